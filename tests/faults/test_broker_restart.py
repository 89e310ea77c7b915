"""Broker restarts (fault suite item 3): a private ``redis-server`` (AOF with ``appendfsync
always``, and again with ``everysec`` as docker-compose runs it; its own port and directory) is
SIGKILLed and restarted twice while a publisher is sending and a real worker is applying, each
time while the worker holds messages it has not acknowledged yet (the second time after it
reconnected from the first outage) and the queue holds at least one message nobody has taken
(the worker is frozen with SIGSTOP for the moment it takes the publisher to queue one). The
publisher retries (kombu's connect and publish retry policy, 20 s), the worker reconnects and
carries on, the messages that were in flight at the kill are handed out again once their
visibility timeout (15 s here) has run out: none is applied twice, and every event whose publish
returned is either in the ledger or reported by the publisher-side check ``quota-ledger
reconcile`` once the broker holds no message (and then published again with ``--republish``).
With ``appendfsync always`` nothing may be reported; with ``everysec`` only messages published in
the few seconds before a kill, whose AOF write Redis had postponed behind a slow fsync
(docs/reliability.md, "Loss windows"). The third run has no persistence at all: each kill loses
what Redis held (at least the queued messages; in-flight ones the worker may still finish), and
the check must find at least those events, which are then published again and applied once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import kombu.exceptions
import pytest
import redis

from events.publish import QUEUE_EVENTS, close_producer, publish_many
from tests.helpers import wait_until
from tests.helpers.faults import (
    audit_clean,
    check_engine,
    entry_count,
    ledger_counts,
    ledger_event_ids,
    settled_count,
    workload,
)

pytestmark = [pytest.mark.faults, pytest.mark.postgres]

MESSAGES = 100
BATCH = 100  # 20 instances × (purchase + 4 requests) per message
# How long before a kill Redis with ``appendfsync everysec`` may have acknowledged writes it had
# not yet written: up to 2 s of postponement behind a slow fsync, one flush second, a margin.
POSTPONED_S = 4.0


def queued(url: str) -> int:
    """Messages waiting in the events queue, not delivered to any consumer yet."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return int(client.llen(QUEUE_EVENTS))
    finally:
        client.close()


def taken_since(url: str, since: float) -> int:
    """Messages delivered to a consumer since ``since`` and not acknowledged yet (kombu keeps
    their delivery time in the ``unacked_index`` sorted set)."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return int(client.zcount("unacked_index", since, "+inf"))
    finally:
        client.close()


def _broker_keys(url: str) -> dict[str, int]:
    """Every key of the broker and its size (list length, hash or set cardinality): where a
    message the check names might still be (kombu's undeliverable queue ``ae.undeliver``…)."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        sizes = {}
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            size = {"list": client.llen, "hash": client.hlen, "set": client.scard}.get(kind)
            sizes[key.decode(errors="replace")] = size(key) if size else -1
        return sizes
    finally:
        client.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("redis_server", ["always", "everysec", "off"], indirect=True)
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
    published_at: list[float] = []  # when each message's publish returned (monotonic)
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
                published_at.append(time.monotonic())
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
            # The worker is frozen until the publisher has queued a message it cannot have
            # taken, so Redis surely holds an undelivered message at the kill (without this,
            # a worker that keeps up leaves the queue empty and the run proves nothing about
            # queued messages: with no persistence nothing would be lost, by chance).
            os.killpg(worker.popen.pid, signal.SIGSTOP)
            try:
                sent_at_freeze = sent
                wait_until(lambda: queued(redis_server.url) > 0, 20, "a queued message", step=0.01)
                queued_at_kill = queued(redis_server.url)
                before = entry_count(engine)
                redis_server.kill()
                killed_at = time.monotonic()
                sent_at_kill = sent
            finally:
                os.killpg(worker.popen.pid, signal.SIGCONT)
            down = time.monotonic()
            assert not publisher_done.is_set(), "publishing ended before the outage"
            time.sleep(1.0)
            redis_server.start()
            outages.append(
                {
                    "messages_sent_before": sent,
                    "entries_before": before,
                    "messages_in_flight": in_flight,
                    "messages_queued": queued_at_kill,
                    "messages_published_while_frozen": (sent_at_freeze, sent_at_kill + 1),
                    "killed_at": killed_at,
                    "seconds_down": round(time.monotonic() - down, 1),
                }
            )
        thread.join(120)
        assert publisher_done.is_set() and sent == MESSAGES, (sent, publish_failures)
        # The broker settles (nothing queued, nothing delivered and unacknowledged, the
        # in-flight messages of the outages handed out again and applied), then the
        # publisher-side check names whatever the ledger never saw.
        settled = settled_count(engine, redis_server.url, 120)
        published = pipeline.tmp / "published.jsonl"
        published.write_text("".join(json.dumps(event) + "\n" for event in events))
        check = pipeline.cli("reconcile", str(published), "--json", timeout=120)
        assert check.returncode in (0, 1), check.stdout + check.stderr
        reconciled = json.loads(check.stdout)
        assert reconciled["settled"] is True and reconciled["checked"] == len(events)
        unaccounted = reconciled["unaccounted"]
        broker_keys = _broker_keys(redis_server.url)
        in_ledger_after_check = ledger_event_ids(engine, "br")
        if unaccounted:  # lost by the broker: send them again
            again = pipeline.cli("reconcile", str(published), "--republish", "--json")
            assert json.loads(again.stdout)["republished"] == len(unaccounted)
        wait_until(lambda: entry_count(engine) >= len(events), 60, "every event applied")
        counts = ledger_counts(engine, "br")
    finally:
        engine.dispose()
        close_producer(redis_server.url)
    log = worker.text()
    assert worker.popen.poll() is None, "the worker died with the broker"
    assert "Unrecoverable error" not in log
    # No task failed: in particular none cancelled on a connection loss reported its SIGTERM as
    # a failure (Celery acknowledges a failed late-ack task: that lost its message).
    assert "raised unexpected" not in log
    # Applied, or reported by the check: every event the check did not name was in the ledger
    # when it answered.
    assert {event["event_id"] for event in events} - set(unaccounted) <= in_ledger_after_check
    if redis_server.appendfsync == "off":
        # Without persistence each kill lost at least the messages queued at that moment
        # (nobody had taken them: the worker was frozen): the check must have found them.
        assert len(unaccounted) >= sum(o["messages_queued"] for o in outages) * BATCH > 0
    else:
        # With persistence, what Redis acknowledged survives the kill, except with ``everysec``:
        # while a background fsync is slow, Redis postpones writing its AOF buffer for up to 2 s
        # and still answers; a kill then loses those writes. So publishes acknowledged in the
        # last ~2 s (plus the once-a-second flush) may go (docs/reliability.md, "Loss windows").
        # Nothing else: two causes of lost messages found here are closed — kombu's take between
        # BRPOP and its record in ``unacked`` (kombu issue #305, worker/transport.py), and a task
        # cancelled on the connection loss reporting its SIGTERM as an ordinary failure, which
        # Celery acknowledged once the broker was back (worker/tasks.py, _stopping_as_a_stop).
        # ``why`` lists the broker's keys, so a failure says where to look.
        # Whole messages only, each published before its kill. The check reports them.
        lost = {index for index, batch in enumerate(batches) if batch[0]["event_id"] in unaccounted}
        assert set(unaccounted) == {e["event_id"] for i in lost for e in batches[i]}
        kills = [o["messages_published_while_frozen"][1] for o in outages]
        why = f"messages lost {sorted(lost)}, outages {outages}, broker keys {broker_keys}"
        assert all(i < kills[-1] for i in lost), why
        # Outage k can only have lost messages published after outage k - 1's kill and before
        # its own.
        for k, outage in enumerate(outages):
            here = [i for i in lost if (kills[k - 1] if k else 0) <= i < kills[k]]
            if redis_server.appendfsync == "everysec":
                here = [i for i in here if outage["killed_at"] - published_at[i] > POSTPONED_S]
            assert here == [], why
        if lost:
            print(f"broker restart ({redis_server.appendfsync}): {why}")
    assert counts["entries"] == counts["distinct"] == len(events)
    assert counts["dead_letters"] == 0
    assert counts["numbers"] == len(events) // 5 * 4
    assert log.count("Connection to broker lost") >= 2
    assert sum(o["messages_in_flight"] for o in outages) >= 1
    report = audit_clean(pipeline)
    figures.update(
        events=len(events),
        messages=MESSAGES,
        appendfsync=redis_server.appendfsync,
        broker_kills=redis_server.kills,
        entries_when_broker_settled=settled,
        events_reported_lost_by_reconcile=len(unaccounted),
        outages=outages,
        publisher_retries_exhausted=len(publish_failures),
        entries=counts["entries"],
        events_lost=len(events) - counts["distinct"],
        duplicates=counts["entries"] - counts["distinct"],
        verify_ok=report["ok"],
    )
