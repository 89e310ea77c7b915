"""A publisher that is not Python: the message of docs/events.md "Publishing from other languages",
built by hand (no kombu, no Celery) and LPUSHed with plain Redis commands — or numbered and
enqueued by the shipped ``events/enqueue.lua`` (SPEC §9) — is applied by the real worker
(embedded: fakeredis over TCP + a Celery worker thread)."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import select
from sqlmodel import Session

from ledger.db import make_engine, upgrade
from ledger.policy import load_policy
from ledger.tables import DeadLetter, LedgerEntry, SequencerGate
from tests.support import Events
from worker.embedded import embedded_pipeline

pytestmark = pytest.mark.timeout(60)


def envelope(
    events: list, task: str = "quota_ledger.apply_batch", kwargs: dict | None = None
) -> str:
    """Exactly the README's recipe (base64 body), or with ``kwargs`` a UTF-8 text body."""
    task_id = str(uuid.uuid4())
    body = json.dumps(
        [
            [events],
            kwargs or {},
            {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
        ]
    )
    encoded = kwargs is None
    return json.dumps(
        {
            "body": base64.b64encode(body.encode("utf-8")).decode("ascii") if encoded else body,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py",
                "task": task,
                "id": task_id,
                "root_id": task_id,
                "parent_id": None,
                "group": None,
                "retries": 0,
                "eta": None,
                "expires": None,
                "timelimit": [None, None],
            },
            "properties": {
                "correlation_id": task_id,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": "quota_ledger.events"},
                "priority": 0,
                "body_encoding": "base64" if encoded else "utf-8",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def test_a_hand_built_message_is_applied(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    factory = Events("foreign")
    purchase = factory.purchase("i-foreign")
    request_text = json.dumps(factory.request("i-foreign"))  # an element may be JSON text
    pickled = envelope([purchase]).replace("application/json", "application/x-python-serialize")
    try:
        with embedded_pipeline(engine, load_policy()) as pipeline:
            client = redis.Redis.from_url(pipeline.broker_url)
            try:
                client.lpush("quota_ledger.events", pickled)  # refused unread: JSON only
                client.lpush("quota_ledger.events", envelope([purchase, request_text, "junk"]))
                pipeline.wait_for_events(["foreign-1", "foreign-2"], timeout=30)
            finally:
                client.close()
        with Session(engine) as session:
            entries = session.execute(
                select(LedgerEntry.event_id, LedgerEntry.outcome).order_by(LedgerEntry.seq)
            ).all()
            letters = session.execute(select(DeadLetter.code, DeadLetter.raw)).all()
    finally:
        engine.dispose()
    assert entries == [("foreign-1", "applied"), ("foreign-2", "applied")]
    assert letters == [("invalid_event", "junk")]


def test_a_hand_built_message_numbered_by_the_shipped_script_is_applied(tmp_path: Path) -> None:
    """README recipe for ordered publishing: a UTF-8 body whose ``sequence`` keyword argument is
    a placeholder, cut in two around it and handed to ``events/enqueue.lua`` with the instance
    id of each element."""
    script = (Path(__file__).resolve().parents[2] / "events" / "enqueue.lua").read_text()
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    factory = Events("numbered")
    purchase, request = factory.purchase("i-num"), factory.request("i-num")
    try:
        with embedded_pipeline(engine, load_policy()) as pipeline:
            client = redis.Redis.from_url(pipeline.broker_url)
            try:
                for event in (purchase, request):
                    document = envelope([event], kwargs={"sequence": "PLACEHOLDER"})
                    before, after = document.split('\\"PLACEHOLDER\\"')
                    client.eval(
                        script,
                        2,
                        "quota_ledger.sequence",
                        "quota_ledger.events",
                        "~epoch",
                        before,
                        after,
                        event["instance_id"],
                    )
                pipeline.wait_for_events(["numbered-1", "numbered-2"], timeout=30)
                epoch = int(client.hget("quota_ledger.sequence", "~epoch"))
            finally:
                client.close()
        with Session(engine) as session:
            entries = session.execute(
                select(LedgerEntry.event_id, LedgerEntry.outcome).order_by(LedgerEntry.seq)
            ).all()
            gate = session.get(SequencerGate, "i-num")
    finally:
        engine.dispose()
    assert entries == [("numbered-1", "applied"), ("numbered-2", "applied")]
    assert gate is not None and (gate.epoch, gate.last) == (epoch, 2)
