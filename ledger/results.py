"""What the ledger answers for one input (SPEC §7 ``apply --json``), and the small text helpers
every writer shares."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ApplyResult",
    "Prior",
    "entry_service_number",
    "invalid_result",
    "storable_text",
]


@dataclass(frozen=True)
class ApplyResult:
    """The answer for one input line or message (SPEC §7 ``apply --json``)."""

    event_id: str | None
    outcome: str  # applied | rejected | stale | duplicate | invalid | parked
    reasons: tuple[str, ...] = ()
    service_number: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "event_id": self.event_id,
            "outcome": self.outcome,
            "reasons": list(self.reasons),
            "service_number": self.service_number,
        }
        if self.error is not None:
            data["error"] = self.error
        return data


def storable_text(text: str) -> str:
    """``text`` as any backend can store it: PostgreSQL text refuses NUL and every UTF-8 encoder
    refuses lone surrogates, so both are kept as visible backslash escapes (``\\x00``,
    ``\\ud800``) instead of failing the whole batch."""
    if "\x00" not in text and text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def invalid_result(code: str, error: str, event_id: str | None) -> ApplyResult:
    return ApplyResult(event_id, "invalid", (code,), None, error)


@dataclass(frozen=True)
class Prior:
    """What the ledger already holds for an ``event_id`` (idempotency)."""

    instance_id: str
    type: str
    payload: str
    outcome: str
    reasons: tuple[str, ...]
    result: dict[str, Any]

    def payload_of(self, instance_id: str) -> str | None:
        """The recorded payload, if recorded for ``instance_id`` (else None: never equal)."""
        return self.payload if self.instance_id == instance_id else None

    def answer(self, event_id: str) -> ApplyResult:
        return ApplyResult(
            event_id,
            "duplicate",
            self.reasons,
            entry_service_number(self.type, self.payload, self.result),
        )


def entry_service_number(event_type: str, payload: str, result: dict[str, Any]) -> str | None:
    """The number issued by a request, or presented by a filing; else None."""
    number: str | None = None
    if "service_number" in result:
        number = result["service_number"]
    elif event_type == "filing.submitted":
        number = json.loads(payload).get("service_number")
    return number
