"""The resequencer (SPEC §9) under faults, on real worker processes, PostgreSQL and Redis:

- a publish number that never arrives: its successor parks, is listed by ``parked``, and is
  applied once the gap times out with nothing else arriving; the late predecessor is then
  applied on arrival;
- a worker SIGKILLed while it holds a purchase whose requests were published after it, and the
  worker that parked those requests SIGKILLed too: nothing lost, nothing applied twice, every
  request issued once the purchase's message comes back;
- the broker's counters lost mid-stream (a flushed Redis): a new epoch, and nothing parks forever.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis
from sqlalchemy import func, select
from sqlmodel import Session

from events import validate_event
from events.publish import (
    QUEUE_EVENTS,
    SEQUENCE_KEY,
    TASK_APPLY_BATCH,
    close_producer,
    producer_app,
    publish,
    publish_many,
)
from ledger.tables import LedgerEntry, ParkedEvent, ServiceNumberRow
from tests.helpers import wait_until
from tests.helpers.faults import audit_clean, check_engine, kill_group
from tests.support import Events

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.postgres]


@pytest.fixture(autouse=True)
def _close_publishers(redis_url: str):
    yield
    close_producer(redis_url)


def count(engine: Any, query: Any) -> int:
    with Session(engine) as session:
        return int(session.execute(query).scalar_one())


def entries(engine: Any, instance_id: str) -> list[tuple[str, str]]:
    with Session(engine) as session:
        return [
            (event_id, outcome)
            for event_id, outcome in session.execute(
                select(LedgerEntry.event_id, LedgerEntry.outcome)
                .where(LedgerEntry.instance_id == instance_id)
                .order_by(LedgerEntry.instance_seq)
            )
        ]


def send_numbered(broker_url: str, event: dict[str, Any], epoch: int, n: int) -> None:
    """A message carrying an explicit publish number, as a publisher in another language
    would send it (Celery's own send_task, the sequence in the keyword arguments)."""
    payload = validate_event(event).model_dump(mode="json")
    producer_app(broker_url).send_task(
        TASK_APPLY_BATCH,
        args=[[payload]],
        kwargs={"sequence": {"epoch": epoch, "numbers": [[event["instance_id"], n]]}},
        queue=QUEUE_EVENTS,
        routing_key=QUEUE_EVENTS,
    )


@pytest.mark.timeout(180)
def test_a_number_that_never_arrives_times_out_and_arrives_late(pipeline) -> None:
    gap_timeout = 12  # long enough for the CLI calls below, each a Python start-up
    pipeline.env["QUOTA_LEDGER_GAP_TIMEOUT"] = str(gap_timeout)
    pipeline.worker(concurrency=2)
    engine = check_engine(pipeline.database_url)
    client = redis.Redis.from_url(pipeline.broker_url)
    ev = Events("gap")
    try:
        publish(ev.purchase("i-gap"), broker_url=pipeline.broker_url)  # number 1
        wait_until(lambda: len(entries(engine, "i-gap")) == 1, 30, "the purchase")
        client.hincrby(SEQUENCE_KEY, "i-gap", 1)  # number 2 is never published
        epoch = int(client.hget(SEQUENCE_KEY, "~epoch"))
        request = ev.request("i-gap", at=1)
        publish(request, broker_url=pipeline.broker_url)  # number 3
        parked_at = time.monotonic()

        def parked_rows() -> list[dict[str, Any]]:
            proc = pipeline.cli("parked", "--json")
            assert proc.returncode == 0, proc.stderr
            return json.loads(proc.stdout)

        wait_until(lambda: parked_rows() != [], 30, "the request to park")
        (row,) = parked_rows()
        assert (row["instance_id"], row["epoch"], row["n"], row["waiting_for"]) == (
            "i-gap",
            epoch,
            3,
            2,
        )
        assert row["event_id"] == request["event_id"]
        show = json.loads(pipeline.cli("show", "i-gap", "--json").stdout)
        assert show["parked"] == 1

        # Nothing else arrives: the gap times out and every worker looks every 5 s at most.
        wait_until(lambda: len(entries(engine, "i-gap")) == 2, gap_timeout + 30, "the request")
        waited = time.monotonic() - parked_at
        assert waited >= gap_timeout - 0.5, f"applied after {waited:.1f}s, before the timeout"
        assert entries(engine, "i-gap")[1] == (request["event_id"], "applied")
        assert parked_rows() == []

        # Number 2 turns up after all: applied on arrival, after the request.
        late = ev.bandwidth("i-gap", 20, at=0.5)
        send_numbered(pipeline.broker_url, late, epoch, 2)
        wait_until(lambda: len(entries(engine, "i-gap")) == 3, 30, "the late predecessor")
        assert entries(engine, "i-gap")[2] == (late["event_id"], "applied")
    finally:
        client.close()
        engine.dispose()


@pytest.mark.timeout(300)
def test_killed_workers_holding_a_purchase_and_its_parked_requests_lose_nothing(
    pipeline, monkeypatch
) -> None:
    # Short visibility timeout (workers and this publisher): the held purchase comes back soon.
    # The gap timeout is long on purpose: the requests must wait for the purchase, not skip it.
    pipeline.env.update(QUOTA_LEDGER_VISIBILITY_TIMEOUT="5", QUOTA_LEDGER_GAP_TIMEOUT="200")
    monkeypatch.setenv("QUOTA_LEDGER_VISIBILITY_TIMEOUT", "5")
    ev = Events("kill")
    purchase = ev.purchase("i-kill", event_id="poison-slow-purchase")
    requests = [ev.request("i-kill", at=n) for n in range(1, 5)]
    engine = check_engine(pipeline.database_url)
    try:
        # Worker A takes the purchase and holds it (the poison worker sleeps on poison-slow).
        holder = pipeline.worker("holder", concurrency=1, module="tests.integration.poison_worker")
        publish(purchase, broker_url=pipeline.broker_url)
        holder.wait_for_log("holding poison-slow-purchase", timeout=30)
        # Worker B takes the requests, published after the purchase: they park behind it.
        parker = pipeline.worker("parker", concurrency=2)
        for request in requests:
            publish(request, broker_url=pipeline.broker_url)
        wait_until(
            lambda: count(engine, select(func.count()).select_from(ParkedEvent)) == 4,
            30,
            "four parked requests",
        )
        assert entries(engine, "i-kill") == []
        # Both die without a warm shutdown: B while its events are parked, A holding the purchase.
        kill_group(parker.popen.pid)
        kill_group(holder.popen.pid)
        killed_at = time.monotonic()

        pipeline.worker("replacement", concurrency=2)
        wait_until(lambda: len(entries(engine, "i-kill")) == 5, 120, "all five entries")
        recovered = time.monotonic() - killed_at
        numbers = count(
            engine,
            select(func.count())
            .select_from(ServiceNumberRow)
            .where(ServiceNumberRow.instance_id == "i-kill"),
        )
        rows = entries(engine, "i-kill")
    finally:
        engine.dispose()
    # The purchase first, then every request in publish order, each issued a number once.
    assert rows == [(purchase["event_id"], "applied")] + [
        (request["event_id"], "applied") for request in requests
    ]
    assert numbers == 4
    assert recovered < 60, f"recovery took {recovered:.0f}s"
    report = audit_clean(pipeline)
    assert report["ok"]


@pytest.mark.timeout(240)
def test_lost_broker_counters_start_a_new_epoch_and_nothing_parks_forever(pipeline) -> None:
    # The gap timeout is long: what releases the parked events here is the new epoch.
    pipeline.env["QUOTA_LEDGER_GAP_TIMEOUT"] = "600"
    pipeline.worker(concurrency=2)
    engine = check_engine(pipeline.database_url)
    client = redis.Redis.from_url(pipeline.broker_url)
    ev = Events("flush")
    instances = [f"i-flush-{n}" for n in range(50)]
    try:
        publish_many(
            [ev.purchase(iid) for iid in instances], batch_size=10, broker_url=pipeline.broker_url
        )
        for iid in instances[:10]:  # a number lost in the old epoch: its successors park
            client.hincrby(SEQUENCE_KEY, iid, 1)
        first = [ev.request(iid, at=1) for iid in instances]
        publish_many(first, batch_size=1, broker_url=pipeline.broker_url)
        wait_until(
            lambda: count(engine, select(func.count()).select_from(ParkedEvent)) == 10,
            60,
            "ten parked requests",
        )
        old_epoch = int(client.hget(SEQUENCE_KEY, "~epoch"))
        client.delete(SEQUENCE_KEY)  # the broker lost its data: epoch and counters together
        second = [ev.request(iid, at=2) for iid in instances]
        publish_many(second, batch_size=1, broker_url=pipeline.broker_url)
        assert int(client.hget(SEQUENCE_KEY, "~epoch")) > old_epoch
        total = len(instances) * 3
        wait_until(
            lambda: count(engine, select(func.count()).select_from(LedgerEntry)) == total,
            90,
            f"{total} entries",
        )
        assert count(engine, select(func.count()).select_from(ParkedEvent)) == 0
        # Per instance: purchase, then the first request, then the second.
        for iid in instances:
            assert [e for e, _ in entries(engine, iid)][1:] == [
                r["event_id"] for r in (first + second) if r["instance_id"] == iid
            ]
    finally:
        client.close()
        engine.dispose()
    assert audit_clean(pipeline)["ok"]
