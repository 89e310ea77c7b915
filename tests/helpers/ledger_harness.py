"""A ledger on a real database for tests that go through the public apply/show path."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

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
