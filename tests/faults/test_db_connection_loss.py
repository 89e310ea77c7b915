"""Database connection loss (fault suite item 4), on a real worker and PostgreSQL.

1. Flapping: while the worker applies 15,000 events, ``pg_terminate_backend`` kills every
   connection it holds on the test database, every 0.2 s (idle ones, and ones in the middle of a
   transaction or of its COMMIT). ``Ledger.apply`` retries the transaction on a new connection.
2. Outage: 5,000 more events, and the database refuses every connection for 10 s
   (``ALLOW_CONNECTIONS false`` + terminate), longer than ``Ledger.apply``'s own retries: the
   tasks go back to Celery, which retries them with backoff until the database is back.

Nothing is lost; a COMMIT that went through although its answer was lost is found again as
``duplicate``s, so nothing is applied twice.
"""

from __future__ import annotations

import re
import threading
import time

import pytest
from sqlalchemy import text

from events.publish import close_producer, publish_many
from tests.helpers import wait_until
from tests.helpers.faults import (
    audit_clean,
    check_engine,
    database_name,
    entry_count,
    ledger_counts,
    redis_queue_state,
    workload,
)

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.postgres]

TERMINATE = text(
    "SELECT pg_terminate_backend(pid), xact_start IS NOT NULL FROM pg_stat_activity"
    " WHERE datname = :db AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    " AND application_name <> 'quota-ledger-fault-check'"
)


@pytest.fixture(autouse=True)
def _close_publishers(redis_url: str):
    yield
    close_producer(redis_url)


@pytest.mark.timeout(150)
def test_terminated_database_connections_lose_and_duplicate_nothing(
    pipeline, pg_admin, figures
) -> None:
    # Celery's retry backoff capped at 4 s (instead of 60) keeps the run short.
    pipeline.env["QUOTA_LEDGER_RETRY_BACKOFF_MAX"] = "4"
    worker = pipeline.worker(concurrency=2)
    events = workload("db", 3000)  # 15,000 events in 150 messages of 100
    engine = check_engine(pipeline.database_url)
    database = database_name(pipeline.database_url)
    stop = threading.Event()
    rounds: list[tuple[int, int]] = []  # (connections terminated, of which in a transaction)

    def killer() -> None:
        deadline = time.monotonic() + 12
        while not stop.is_set() and time.monotonic() < deadline:
            with pg_admin.connect() as conn:
                rows = conn.execute(TERMINATE, {"db": database}).all()
            if rows:
                rounds.append((len(rows), sum(1 for _, busy in rows if busy)))
            stop.wait(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    try:
        publish_many(events, batch_size=100, broker_url=pipeline.broker_url)
        wait_until(lambda: entry_count(engine) >= 100, 30, "processing to start")
        thread.start()
        wait_until(lambda: entry_count(engine) >= len(events), 120, "every event in the ledger")
        stop.set()
        thread.join(10)

        # Phase 2: the database refuses connections for longer than the in-ledger retries.
        outage = workload("dx", 1000)
        events += outage
        publish_many(outage, batch_size=100, broker_url=pipeline.broker_url)
        with pg_admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
            try:
                refused = conn.execute(TERMINATE, {"db": database}).all()
                time.sleep(10)
            finally:
                conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
        wait_until(lambda: entry_count(engine) >= len(events), 120, "every event in the ledger")
        wait_until(
            lambda: (
                redis_queue_state(pipeline.broker_url)
                == {"queued": 0, "unacked": 0, "delivery_keys": 0}
            ),
            60,
            "an empty queue",
        )
        counts = ledger_counts(engine)
    finally:
        stop.set()
        engine.dispose()
    log = worker.text()
    terminated = sum(n for n, _ in rounds)
    mid_transaction = sum(busy for _, busy in rounds)
    ledger_retries = len(re.findall(r"retrying batch after", log))
    celery_retries = len(re.findall(r"transient error, retry", log))
    assert len(rounds) >= 5 and mid_transaction >= 1, rounds
    assert ledger_retries >= 1 and celery_retries >= 1
    assert counts["entries"] == counts["distinct"] == len(events)
    assert counts["dead_letters"] == 0
    assert counts["numbers"] == 4000 * 4
    report = audit_clean(pipeline)
    figures.update(
        events=len(events),
        messages=200,
        termination_rounds=len(rounds),
        connections_terminated=terminated + len(refused),
        outage_seconds=10,
        terminated_mid_transaction=mid_transaction,
        transaction_retries_in_ledger=ledger_retries,
        celery_retries=celery_retries,
        entries=counts["entries"],
        events_lost=len(events) - counts["distinct"],
        duplicates=counts["entries"] - counts["distinct"],
        verify_ok=report["ok"],
    )
