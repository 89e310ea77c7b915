"""Poison messages (fault suite item 6) on a real worker, Redis and PostgreSQL.

Pushed straight into the ``quota_ledger.events`` list or sent by task name:

- transport level: a list item that is not a kombu envelope at all; an envelope whose body is
  broken JSON, is not UTF-8, or is not base64; an envelope for a task name nobody runs;
- task level: ``apply_batch`` with arguments of the wrong shape (``[42]``, ``["x", "y"]``, junk
  keyword arguments, elements that are not events), ``apply_event`` with an invalid event;
- ledger level: an event the database refuses while it is applied — a real PostgreSQL trigger
  on ``ledger_entries`` that raises for one event id (no mock in the worker).

Each one is dead-lettered exactly once, with what arrived as ``raw`` (or, where nothing of it
can be read, as much of the raw message as there is); the worker keeps processing (the good
events behind them are applied), nothing is redelivered in a loop, and the queue ends empty.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import pytest
import redis
from sqlalchemy import text

from events.publish import QUEUE_EVENTS, close_producer, producer_app, publish_many
from tests.helpers import wait_until
from tests.helpers.faults import (
    audit_clean,
    check_engine,
    entry_count,
    redelivered,
    redis_queue_state,
)
from tests.support import Events

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.postgres]


def envelope(
    body: bytes,
    *,
    task: Any = "quota_ledger.apply_batch",
    encoded: bool = True,
    drop: tuple[str, ...] = (),
    content_type: str = "application/json",
) -> str:
    """kombu's Redis envelope (docs/events.md "Publishing from other languages") around ``body``."""
    task_id = str(uuid.uuid4())
    document = {
        "body": base64.b64encode(body).decode("ascii") if encoded else body.decode("latin-1"),
        "content-encoding": "utf-8",
        "content-type": content_type,
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
            "delivery_info": {"exchange": "", "routing_key": QUEUE_EVENTS},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    for key in drop:
        del document["headers"][key]
    return json.dumps(document)


def _body(args: Any) -> bytes:
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return json.dumps([args, {}, embed]).encode()


RAISE_TRIGGER = """
CREATE FUNCTION poison_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'poison: refused by a test trigger';
END $$;
CREATE TRIGGER poison_refuse BEFORE INSERT ON ledger_entries FOR EACH ROW
    WHEN (NEW.event_id LIKE 'poison-raise%') EXECUTE FUNCTION poison_refuse();
"""


# (poison, code, text the error contains, text the raw contains) — one dead letter each.
EXPECTED = [
    (
        "not an envelope",
        "invalid_event",
        "not a readable message: JSONDecodeError",
        "this is not a kombu message",
    ),
    ("broken JSON body", "invalid_event", "body does not decode", '[[{"event_id": "half-a-mess'),
    ("body not UTF-8", "invalid_event", "body does not decode", "\\xff\\xfe\\x00\\x81"),
    ("body not base64", "invalid_event", "Invalid base64", "%%% not base64 %%%"),
    ("unknown task", "invalid_event", "unknown task 'quota_ledger.nope'", '"event_id": "poison-1"'),
    ("task name not a string", "invalid_event", "TypeError: unhashable", "[[[]], {}"),
    ("no task id", "invalid_event", "KeyError: 'id'", "[[[]], {}"),
    ("body not a protocol-2 triple", "invalid_event", "ValueError", '"hello"'),
    ("body an object", "invalid_event", "could not run: TypeError", '"args":1'),
    ("args=[42]", "invalid_event", "expects a JSON array of events, got a number", "42"),
    (
        "args=['x', 'y']",
        "invalid_event",
        "takes exactly one argument",
        '{"args":["x","y"],"kwargs":{}}',
    ),
    ("junk kwargs", "invalid_event", "keyword(s): junk, more", '"kwargs":{"junk":1,"more":[1,2]}'),
    ("element 42", "invalid_event", "element 0: expected an event", "42"),
    ("element not JSON", "invalid_event", "not valid JSON", "not json"),
    ("element of unknown type", "invalid_event", 'unknown event type "nope"', '{"type":"nope"}'),
    (
        "apply_event invalid",
        "invalid_event",
        "type: must be a string",
        '{"event_id":"bad event","type":7}',
    ),
    (
        "refused by the database",
        "processing_error",
        "poison: refused by a test trigger",
        '"event_id":"poison-raise-1"',
    ),
]


@pytest.fixture(autouse=True)
def _close_publishers(redis_url: str):
    yield
    close_producer(redis_url)


@pytest.mark.timeout(120)
def test_poison_messages_are_dead_lettered_once_and_the_worker_goes_on(pipeline, figures) -> None:
    engine = check_engine(pipeline.database_url)
    with engine.begin() as conn:
        conn.execute(text(RAISE_TRIGGER))
    worker = pipeline.worker(concurrency=2)
    factory = Events("poison")
    good_before = [factory.purchase(f"i-good-{n}") for n in range(5)]
    good_after = [factory.purchase(f"i-later-{n}") for n in range(5)]
    raiser = factory.purchase("i-raise", event_id="poison-raise-1")
    client = redis.Redis.from_url(pipeline.broker_url)
    app = producer_app(pipeline.broker_url)
    try:
        publish_many(good_before, broker_url=pipeline.broker_url)
        # Transport and protocol level, LPUSHed like a foreign publisher would.
        raw_items = {
            "not an envelope": b"\x00\xff this is not a kombu message {",
            "broken JSON body": envelope(b'[[{"event_id": "half-a-mess'),
            "body not UTF-8": envelope(b"\xff\xfe\x00\x81"),
            "body not base64": envelope(b"%%% not base64 %%%", encoded=False),
            "unknown task": envelope(_body([[good_before[0]]]), task="quota_ledger.nope"),
            "task name not a string": envelope(_body([[]]), task=["quota_ledger.apply_batch"]),
            "no task id": envelope(_body([[]]), drop=("id",)),
            "body not a protocol-2 triple": envelope(b'"hello"'),
            "body an object": envelope(b'{"args": 1}'),
            # Refused unread (JSON only): logged, not stored (docs/operations.md "Celery settings").
            "text/plain body": envelope(b"hello", content_type="text/plain"),
        }
        for item in raw_items.values():
            client.lpush(QUEUE_EVENTS, item)
        # Task level, by name, as a confused Celery client would.
        sends: list[tuple[str, dict[str, Any]]] = [
            ("quota_ledger.apply_batch", {"args": [42]}),
            ("quota_ledger.apply_batch", {"args": ["x", "y"]}),
            ("quota_ledger.apply_batch", {"kwargs": {"junk": 1, "more": [1, 2]}}),
            ("quota_ledger.apply_batch", {"args": [[42, "not json", {"type": "nope"}]]}),
            ("quota_ledger.apply_event", {"args": [{"event_id": "bad event", "type": 7}]}),
        ]
        for name, options in sends:
            app.send_task(name, queue=QUEUE_EVENTS, routing_key=QUEUE_EVENTS, **options)
        # Ledger level: the database refuses this event.
        publish_many([raiser], broker_url=pipeline.broker_url)
        publish_many(good_after, broker_url=pipeline.broker_url)

        def letters() -> list[Any]:
            with engine.connect() as conn:
                return conn.execute(
                    text("SELECT event_id, code, error, raw FROM dead_letters ORDER BY id")
                ).all()

        wait_until(lambda: entry_count(engine) >= 10, 60, "the good events")
        wait_until(lambda: len(letters()) >= len(EXPECTED), 60, "every dead letter")
        wait_until(
            lambda: (
                redis_queue_state(pipeline.broker_url)
                == {"queued": 0, "unacked": 0, "delivery_keys": 0}
            ),
            30,
            "an empty queue",
        )
        time.sleep(3)  # nothing comes back
        found = letters()
        with engine.connect() as conn:
            entries = conn.execute(text("SELECT event_id FROM ledger_entries")).scalars().all()
    finally:
        client.close()
        engine.dispose()
    log = worker.text()
    assert worker.popen.poll() is None, "the worker stopped"
    assert "Unrecoverable error" not in log and "Frequent restarts" not in log
    assert redelivered(log) == 0
    assert redis_queue_state(pipeline.broker_url)["queued"] == 0
    assert sorted(entries) == sorted(e["event_id"] for e in good_before + good_after)
    unmatched = list(found)
    for name, code, error, raw in EXPECTED:
        hits = [
            row for row in unmatched if row.code == code and error in row.error and raw in row.raw
        ]
        assert len(hits) == 1, (name, hits, found)
        unmatched.remove(hits[0])
    assert unmatched == [], unmatched  # exactly one dead letter per poison, nothing else
    assert "Refusing to deserialize untrusted content of type text/plain" in log
    report = audit_clean(pipeline)
    figures.update(
        poison_messages=len(raw_items) + len(sends) + 1,
        dead_letters=len(found),
        dropped_unread_by_design=1,
        redelivered=0,
        good_events_applied=len(entries),
        worker_alive=True,
        verify_ok=report["ok"],
    )
