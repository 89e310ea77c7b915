"""Webhooks against a real HTTP receiver (a local server in the test), on every backend:
signatures verify, order per endpoint holds, a receiver that fails for a while then recovers
gets every change, a replayed body with an old timestamp is rejected by the documented check,
and an endpoint that keeps failing is disabled."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from events import parse_event_obj
from ledger.changefeed import changes_after
from ledger.policy import load_policy
from ledger.service import Ledger
from ledger.store import webhooks as store
from ledger.webhooks import SIGNATURE_HEADER, verify_signature
from tests.helpers.webhooks import Receiver
from tests.support import Events, day
from worker.webhooks import DeliveryPolicy, deliver_due, http_post


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


class Clock:
    def __init__(self) -> None:
        self.now = day(0)

    def __call__(self) -> Any:
        return self.now


def _apply(engine: Engine, *events: dict[str, Any]) -> None:
    Ledger(engine, load_policy()).apply([parse_event_obj(e) for e in events])


def _events() -> list[dict[str, Any]]:
    ev = Events()
    return [
        ev.purchase("i1"),
        ev.request("i1"),
        ev.purchase("i2", product="virtual_host"),
        ev.request("i2"),
        ev.release("i1", at=20),
    ]


def test_signed_deliveries_in_feed_order(engine: Engine, receiver: Receiver) -> None:
    clock = Clock()
    every = store.add_endpoint(
        engine, url=receiver.url, kinds=[], secret="whsec_a", now=clock(), from_start=True
    )
    _apply(engine, *_events())
    report = deliver_due(engine, clock=clock)
    feed = changes_after(engine, after=0, limit=100)
    assert report.delivered == len(feed) and report.failed == 0
    bodies = [body for _, body in receiver.accepted()]

    assert [json.loads(body) for body in bodies] == feed
    for headers, body in receiver.accepted():
        assert verify_signature("whsec_a", headers[SIGNATURE_HEADER], body, now=int(time.time()))
        assert not verify_signature(
            "whsec_b", headers[SIGNATURE_HEADER], body, now=int(time.time())
        )
    assert receiver.accepted()[0][0]["Quota-Ledger-Delivery"] == f"{every['id']}:1"
    # Nothing new: the next pass posts nothing.
    assert deliver_due(engine, clock=clock).delivered == 0
    (row,) = store.list_endpoints(engine)
    assert row["cursor"] == len(feed) and row["failures"] == 0


def test_an_endpoint_gets_only_its_kinds_and_new_changes(
    engine: Engine, receiver: Receiver
) -> None:
    _apply(engine, *_events()[:2])
    head = len(changes_after(engine, after=0, limit=100))
    store.add_endpoint(
        engine, url=receiver.url, kinds=["service_number.invalidated"], secret="s", now=day(0)
    )
    _apply(engine, *_events()[2:])
    deliver_due(engine, clock=Clock())

    got = [json.loads(body) for _, body in receiver.accepted()]
    assert [(c["kind"], c["instance_id"]) for c in got] == [("service_number.invalidated", "i1")]
    assert all(c["position"] > head for c in got)
    (row,) = store.list_endpoints(engine)
    assert row["cursor"] == len(changes_after(engine, after=0, limit=100))  # passed over the rest


def test_a_receiver_that_fails_then_recovers_gets_every_change_in_order(
    engine: Engine, receiver: Receiver
) -> None:
    clock = Clock()
    store.add_endpoint(engine, url=receiver.url, kinds=[], secret="s", now=clock(), from_start=True)
    _apply(engine, *_events())
    receiver.statuses = [500, 503, 200, 500, 429]  # fails, recovers, fails again, recovers
    policy = DeliveryPolicy(backoff_base_s=10, backoff_cap_s=60)
    passes = 0
    while len(receiver.accepted()) < len(changes_after(engine, after=0, limit=100)):
        deliver_due(engine, clock=clock, policy=policy, random=lambda: 0.999)
        (row,) = store.list_endpoints(engine)
        if row["failures"]:
            # Not before the backoff: a pass now posts nothing.
            before = len(receiver.requests)
            deliver_due(engine, clock=clock, policy=policy)
            assert len(receiver.requests) == before
            assert row["next_attempt_at"] > clock.now
        clock.now = row["next_attempt_at"] + timedelta(seconds=1)
        passes += 1
        assert passes < 20

    positions = [json.loads(body)["position"] for _, body in receiver.accepted()]
    assert positions == list(range(1, len(positions) + 1))  # each once, in order
    (row,) = store.list_endpoints(engine)
    log = store.delivery_log(engine, row["id"])
    assert [entry["status"] for entry in reversed(log)][:6] == [500, 503, 200, 500, 429, 200]
    assert [entry["attempt"] for entry in reversed(log)][:6] == [1, 2, 3, 1, 2, 3]


@pytest.mark.postgres
def test_deliverers_racing_for_one_endpoint_post_each_change_once_in_order(
    postgres_url: str, receiver: Receiver
) -> None:
    """Four deliverers (as four beat-scheduled tasks on different workers would) run passes
    at the same time on PostgreSQL: the endpoint's lease lets one at a time post, so every
    change arrives exactly once and in feed order."""
    from ledger.db import ensure_schema, make_engine

    engine = make_engine(postgres_url)
    try:
        ensure_schema(engine)
        ev = Events()
        events = []
        for n in range(30):
            events += [ev.purchase(f"r{n}"), ev.request(f"r{n}"), ev.request(f"r{n}", at=2)]
        _apply(engine, *events)
        total = len(changes_after(engine, after=0, limit=10_000))
        store.add_endpoint(
            engine, url=receiver.url, kinds=[], secret="s", now=day(0), from_start=True
        )
        policy = DeliveryPolicy(batch=7)  # many short passes: many chances to overlap
        claimed: list[int] = []
        start = threading.Barrier(4)

        def slow_post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> Any:
            time.sleep(0.002)  # a receiver that takes a moment: passes overlap
            return http_post(url, body, headers, timeout)

        def deliverer() -> None:
            start.wait()
            while len(receiver.accepted()) < total:
                claimed.append(
                    deliver_due(engine, clock=Clock(), policy=policy, post=slow_post).endpoints
                )

        threads = [threading.Thread(target=deliverer) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        positions = [json.loads(body)["position"] for _, body in receiver.accepted()]
        assert positions == list(range(1, total + 1))  # each once, in order
        assert len(receiver.requests) == total  # and never posted twice
        # The race was real: passes found the endpoint leased to another deliverer.
        assert claimed.count(0) > 0 and claimed.count(1) >= total // 7
    finally:
        engine.dispose()


def test_a_replayed_body_with_an_old_timestamp_is_rejected(
    engine: Engine, receiver: Receiver
) -> None:
    store.add_endpoint(
        engine, url=receiver.url, kinds=[], secret="whsec_x", now=day(0), from_start=True
    )
    _apply(engine, *_events()[:1])
    deliver_due(engine, clock=Clock())
    headers, body = receiver.accepted()[0]
    header = headers[SIGNATURE_HEADER]
    signed_at = int(header.split(",")[0].removeprefix("t="))
    assert verify_signature("whsec_x", header, body, now=signed_at + 300)
    assert not verify_signature("whsec_x", header, body, now=signed_at + 301)  # a replay
    assert not verify_signature("whsec_x", header, body.replace(b"i1", b"i9"), now=signed_at)


def test_an_endpoint_failing_for_days_is_disabled(engine: Engine) -> None:
    clock = Clock()
    # Nothing listens on this port: every attempt fails without an answer.
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as probe:
        port = probe.server_address[1]
    store.add_endpoint(
        engine, url=f"http://127.0.0.1:{port}/", kinds=[], secret="s", now=clock(), from_start=True
    )
    _apply(engine, *_events()[:1])
    policy = DeliveryPolicy(
        backoff_base_s=3600, backoff_cap_s=6 * 3600, disable_after=timedelta(days=3)
    )
    disabled: list[int] = []
    for _ in range(40):
        disabled += deliver_due(engine, clock=clock, policy=policy, random=lambda: 1.0).disabled
        (row,) = store.list_endpoints(engine)
        if not row["enabled"]:
            break
        clock.now = row["next_attempt_at"]
    assert not row["enabled"] and disabled == [row["id"]]
    assert row["last_status"] is None and "Error" in row["last_error"]
    assert clock.now - row["failing_since"] >= timedelta(days=3)
    assert deliver_due(engine, clock=clock, policy=policy).endpoints == 0


def test_the_beat_scheduled_task_delivers(tmp_path, receiver: Receiver) -> None:
    from ledger.db import make_engine, upgrade
    from ledger.settings import Settings
    from worker import tasks
    from worker.celery_app import WEBHOOKS_ENTRY, create_app
    from worker.metrics import WEBHOOK_LAG
    from worker.webhooks import TASK_DELIVER_WEBHOOKS

    url = f"sqlite:///{tmp_path / 'hooks.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        endpoint = store.add_endpoint(
            engine, url=receiver.url, kinds=[], secret="s", now=day(0), from_start=True
        )
        _apply(engine, *_events()[:2])
        app = create_app(Settings(database_url=url, broker_url="memory://", webhook_interval=2))
        entry = app.conf.beat_schedule[WEBHOOKS_ENTRY]
        assert (entry["task"], entry["schedule"]) == (TASK_DELIVER_WEBHOOKS, 2)
        report = app.tasks[TASK_DELIVER_WEBHOOKS].apply().get()
        assert report == {"endpoints": 1, "delivered": 3, "failed": 0, "disabled": []}
        assert len(receiver.accepted()) == 3
        assert WEBHOOK_LAG.labels(endpoint=str(endpoint["id"]))._value.get() == 0
    finally:
        tasks.dispose_runtimes()
        engine.dispose()
