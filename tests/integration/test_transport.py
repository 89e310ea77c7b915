"""The broker transport of worker/transport.py against the machine's Redis, with real processes.

The worst moment for a worker to die is right after Redis handed it a message: kombu's own
transport has by then removed the message from the queue (BRPOP) but not yet recorded it in
the ``unacked`` hash (a second round trip), so nothing can ever restore it (kombu issue #305).
A consumer process here dies at exactly that moment on purpose — its first line of Python
after the reply, ``Transport._deliver``, is ``os._exit`` — once with kombu's transport (the
message is lost: the control that proves the test hits the window) and once with ours (the
claim script recorded the message in the same step that took it, so the visibility timeout
hands it to the next consumer).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from tests.helpers.redis_db import private_redis_db

pytestmark = [pytest.mark.redis]

OURS = "worker.transport:Transport"
KOMBU = "redis"
VISIBILITY_S = 1

#: A consumer that dies the moment a message reaches Python (argv: broker URL, transport).
DIE_ON_DELIVERY = """
import os, sys
from kombu import Connection, Consumer, Exchange, Queue
from kombu.transport import virtual

virtual.Transport._deliver = lambda self, message, queue: os._exit(9)
queue = Queue("t", Exchange("t", type="direct"), routing_key="t")
with Connection(sys.argv[1], transport=sys.argv[2]) as connection:
    with Consumer(connection, [queue], accept=["json"], callbacks=[lambda body, message: None]):
        connection.drain_events(timeout=20)
sys.exit("no message arrived")
"""


def queue_named(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def connect(url: str, transport: str = OURS, *, wait_s: float = 1.0) -> Connection:
    """A connection whose consumers wait ``wait_s`` on an empty queue before looking again
    (kombu's ``polling_interval``, its ``brpop_timeout``)."""
    options = {
        "polling_interval": wait_s,
        "visibility_timeout": VISIBILITY_S,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": 1,
    }
    return Connection(url, transport=transport, transport_options=options)


def publish(url: str, body: dict[str, Any], queue: str = "t") -> None:
    with connect(url) as connection:
        producer = Producer(connection)
        producer.publish(
            body, exchange=queue, routing_key=queue, declare=[queue_named(queue)], serializer="json"
        )


def consume(
    url: str,
    count: int,
    *,
    queues: tuple[str, ...] = ("t",),
    deadline_s: float = 20,
    wait_s: float = 1.0,
) -> list[tuple[Any, float, bool]]:
    """The first ``count`` messages a consumer of ``queues`` gets, acknowledged, each with the
    moment it arrived (``time.monotonic()``) and whether it was a redelivery."""
    got: list[tuple[Any, float, bool]] = []
    started = time.monotonic()

    def on_message(body: Any, message: Any) -> None:
        got.append((body, time.monotonic(), bool(message.delivery_info.get("redelivered"))))
        message.ack()

    with (
        connect(url, wait_s=wait_s) as connection,
        Consumer(
            connection, [queue_named(q) for q in queues], accept=["json"], callbacks=[on_message]
        ),
    ):
        while len(got) < count and time.monotonic() - started < deadline_s:
            with contextlib.suppress(TimeoutError):
                connection.drain_events(timeout=0.5)
    return got


def publish_later(
    url: str, body: dict[str, Any], delay_s: float, queue: str = "t"
) -> tuple[threading.Timer, list[float]]:
    """Publish ``body`` from another thread after ``delay_s``; the list gets the moment the
    publish returned."""
    published: list[float] = []

    def send() -> None:
        publish(url, body, queue)
        published.append(time.monotonic())

    timer = threading.Timer(delay_s, send)
    timer.start()
    return timer, published


def die_on_delivery(url: str, transport: str) -> None:
    run = subprocess.run(
        [sys.executable, "-c", DIE_ON_DELIVERY, url, transport],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 9, run.stderr


@pytest.fixture
def url() -> Iterator[str]:
    with private_redis_db() as redis_url:
        yield redis_url


def test_a_consumer_killed_right_after_kombus_brpop_loses_the_message(url: str) -> None:
    """The control: kombu's own transport, same death, and the message is nowhere."""
    publish(url, {"n": 1})
    die_on_delivery(url, KOMBU)
    client = redis.Redis.from_url(url)
    assert client.llen("t") == 0
    assert client.hlen("unacked") == 0
    assert consume(url, 1, deadline_s=3 * VISIBILITY_S + 3) == []


def test_a_consumer_killed_right_after_the_claim_leaves_the_message_for_the_next(url: str) -> None:
    publish(url, {"n": 1})
    die_on_delivery(url, OURS)
    client = redis.Redis.from_url(url)
    assert client.llen("t") == 0
    assert client.hlen("unacked") == 1 and client.zcard("unacked_index") == 1
    started = time.monotonic()
    got = consume(url, 1)
    assert [(body, redelivered) for body, _, redelivered in got] == [({"n": 1}, True)]
    # The visibility timeout plus one restore interval, and a second of slack.
    assert got[0][1] - started < VISIBILITY_S + 1 + 1
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0


def test_claimed_messages_are_recorded_once_and_forgotten_on_ack(url: str) -> None:
    for n in range(5):
        publish(url, {"n": n})
    got = consume(url, 5)
    assert [body for body, _, _ in got] == [{"n": n} for n in range(5)]
    assert not any(redelivered for _, _, redelivered in got)
    client = redis.Redis.from_url(url)
    assert (client.llen("t"), client.hlen("unacked"), client.zcard("unacked_index")) == (0, 0, 0)


def test_the_unacked_entry_is_what_kombus_restore_reads(url: str) -> None:
    """Byte for byte kombu's ``[message, exchange, routing_key]``: the Lua-built entry parses
    back to the message as published."""
    publish(url, {"text": '备案 "quoted" \\ /'})
    die_on_delivery(url, OURS)
    client = redis.Redis.from_url(url)
    (entry,) = client.hvals("unacked")
    message, exchange, routing_key = json.loads(entry)
    assert (exchange, routing_key) == ("t", "t")
    assert message["properties"]["delivery_info"]["routing_key"] == "t"
    assert consume(url, 1)[0][0] == {"text": '备案 "quoted" \\ /'}


def test_an_idle_consumer_gets_a_message_as_soon_as_it_is_published(url: str) -> None:
    """The blocking wait (BLMOVE of the queue onto itself) returns on a push, not after its
    timeout, and takes nothing. The wait here is 10 s, so a message that came only when the
    wait timed out would take ~8.5 s after its publish, not a moment."""
    timer, published = publish_later(url, {"n": 1}, 1.5)
    got = consume(url, 1, wait_s=10)
    timer.join()
    assert [body for body, _, _ in got] == [{"n": 1}]
    assert got[0][1] - published[0] < 3


def test_a_message_on_another_queue_arrives_within_the_wait_timeout(url: str) -> None:
    """The wait watches one queue; a message on the other is claimed when it times out (1 s
    here), then at most a claim later."""
    publish(url, {"n": 0}, queue="a")
    timer, published = publish_later(url, {"n": 1}, 1.5, queue="b")
    got = consume(url, 2, queues=("a", "b"))
    timer.join()
    assert [body for body, _, _ in got] == [{"n": 0}, {"n": 1}]
    assert got[1][1] - published[0] < 1 + 1.5


def test_an_unreadable_recorded_item_is_dead_lettered_under_its_own_tag(url: str) -> None:
    """The claim script records anything with a delivery tag; when Python cannot read it, the
    dead-letter message replaces it in ``unacked`` under the same tag (no orphan entry that
    would be restored, unreadable, forever)."""
    client = redis.Redis.from_url(url)
    item = {
        "body": "abc",  # not base64: kombu cannot decode it
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": "tag-1",
            "delivery_info": {"exchange": "t", "routing_key": "t"},
        },
    }
    client.lpush("t", json.dumps(item))
    seen: list[tuple[str, str]] = []

    def on_message(body: Any, message: Any) -> None:
        entry = client.hget("unacked", message.delivery_tag)
        seen.append((message.delivery_tag, json.loads(entry)[0]["headers"]["task"]))
        message.ack()

    with (
        connect(url) as connection,
        Consumer(connection, [queue_named("t")], accept=["json"], callbacks=[on_message]),
    ):
        connection.drain_events(timeout=5)
    assert seen == [("tag-1", "quota_ledger.dead_letter")]
    assert (client.llen("t"), client.hlen("unacked"), client.zcard("unacked_index")) == (0, 0, 0)


def test_a_socket_error_reads_the_reply_of_the_command_sent(url: str) -> None:
    """kombu reads the pending reply of a socket in error (``_poll_error``) as a BRPOP reply;
    here it is the claim's ``[key, item, tag]``: read as such, nothing pending afterwards, and
    the claimed message stays recorded for the visibility timeout."""
    publish(url, {"n": 1})
    client = redis.Redis.from_url(url)
    with (
        connect(url) as connection,
        Consumer(connection, [queue_named("t")], accept=["json"], callbacks=[]) as consumer,
    ):
        channel = consumer.channel
        # What kombu's poller does before its first fetch: a connection of the client's own.
        channel.client.connection = channel.client.connection_pool.get_connection()
        channel._brpop_start()
        key, item, tag = channel._poll_error("BRPOP")
        assert (key, json.loads(item)["properties"]["delivery_tag"]) == (b"t", tag.decode())
        assert channel._in_poll is None
        assert client.hexists("unacked", tag) and client.llen("t") == 0
