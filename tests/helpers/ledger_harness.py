"""A ledger on a real database for tests that go through the public apply/show path."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from events import parse_event_obj
from ledger.policy import Policy
from ledger.queries import show_instance
from ledger.service import ApplyResult, Ledger


@dataclass
class Harness:
    engine: Engine
    ledger: Ledger

    @property
    def policy(self) -> Policy:
        return self.ledger.policy

    def apply(self, *events: dict[str, Any]) -> list[ApplyResult]:
        return self.ledger.apply([parse_event_obj(event) for event in events])

    def apply_one(self, event: dict[str, Any]) -> ApplyResult:
        (result,) = self.apply(event)
        return result

    def show(self, instance_id: str, at: datetime) -> dict[str, Any]:
        with Session(self.engine) as session:
            view = show_instance(session, instance_id=instance_id, at=at, policy=self.policy)
        assert view is not None, f"no entries for {instance_id}"
        return view


def drop_append_only_triggers(harness: Harness) -> None:
    """Let a tampering test edit the append-only tables (the triggers refuse it otherwise)."""
    with harness.engine.begin() as conn:
        if harness.engine.dialect.name == "sqlite":
            for (name,) in conn.execute(
                text("SELECT name FROM sqlite_master WHERE type='trigger'")
            ).all():
                conn.execute(text(f'DROP TRIGGER "{name}"'))
        else:
            for table in ("ledger_entries", "ledger_changes"):
                conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
