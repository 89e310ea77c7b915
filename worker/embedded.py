"""An embedded broker and worker: the real queue without any server to install.

:func:`embedded_pipeline` starts an in-process Redis (``fakeredis.TcpFakeServer``; its Lua
support runs kombu's scripts) on a free local port and a real Celery worker on it (a thread,
solo pool, the production ``worker.celery_app`` configuration and ``worker.tasks``), applying
to the engine it is given. :meth:`EmbeddedPipeline.apply_lines` sends JSONL lines down the one
ingest path (:func:`worker.ingest.ingest`) and waits until the worker has put every event in
the ledger. ``quota-ledger demo`` runs on it; the production worker does not use this module.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from events import EventRejection, canonical_payload, parse_event
from ledger.policy import Policy
from ledger.results import ApplyResult, entry_service_number, invalid_result
from ledger.service import Ledger
from ledger.settings import Settings
from ledger.tables import DeadLetter, LedgerEntry
from worker import bootstrap
from worker.ingest import enqueue_to, ingest

__all__ = ["EmbeddedPipeline", "embedded_pipeline", "fake_redis_server"]

_IN_CHUNK = 500


@contextmanager
def fake_redis_server(host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """A fakeredis TCP server (on a free port by default) for the duration; yields its
    ``redis://`` URL."""
    from fakeredis import TcpFakeServer

    server = TcpFakeServer((host, port), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, name="fakeredis", daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        yield f"redis://{host}:{port}/0"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@dataclass
class EmbeddedPipeline:
    broker_url: str
    engine: Engine
    ledger: Ledger

    def apply_lines(self, lines: Iterable[str], *, timeout: float = 60.0) -> list[ApplyResult]:
        """``Ledger.apply_lines``, but through the queue: one result per non-blank line.

        The lines go the way ``quota-ledger publish`` sends them (``worker.ingest``): the valid
        ones are enqueued and applied by the worker, the invalid ones dead-lettered here. The
        answers are then read back from the ledger: the entry of each event, ``duplicate`` for
        a repeated event id with the same content, the ``event_id_reused`` dead letter for one
        with other content.
        """
        parsed = [parse_event(line) for line in lines if line.strip()]
        done = ingest(parsed, enqueue=enqueue_to(self.broker_url), dead_letter=self.ledger.apply)
        events = done.queued
        refused = iter(answer for answer in done.answers if answer.outcome == "invalid")
        if events:
            self.wait_for_events([event.event_id for event in events], timeout=timeout)
        known = self._entries([event.event_id for event in events])
        letters = self._dead_letters([event.event_id for event in events])
        results: list[ApplyResult] = []
        first: dict[str, tuple[str, ApplyResult]] = {}
        for item in parsed:
            if isinstance(item, EventRejection):
                results.append(next(refused))
                continue
            payload = canonical_payload(item)
            if item.event_id in first:
                seen_payload, seen = first[item.event_id]
                if seen_payload == payload:
                    results.append(
                        ApplyResult(item.event_id, "duplicate", seen.reasons, seen.service_number)
                    )
                else:
                    results.append(_refusal(letters, item.event_id, "event_id_reused"))
                continue
            if item.event_id not in known:  # refused by the worker (processing_error)
                answer = _refusal(letters, item.event_id, "processing_error")
            elif known[item.event_id][1] != payload:  # recorded before with other content
                answer = _refusal(letters, item.event_id, "event_id_reused")
            else:
                type_, stored, outcome, reasons, result = known[item.event_id]
                number = entry_service_number(type_, stored, dict(result or {}))
                answer = ApplyResult(item.event_id, outcome, tuple(reasons or ()), number)
            first[item.event_id] = (payload, answer)
            results.append(answer)
        return results

    def wait_for_events(self, event_ids: Sequence[str], *, timeout: float = 60.0) -> None:
        """Block until every id in ``event_ids`` has a ledger entry or a dead letter (or raise
        TimeoutError)."""
        wanted = sorted(set(event_ids))
        deadline = time.monotonic() + timeout
        while True:
            done: set[str] = set()
            with Session(self.engine) as session:
                for start in range(0, len(wanted), _IN_CHUNK):
                    chunk = wanted[start : start + _IN_CHUNK]
                    for table in (LedgerEntry, DeadLetter):
                        done.update(
                            session.execute(
                                select(table.event_id).where(table.event_id.in_(chunk))  # type: ignore[union-attr,attr-defined]
                            ).scalars()
                        )
            found = len(done)
            if found >= len(wanted):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {found} of {len(wanted)} events reached the ledger in {timeout:g}s"
                )
            time.sleep(0.05)

    def _entries(self, event_ids: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        rows: dict[str, tuple[Any, ...]] = {}
        wanted = sorted(set(event_ids))
        with Session(self.engine) as session:
            for start in range(0, len(wanted), _IN_CHUNK):
                query = select(
                    LedgerEntry.event_id,
                    LedgerEntry.type,
                    LedgerEntry.payload,
                    LedgerEntry.outcome,
                    LedgerEntry.reasons,
                    LedgerEntry.result,
                ).where(LedgerEntry.event_id.in_(wanted[start : start + _IN_CHUNK]))  # type: ignore[attr-defined]
                for event_id, *rest in session.execute(query):
                    rows[event_id] = tuple(rest)
        return rows

    def _dead_letters(self, event_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """The latest dead letter ``(code, error)`` of each of ``event_ids`` that has one."""
        found: dict[str, tuple[str, str]] = {}
        wanted = sorted(set(event_ids))
        with Session(self.engine) as session:
            for start in range(0, len(wanted), _IN_CHUNK):
                query = (
                    select(DeadLetter.event_id, DeadLetter.code, DeadLetter.error)
                    .where(DeadLetter.event_id.in_(wanted[start : start + _IN_CHUNK]))  # type: ignore[union-attr]
                    .order_by(DeadLetter.id)
                )
                for event_id, code, error in session.execute(query):
                    found[event_id] = (code, error)
        return found


def _refusal(letters: dict[str, tuple[str, str]], event_id: str, code: str) -> ApplyResult:
    stored_code, error = letters.get(
        event_id, (code, f"event_id {event_id!r} is already recorded with other content")
    )
    return invalid_result(stored_code, error, event_id)


@contextmanager
def embedded_pipeline(
    engine: Engine, policy: Policy, *, loglevel: str = "WARNING"
) -> Iterator[EmbeddedPipeline]:
    """A fakeredis broker plus a Celery worker thread applying to ``engine`` with ``policy``."""
    from celery.contrib.testing.worker import start_worker

    from events.publish import close_producer
    from worker import tasks
    from worker.celery_app import create_app
    from worker.gaps import GapChecker

    database_url = engine.url.render_as_string(hide_password=False)
    with fake_redis_server() as broker_url:
        settings = Settings(database_url=database_url, broker_url=broker_url)
        app = create_app(settings, policy=policy, engine=engine)
        app.conf.update(
            # An embedded worker leaves the host process's logging alone and needs no remote
            # control (pidbox) to be driven.
            worker_hijack_root_logger=False,
            worker_enable_remote_control=False,
        )
        previous = logging.getLogger("celery").level
        logging.getLogger("celery").setLevel(loglevel)
        try:
            checker = GapChecker(app, settings.gap_check_interval)
            with start_worker(
                app,
                pool="solo",
                concurrency=1,
                perform_ping_check=False,
                loglevel=loglevel,
                shutdown_timeout=30,
            ):
                # The test worker sends no worker_ready: start the resequencer's clock here.
                checker.start()
                try:
                    ledger = bootstrap.build_ledger(settings, engine, policy)
                    yield EmbeddedPipeline(broker_url, engine, ledger)
                finally:
                    checker.stop()
                    checker.join(10)
        finally:
            logging.getLogger("celery").setLevel(previous)
            tasks.dispose_runtimes()
            close_producer(broker_url)
