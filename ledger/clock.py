"""The one wall clock of the project: aware UTC (every stored time is UTC, SPEC §7)."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["utcnow"]


def utcnow() -> datetime:
    return datetime.now(UTC)
