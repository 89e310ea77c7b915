"""``ledger.changes.derive_changes``: what one entry changed, from (before, after, entry)."""

from __future__ import annotations

from typing import Any

from events import canonical_payload, parse_event_obj
from ledger.changes import (
    Change,
    derive_changes,
    fold_feed,
    reminder_window,
    renewal_due_change,
)
from ledger.entries import record
from ledger.policy import load_policy
from ledger.state import InstanceState
from tests.support import Events, Numbers, day

POLICY = load_policy()


def _apply(
    state: InstanceState, event: dict[str, Any], numbers: Numbers
) -> tuple[list[Change], InstanceState]:
    """Record ``event`` on ``state`` as the service does, and derive its changes."""
    parsed = parse_event_obj(event)
    payload = canonical_payload(parsed)
    fields, after = record(state, parsed, payload=payload, policy=POLICY, new_number=numbers)
    entry = {**fields, "occurred_at": parsed.occurred_at}
    return derive_changes(state, after, entry, POLICY), after


class Run:
    def __init__(self, instance: str = "i1") -> None:
        self.state = InstanceState(instance)
        self.numbers = Numbers()
        self.feed: list[Change] = []

    def __call__(self, event: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        changes, self.state = _apply(self.state, event, self.numbers)
        self.feed += changes
        return [(c.kind, c.data) for c in changes]


def test_purchase_request_filing_withdrawal() -> None:
    ev, run = Events(), Run()
    assert run(ev.purchase("i1")) == [
        ("instance.status_changed", {"from": "unknown", "to": "active"}),
        ("instance.eligibility_changed", {"from": "unknown", "to": "eligible", "reasons": []}),
    ]
    assert run(ev.request("i1")) == [("service_number.issued", {"number": "SN-1"})]
    accepted = run(ev.file("i1", "SN-1", filing="f1", subject="s", website="a.example.com"))
    assert accepted == [
        ("service_number.used", {"number": "SN-1", "filing_id": "f1"}),
        (
            "filing.accepted",
            {
                "filing_id": "f1",
                "service_number": "SN-1",
                "website": "a.example.com",
                "subject_id": "s",
            },
        ),
    ]
    assert run(ev.withdraw("i1", "f1")) == [("filing.withdrawn", {"filing_id": "f1"})]
    assert run(ev.withdraw("i1", "f1")) == []  # stale: nothing changed


def test_rejections_are_changes_and_change_no_state() -> None:
    ev, run = Events(), Run()
    assert run(ev.request("i1")) == [
        ("service_number.request_rejected", {"reasons": ["instance_unknown"]})
    ]
    run(ev.purchase("i1"))
    ((kind, data),) = run(ev.file("i1", "SN-9", filing="f9", subject="s", website="b.example.com"))
    assert kind == "filing.rejected"
    assert data == {
        "filing_id": "f9",
        "service_number": "SN-9",
        "website": "b.example.com",
        "subject_id": "s",
        "reasons": ["service_number_invalid"],
    }


def test_release_invalidates_with_its_reason_and_changes_status_and_eligibility() -> None:
    ev, run = Events(), Run()
    run(ev.purchase("i1"))
    run(ev.request("i1"))
    assert run(ev.release("i1", at=20)) == [
        ("service_number.invalidated", {"number": "SN-1", "reason": "instance_released"}),
        ("instance.status_changed", {"from": "active", "to": "released"}),
        (
            "instance.eligibility_changed",
            {"from": "eligible", "to": "ineligible", "reasons": ["instance_released"]},
        ),
    ]


def test_a_late_renewal_revives_what_an_expiry_invalidated() -> None:
    ev, run = Events(), Run()
    run(ev.purchase("i1", product="nat_gateway", term=1, expires=30))
    run(ev.request("i1", at=1))
    assert ("service_number.invalidated", {"number": "SN-1", "reason": "instance_expired"}) in run(
        ev.expire("i1", end=30)
    )
    kinds = run(ev.renew("i1", at=29, term=12, expires=400))
    assert ("service_number.revived", {"number": "SN-1"}) in kinds
    assert ("instance.status_changed", {"from": "expired", "to": "active"}) in kinds
    assert fold_feed((c.kind, c.instance_id, c.data) for c in run.feed).numbers == {
        "SN-1": "active"
    }


def test_changes_name_their_entry_and_time() -> None:
    ev, run = Events(), Run()
    purchase = ev.purchase("i1", at=3)
    run(purchase)
    first = run.feed[0]
    assert (first.instance_id, first.event_id, first.instance_seq) == (
        "i1",
        purchase["event_id"],
        1,
    )
    assert first.occurred_at == day(3)


def test_a_renewal_reminder_names_no_entry_and_its_crossing_time() -> None:
    change = renewal_due_change(instance_id="i1", threshold_days=7, expires_at=day(40))
    assert (change.kind, change.event_id, change.instance_seq) == (
        "instance.renewal_due",
        None,
        None,
    )
    assert change.data == {"threshold_days": 7, "expires_at": "2026-02-10T00:00:00Z"}
    assert change.occurred_at == day(33)


def test_reminder_windows_cover_each_crossing_once() -> None:
    assert reminder_window(30, None, day(10)) == (day(10), day(40))
    assert reminder_window(30, day(10), day(12)) == (day(40), day(42))
    assert reminder_window(30, day(12), day(11)) is None  # a sweep "in the past" finds nothing
    # An end that a renewal moved into an already swept span is not reminded again at the
    # thresholds already passed: it is met at the next, smaller one.
    assert reminder_window(7, day(12), day(13)) == (day(19), day(20))
