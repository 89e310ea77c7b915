"""Renewal reminders (issue 14) on every backend: ``instance.renewal_due`` at 30, 7 and 1 days
of remaining term, once each per instance, threshold and end; re-armed by a renewal; never for
an instance without numbers or filings."""

from __future__ import annotations

from typing import Any

from events import parse_event_obj
from ledger.changefeed import changes_after
from ledger.policy import load_policy
from ledger.service import Ledger
from ledger.store.memory import MemoryStorage
from tests.helpers.ledger_harness import Harness
from tests.support import Events, day


def _reminders(harness: Harness) -> list[tuple[str | None, int, str, str]]:
    return [
        (c["instance_id"], c["data"]["threshold_days"], c["data"]["expires_at"], c["occurred_at"])
        for c in changes_after(harness.engine, after=0, limit=1000)
        if c["kind"] == "instance.renewal_due"
    ]


def test_each_threshold_fires_once(any_ledger: Harness) -> None:
    ev = Events()
    any_ledger.apply(ev.purchase("held", expires=100), ev.request("held", at=10))
    any_ledger.apply(ev.purchase("empty", expires=100))  # no numbers, no filings: never
    sweep = any_ledger.ledger.sweep
    for moment in (60, 69, 70.5, 71, 80, 93.5, 94, 99.5, 99.9):
        sweep(now=day(moment))
    end = "2026-04-11T00:00:00Z"  # day 100
    assert _reminders(any_ledger) == [
        ("held", 30, end, "2026-03-12T00:00:00Z"),
        ("held", 7, end, "2026-04-04T00:00:00Z"),
        ("held", 1, end, "2026-04-10T00:00:00Z"),
    ]


def test_a_renewal_re_arms_them_and_a_first_sweep_says_only_the_most_urgent(
    any_ledger: Harness,
) -> None:
    ev = Events()
    any_ledger.apply(ev.purchase("i1", expires=100), ev.request("i1", at=10))
    any_ledger.apply(ev.purchase("soon", expires=100), ev.request("soon", at=10))
    any_ledger.apply(ev.file("soon", "SN-2", filing="f", at=11))
    any_ledger.ledger.sweep(now=day(99.5))  # the first sweep ever: 12 hours left
    assert [(i, d) for i, d, _, _ in _reminders(any_ledger)] == [("i1", 1), ("soon", 1)]
    any_ledger.apply(ev.renew("i1", at=99.6, term=12, expires=200))
    for moment in (100.5, 169, 170.5, 193.5, 199.5):
        any_ledger.ledger.sweep(now=day(moment))
    assert [(i, d, e[:10]) for i, d, e, _ in _reminders(any_ledger) if i == "i1"] == [
        ("i1", 1, "2026-04-11"),
        ("i1", 30, "2026-07-20"),
        ("i1", 7, "2026-07-20"),
        ("i1", 1, "2026-07-20"),
    ]


def test_expired_released_and_pay_as_you_go_instances_get_none(any_ledger: Harness) -> None:
    ev = Events()
    any_ledger.apply(ev.purchase("gone", expires=100), ev.request("gone", at=10))
    any_ledger.apply(ev.release("gone", at=20))
    any_ledger.apply(ev.purchase("payg", billing="pay_as_you_go", term=None, expires=None))
    any_ledger.ledger.sweep(now=day(99))
    assert _reminders(any_ledger) == []


def test_the_in_memory_twin_agrees() -> None:
    ev = Events()
    storage = MemoryStorage()
    ledger = Ledger(storage, load_policy())
    events: list[dict[str, Any]] = [ev.purchase("held", expires=100), ev.request("held", at=10)]
    ledger.apply([parse_event_obj(e) for e in events])
    for moment in (70.5, 71, 93.5, 99.5):
        ledger.sweep(now=day(moment))
    reminders = [c for c in storage.changes if c.kind == "instance.renewal_due"]
    assert [c.data["threshold_days"] for c in reminders] == [30, 7, 1]


def test_instances_renewal_due_lists_what_the_reminders_are_about(any_ledger: Harness) -> None:
    from sqlmodel import Session

    from ledger.queries import list_instances

    ev = Events()
    any_ledger.apply(ev.purchase("soon", expires=100), ev.request("soon", at=10))
    any_ledger.apply(ev.purchase("later", expires=200), ev.request("later", at=10))
    any_ledger.apply(ev.purchase("empty", expires=100))
    with Session(any_ledger.engine) as session:

        def due(at: float) -> list[str]:
            rows = list_instances(session, policy=any_ledger.policy, at=day(at), renewal_due=True)
            return [row["instance_id"] for row in rows]

        assert due(60) == []
        assert due(75) == ["soon"]
        assert due(175) == ["later"]  # "soon" has ended: the sweep's business now
