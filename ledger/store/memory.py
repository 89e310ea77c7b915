"""The ledger's storage on plain dicts: the same service (``ledger.service.Ledger``), no database.

For the rule and property tests (thousands of examples) and the simulation's in-order model:
what they exercise is the real use case — dedupe, decide, record, fold, the resequencer's gate —
not a copy of it. A transaction works on what it loaded and writes back only in ``save``; a
transaction whose work raises leaves nothing behind, as a rolled-back one would.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from ledger.changes import Change, reminder_window, renewal_due_change
from ledger.clock import utcnow
from ledger.resequencer import Gate, Parked, Release
from ledger.results import Prior
from ledger.state import InstanceState
from ledger.store import ParkedRow, Transaction

__all__ = ["MemoryStorage"]

T = TypeVar("T")


@dataclass
class MemoryStorage:
    """Every table of the ledger as a dict or a list (``entries`` in commit order)."""

    clock: Callable[[], datetime] = utcnow
    states: dict[str, InstanceState] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    priors: dict[str, Prior] = field(default_factory=dict)
    gates: dict[str, Gate] = field(default_factory=dict)
    parked: dict[tuple[str, int, int], tuple[ParkedRow, datetime]] = field(default_factory=dict)
    # The change feed, in position order: ``changes[p - 1]`` is at position ``p``.
    changes: list[Change] = field(default_factory=list)
    renewal_marks: dict[int, datetime] = field(default_factory=dict)

    def run(self, work: Callable[[Transaction], T], max_attempts: int) -> T:
        return work(_MemoryTransaction(self))

    def due_gate_instances(self, *, timeout: float, limit: int) -> list[str]:
        now = self.clock().timestamp()
        due = set()
        for (instance_id, epoch, n), (_, parked_at) in self.parked.items():
            gate = self.gates.get(instance_id)
            if now - parked_at.timestamp() >= timeout or (
                gate is not None and gate.epoch == epoch and n == gate.last + 1
            ):
                due.add(instance_id)
        return sorted(due)[:limit]

    def due_expiries(
        self, *, now: datetime, after: tuple[datetime, str] | None, limit: int
    ) -> list[tuple[str, datetime]]:
        due = sorted(
            (state.expires_at, instance_id)
            for instance_id, state in self.states.items()
            if state.status == "active"
            and state.billing_method == "subscription"
            and state.expires_at is not None
            and state.expires_at <= now
        )
        if after is not None:
            due = [key for key in due if key > after]
        return [(instance_id, expires_at) for expires_at, instance_id in due[:limit]]

    def remind_renewals(
        self, *, now: datetime, thresholds: Sequence[int], recorded_at: datetime
    ) -> int:
        """``ledger.store.reminders.remind_renewals`` on the states (a full scan: it is a
        model, not the indexed query)."""
        reminded: dict[str, Change] = {}
        for days in sorted(thresholds):
            window = reminder_window(days, self.renewal_marks.get(days), now)
            if window is None:
                continue
            due = sorted(
                (state.expires_at, iid)
                for iid, state in self.states.items()
                if state.status == "active"
                and state.billing_method == "subscription"
                and state.expires_at is not None
                and window[0] < state.expires_at <= window[1]
                and (
                    any(n.status == "active" for n in state.numbers.values())
                    or any(f.status == "accepted" for f in state.filings.values())
                )
            )
            for end, iid in due:
                if iid not in reminded:
                    change = renewal_due_change(
                        instance_id=iid, threshold_days=days, expires_at=end
                    )
                    reminded[iid] = change
        for days in thresholds:
            self.renewal_marks[days] = max(self.renewal_marks.get(days, now), now)
        self.changes += reminded.values()
        return len(reminded)


class _MemoryTransaction:
    def __init__(self, storage: MemoryStorage) -> None:
        self.storage = storage

    def lock(self, instance_ids: Sequence[str]) -> dict[str, InstanceState]:
        states = self.storage.states
        return {iid: states.get(iid) or InstanceState(iid) for iid in instance_ids}

    def priors(self, event_ids: Iterable[str]) -> dict[str, Prior]:
        known = self.storage.priors
        return {event_id: known[event_id] for event_id in event_ids if event_id in known}

    def gates(self, instance_ids: Sequence[str]) -> dict[str, Gate]:
        gates: dict[str, Gate] = {}
        for iid in instance_ids:
            stored = self.storage.gates.get(iid)
            gate = copy.deepcopy(stored) if stored is not None else Gate(iid)
            gate.released = gate.skipped = 0
            gates[iid] = gate
        return gates

    def parked(self, releases: Iterable[Release]) -> dict[tuple[str, int, int], ParkedRow]:
        rows = {}
        for release in releases:
            key = (release.instance_id, release.epoch, release.n)
            if key in self.storage.parked:
                rows[key] = self.storage.parked[key][0]
        return rows

    def now(self) -> datetime:
        return self.storage.clock()

    def save(
        self,
        *,
        dead_letters: list[dict[str, Any]],
        entries: list[dict[str, Any]],
        states: dict[str, InstanceState],
        recorded_at: datetime,
        gates: Iterable[Gate] = (),
        parked: list[dict[str, Any]] | None = None,
        released: list[Release] | None = None,
        changes: Sequence[Change] = (),
    ) -> None:
        storage = self.storage
        storage.dead_letters += dead_letters
        storage.changes += changes
        for entry in entries:
            storage.entries.append(entry)
            storage.priors[entry["event_id"]] = Prior(
                entry["instance_id"],
                entry["type"],
                entry["payload"],
                entry["outcome"],
                tuple(entry["reasons"]),
                entry["result"],
            )
        storage.states.update(
            {iid: state for iid, state in states.items() if state.entries or iid in storage.states}
        )
        for release in released or ():
            storage.parked.pop((release.instance_id, release.epoch, release.n), None)
        now = self.now()
        for row in parked or ():
            key = (row["instance_id"], row["epoch"], row["n"])
            storage.parked[key] = (ParkedRow(*key, row["event_id"], row["raw"]), now)
        for gate in gates:
            if gate.epoch is None:
                continue
            kept = Gate(gate.instance_id, gate.epoch, gate.last)
            kept.parked = {
                n: Parked(n, storage.parked[(gate.instance_id, gate.epoch, n)][1], p.has_event)
                for n, p in gate.parked.items()
                if (gate.instance_id, gate.epoch, n) in storage.parked
            }
            storage.gates[gate.instance_id] = kept
