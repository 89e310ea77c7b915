"""The use case: apply events. Every entrypoint (CLI ``apply``, Celery tasks, the sweep, the demo)
goes through :meth:`Ledger.apply`, so there is exactly one write path; the storage it works on
is ``ledger.store`` (all the SQL), the rules ``ledger.rules`` (pure).

What happens to a batch, in one transaction:
1. invalid input (an :class:`~events.EventRejection`) is dead-lettered;
2. the batch's instances are locked, in sorted order, and their states loaded;
3. the resequencer (SPEC §9, ``ledger.resequencer``) decides what is applied now and in which
   order: numbered events ahead of a gap park, parked successors are released;
4. each event to apply, in that order: a known ``event_id`` with the same canonical payload is a
   ``duplicate`` (the original answer returned); with other content it is dead-lettered as
   ``event_id_reused``; otherwise it is decided, hashed onto its instance's chain and folded
   (``ledger.entries.record``);
5. the store saves entries, projections, dead letters and the gates.

Uniqueness is the database's job (``event_id`` unique, ``(instance_id, instance_seq)`` unique,
service numbers primary key): if two appliers race past the in-memory checks, one transaction
fails and is retried, and the retry sees the winner's rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy.engine import Engine

from events import Event, EventRejection, canonical_payload, parse_event
from events.jsonl import batches
from ledger.changes import Change, dead_letter_change, derive_changes
from ledger.clock import utcnow
from ledger.entries import record
from ledger.gating import open_gates, plan
from ledger.numbers import new_service_number
from ledger.policy import Policy
from ledger.resequencer import Tag
from ledger.results import ApplyResult, Prior, entry_service_number, invalid_result, storable_text
from ledger.settings import DEFAULT_GAP_TIMEOUT, DEFAULT_MAX_PARKED
from ledger.state import InstanceState
from ledger.store import SqlStorage, Storage, Transaction
from ledger.sweep import sweep_due

__all__ = ["ApplyResult", "Ledger", "utcnow"]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
Parsed = Event | EventRejection


class Ledger:
    """The ledger service bound to one database and one policy."""

    def __init__(
        self,
        storage: Engine | Storage,
        policy: Policy,
        *,
        new_number: Callable[[], str] = new_service_number,
        clock: Clock = utcnow,
        max_attempts: int = 8,
        gap_timeout: float = DEFAULT_GAP_TIMEOUT,
        max_parked: int = DEFAULT_MAX_PARKED,
        on_released: Callable[[list[ApplyResult]], None] | None = None,
        on_gaps_skipped: Callable[[int], None] | None = None,
    ) -> None:
        # A database (the engine of SqlStorage), or any Storage (tests: MemoryStorage).
        self.storage: Storage = SqlStorage(storage) if isinstance(storage, Engine) else storage
        self.engine: Engine | None = storage if isinstance(storage, Engine) else None
        self.policy = policy
        self.new_number = new_number
        self.clock = clock
        self.max_attempts = max_attempts
        # The resequencer (SPEC §9): seconds a gap may stay open, events parked per instance.
        self.gap_timeout = gap_timeout
        self.max_parked = max_parked
        # Observers for the worker's metrics: outcomes of released parked events (answered
        # ``parked`` to their own message long ago), and gaps skipped.
        self.on_released = on_released
        self.on_gaps_skipped = on_gaps_skipped

    # -- writing -------------------------------------------------------------------------------

    def apply_lines(self, lines: Iterable[str], *, batch_size: int = 500) -> Iterator[ApplyResult]:
        """Apply JSONL lines (blank ones skipped) in batches; one result per non-blank line."""
        texts = (line.rstrip("\r\n") for line in lines if line.strip())
        for batch in batches(texts, batch_size):
            yield from self.apply([parse_event(raw) for raw in batch])

    def apply(
        self,
        items: Sequence[Parsed],
        *,
        raws: Sequence[str | None] | None = None,
        sequence: Sequence[Tag | None] | None = None,
    ) -> list[ApplyResult]:
        """Apply parsed events (and record rejections) in one transaction, retried on conflict.

        ``raws`` optionally gives each item's original text, kept in a dead letter if the item is
        refused later (``event_id_reused``) and in the parked store; without it the canonical
        payload is kept. ``sequence`` gives each item's publish number (SPEC §9), or None for an
        item that bypasses the resequencer; without it every item is applied on arrival.
        """
        texts: list[str | None] = list(raws) if raws else [None] * len(items)
        tags: list[Tag | None] = list(sequence) if sequence else [None] * len(items)
        work = partial(self._transaction, items=items, raws=texts, tags=tags)
        return self.storage.run(work, self.max_attempts)

    def release_due(self, *, max_instances: int = 200) -> int:
        """The periodic resequencer check (SPEC §9): for every instance whose oldest parked
        event has waited the gap timeout, skip its timed-out gaps and apply the run behind them;
        release what an earlier transaction's budget left ready. Returns how many instances
        were handled (each in its own transaction)."""
        due = self.storage.due_gate_instances(timeout=self.gap_timeout, limit=max_instances)
        for iid in due:
            check = partial(self._transaction, items=[], raws=[], tags=[], gate_checks=[iid])
            self.storage.run(check, self.max_attempts)
        return len(due)

    def _transaction(
        self,
        store: Transaction,
        items: Sequence[Parsed],
        raws: list[str | None],
        tags: list[Tag | None],
        gate_checks: Sequence[str] = (),
    ) -> list[ApplyResult]:
        now = self.clock()
        results: list[ApplyResult | None] = [None] * len(items)
        letters: list[tuple[int, dict[str, Any]]] = []  # (order, row): stored in input order

        def refuse(order: int, code: str, error: str, event_id: str | None, raw: str) -> None:
            if order < len(items):
                results[order] = invalid_result(code, error, event_id)
            row = {"received_at": now, "event_id": event_id, "code": code}
            letters.append(
                (order, {**row, "error": storable_text(error), "raw": storable_text(raw)})
            )

        for index, item in enumerate(items):
            if isinstance(item, EventRejection):
                refuse(index, item.code, item.error, item.event_id, item.raw)
        instance_ids = sorted(
            {item.instance_id for item in items if not isinstance(item, EventRejection)}
            | {tag.instance_id for tag in tags if tag is not None}
            | set(gate_checks)
        )
        states = store.lock(instance_ids)

        # The resequencer decides what is applied now, and in which order (SPEC §9).
        gates, checked = open_gates(store, tags, gate_checks, timeout=self.gap_timeout)
        work = plan(store, items, raws, tags, gates, checked, results, refuse, self.max_parked)

        entries: list[dict[str, Any]] = []
        changes: list[Change] = []  # the feed's records of this transaction, in apply order
        released: list[ApplyResult] = []
        priors = store.priors(event.event_id for _, event, _ in work.apply)
        for order, event, raw_text in work.apply:
            payload = canonical_payload(event)
            prior = priors.get(event.event_id)
            if prior is not None and prior.payload_of(event.instance_id) != payload:
                error = f"event_id {event.event_id!r} is already recorded with other content"
                refuse(order, "event_id_reused", error, event.event_id, raw_text or payload)
                continue
            if prior is not None:
                result = prior.answer(event.event_id)
            else:
                before = states[event.instance_id]
                try:
                    entry, after = self._record(before, event, payload, now)
                    # Derived before anything is kept, so a defect here refuses the event whole.
                    changes += derive_changes(before, after, entry, self.policy)
                except Exception as exc:  # a defect must not take the batch down with it
                    log.exception("processing_error for event %s", event.event_id)
                    error = f"{type(exc).__name__}: {exc}"
                    refuse(order, "processing_error", error, event.event_id, raw_text or payload)
                    continue
                states[event.instance_id] = after
                entries.append(entry)
                reasons = tuple(entry["reasons"])
                priors[event.event_id] = Prior(
                    event.instance_id,
                    event.type,
                    payload,
                    entry["outcome"],
                    reasons,
                    entry["result"],
                )
                number = entry_service_number(event.type, payload, entry["result"])
                result = ApplyResult(event.event_id, entry["outcome"], reasons, number)
            if order < len(items):
                results[order] = result
            else:
                released.append(result)

        letters.sort(key=lambda pair: pair[0])
        dead = [
            dead_letter_change(code=row["code"], event_id=row["event_id"], received_at=now)
            for _, row in letters
        ]
        store.save(
            dead_letters=[row for _, row in letters],
            entries=entries,
            states=states,
            recorded_at=now,
            gates=gates.values(),
            parked=work.parked,
            released=work.released,
            changes=dead + changes,
        )
        skipped = sum(gate.skipped for gate in gates.values())
        if skipped and self.on_gaps_skipped is not None:
            self.on_gaps_skipped(skipped)
        if released and self.on_released is not None:
            self.on_released(released)
        return [result for result in results if result is not None]

    def _record(
        self, state: InstanceState, event: Event, payload: str, now: datetime
    ) -> tuple[dict[str, Any], InstanceState]:
        fields, new_state = record(
            state, event, payload=payload, policy=self.policy, new_number=self.new_number
        )
        entry = {
            **fields,
            "instance_id": event.instance_id,
            "occurred_at": event.occurred_at,
            "recorded_at": now,
        }
        return entry, new_state

    # -- the expiry sweep ------------------------------------------------------------------------

    def sweep(self, *, now: datetime, chunk_size: int = 500) -> int:
        """Append ``instance.expired`` for every active subscription whose end is at or before
        ``now`` (``ledger.sweep.sweep_due``), then write the renewal reminders; returns how many
        expiries took effect."""
        expired = sweep_due(self.storage, self.apply, now=now, chunk_size=chunk_size)
        self.remind_renewals(now=now)
        return expired

    def remind_renewals(self, *, now: datetime) -> int:
        """The sweep's second job: ``instance.renewal_due`` changes for active subscriptions
        holding numbers or filings whose remaining term crossed a threshold of the policy
        (``renewal_reminder_days``) since the last sweep; returns how many (docs/changes.md)."""
        thresholds = self.policy.renewal_reminder_days
        if not thresholds:
            return 0
        return self.storage.remind_renewals(
            now=now, thresholds=thresholds, recorded_at=self.clock()
        )
