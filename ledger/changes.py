"""The change feed's records: what an entry changed, derived from (state before, state after,
entry). Pure: no I/O, no clock (the time of a change is its entry's ``occurred_at``).

The service calls :func:`derive_changes` for every entry it records, in the same transaction;
the store numbers the changes (``ledger.store.feed``). The same function runs in the in-memory
storage of the property tests, so what is stored and what is tested is one piece of code.

Kinds (``docs/changes.md`` documents each ``data``):

- ``service_number.issued`` / ``.used`` / ``.invalidated`` (with ``reason``) / ``.revived``;
- ``service_number.request_rejected`` (with ``reasons``);
- ``filing.accepted`` / ``.rejected`` (with ``reasons``) / ``.withdrawn``;
- ``instance.status_changed``, ``instance.eligibility_changed`` (with ``reasons``);
- ``event.dead_lettered`` (no entry: the event never reached the ledger);
- ``instance.renewal_due`` (no entry: the clock crossed a threshold; made by the sweep).

Eligibility before and after are both evaluated at the entry's ``occurred_at``: the change says
what *this entry* changed, not what the passing of time did (that is ``renewal_due``'s job).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from events import iso_utc
from ledger.policy import Policy
from ledger.rules import eligibility
from ledger.state import InstanceState

__all__ = [
    "CHANGE_KINDS",
    "Change",
    "FeedFold",
    "dead_letter_change",
    "derive_changes",
    "fold_feed",
    "reminder_window",
    "renewal_due_change",
]

CHANGE_KINDS: tuple[str, ...] = (
    "service_number.issued",
    "service_number.used",
    "service_number.invalidated",
    "service_number.revived",
    "service_number.request_rejected",
    "filing.accepted",
    "filing.rejected",
    "filing.withdrawn",
    "instance.status_changed",
    "instance.eligibility_changed",
    "instance.renewal_due",
    "event.dead_lettered",
)


#: The entry types that can change an instance's status or eligibility: the facts (SPEC §6).
_FACT_TYPES = frozenset(
    {
        "instance.purchased",
        "instance.renewed",
        "instance.billing_converted",
        "instance.bandwidth_changed",
        "instance.expired",
        "instance.released",
    }
)


@dataclass(frozen=True)
class Change:
    """One change of meaning, before the store gives it a position."""

    kind: str
    instance_id: str | None
    event_id: str | None  # the entry that caused it (None: a dead letter, a reminder)
    instance_seq: int | None
    occurred_at: datetime
    data: dict[str, Any] = field(default_factory=dict)


def derive_changes(
    before: InstanceState,
    after: InstanceState,
    entry: Mapping[str, Any],
    policy: Policy,
) -> list[Change]:
    """The changes one recorded entry made. ``entry`` holds at least ``event_id``, ``type``,
    ``instance_seq``, ``occurred_at`` (a datetime), ``payload`` (canonical JSON), ``outcome``
    and ``reasons``. Order: numbers (by issue), filings (by acceptance), then the instance."""
    instance_id = after.instance_id
    at: datetime = entry["occurred_at"]

    def change(kind: str, **data: Any) -> Change:
        return Change(kind, instance_id, entry["event_id"], entry["instance_seq"], at, data)

    changes: list[Change] = []
    if entry["outcome"] == "rejected":
        # Rejections change no state; the decision itself is what downstream wants to hear.
        reasons = list(entry["reasons"])
        if entry["type"] == "filing.submitted":
            payload = json.loads(entry["payload"])
            changes.append(
                change(
                    "filing.rejected",
                    filing_id=payload["filing_id"],
                    service_number=payload["service_number"],
                    website=payload["website"],
                    subject_id=payload["subject_id"],
                    reasons=reasons,
                )
            )
        elif entry["type"] == "service_number.requested":
            changes.append(change("service_number.request_rejected", reasons=reasons))
        return changes
    if entry["outcome"] != "applied":
        return changes  # stale: nothing changed

    for number, now in after.numbers.items():
        old = before.numbers.get(number)
        if old is None:
            changes.append(change("service_number.issued", number=number))
            continue
        if old.status == now.status:
            continue
        if now.status == "used":
            changes.append(change("service_number.used", number=number, filing_id=now.filing_id))
        elif now.status == "invalidated":
            reason = now.invalidated_reason
            changes.append(change("service_number.invalidated", number=number, reason=reason))
        else:
            changes.append(change("service_number.revived", number=number))
    for filing_id, filing in after.filings.items():
        previous = before.filings.get(filing_id)
        if previous is None:
            changes.append(
                change(
                    "filing.accepted",
                    filing_id=filing_id,
                    service_number=filing.service_number,
                    website=filing.website,
                    subject_id=filing.subject_id,
                )
            )
        elif previous.status != filing.status:
            changes.append(change("filing.withdrawn", filing_id=filing_id))
    if entry["type"] not in _FACT_TYPES:
        # Numbers and filings never change an instance's status or eligibility (SPEC §4): skip
        # evaluating them twice on the hot path of requests and filings.
        return changes
    if before.status != after.status:
        changes.append(
            change("instance.status_changed", **{"from": before.status}, to=after.status)
        )
    old_verdict = eligibility(before, policy, at)
    new_verdict = eligibility(after, policy, at)
    if old_verdict != new_verdict:
        changes.append(
            change(
                "instance.eligibility_changed",
                **{"from": old_verdict.status},
                to=new_verdict.status,
                reasons=list(new_verdict.reasons),
            )
        )
    return changes


def dead_letter_change(
    *, code: str, event_id: str | None, received_at: datetime, instance_id: str | None = None
) -> Change:
    """An event refused before the ledger: it names no entry (there is none)."""
    return Change(
        "event.dead_lettered",
        instance_id,
        None,
        None,
        received_at,
        {"code": code, "event_id": event_id},
    )


def renewal_due_change(*, instance_id: str, threshold_days: int, expires_at: datetime) -> Change:
    """``instance_id``'s remaining term crossed ``threshold_days`` days: its time is the moment
    it crossed (``expires_at`` − threshold), whenever the sweep noticed."""
    data = {"threshold_days": threshold_days, "expires_at": iso_utc(expires_at)}
    crossed = expires_at - timedelta(days=threshold_days)
    return Change("instance.renewal_due", instance_id, None, None, crossed, data)


def reminder_window(
    threshold_days: int, swept_until: datetime | None, now: datetime
) -> tuple[datetime, datetime] | None:
    """The ends ``(lo, hi]`` whose ``threshold_days`` crossing happened since the last sweep
    (at ``swept_until``) and up to ``now``, or None when there are none. Ends at or before
    ``now`` are the expiry sweep's business. The first sweep (``swept_until`` None) takes
    every end within the threshold. So each sweep reads only what became due since the last
    one, and an end that a renewal moved is met again when its own crossing comes."""
    span = timedelta(days=threshold_days)
    lo = now if swept_until is None else max(swept_until + span, now)
    hi = now + span
    return (lo, hi) if hi > lo else None


@dataclass
class FeedFold:
    """What a consumer learns by folding the feed: each number's and filing's last status."""

    numbers: dict[str, str] = field(default_factory=dict)  # number -> active|used|invalidated
    filings: dict[tuple[str, str], str] = field(default_factory=dict)  # (instance, id) -> status


_NUMBER_STATUS = {
    "service_number.issued": "active",
    "service_number.used": "used",
    "service_number.invalidated": "invalidated",
    "service_number.revived": "active",
}
_FILING_STATUS = {"filing.accepted": "accepted", "filing.withdrawn": "withdrawn"}


def fold_feed(changes: Iterable[tuple[str, str | None, Mapping[str, Any]]]) -> FeedFold:
    """Fold ``(kind, instance_id, data)`` in feed order: the consumer's view of numbers and
    filings. ``verify`` and the completeness tests compare it with the projections."""
    folded = FeedFold()
    for kind, instance_id, data in changes:
        if kind in _NUMBER_STATUS:
            folded.numbers[data["number"]] = _NUMBER_STATUS[kind]
        elif kind in _FILING_STATUS and instance_id is not None:
            folded.filings[(instance_id, data["filing_id"])] = _FILING_STATUS[kind]
    return folded
