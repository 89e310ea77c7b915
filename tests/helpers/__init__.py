"""Plain helpers shared by the test suites (no fixtures: those live in the ``conftest.py`` files).

``tests.helpers``                 ``wait_until`` and ``free_port``, used everywhere.
``tests.helpers.redis_db``        a private database index on the machine's Redis.
``tests.helpers.pipeline``        real ``quota-ledger`` processes on a database and a broker.
``tests.helpers.ledger_harness``  a ledger service with the reads the contract tests need.
``tests.helpers.api``             tokens, the HTTP scenario, live and ``serve`` servers.
``tests.helpers.faults``          processes, private Redis/PostgreSQL servers, workloads, checks.

Events, deterministic service numbers and the in-memory ledger are in ``tests.support``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

__all__ = ["free_port", "wait_until"]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.1) -> None:
    """Poll ``predicate`` every ``step`` seconds; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
