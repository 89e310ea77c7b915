"""The expiry the sweep appends for an instance whose subscription ran out (SPEC §6 "Sweep"):
it occurred when the subscription ended, and its event id is deterministic, so two sweeps
never double-expire."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from events import Event, iso_utc, validate_event
from ledger.results import ApplyResult

__all__ = ["sweep_due", "sweep_event_id", "sweep_expiry"]


class DueExpiries(Protocol):
    def due_expiries(
        self, *, now: datetime, after: tuple[datetime, str] | None, limit: int
    ) -> list[tuple[str, datetime]]: ...


def sweep_event_id(instance_id: str, expires_at: datetime) -> str:
    return f"sweep:{instance_id}:{expires_at.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}"


def sweep_expiry(instance_id: str, expires_at: datetime) -> Event:
    """The expiry the sweep appends: it occurred when the subscription ended."""
    end = iso_utc(expires_at)
    return validate_event(
        {
            "event_id": sweep_event_id(instance_id, expires_at),
            "type": "instance.expired",
            "occurred_at": end,
            "instance_id": instance_id,
            "expires_at": end,
        }
    )


def sweep_due(
    storage: DueExpiries,
    apply: Callable[[Sequence[Event]], list[ApplyResult]],
    *,
    now: datetime,
    chunk_size: int,
) -> int:
    """Apply an expiry for every active subscription whose end is at or before ``now``, a keyset
    page at a time; returns how many took effect. Its cost follows the number of due instances,
    not of all instances; the event id is deterministic, so overlapping sweeps are duplicates,
    never double expiries. Sweep expiries bypass the resequencer (no sequence numbers)."""
    expired = 0
    after: tuple[datetime, str] | None = None
    while due := storage.due_expiries(now=now, after=after, limit=chunk_size):
        events = [sweep_expiry(instance_id, expires_at) for instance_id, expires_at in due]
        expired += sum(1 for result in apply(events) if result.outcome == "applied")
        after = (due[-1][1], due[-1][0])
    return expired
