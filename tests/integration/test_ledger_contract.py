"""The ledger's contract (SPEC §5–§6), run on every backend: SQLite and a fresh PostgreSQL."""

from __future__ import annotations

import json
import threading

import pytest
from sqlalchemy import text
from sqlmodel import Session

from events import parse_event
from ledger.audit import rebuild, verify
from ledger.queries import instance_history, rejected_events, service_number_info
from ledger.service import Ledger
from tests.helpers.ledger_harness import Harness, drop_append_only_triggers
from tests.support import Events, Numbers, day


def test_duplicate_returns_the_original_answer(any_ledger: Harness) -> None:
    ev = Events()
    purchase = ev.purchase("i1")
    request = ev.request("i1")
    first = any_ledger.apply(purchase, request)
    # Same content, other key order and white space: still a duplicate.
    reordered = json.dumps(dict(reversed(list(request.items()))), indent=2)
    again = any_ledger.ledger.apply([parse_event(reordered)])
    assert [r.to_json() for r in again] == [
        {
            "event_id": request["event_id"],
            "outcome": "duplicate",
            "reasons": [],
            "service_number": first[1].service_number,
        }
    ]
    with Session(any_ledger.engine) as session:
        assert len(instance_history(session, instance_id="i1")) == 2


def test_event_id_reused_with_other_content_is_dead_lettered(any_ledger: Harness) -> None:
    ev = Events()
    purchase = ev.purchase("i1")
    any_ledger.apply(purchase)
    changed = json.dumps({**purchase, "public_bandwidth_mbps": 0})
    (result,) = any_ledger.ledger.apply([parse_event(changed)], raws=[changed])
    assert (result.outcome, result.reasons) == ("invalid", ("event_id_reused",))
    with Session(any_ledger.engine) as session:
        (dead,) = rejected_events(session)
        assert (dead["event_id"], dead["code"], dead["raw"]) == (
            purchase["event_id"],
            "event_id_reused",
            changed,
        )
        assert len(instance_history(session, instance_id="i1")) == 1


def test_invalid_lines_are_dead_lettered_never_dropped(any_ledger: Harness) -> None:
    lines = [
        "not json",
        "[1, 2]",
        json.dumps(
            {
                "event_id": "x1",
                "type": "instance.exploded",
                "occurred_at": "2026-01-01T00:00:00Z",
                "instance_id": "i",
            }
        ),
        "{" + " " * (64 * 1024) + "}",
        "null\x00byte",
        "",
    ]
    results = list(any_ledger.ledger.apply_lines(lines))
    assert [r.outcome for r in results] == ["invalid"] * 5
    assert [r.reasons for r in results] == [("invalid_event",)] * 3 + [
        ("too_large",),
        ("invalid_event",),
    ]
    assert results[2].event_id == "x1" and "type" in results[2].error
    with Session(any_ledger.engine) as session:
        dead = rejected_events(session)
    assert [d["code"] for d in dead] == ["invalid_event"] * 3 + ["too_large", "invalid_event"]
    assert dead[0]["raw"] == "not json" and all(d["error"] for d in dead)
    assert "byte" in dead[4]["raw"]


def test_an_event_that_fails_while_applied_is_a_processing_error(any_ledger: Harness) -> None:
    ev = Events()

    def broken_numbers() -> str:
        raise RuntimeError("number source unavailable")

    broken = Ledger(any_ledger.engine, any_ledger.policy, new_number=broken_numbers)
    results = broken.apply(
        [
            parse_event(json.dumps(e))
            for e in (ev.purchase("i1"), ev.request("i1"), ev.bandwidth("i1", 9, at=2))
        ]
    )
    assert [r.outcome for r in results] == ["applied", "invalid", "applied"]
    assert results[1].reasons == ("processing_error",)
    assert "number source unavailable" in results[1].error
    with Session(any_ledger.engine) as session:
        assert [d["code"] for d in rejected_events(session)] == ["processing_error"]


def test_ledger_entries_refuse_update_and_delete(any_ledger: Harness) -> None:
    any_ledger.apply(Events().purchase("i1"))
    for statement in (
        "UPDATE ledger_entries SET outcome = 'rejected'",
        "DELETE FROM ledger_entries",
    ):
        with pytest.raises(Exception, match="append-only"), any_ledger.engine.begin() as conn:
            conn.execute(text(statement))
    assert verify(any_ledger.engine).to_json()["ok"]


def test_sweep_expires_due_instances_once(any_ledger: Harness) -> None:
    ev = Events()
    any_ledger.apply(
        ev.purchase("due-1", expires=100),
        ev.purchase("due-2", expires=150),
        ev.purchase("later", expires=300),
        ev.purchase("payg", billing="pay_as_you_go"),
        ev.request("due-1", at=10),
    )
    assert any_ledger.ledger.sweep(now=day(200), chunk_size=1) == 2
    assert any_ledger.ledger.sweep(now=day(200)) == 0
    assert any_ledger.show("due-1", day(200))["status"] == "expired"
    assert any_ledger.show("later", day(200))["status"] == "active"
    assert any_ledger.show("payg", day(200))["status"] == "active"
    numbers = any_ledger.show("due-1", day(200))["service_numbers"]
    assert [(n["status"], n["invalidated_reason"]) for n in numbers] == [
        ("invalidated", "instance_expired")
    ]
    with Session(any_ledger.engine) as session:
        last = instance_history(session, instance_id="due-1")[-1]
        info = service_number_info(session, number=numbers[0]["number"])
    assert last["event_id"] == "sweep:due-1:20260411T000000Z"
    assert last["occurred_at"] == "2026-04-11T00:00:00Z"
    assert info["invalidated_at"] == "2026-04-11T00:00:00Z" and info["status"] == "invalidated"


def test_rebuild_finds_and_repairs_projection_drift(any_ledger: Harness) -> None:
    ev = Events()
    any_ledger.apply(ev.purchase("i1"), ev.request("i1"), ev.purchase("i2"))
    with any_ledger.engine.begin() as conn:
        conn.execute(text("UPDATE instances SET status = 'released' WHERE instance_id = 'i1'"))
        conn.execute(text("DELETE FROM service_numbers"))
    assert rebuild(any_ledger.engine, check=True).to_json() == {
        "instances": 2,
        "entries": 3,
        "drift": ["i1"],
        "broken": [],
    }
    assert rebuild(any_ledger.engine).to_json()["drift"] == ["i1"]
    assert rebuild(any_ledger.engine, check=True).to_json()["drift"] == []
    assert any_ledger.show("i1", day(20))["status"] == "active"


def test_verify_and_rebuild_find_a_removed_last_entry(any_ledger: Harness) -> None:
    ev = Events()
    any_ledger.apply(ev.purchase("i1"), ev.request("i1"), ev.purchase("i2"))
    drop_append_only_triggers(any_ledger)
    with any_ledger.engine.begin() as conn:
        conn.execute(
            text("DELETE FROM ledger_entries WHERE instance_id = 'i1' AND instance_seq = 2")
        )
    verified = verify(any_ledger.engine)
    # The removed entry's change now names no entry: the feed check sees it too.
    assert verified.feed.orphans == [3]
    report = verified.to_json()
    assert report == {
        "ok": False,
        "entries": 2,
        "instances": 2,
        "broken": ["i1"],
    }
    report = rebuild(any_ledger.engine).to_json()
    assert report["broken"] == ["i1"]
    # Left as it was: the head is never lowered.
    assert any_ledger.show("i1", day(20))["entries"] == 2


def test_verify_finds_an_edited_entry(any_ledger: Harness) -> None:
    ev = Events()
    any_ledger.apply(ev.purchase("i1"), ev.request("i1"), ev.purchase("i2"))
    drop_append_only_triggers(any_ledger)
    with any_ledger.engine.begin() as conn:
        conn.execute(
            text("UPDATE ledger_entries SET outcome = 'rejected' WHERE instance_id = 'i2'")
        )
    assert verify(any_ledger.engine).to_json()["broken"] == ["i2"]
    assert rebuild(any_ledger.engine, check=True).to_json()["broken"] == ["i2"]


def test_concurrent_appliers_never_exceed_the_cap(any_ledger: Harness) -> None:
    """Eight threads, each with its own connection, race for one instance's five slots."""
    ev = Events()
    any_ledger.apply(ev.purchase("race"))
    requests = [[ev.request("race", at=10) for _ in range(5)] for _ in range(8)]
    outcomes: list[str] = []
    errors: list[BaseException] = []

    def worker(batch: list[dict]) -> None:
        ledger = Ledger(any_ledger.engine, any_ledger.policy, new_number=Numbers(f"T{id(batch)}"))
        try:
            for request in batch:
                outcomes.extend(r.outcome for r in ledger.apply([parse_event(json.dumps(request))]))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(batch,)) for batch in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert sorted(outcomes) == ["applied"] * 5 + ["rejected"] * 35
    view = any_ledger.show("race", day(20))
    assert view["websites"]["reserved"] == 5 and view["entries"] == 41
    assert verify(any_ledger.engine).to_json()["ok"]
    assert rebuild(any_ledger.engine, check=True).to_json()["drift"] == []


def test_dead_letters_are_stored_in_input_order(any_ledger: Harness) -> None:
    purchase = Events().purchase("i1")
    any_ledger.apply(purchase)
    reused = json.dumps({**purchase, "region": "cn-beijing"})
    results = list(any_ledger.ledger.apply_lines([reused, "junk"]))
    assert [r.reasons for r in results] == [("event_id_reused",), ("invalid_event",)]
    with Session(any_ledger.engine) as session:
        assert [d["code"] for d in rejected_events(session)] == ["event_id_reused", "invalid_event"]
