"""Broker restarts (fault suite item 3): a private ``redis-server`` (AOF, ``appendfsync always``,
its own port and directory) is SIGKILLed and restarted twice while a publisher is sending and a
real worker is applying, each time while the worker holds messages it has not acknowledged yet
(the second time after it reconnected from the first outage). The publisher retries (kombu's
connect and publish retry policy, 20 s), the worker reconnects and carries on, the messages that
were in flight at the kill are handed out again once their visibility timeout (15 s here) has
run out: no event is lost, none is applied twice.
"""

from __future__ import annotations

import threading
import time

import kombu.exceptions
import pytest
import redis

from events.publish import close_producer, publish_many
from tests.faults.conftest import (
    audit_clean,
    check_engine,
    entry_count,
    ledger_counts,
    redis_queue_state,
    wait_until,
    workload,
)

pytestmark = [pytest.mark.faults, pytest.mark.postgres]

MESSAGES = 100
BATCH = 100  # 20 instances × (purchase + 4 requests) per message


def taken_since(url: str, since: float) -> int:
    """Messages delivered to a consumer since ``since`` and not acknowledged yet (kombu keeps
    their delivery time in the ``unacked_index`` sorted set)."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return int(client.zcount("unacked_index", since, "+inf"))
    finally:
        client.close()


@pytest.mark.timeout(180)
def test_redis_killed_and_restarted_during_publishing_and_processing(
    pipeline, redis_server, monkeypatch, figures
) -> None:
    monkeypatch.setenv("QUOTA_LEDGER_VISIBILITY_TIMEOUT", "15")
    pipeline.env["QUOTA_LEDGER_VISIBILITY_TIMEOUT"] = "15"
    pipeline.broker_url = redis_server.url
    events = workload("br", MESSAGES * BATCH // 5)
    batches = [events[i : i + BATCH] for i in range(0, len(events), BATCH)]
    engine = check_engine(pipeline.database_url)
    sent = 0
    publish_failures: list[str] = []
    publisher_done = threading.Event()

    def publisher() -> None:
        nonlocal sent
        try:
            for batch in batches:
                while True:
                    try:
                        publish_many(batch, batch_size=BATCH, broker_url=redis_server.url)
                        break
                    except kombu.exceptions.OperationalError as exc:  # retries exhausted
                        publish_failures.append(str(exc))
                        if len(publish_failures) > 5:
                            raise
                sent += 1
                time.sleep(0.15)
        finally:
            publisher_done.set()

    worker = pipeline.worker(concurrency=2)
    thread = threading.Thread(target=publisher, daemon=True)
    outages = []
    try:
        thread.start()
        # First outage: early, with publishing and processing under way.
        wait_until(lambda: entry_count(engine) >= 1000, 60, "processing to start")
        for threshold in (15, 55):
            wait_until(lambda t=threshold: sent >= t, 60, f"{threshold} messages sent")
            # The worker is connected to this Redis (after the first outage: reconnected)…
            connections = len(outages) + 1
            wait_until(
                lambda n=connections: worker.text().count("Connected to") >= n,
                30,
                "the worker to (re)connect",
            )
            connected_at = time.time()
            # …and holds messages it took since (delivered, not yet acknowledged).
            wait_until(
                lambda since=connected_at: taken_since(redis_server.url, since) > 0,
                20,
                "a message in flight",
                step=0.005,
            )
            in_flight = taken_since(redis_server.url, connected_at)
            before = entry_count(engine)
            redis_server.kill()
            down = time.monotonic()
            assert not publisher_done.is_set(), "publishing ended before the outage"
            time.sleep(1.0)
            redis_server.start()
            outages.append(
                {
                    "messages_sent_before": sent,
                    "entries_before": before,
                    "messages_in_flight": in_flight,
                    "seconds_down": round(time.monotonic() - down, 1),
                }
            )
        thread.join(120)
        assert publisher_done.is_set() and sent == MESSAGES, (sent, publish_failures)
        wait_until(lambda: entry_count(engine) >= len(events), 90, "every event in the ledger")
        wait_until(
            lambda: (
                redis_queue_state(redis_server.url)
                == {"queued": 0, "unacked": 0, "delivery_keys": 0}
            ),
            30,
            "an empty queue",
        )
        counts = ledger_counts(engine, "br")
    finally:
        engine.dispose()
        close_producer(redis_server.url)
    log = worker.text()
    assert worker.popen.poll() is None, "the worker died with the broker"
    assert "Unrecoverable error" not in log
    assert counts["entries"] == counts["distinct"] == len(events)
    assert counts["dead_letters"] == 0
    assert counts["numbers"] == len(events) // 5 * 4
    assert log.count("Connection to broker lost") >= 2
    assert sum(o["messages_in_flight"] for o in outages) >= 1
    report = audit_clean(pipeline)
    figures.update(
        events=len(events),
        messages=MESSAGES,
        broker_kills=redis_server.kills,
        outages=outages,
        publisher_retries_exhausted=len(publish_failures),
        entries=counts["entries"],
        events_lost=len(events) - counts["distinct"],
        duplicates=counts["entries"] - counts["distinct"],
        verify_ok=report["ok"],
    )
