"""A publisher that is not Python: the message of README "Publishing from other languages",
built by hand (no kombu, no Celery) and LPUSHed with plain Redis commands, is applied by the
real worker (embedded: fakeredis over TCP + a Celery worker thread)."""

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
from ledger.tables import DeadLetter, LedgerEntry
from tests.support import Events
from worker.embedded import embedded_pipeline

pytestmark = pytest.mark.timeout(60)


def envelope(events: list, task: str = "quota_ledger.apply_batch") -> str:
    """Exactly the README's recipe."""
    task_id = str(uuid.uuid4())
    body = json.dumps(
        [[events], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )
    return json.dumps(
        {
            "body": base64.b64encode(body.encode("utf-8")).decode("ascii"),
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
                "body_encoding": "base64",
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
