"""The expiry the sweep appends for an instance whose subscription ran out (SPEC §6 "Sweep"):
it occurred when the subscription ended, and its event id is deterministic, so two sweeps
never double-expire."""

from __future__ import annotations

from datetime import UTC, datetime

from events import Event, iso_utc, validate_event

__all__ = ["sweep_event_id", "sweep_expiry"]


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
