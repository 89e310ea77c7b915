"""Properties of the ledger (hypothesis): idempotency, facts that commute, caps never exceeded,
rebuild equals live, and tampering found by verify.

The pure properties run on the in-memory model (``tests.support.MemoryLedger``, which calls the
same ``record`` as the service) with many examples; the storage properties run the real service
on SQLite with fewer, each example in its own namespace of instance and event ids.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlmodel import Session

from events import iso_utc, parse_event_obj
from ledger.audit import rebuild, verify
from ledger.db import make_engine, upgrade
from ledger.policy import load_policy
from ledger.queries import instance_history, show_instance
from ledger.rules import subject_cap, website_cap
from ledger.service import Ledger
from ledger.state import InstanceState, state_to_json
from tests.property.strategies import fact_histories, histories
from tests.support import MemoryLedger, Numbers, day

POLICY = load_policy()
DB_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def facts(state: InstanceState) -> dict[str, Any]:
    purchase = state.purchase
    return {
        "purchase": None if purchase is None else (purchase.account_id, purchase.product_type),
        "billing": state.billing_method,
        "bandwidth": state.public_bandwidth_mbps,
        "expires_at": state.expires_at,
        "term": state.term_months,
        "status": state.status,
        "effective_ends": sorted(e.end for e in state.effective_expiries),
    }


# -- pure properties ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(events=fact_histories(), data=st.data())
def test_any_permutation_of_facts_gives_the_same_facts(events, data) -> None:
    shuffled = data.draw(st.permutations(events))
    first, second = MemoryLedger(POLICY), MemoryLedger(POLICY)
    first.apply_all(events)
    second.apply_all(shuffled)
    assert facts(first.state("i1")) == facts(second.state("i1"))


@settings(max_examples=300, deadline=None)
@given(events=histories(max_size=60))
def test_caps_are_never_exceeded_and_numbers_used_once(events) -> None:
    led = MemoryLedger(POLICY)
    for event in events:
        led.apply(event)
        for state in led.states.values():
            assert state.websites_used + state.websites_reserved <= website_cap(state, POLICY)
            assert len(state.subjects) <= subject_cap(state, POLICY)
            used_by = [f.service_number for f in state.filings.values()]
            assert len(used_by) == len(set(used_by))
            assert all(state.numbers[n].status == "used" for n in used_by)


@settings(max_examples=200, deadline=None)
@given(events=histories())
def test_replaying_in_memory_is_a_no_op(events) -> None:
    led = MemoryLedger(POLICY)
    led.apply_all(events)
    snapshot = {iid: state_to_json(s) for iid, s in led.states.items()}
    assert set(led.apply_all(events)) <= {"duplicate"}
    assert {iid: state_to_json(s) for iid, s in led.states.items()} == snapshot


# -- storage properties (real service, SQLite) ------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    url = f"sqlite:///{tmp_path_factory.mktemp('props') / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


_namespaces = itertools.count()


def namespaced(events: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    ns = f"n{next(_namespaces)}-"
    numbers = {f"SN-{k}": f"{ns}SN-{k}" for k in range(1, 40)}
    out = []
    for event in events:
        event = {
            **event,
            "event_id": ns + event["event_id"],
            "instance_id": ns + event["instance_id"],
        }
        if "service_number" in event:
            event["service_number"] = numbers.get(event["service_number"], event["service_number"])
        out.append(event)
    return ns, out


def snapshot(engine, instance_ids: set[str]) -> dict[str, Any]:
    with Session(engine) as session:
        return {
            iid: (
                show_instance(session, instance_id=iid, at=day(200), policy=POLICY),
                [
                    {k: v for k, v in e.items() if k != "seq"}
                    for e in instance_history(session, instance_id=iid)
                ],
            )
            for iid in sorted(instance_ids)
        }


@DB_SETTINGS
@given(events=histories())
def test_replaying_through_the_store_changes_nothing(store, events) -> None:
    ns, events = namespaced(events)
    ledger = Ledger(store, POLICY, new_number=Numbers(f"{ns}SN"))
    parsed = [parse_event_obj(e) for e in events]
    first = ledger.apply(parsed)
    before = snapshot(store, {e["instance_id"] for e in events})
    again = ledger.apply(parsed)
    assert [r.outcome for r in again] == ["duplicate"] * len(events)
    assert [(r.reasons, r.service_number) for r in again] == [
        (r.reasons, r.service_number) for r in first
    ]
    assert snapshot(store, {e["instance_id"] for e in events}) == before


@DB_SETTINGS
@given(events=histories(), batch=st.integers(1, 7))
def test_store_agrees_with_the_pure_model_and_rebuild_equals_live(store, events, batch) -> None:
    ns, events = namespaced(events)
    ledger = Ledger(store, POLICY, new_number=Numbers(f"{ns}SN"))
    for start in range(0, len(events), batch):  # batch boundaries must not matter
        ledger.apply([parse_event_obj(e) for e in events[start : start + batch]])
    model = MemoryLedger(POLICY, new_number=Numbers(f"{ns}SN"))
    model.apply_all(events)
    with Session(store) as session:
        for iid, state in model.states.items():
            view = show_instance(session, instance_id=iid, at=day(200), policy=POLICY)
            assert view is not None and view["head_hash"] == state.head_hash
            assert view["entries"] == state.entries
    report = rebuild(store, check=True).to_json()
    assert report["drift"] == [] and report["broken"] == []


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=histories(max_size=15).filter(bool), data=st.data())
def test_changing_any_stored_entry_is_found_by_verify(tmp_path_factory, events, data) -> None:
    url = f"sqlite:///{tmp_path_factory.mktemp('tamper') / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        Ledger(engine, POLICY, new_number=Numbers()).apply([parse_event_obj(e) for e in events])
        assert verify(engine).to_json()["ok"]
        with engine.begin() as conn:
            rows = conn.execute(
                text("SELECT seq, instance_id FROM ledger_entries ORDER BY seq")
            ).all()
        seq, instance_id = data.draw(st.sampled_from(rows))
        column, value = data.draw(
            st.sampled_from(
                [
                    ("outcome", "'applied'"),
                    ("reasons", "'[\"x\"]'"),
                    ("result", '\'{"service_number": "forged"}\''),
                    ("payload", "payload || ' '"),
                    ("occurred_at", f"'{iso_utc(day(999))}'"),
                    ("policy_version", "'forged'"),
                    ("instance_seq", "instance_seq + 1000"),
                    ("hash", "'" + "f" * 64 + "'"),
                    ("event_id", "event_id || '-x'"),
                    ("type", "'instance.renewed'"),
                ]
            )
        )
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER IF EXISTS ledger_entries_no_update"))
            for (name,) in conn.execute(
                text("SELECT name FROM sqlite_master WHERE type = 'trigger'")
            ).all():
                conn.execute(text(f'DROP TRIGGER "{name}"'))
            before = conn.execute(
                text(f"SELECT {column} FROM ledger_entries WHERE seq = :s"), {"s": seq}
            ).scalar()
            conn.execute(
                text(f"UPDATE ledger_entries SET {column} = {value} WHERE seq = :s"), {"s": seq}
            )
            after = conn.execute(
                text(f"SELECT {column} FROM ledger_entries WHERE seq = :s"), {"s": seq}
            ).scalar()
        if json.dumps(before, default=str) == json.dumps(after, default=str):
            return  # the "change" wrote the same value: nothing to find
        report = verify(engine).to_json()
        assert not report["ok"] and report["broken"] == [instance_id]
    finally:
        engine.dispose()


# --- publish order (SPEC §9) on the real service, in memory ------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_numbered_messages_in_any_order_give_the_in_order_ledger(data: st.DataObject) -> None:
    """One instance's stream — purchase, requests, filings of the numbers it will issue, a
    bandwidth change, a renewal — published one event per message and delivered in any order,
    some twice: with the resequencer the ledger is the one that applied the stream in order."""
    from ledger.resequencer import Tag
    from tests.support import Events

    ev = Events("po")
    stream = [ev.purchase("i-po", at=0, bandwidth=data.draw(st.sampled_from([0, 5])))]
    for step in range(1, data.draw(st.integers(2, 12))):
        kind = data.draw(st.sampled_from(["request", "request", "file", "bandwidth", "renew"]))
        if kind == "request":
            stream.append(ev.request("i-po", at=step))
        elif kind == "file":
            number = f"SN-{data.draw(st.integers(1, 4))}"
            stream.append(ev.file("i-po", number, at=step, filing=f"F-{step}", subject=f"s{step}"))
        elif kind == "bandwidth":
            stream.append(ev.bandwidth("i-po", data.draw(st.sampled_from([0, 10])), at=step))
        else:
            stream.append(ev.renew("i-po", at=step, term=12, expires=730))
    numbered = [(event, Tag("i-po", 7, n)) for n, event in enumerate(stream, 1)]
    deliveries = data.draw(st.permutations(numbered))
    deliveries += data.draw(st.lists(st.sampled_from(numbered), max_size=4))  # redeliveries

    shuffled, in_order = MemoryLedger(POLICY), MemoryLedger(POLICY)
    for event, tag in deliveries:
        shuffled.ledger.apply([parse_event_obj(event)], sequence=[tag])
    in_order.apply_all(stream)

    def chain(model: MemoryLedger) -> list[tuple[Any, ...]]:
        return [
            (e["event_id"], e["outcome"], e["reasons"], e["result"], e["hash"])
            for e in model.entries["i-po"]
        ]

    assert chain(shuffled) == chain(in_order)
    assert shuffled.storage.parked == {} and shuffled.storage.gates["i-po"].last == len(stream)
