"""The distributed pipeline end to end: real ``quota-ledger worker`` / ``beat`` processes on the
machine's Redis and PostgreSQL, events published with ``events.publish`` or ``quota-ledger
publish``."""

from __future__ import annotations

import ast
import json
import re
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from events.publish import (
    QUEUE_EVENTS,
    QUEUE_SWEEP,
    TASK_SWEEP,
    close_producer,
    producer_app,
    publish_many,
)
from ledger.audit import verify
from ledger.db import make_engine
from ledger.policy import load_policy
from ledger.queries import show_instance
from ledger.tables import DeadLetter, LedgerEntry, ServiceNumberRow
from tests.helpers import wait_until
from tests.support import Events

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[2]
POLICY = load_policy()


def count(engine: Engine, stmt: Any) -> int:
    with Session(engine) as session:
        return int(session.execute(stmt).scalar_one())


def entries_for(engine: Engine, event_ids: list[str]) -> int:
    return count(
        engine,
        select(func.count()).select_from(LedgerEntry).where(LedgerEntry.event_id.in_(event_ids)),
    )


@pytest.fixture
def engine(pipeline) -> Any:
    eng = make_engine(pipeline.database_url)
    yield eng
    eng.dispose()


@pytest.fixture(autouse=True)
def _close_publishers(redis_url: str):
    yield
    close_producer(redis_url)


# --- caps under concurrency ----------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_caps_hold_with_interleaved_requests_on_four_processes(pipeline, engine) -> None:
    pipeline.worker(concurrency=4)
    factory = Events("cap")
    instances = [f"i-cap-{n:02d}" for n in range(40)]
    purchases = [factory.purchase(i) for i in instances]
    publish_many(purchases, batch_size=10, broker_url=pipeline.broker_url)
    purchase_ids = [p["event_id"] for p in purchases]
    wait_until(lambda: entries_for(engine, purchase_ids) == 40, 30, "the purchases")

    # Round robin: each message carries 8 requests of 8 different instances, and each
    # instance's 8 requests are spread over 8 messages that four processes apply at once.
    requests = [
        factory.request(instance, at=10 + k / 100) for k in range(8) for instance in instances
    ]
    publish_many(requests, batch_size=8, broker_url=pipeline.broker_url)
    request_ids = [r["event_id"] for r in requests]
    wait_until(lambda: entries_for(engine, request_ids) == 320, 60, "320 requests")

    with Session(engine) as session:
        outcomes = session.execute(
            select(LedgerEntry.instance_id, LedgerEntry.outcome, LedgerEntry.reasons).where(
                LedgerEntry.type == "service_number.requested"
            )
        ).all()
        numbers = Counter(session.execute(select(ServiceNumberRow.instance_id)).scalars().all())
        views = [
            show_instance(
                session, instance_id=i, at=datetime(2026, 2, 1, tzinfo=UTC), policy=POLICY
            )
            for i in instances
        ]
    per_instance: dict[str, Counter] = {}
    for instance_id, outcome, reasons in outcomes:
        per_instance.setdefault(instance_id, Counter())[(outcome, tuple(reasons or ()))] += 1
    for instance_id in instances:
        assert per_instance[instance_id] == {
            ("applied", ()): 5,
            ("rejected", ("website_limit_reached",)): 3,
        }, instance_id
        assert numbers[instance_id] == 5
    for view in views:
        assert view["websites"] == {"cap": 5, "used": 0, "reserved": 5, "remaining": 0}
    assert verify(engine).to_json()["ok"] is True


# --- publish + worker versus apply -----------------------------------------------------------


def _normalise(view: dict[str, Any]) -> dict[str, Any]:
    """The random service numbers become N1, N2, … in issue order; the head hash (which covers
    them) is dropped."""
    names = {sn["number"]: f"N{k}" for k, sn in enumerate(view["service_numbers"], 1)}
    out = json.loads(json.dumps(view))
    out.pop("head_hash")
    for sn in out["service_numbers"]:
        sn["number"] = names[sn["number"]]
    return out


def _scenario(tmp: Path) -> tuple[Path, list[str]]:
    factory = Events("same")
    lines = (REPO / "examples" / "demo.jsonl").read_text(encoding="utf-8").splitlines()
    for n in range(12):
        instance = f"i-same-{n}"
        product = ("ecs", "nat_gateway", "web_hosting", "marketplace")[n % 4]
        events = [
            factory.purchase(
                instance, product, term=(1, 3, 6, 12)[n % 4], expires=(31, 90, 181, 365)[n % 4]
            )
        ]
        events += [factory.request(instance, at=2 + k) for k in range(7)]
        if n % 3 == 0:
            events.append(factory.bandwidth(instance, 0, at=5.5))
        if n % 5 == 0:
            events.append(factory.release(instance, at=6.5))
        lines += [json.dumps(e) for e in events]
    lines[5:5] = ["this is not json", ""]
    lines.append(json.dumps({**factory.request("i-same-1"), "occurred_at": "2026-01-05T00:00:00"}))
    lines.append(lines[0])  # a duplicate of the first purchase
    path = tmp / "scenario.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    instance_ids = sorted(
        {
            json.loads(line)["instance_id"]
            for line in lines
            if line.startswith("{") and "instance_id" in line
        }
    )
    return path, instance_ids


@pytest.mark.timeout(90)
def test_publish_through_the_worker_equals_apply(pipeline, engine, sqlite_url, tmp_path) -> None:
    pipeline.worker(concurrency=4)
    path, instance_ids = _scenario(tmp_path)

    published = pipeline.cli("publish", str(path), "--json")
    assert published.returncode == 1, published.stderr  # two invalid lines
    queued = [json.loads(line) for line in published.stdout.splitlines()]
    applied_proc = pipeline.cli("apply", str(path), "--json", "--db", sqlite_url)
    assert applied_proc.returncode == 1, applied_proc.stderr
    applied = [json.loads(line) for line in applied_proc.stdout.splitlines()]
    assert len(queued) == len(applied)  # one line per non-blank input line, in order
    for q, a in zip(queued, applied, strict=True):
        assert q["event_id"] == a["event_id"]
        if a["outcome"] == "invalid":
            assert q == a  # dead-lettered by publish exactly like apply does
        else:
            assert q == {
                "event_id": a["event_id"],
                "outcome": "queued",
                "reasons": [],
                "service_number": None,
            }

    valid_ids = sorted({q["event_id"] for q in queued if q["outcome"] == "queued"})
    wait_until(lambda: entries_for(engine, valid_ids) == len(valid_ids), 60, "every event")

    other = make_engine(sqlite_url)
    at = datetime(2026, 9, 1, tzinfo=UTC)
    try:
        with Session(engine) as a, Session(other) as b:
            for instance_id in instance_ids:
                via_queue = show_instance(a, instance_id=instance_id, at=at, policy=POLICY)
                in_process = show_instance(b, instance_id=instance_id, at=at, policy=POLICY)
                assert (via_queue is None) == (in_process is None), instance_id
                if via_queue is not None:
                    assert _normalise(via_queue) == _normalise(in_process), instance_id
            letters = [
                select(
                    DeadLetter.event_id, DeadLetter.code, DeadLetter.error, DeadLetter.raw
                ).order_by(DeadLetter.id)
            ] * 2
            assert a.execute(letters[0]).all() == b.execute(letters[1]).all()
            assert len(a.execute(letters[0]).all()) == 2
    finally:
        other.dispose()


# --- poison messages -------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_poison_messages_are_dead_lettered_once_and_the_rest_flows(pipeline, engine) -> None:
    # Celery notices a dead pool process within its 5 s maintenance tick, so each kill costs
    # about 5 s: three deliveries instead of the default five keep the test short.
    worker = pipeline.worker(
        concurrency=4,
        module="tests.integration.poison_worker",
        env={"QUOTA_LEDGER_MAX_DELIVERIES": "3"},
    )
    factory = Events("flow")
    killer = factory.purchase("i-poison-a", event_id="poison-kill-1")
    raiser = factory.purchase("i-poison-b", event_id="poison-raise-1")
    good = [factory.purchase(f"i-flow-{n}") for n in range(20)]
    publish_many([killer], broker_url=pipeline.broker_url)
    publish_many([raiser], broker_url=pipeline.broker_url)
    publish_many(good, batch_size=4, broker_url=pipeline.broker_url)

    good_ids = [g["event_id"] for g in good]
    wait_until(lambda: entries_for(engine, good_ids) == 20, 60, "the events behind the poison")

    def letters() -> list[tuple[str | None, str, str]]:
        with Session(engine) as session:
            return [
                tuple(row)
                for row in session.execute(
                    select(DeadLetter.event_id, DeadLetter.code, DeadLetter.error).order_by(
                        DeadLetter.id
                    )
                )
            ]

    wait_until(lambda: len(letters()) == 2, 60, "both poison messages in the dead-letter store")
    time.sleep(1.0)  # nothing loops: still exactly one dead letter each
    assert sorted(letters()) == [
        ("poison-kill-1", "processing_error", "delivered 4 times without completing"),
        ("poison-raise-1", "processing_error", "RuntimeError: poisoned event"),
    ]
    assert entries_for(engine, ["poison-kill-1", "poison-raise-1"]) == 0
    log = worker.text()
    assert log.count("WorkerLostError") >= 3  # the killer really killed three pool processes
    client = redis.Redis.from_url(pipeline.broker_url)
    try:
        assert client.llen(QUEUE_EVENTS) == 0
        assert client.keys("quota_ledger:deliveries:*") == []
    finally:
        client.close()


# --- the beat-driven sweep ---------------------------------------------------------------------


_SWEEP_DONE = re.compile(r"Task quota_ledger\.sweep\[[^\]]+\] succeeded in [0-9.]+s: (\{.*\})")


@pytest.mark.timeout(90)
def test_beat_sweeps_expire_due_instances_exactly_once(pipeline, engine, tmp_path) -> None:
    from ledger.service import Ledger

    factory = Events("sweep")
    due = [f"i-due-{n:02d}" for n in range(30)]
    later = [f"i-later-{n}" for n in range(5)]
    events: list[dict[str, Any]] = []
    for instance in due:  # ended 2024-12-31, long before now
        events.append(factory.purchase(instance, at=-730, expires=-366))
        events.append(factory.request(instance, at=-700))
    for instance in later:
        events.append(factory.purchase(instance, at=0, expires=36500))
    from events import validate_event

    Ledger(engine, POLICY).apply([validate_event(e) for e in events])

    worker = pipeline.worker(concurrency=4)
    beat_env = {"QUOTA_LEDGER_SWEEP_INTERVAL": "1"}
    beats = [
        pipeline.start(
            f"beat-{n}",
            ["beat", "--loglevel", "INFO"],
            env={**beat_env, "QUOTA_LEDGER_BEAT_SCHEDULE_FILE": str(tmp_path / f"beat-{n}.db")},
        )
        for n in range(2)
    ]
    # And two direct sweep messages sent at the same moment.
    producer = producer_app(pipeline.broker_url)
    barrier = threading.Barrier(2)

    def send() -> None:
        barrier.wait()
        producer.send_task(
            TASK_SWEEP, queue=QUEUE_SWEEP, routing_key=QUEUE_SWEEP, ignore_result=True
        )

    senders = [threading.Thread(target=send) for _ in range(2)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(10)

    def expired_entries() -> int:
        return count(
            engine,
            select(func.count())
            .select_from(LedgerEntry)
            .where(LedgerEntry.type == "instance.expired"),
        )

    wait_until(lambda: expired_entries() == 30, 30, "30 expiries")
    for beat in beats:
        beat.wait_for_log("Sending due task", timeout=15)
    time.sleep(2.5)  # several more beat ticks: nothing is expired twice
    for beat in beats:
        beat.stop()

    with Session(engine) as session:
        rows = session.execute(
            select(LedgerEntry.instance_id, LedgerEntry.event_id).where(
                LedgerEntry.type == "instance.expired"
            )
        ).all()
        statuses = dict(session.execute(text("SELECT instance_id, status FROM instances")).all())
    assert sorted(r.instance_id for r in rows) == due  # each due instance exactly once
    assert all(r.event_id.startswith(f"sweep:{r.instance_id}:") for r in rows)
    assert {statuses[i] for i in due} == {"expired"}
    assert {statuses[i] for i in later} == {"active"}
    assert verify(engine).to_json()["ok"] is True

    reports = [ast.literal_eval(m) for m in _SWEEP_DONE.findall(worker.text())]
    assert len(reports) >= 3  # two direct sweeps plus beat ticks
    assert sum(r["expired"] for r in reports) == 30  # the work was done once
