"""Network faults between the workers and their servers (``tests/faults/proxy.py``, loopback
only): a real worker reaches PostgreSQL and Redis only through a TCP proxy that stalls, cuts
(FIN) and resets (RST) its connections

- to PostgreSQL while a transaction is open (a batch half written),
- to Redis while the worker waits on an empty queue (its blocking ``BLMOVE``:
  worker/transport.py), and while it is busy (messages delivered and not acknowledged yet).

The pipeline recovers by itself: dead connections are replaced (SQLAlchemy's pre-ping, kombu's
reconnect), the transactions that broke are retried, messages whose ack was lost come back after
their visibility timeout (15 s here). Nothing is lost, nothing applied twice, audit clean.
"""

from __future__ import annotations

import re
import time
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from sqlalchemy import text

from events.publish import close_producer, publish_many
from tests.faults.proxy import FaultProxy
from tests.helpers import wait_until
from tests.helpers.faults import (
    audit_clean,
    check_engine,
    database_name,
    entry_count,
    ledger_counts,
    settled_count,
    workload,
)

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.postgres]

OPEN_TRANSACTIONS = text(
    "SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND xact_start IS NOT NULL"
    " AND backend_type = 'client backend' AND application_name <> 'quota-ledger-fault-check'"
    " AND pid <> pg_backend_pid()"
)


def through(url: str, proxy: FaultProxy) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{proxy.port}"))


@pytest.fixture
def proxies(pipeline):
    pg = FaultProxy(urlsplit(pipeline.database_url).port or 5432)
    broker = FaultProxy(urlsplit(pipeline.broker_url).port or 6379)
    yield pg, broker
    pg.close()
    broker.close()


@pytest.mark.timeout(300)
def test_stalled_cut_and_reset_connections_lose_and_duplicate_nothing(
    pipeline, proxies, pg_admin, figures
) -> None:
    pg, broker = proxies
    pipeline.env.update(QUOTA_LEDGER_VISIBILITY_TIMEOUT="15", QUOTA_LEDGER_RETRY_BACKOFF_MAX="4")
    worker = pipeline.worker(
        concurrency=2,
        env={
            "QUOTA_LEDGER_DATABASE_URL": through(pipeline.database_url, pg),
            "QUOTA_LEDGER_BROKER_URL": through(pipeline.broker_url, broker),
        },
    )
    engine = check_engine(pipeline.database_url)
    database = database_name(pipeline.database_url)
    index = int(urlsplit(pipeline.broker_url).path.lstrip("/") or 0)
    client = redis.Redis.from_url(pipeline.broker_url, socket_timeout=5)
    rounds = [workload(f"nf{n}", 800) for n in range(3)]  # 3 × 4,000 events, messages of 100
    total = sum(len(r) for r in rounds)

    def publish(events: list[dict]) -> None:
        publish_many(events, batch_size=100, broker_url=pipeline.broker_url)

    def transaction_open() -> bool:
        with pg_admin.connect() as conn:
            return conn.execute(OPEN_TRANSACTIONS, {"db": database}).scalar_one() > 0

    def waiting() -> bool:
        """The worker is blocked in its wait for a message (worker/transport.py)."""
        return any(
            c.get("cmd") == "blmove" and int(c.get("db", -1)) == index for c in client.client_list()
        )

    def applied(n: int) -> bool:
        return entry_count(engine) >= n

    hits: dict[str, int] = {}
    try:
        # 1. PostgreSQL: reset, cut and stall, each while a worker transaction is open.
        publish(rounds[0])
        for kind in ("reset", "cut", "stall"):
            wait_until(transaction_open, 30, "a transaction in flight", step=0.002)
            hits[f"postgres_{kind}"] = pg.stall(5) if kind == "stall" else getattr(pg, kind)()
            time.sleep(0.5)
        wait_until(lambda: applied(len(rounds[0])), 90, "round 1 in the ledger")

        # 2. Redis, idle: the worker waits on the empty queue; reset that connection.
        wait_until(waiting, 30, "the worker blocked in its wait")
        hits["redis_reset_in_wait"] = broker.reset()
        time.sleep(1.0)
        # Busy: messages delivered and unacknowledged; cut, then stall.
        publish(rounds[1])
        for kind in ("cut", "stall"):
            wait_until(lambda: client.hlen("unacked") > 0, 30, "messages in flight", step=0.002)
            hits[f"redis_{kind}_busy"] = broker.stall(5) if kind == "stall" else broker.cut()
            time.sleep(1.0)
        wait_until(lambda: applied(len(rounds[0]) + len(rounds[1])), 90, "round 2 in the ledger")

        # 3. Redis stalled for 10 s while the worker waits; events arrive meanwhile.
        wait_until(waiting, 30, "the worker blocked in its wait")
        hits["redis_stall_in_wait"] = broker.stall(10)
        publish(rounds[2])
        wait_until(lambda: applied(total), 120, "every event in the ledger")
        settled_count(engine, pipeline.broker_url, 60)
        counts = ledger_counts(engine)
    finally:
        engine.dispose()
        client.close()
        close_producer(pipeline.broker_url)
    log = worker.text()
    assert worker.popen.poll() is None, "the worker died"
    assert "Unrecoverable error" not in log
    assert all(n >= 1 for n in hits.values()), hits  # every fault hit a live connection
    assert counts["entries"] == counts["distinct"] == total
    assert counts["dead_letters"] == 0
    assert counts["numbers"] == total // 5 * 4
    report = audit_clean(pipeline)
    figures.update(
        events=total,
        connections_hit=hits,
        postgres_connections_opened=pg.accepted,
        redis_connections_opened=broker.accepted,
        retries_logged=len(re.findall(r"retrying batch after|transient error, retry", log)),
        broker_reconnects=log.count("Connection to broker lost"),
        entries=counts["entries"],
        events_lost=total - counts["distinct"],
        duplicates=counts["entries"] - counts["distinct"],
        verify_ok=report["ok"],
    )
