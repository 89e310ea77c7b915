"""``events.publish`` against an in-process Redis (fakeredis over TCP): the exact message on the
wire, batch splitting, and validation before anything is sent."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from events import EventRejection, validate_event
from events.publish import (
    QUEUE_EVENTS,
    TASK_APPLY_BATCH,
    TASK_APPLY_EVENT,
    InvalidEvents,
    close_producer,
    enqueue_batches,
    publish,
    publish_many,
)
from tests.support import Events, message_body
from worker.embedded import fake_redis_server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def broker() -> Iterator[tuple[str, redis.Redis]]:
    with fake_redis_server() as url:
        client = redis.Redis.from_url(url)
        try:
            yield url, client
        finally:
            close_producer(url)
            client.close()


def _messages(client: redis.Redis) -> list[dict[str, Any]]:
    """The queue's messages, oldest first (kombu LPUSHes and workers BRPOP)."""
    return [json.loads(raw) for raw in reversed(client.lrange(QUEUE_EVENTS, 0, -1))]


def _body(message: dict[str, Any]) -> Any:
    # UTF-8 JSON text, not base64: the enqueue script writes the sequence into it (SPEC §9).
    assert message["properties"]["body_encoding"] == "utf-8"
    return message_body(message)


def test_message_format_is_a_json_celery_v2_task_on_the_events_queue(broker) -> None:
    url, client = broker
    event = Events().purchase("i-fmt")
    assert publish(event, broker_url=url) == event["event_id"]

    (message,) = _messages(client)
    assert message["content-type"] == "application/json"
    assert message["content-encoding"] == "utf-8"
    headers = message["headers"]
    assert headers["task"] == TASK_APPLY_BATCH
    assert headers["lang"] == "py"
    assert headers["id"] == message["properties"]["correlation_id"]
    assert headers["retries"] == 0
    assert message["properties"]["delivery_info"]["routing_key"] == QUEUE_EVENTS
    assert message["properties"]["delivery_mode"] == 2

    args, kwargs, embed = _body(message)
    # The publish number of each element, per instance, under the broker's epoch (SPEC §9).
    assert kwargs == {"sequence": {"epoch": kwargs["sequence"]["epoch"], "numbers": [["i-fmt", 1]]}}
    assert kwargs["sequence"]["epoch"] > 1_700_000_000_000_000  # microseconds of Redis TIME
    assert set(embed) >= {"callbacks", "errbacks", "chain", "chord"}
    # One argument: the array of canonical payloads (every field, defaults included).
    assert args == [[validate_event(event).model_dump(mode="json")]]
    assert args[0][0]["occurred_at"].endswith("Z")
    # Nothing but JSON anywhere: no pickle content type, no python objects in the body.
    assert b"pickle" not in json.dumps(message).encode()


def test_batches_are_split_at_batch_size(broker) -> None:
    url, client = broker
    factory = Events("split")
    events = [factory.purchase(f"i-{n}") for n in range(1234)]
    assert publish_many(events, batch_size=500, broker_url=url) == 1234

    messages = _messages(client)
    sizes = [len(_body(m)[0][0]) for m in messages]
    assert sizes == [500, 500, 234]
    ids = [e["event_id"] for m in messages for e in _body(m)[0][0]]
    assert ids == [e["event_id"] for e in events]  # order kept across messages
    assert {m["headers"]["task"] for m in messages} == {TASK_APPLY_BATCH}
    assert len({m["headers"]["id"] for m in messages}) == 3


def test_invalid_events_are_never_enqueued(broker) -> None:
    url, client = broker
    factory = Events("bad")
    good = factory.purchase("i-ok")
    naive = {**factory.request("i-ok"), "occurred_at": "2026-01-01T00:00:00"}
    with pytest.raises(InvalidEvents) as caught:
        publish_many([good, "not json", naive, good], broker_url=url)
    problems = caught.value.problems
    assert [index for index, _ in problems] == [1, 2]
    assert all(isinstance(r, EventRejection) and r.code == "invalid_event" for _, r in problems)
    assert "occurred_at" in problems[1][1].error
    assert isinstance(caught.value, ValueError)
    assert client.llen(QUEUE_EVENTS) == 0

    with pytest.raises(InvalidEvents):
        publish({"type": "instance.released"}, broker_url=url)
    assert client.keys("*") == []  # not even a connection was needed


def test_enqueue_batches_takes_validated_events_and_checks_its_arguments(broker) -> None:
    url, client = broker
    factory = Events("enq")
    events = [validate_event(factory.purchase(f"i-{n}")) for n in range(3)]
    assert enqueue_batches(events, batch_size=2, broker_url=url) == 3
    assert [len(_body(m)[0][0]) for m in _messages(client)] == [2, 1]
    assert enqueue_batches([], broker_url=url) == 0
    with pytest.raises(TypeError):
        enqueue_batches([factory.purchase("i-raw")], broker_url=url)  # type: ignore[list-item]
    with pytest.raises(ValueError):
        enqueue_batches(events, batch_size=1001, broker_url=url)
    with pytest.raises(ValueError):
        publish_many(events, batch_size=0, broker_url=url)


def test_json_strings_and_models_are_accepted_and_sent_canonical(broker) -> None:
    url, client = broker
    factory = Events("mix")
    as_text = json.dumps(factory.purchase("i-a"), indent=2)
    as_model = validate_event(factory.purchase("i-b"))
    assert publish_many([as_text, as_model], broker_url=url) == 2
    (message,) = _messages(client)
    payloads = _body(message)[0][0]
    assert [p["instance_id"] for p in payloads] == ["i-a", "i-b"]
    assert all(isinstance(p, dict) for p in payloads)


def test_unreachable_broker_raises_after_the_bounded_retry(monkeypatch) -> None:
    import kombu.exceptions

    from events import publish as module

    monkeypatch.setattr(
        module,
        "PUBLISH_RETRY_POLICY",
        {"max_retries": 1, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.1},
    )
    monkeypatch.setattr(module, "PUBLISH_CONNECT_SECONDS", 0.5)
    url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    try:
        with pytest.raises(kombu.exceptions.OperationalError):
            publish(Events("down").purchase("i-down"), broker_url=url)
    finally:
        close_producer(url)


def test_publisher_retries_until_the_broker_comes_up() -> None:
    """The broker is down when publishing starts and up a second later: the publish waits
    (within PUBLISH_CONNECT_SECONDS) and succeeds."""
    import socket
    import threading
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    up = threading.Event()
    release = threading.Event()

    def broker_later() -> None:
        time.sleep(1.0)
        with fake_redis_server(port=port):
            up.set()
            release.wait(30)

    thread = threading.Thread(target=broker_later, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        assert publish_many([Events("late").purchase("i-late")], broker_url=url) == 1
        assert up.is_set() and time.monotonic() - started >= 0.9
        client = redis.Redis.from_url(url)
        try:
            assert client.llen(QUEUE_EVENTS) == 1
        finally:
            client.close()
    finally:
        close_producer(url)
        release.set()
        thread.join(10)


def test_publish_module_is_client_side_only() -> None:
    code = (
        "import sys, events.publish; "
        "bad = [m for m in ('worker', 'ledger', 'sqlalchemy', 'sqlmodel') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_task_names_are_distinct_constants() -> None:
    assert TASK_APPLY_BATCH == "quota_ledger.apply_batch"
    assert TASK_APPLY_EVENT == "quota_ledger.apply_event"
    assert QUEUE_EVENTS == "quota_ledger.events"
