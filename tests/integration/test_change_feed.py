"""The change feed (docs/changes.md) on every backend: what is written, in the ledger's
transaction, gap-free; append-only; untouched by rebuild; checked by verify; gap-free and in
commit order under concurrent writers on PostgreSQL."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session

from events import parse_event_obj
from ledger.audit import rebuild, verify
from ledger.changefeed import changes_after, current_position, wait_for_changes
from ledger.changes import fold_feed
from ledger.db import make_engine
from ledger.policy import load_policy
from ledger.service import Ledger
from tests.helpers.ledger_harness import Harness, drop_append_only_triggers
from tests.support import Events, day


def _kinds(harness: Harness, after: int = 0) -> list[tuple[str, str | None, dict[str, Any]]]:
    return [
        (c["kind"], c["instance_id"], c["data"])
        for c in changes_after(harness.engine, after=after, limit=1000)
    ]


def test_a_lifecycle_writes_each_change_once_in_order(any_ledger: Harness) -> None:
    ev = Events()
    purchase = ev.purchase("i1")
    request = ev.request("i1", at=10)
    filing = ev.file("i1", "SN-1", filing="f1", at=11)
    bad = ev.file("i1", "SN-404", filing="f2", at=12)
    withdraw = ev.withdraw("i1", "f1", at=13)
    any_ledger.apply(purchase, request, filing, bad, withdraw)
    any_ledger.apply(ev.request("i1", at=14))  # SN-2
    assert any_ledger.ledger.sweep(now=day(400)) == 1

    changes = changes_after(any_ledger.engine, after=0, limit=100)
    assert [c["position"] for c in changes] == list(range(1, len(changes) + 1))
    assert [(c["kind"], c["event_id"]) for c in changes] == [
        ("instance.status_changed", purchase["event_id"]),
        ("instance.eligibility_changed", purchase["event_id"]),
        ("service_number.issued", request["event_id"]),
        ("service_number.used", filing["event_id"]),
        ("filing.accepted", filing["event_id"]),
        ("filing.rejected", bad["event_id"]),
        ("filing.withdrawn", withdraw["event_id"]),
        ("service_number.issued", changes[7]["event_id"]),
        ("service_number.invalidated", "sweep:i1:20270101T000000Z"),
        # No eligibility change: at its end the instance was already ineligible (time counts,
        # SPEC §4); the expiry entry changes its status and its numbers, not its eligibility.
        ("instance.status_changed", "sweep:i1:20270101T000000Z"),
    ]
    first = changes[0]
    assert first["data"] == {"from": "unknown", "to": "active"}
    assert first["instance_id"] == "i1" and first["instance_seq"] == 1
    assert first["occurred_at"] == purchase["occurred_at"]
    assert changes[1]["data"] == {"from": "unknown", "to": "eligible", "reasons": []}
    assert changes[5]["data"]["reasons"] == ["service_number_invalid"]
    assert changes[8]["data"] == {"number": "SN-2", "reason": "instance_expired"}
    assert changes[9]["data"] == {"from": "active", "to": "expired"}
    with Session(any_ledger.engine) as session:
        seqs = dict(session.execute(text("SELECT event_id, seq FROM ledger_entries")).all())
    assert all(c["seq"] == seqs[c["event_id"]] for c in changes)
    assert current_position(any_ledger.engine) == len(changes)
    # A consumer resumes from its cursor.
    assert changes_after(any_ledger.engine, after=6, limit=2) == changes[6:8]


def test_duplicates_stale_and_parked_events_write_no_change(any_ledger: Harness) -> None:
    ev = Events()
    purchase = ev.purchase("i1")
    any_ledger.apply(purchase)
    before = current_position(any_ledger.engine)
    any_ledger.apply(purchase)  # duplicate
    any_ledger.apply(ev.purchase("i1", event_id="second"))  # stale
    assert current_position(any_ledger.engine) == before
    assert len(changes_after(any_ledger.engine, after=0, limit=100)) == before


def test_dead_letters_are_changes_without_an_entry(any_ledger: Harness) -> None:
    from events import parse_event

    any_ledger.ledger.apply([parse_event("not json")])
    (change,) = changes_after(any_ledger.engine, after=0, limit=10)
    assert change["kind"] == "event.dead_lettered"
    assert (change["event_id"], change["seq"], change["instance_id"]) == (None, None, None)
    assert change["data"] == {"code": "invalid_event", "event_id": None}
    assert verify(any_ledger.engine).feed.ok is True


def test_a_failed_transaction_leaves_no_position_behind(any_ledger: Harness) -> None:
    ev = Events()
    any_ledger.apply(ev.purchase("i1"))
    position = current_position(any_ledger.engine)
    boom = RuntimeError("the connection went away")

    def fail(*_: Any, **__: Any) -> Any:
        raise boom

    ledger = any_ledger.ledger
    original = ledger.storage.run

    def run_then_fail(work: Any, attempts: int) -> Any:
        def failing(store: Any) -> Any:
            result = work(store)
            raise boom  # after save(): the counter was taken, then rolled back
            return result  # pragma: no cover

        return original(failing, 1)

    ledger.storage.run = run_then_fail  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        ledger.apply([parse_event_obj(ev.request("i1"))])
    ledger.storage.run = original  # type: ignore[method-assign]
    assert current_position(any_ledger.engine) == position
    any_ledger.apply(ev.request("i1"))
    positions = [c["position"] for c in changes_after(any_ledger.engine, after=0, limit=100)]
    assert positions == list(range(1, position + 2))


def test_the_feed_is_append_only_in_the_database(any_ledger: Harness) -> None:
    ev = Events()
    any_ledger.apply(ev.purchase("i1"))
    for statement in (
        "UPDATE ledger_changes SET kind = 'x'",
        "DELETE FROM ledger_changes",
    ):
        with pytest.raises((IntegrityError, DBAPIError)), any_ledger.engine.begin() as conn:
            conn.execute(text(statement))
    if any_ledger.engine.dialect.name == "postgresql":
        with pytest.raises((IntegrityError, DBAPIError)), any_ledger.engine.begin() as conn:
            conn.execute(text("TRUNCATE ledger_changes"))
    assert len(changes_after(any_ledger.engine, after=0, limit=10)) == 2


def test_rebuild_leaves_the_feed_alone_and_verify_checks_it(any_ledger: Harness) -> None:
    ev = Events()
    any_ledger.apply(ev.purchase("i1"), ev.request("i1"), ev.purchase("i2"))
    feed = changes_after(any_ledger.engine, after=0, limit=100)
    assert rebuild(any_ledger.engine).to_json()["drift"] == []
    assert changes_after(any_ledger.engine, after=0, limit=100) == feed
    verified = verify(any_ledger.engine)
    assert verified.to_json()["ok"] is True
    assert verified.feed.to_json() == {
        "ok": True,
        "changes": len(feed),
        "position": len(feed),
        "gaps": 0,
        "orphans": [],
    }
    # A change removed behind the database's back: a gap.
    drop_append_only_triggers(any_ledger)
    with any_ledger.engine.begin() as conn:
        conn.execute(text("DELETE FROM ledger_changes WHERE position = 2"))
    verified = verify(any_ledger.engine)
    assert verified.to_json()["ok"] is False and verified.feed.gaps == 1
    assert verified.to_json()["broken"] == []


def test_folding_the_feed_gives_every_number_and_filing_status(any_ledger: Harness) -> None:
    ev = Events()
    events = [ev.purchase("a"), ev.purchase("b", product="nat_gateway", expires=30)]
    events += [ev.request("a", at=1), ev.request("a", at=2), ev.request("b", at=1)]
    any_ledger.apply(*events)
    any_ledger.apply(ev.file("a", "SN-1", filing="f1", at=3))
    any_ledger.apply(ev.withdraw("a", "f1", at=4), ev.release("a", at=5))
    any_ledger.ledger.sweep(now=day(31))
    any_ledger.apply(ev.renew("b", at=29, term=12, expires=400))  # late renewal: revives
    folded = fold_feed(_kinds(any_ledger))
    with Session(any_ledger.engine) as session:
        numbers = dict(session.execute(text("SELECT number, status FROM service_numbers")).all())
        filings = {
            (iid, fid): status
            for iid, fid, status in session.execute(
                text("SELECT instance_id, filing_id, status FROM filings")
            ).all()
        }
    assert folded.numbers == numbers
    assert folded.filings == filings
    assert "service_number.revived" in [kind for kind, _, _ in _kinds(any_ledger)]


def test_long_poll_returns_at_once_or_after_the_wait(any_ledger: Harness) -> None:
    ev = Events()
    any_ledger.apply(ev.purchase("i1"))
    assert len(wait_for_changes(any_ledger.engine, after=0, limit=10, wait=5)) == 2
    ticks = iter(range(100))
    slept: list[float] = []
    assert (
        wait_for_changes(
            any_ledger.engine,
            after=2,
            limit=10,
            wait=1.0,
            poll_interval=0.25,
            sleep=slept.append,
            clock=lambda: next(ticks) * 0.25,
        )
        == []
    )
    assert slept and sum(slept) <= 1.0
    # A change that commits while a reader waits wakes it.
    timer = threading.Timer(0.3, any_ledger.apply, args=[ev.request("i1")])
    timer.start()
    try:
        woke = wait_for_changes(any_ledger.engine, after=2, limit=10, wait=10)
    finally:
        timer.join()
    assert [c["kind"] for c in woke] == ["service_number.issued"]


@pytest.mark.postgres
def test_positions_are_gap_free_and_in_commit_order_under_concurrent_writers(
    postgres_url: str,
) -> None:
    """Four threads (their own connections) apply to overlapping instances while a reader
    follows the feed with a cursor: it must see every position exactly once, in order, and
    never a position while a lower one is still uncommitted."""
    from ledger.db import upgrade

    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    ledger = Ledger(engine, load_policy())
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        cursor = 0
        try:
            while not stop.is_set() or cursor < current_position(engine):
                for change in changes_after(engine, after=cursor, limit=500):
                    seen.append(change["position"])
                    cursor = change["position"]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def writer(worker: int) -> None:
        ev = Events(prefix=f"w{worker}")
        try:
            for round_ in range(15):
                instances = [f"i{(worker + k) % 6}" for k in range(2)]
                batch = []
                for instance in instances:
                    batch += [ev.purchase(instance), ev.request(instance, at=10 + round_)]
                ledger.apply([parse_event_obj(e) for e in batch])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    follow = threading.Thread(target=reader)
    follow.start()
    writers = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    follow.join()
    try:
        assert errors == []
        head = current_position(engine)
        assert head > 0
        assert seen == list(range(1, head + 1))
        assert verify(engine).feed.ok is True
    finally:
        engine.dispose()
