"""The resequencer's clock (SPEC §9): every running worker looks for timed-out gaps.

A gap in an instance's publish numbers is skipped once it has stayed open for the gap timeout,
even if nothing else ever arrives for that instance; so something must look without an arrival.
Each ``quota-ledger worker`` (and the embedded demo's) runs one daemon thread in its main process
that calls :meth:`ledger.service.Ledger.release_due` every ``QUOTA_LEDGER_GAP_CHECK_INTERVAL``
seconds (5 at most), and refreshes the parked-events gauges. No beat is needed, and several
workers checking at once is harmless: each instance is handled under its lock, and the second
finds nothing left to do.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown
from sqlmodel import Session

from ledger.clock import utcnow
from ledger.store.parking import parked_summary
from worker.metrics import record_parked

log = logging.getLogger(__name__)

__all__ = ["GapChecker", "check_once"]

_checkers: dict[int, GapChecker] = {}
_checkers_lock = threading.Lock()


def check_once(app: Any) -> int:
    """One look: release what is due, then measure what stays parked. Returns the number of
    instances whose gates were worked on."""
    from worker.tasks import runtime_for  # the tasks module registers the tasks on import

    runtime = runtime_for(app)
    handled = runtime.ledger.release_due()
    with Session(runtime.engine) as session:
        count, oldest = parked_summary(session.connection())
    age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
    record_parked(count, max(age, 0.0))
    return handled


class GapChecker(threading.Thread):
    """Calls :func:`check_once` every ``interval`` seconds until stopped."""

    def __init__(self, app: Any, interval: float) -> None:
        super().__init__(name="quota-ledger-gap-check", daemon=True)
        self.app = app
        self.interval = interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                check_once(self.app)
            except Exception:  # the database may be down for a while: try again next time
                log.warning("gap check failed; retrying in %ss", self.interval, exc_info=True)

    def stop(self) -> None:
        self.stopped.set()


@worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None:
        return
    settings = getattr(app, "ledger_settings", None)
    if settings is None:
        from ledger.settings import get_settings

        settings = get_settings()
    with _checkers_lock:
        if id(app) in _checkers:
            return
        checker = GapChecker(app, settings.gap_check_interval)
        _checkers[id(app)] = checker
    checker.start()
    timeout = settings.gap_timeout_seconds
    log.info("gap check every %ss (gap timeout %ss)", checker.interval, timeout)


@worker_shutdown.connect
def _stop(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    with _checkers_lock:
        checker = _checkers.pop(id(app), None) if app is not None else None
    if checker is not None:
        checker.stop()
