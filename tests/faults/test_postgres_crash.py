"""A real PostgreSQL crash: the postmaster of a cluster of the test's own (``pg_server``: initdb
in a temporary directory, a free port; the shared server is never touched) is SIGKILLed in the
middle of a 20,000-event run through ``publish`` and two real workers, and started again.

The backends notice their postmaster is gone and exit, the transactions in flight are lost (or,
for a COMMIT whose answer was lost, kept), and the next start runs crash recovery from the WAL.
The workers are not restarted: their tasks fail with connection errors, ``Ledger.apply`` and
then Celery retry them (backoff capped at 4 s here), SQLAlchemy's pre-ping replaces the dead
pooled connections, and the run completes: 0 events lost, 0 applied twice (a batch committed
just before the crash is answered ``duplicate`` when it is retried), ``verify`` and ``rebuild
--check`` clean.
"""

from __future__ import annotations

import re
import time

import pytest
from sqlalchemy import text

from events.publish import close_producer, publish_many
from tests.helpers import wait_until
from tests.helpers.faults import (
    audit_clean,
    check_engine,
    entry_count,
    ledger_counts,
    wait_for_an_empty_queue,
    workload,
)

pytestmark = [pytest.mark.faults, pytest.mark.redis]

OPEN_TRANSACTIONS = text(
    "SELECT count(*) FROM pg_stat_activity WHERE datname = 'ledger'"
    " AND xact_start IS NOT NULL AND pid <> pg_backend_pid()"
    " AND application_name <> 'quota-ledger-fault-check'"
)


@pytest.mark.timeout(300)
def test_postgres_killed_mid_run_and_restarted_loses_and_duplicates_nothing(
    private_pipeline, pg_server, figures
) -> None:
    pipe = private_pipeline
    pipe.env["QUOTA_LEDGER_RETRY_BACKOFF_MAX"] = "4"
    events = workload("pg", 4000)  # 20,000 events in 80 messages of 250
    engine = check_engine(pipe.database_url)
    try:
        workers = [pipe.worker(f"worker-{n}", concurrency=1) for n in (1, 2)]
        publish_many(events, batch_size=250, broker_url=pipe.broker_url)
        wait_until(lambda: entry_count(engine) >= 4000, 60, "a fifth of the run")
        # Kill while a worker's transaction is open (a batch half written).
        open_transactions = 0

        def a_transaction_is_open() -> bool:
            nonlocal open_transactions
            with engine.connect() as conn:
                open_transactions = conn.execute(OPEN_TRANSACTIONS).scalar_one()
            return open_transactions > 0

        wait_until(a_transaction_is_open, 30, "a worker inside a transaction", step=0.005)
        pg_server.kill()
        engine.dispose()
        down = time.monotonic()
        time.sleep(2.0)
        pg_server.start()
        seconds_down = time.monotonic() - down
        wait_until(lambda: entry_count(engine) >= len(events), 180, "every event in the ledger")
        recovered = time.monotonic() - down
        wait_for_an_empty_queue(pipe.broker_url, 60)
        counts = ledger_counts(engine, "pg")
    finally:
        engine.dispose()
        close_producer(pipe.broker_url)
    logs = [worker.text() for worker in workers]
    for worker, log in zip(workers, logs, strict=True):
        assert worker.popen.poll() is None, f"{worker.name} died with the database"
        assert "Unrecoverable error" not in log
    assert counts["entries"] == counts["distinct"] == len(events)
    assert counts["dead_letters"] == 0
    assert counts["numbers"] == 4000 * 4
    retries = sum(
        len(re.findall(r"retrying batch after|transient error, retry", log)) for log in logs
    )
    assert retries >= 1, "no worker noticed the crash"
    report = audit_clean(pipe)
    figures.update(
        events=len(events),
        messages=80,
        workers=2,
        transactions_open_just_before_kill=open_transactions,
        postmaster_kills=pg_server.kills,
        seconds_down=round(seconds_down, 1),
        seconds_from_kill_to_all_applied=round(recovered, 1),
        retries_logged=retries,
        entries=counts["entries"],
        events_lost=len(events) - counts["distinct"],
        duplicates=counts["entries"] - counts["distinct"],
        verify_ok=report["ok"],
    )
