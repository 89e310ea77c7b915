"""The resequencer's gate through the service on every backend (SPEC §9): what parks, what is
released and in which order, what a gap timeout and the capacity skip do, what the answers and
queries show, and that rebuild and verify leave its state alone."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from events import parse_event, parse_event_obj
from ledger.audit import rebuild, verify
from ledger.policy import load_policy
from ledger.queries import instance_history, parked_events, show_instance
from ledger.resequencer import Tag
from ledger.service import ApplyResult, Ledger
from ledger.tables import DeadLetter, LedgerEntry, ParkedEvent, SequencerGate
from tests.support import Events, Numbers

EPOCH = 1_764_000_000_000_000
AT = datetime(2026, 6, 1, tzinfo=UTC)


def make_ledger(engine: Engine, **options: Any) -> Ledger:
    return Ledger(engine, load_policy(), new_number=Numbers(), **options)


def send(ledger: Ledger, *items: tuple[Any, int], epoch: int = EPOCH) -> list[ApplyResult]:
    """One message: each item is ``(event dict or raw text, n)``; tags name the event's instance
    (``instance`` of a raw text item is ``i-1``)."""
    parsed = [
        parse_event(item) if isinstance(item, str) else parse_event_obj(item) for item, _ in items
    ]
    tags = [
        Tag(item["instance_id"] if isinstance(item, dict) else "i-1", epoch, n) for item, n in items
    ]
    return ledger.apply(parsed, sequence=tags)


def outcomes(results: list[ApplyResult]) -> list[str]:
    return [r.outcome for r in results]


def entries(engine: Engine, instance_id: str = "i-1") -> list[tuple[str, str]]:
    with Session(engine) as session:
        return [
            (row["event_id"], row["outcome"])
            for row in instance_history(session, instance_id=instance_id)
        ]


def parked(engine: Engine) -> list[dict[str, Any]]:
    with Session(engine) as session:
        return parked_events(session)


def count(engine: Engine, table: Any) -> int:
    with Session(engine) as session:
        return int(session.execute(select(func.count()).select_from(table)).scalar_one())


def test_a_request_ahead_of_its_purchase_parks_and_is_decided_after_it(engine: Engine) -> None:
    ledger = make_ledger(engine)
    ev = Events("rq")
    purchase, request = ev.purchase("i-1"), ev.request("i-1", at=1)

    assert outcomes(send(ledger, (request, 2))) == ["parked"]
    assert entries(engine) == []
    (row,) = parked(engine)
    assert {k: v for k, v in row.items() if k != "parked_at"} == {
        "instance_id": "i-1",
        "epoch": EPOCH,
        "n": 2,
        "event_id": "rq-2",
        "type": "service_number.requested",
        "waiting_for": 1,
    }
    assert row["parked_at"].endswith("Z")
    with Session(engine) as session:
        view = show_instance(session, instance_id="i-1", at=AT, policy=ledger.policy)
        history = instance_history(session, instance_id="i-1")
    assert view is not None and history == []
    assert (view["status"], view["entries"], view["parked"]) == ("unknown", 0, 1)

    # A redelivery of the parked message: answered parked again, nothing new stored.
    assert outcomes(send(ledger, (request, 2))) == ["parked"]
    assert count(engine, ParkedEvent) == 1

    # The purchase fills the gap: it is applied, then the request, in the same transaction.
    assert outcomes(send(ledger, (purchase, 1))) == ["applied"]
    assert entries(engine) == [("rq-1", "applied"), ("rq-2", "applied")]
    assert parked(engine) == []
    # The released request was decided when applied: it got a number.
    with Session(engine) as session:
        view = show_instance(session, instance_id="i-1", at=AT, policy=ledger.policy)
    assert view is not None and [n["number"] for n in view["service_numbers"]] == ["SN-1"]
    assert view["parked"] == 0
    # A redelivery of an applied number is applied on arrival: a duplicate.
    assert outcomes(send(ledger, (request, 2))) == ["duplicate"]


def test_a_message_keeps_its_own_order_and_numbers_already_filled_pass(engine: Engine) -> None:
    ledger = make_ledger(engine)
    ev = Events("mo")
    p, r1, r2 = ev.purchase("i-1"), ev.request("i-1", at=1), ev.request("i-1", at=2)
    other = ev.purchase("i-2")
    # One message, numbers in order, two instances: everything applied on arrival.
    assert outcomes(send(ledger, (p, 1), (other, 1), (r1, 2), (r2, 3))) == ["applied"] * 4
    assert entries(engine) == [("mo-1", "applied"), ("mo-2", "applied"), ("mo-3", "applied")]
    with Session(engine) as session:
        gates = {g.instance_id: (g.epoch, g.last) for g in session.scalars(select(SequencerGate))}
    assert gates == {"i-1": (EPOCH, 3), "i-2": (EPOCH, 1)}


def test_a_dead_lettered_element_fills_its_number(engine: Engine) -> None:
    ledger = make_ledger(engine)
    ev = Events("dl")
    purchase, request = ev.purchase("i-1"), ev.request("i-1", at=1)
    assert outcomes(send(ledger, (purchase, 1), (request, 3))) == ["applied", "parked"]
    # Number 2 was an invalid event: dead-lettered at once, and its number counts as filled.
    assert outcomes(send(ledger, ("{not json", 2))) == ["invalid"]
    assert entries(engine) == [("dl-1", "applied"), ("dl-2", "applied")]
    assert count(engine, DeadLetter) == 1 and parked(engine) == []


def test_an_invalid_element_ahead_of_a_gap_is_filled_when_reached(engine: Engine) -> None:
    ledger = make_ledger(engine)
    ev = Events("ia")
    purchase, request = ev.purchase("i-1"), ev.request("i-1", at=1)
    assert outcomes(send(ledger, ("junk", 2), (request, 3))) == ["invalid", "parked"]
    assert [row["n"] for row in parked(engine)] == [3]  # the filled placeholder is not listed
    assert outcomes(send(ledger, (purchase, 1))) == ["applied"]
    assert entries(engine) == [("ia-1", "applied"), ("ia-2", "applied")]
    assert count(engine, ParkedEvent) == 0


def test_a_gap_that_times_out_is_skipped_and_the_late_predecessor_applied_on_arrival(
    engine: Engine,
) -> None:
    ledger = make_ledger(engine, gap_timeout=0.5)
    ev = Events("gt")
    purchase, request = ev.purchase("i-1"), ev.request("i-1", at=1)
    assert outcomes(send(ledger, (purchase, 1), (request, 3))) == ["applied", "parked"]
    assert ledger.release_due() == 0  # not yet timed out
    assert [row["n"] for row in parked(engine)] == [3]
    time.sleep(1.1)  # SQLite's clock in the store has millisecond steps; PostgreSQL: now()
    assert ledger.release_due() == 1
    assert entries(engine) == [("gt-1", "applied"), ("gt-2", "applied")]
    assert parked(engine) == []
    # Number 2 turns up after all: applied on arrival.
    late = ev.bandwidth("i-1", 10, at=0.5)
    assert outcomes(send(ledger, (late, 2))) == ["applied"]
    assert [e for e, _ in entries(engine)] == ["gt-1", "gt-2", "gt-3"]


def test_too_many_parked_skips_the_lowest_gap_at_once(engine: Engine) -> None:
    skipped: list[int] = []
    ledger = make_ledger(engine, max_parked=2, on_gaps_skipped=skipped.append)
    ev = Events("cap")
    purchase = ev.purchase("i-1")
    requests = [ev.request("i-1", at=n) for n in (1, 2, 3)]
    assert outcomes(send(ledger, (purchase, 1))) == ["applied"]
    assert outcomes(send(ledger, (requests[0], 3), (requests[1], 5))) == ["parked", "parked"]
    # A third parked event is one too many: the gap at 2 is skipped, 3 applied; 5 and 6 wait.
    assert outcomes(send(ledger, (requests[2], 6))) == ["parked"]
    assert entries(engine) == [("cap-1", "applied"), ("cap-2", "applied")]
    assert [row["n"] for row in parked(engine)] == [5, 6]
    assert skipped == [1]


def test_a_new_epoch_releases_the_old_epochs_parked_first(engine: Engine) -> None:
    ledger = make_ledger(engine)
    ev = Events("ep")
    purchase, r1, r2 = ev.purchase("i-1"), ev.request("i-1", at=1), ev.request("i-1", at=2)
    assert outcomes(send(ledger, (purchase, 1), (r1, 3))) == ["applied", "parked"]
    # The broker lost its counters: a new epoch, numbers from 1 again.
    assert outcomes(send(ledger, (r2, 1), epoch=EPOCH + 1)) == ["applied"]
    assert entries(engine) == [("ep-1", "applied"), ("ep-2", "applied"), ("ep-3", "applied")]
    # A straggler of the old epoch is applied on arrival.
    assert outcomes(send(ledger, (ev.bandwidth("i-1", 1, at=3), 2))) == ["applied"]
    with Session(engine) as session:
        gate = session.get(SequencerGate, "i-1")
    assert gate is not None and (gate.epoch, gate.last, gate.parked) == (EPOCH + 1, 1, 0)


def test_rebuild_and_verify_leave_the_resequencer_alone(engine: Engine) -> None:
    ledger = make_ledger(engine)
    ev = Events("rb")
    assert outcomes(send(ledger, (ev.purchase("i-1"), 1), (ev.request("i-1", at=1), 3))) == [
        "applied",
        "parked",
    ]
    assert verify(engine).broken == []
    report = rebuild(engine, check=True)
    assert (report.drift, report.broken) == ([], [])
    rebuild(engine)
    assert [row["n"] for row in parked(engine)] == [3]
    with Session(engine) as session:
        gate = session.get(SequencerGate, "i-1")
    assert gate is not None and (gate.last, gate.parked) == (1, 1)


def test_messages_without_numbers_bypass_the_gate(engine: Engine) -> None:
    ledger = make_ledger(engine)
    ev = Events("by")
    request = parse_event_obj(ev.request("i-1", at=1))
    assert outcomes(ledger.apply([request])) == ["rejected"]  # instance_unknown, on arrival
    assert count(engine, SequencerGate) == 0
    assert count(engine, LedgerEntry) == 1
