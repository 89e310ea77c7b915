"""Test helpers: an event factory with readable defaults, deterministic service numbers, the
real ledger service on in-memory storage, and the decoding of a queued message."""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from events import BaseEvent, Event, iso_utc, parse_event_obj
from ledger.policy import Policy
from ledger.results import Prior
from ledger.service import Ledger
from ledger.state import InstanceState
from ledger.store.memory import MemoryStorage

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def day(n: float) -> datetime:
    """``n`` days after 2026-01-01T00:00Z."""
    return T0 + timedelta(days=n)


def ts(n: float) -> str:
    return iso_utc(day(n))


class Numbers:
    """Deterministic service numbers ``SN-1``, ``SN-2``, … for tests that reference them."""

    def __init__(self, prefix: str = "SN") -> None:
        self._counter = itertools.count(1)
        self.prefix = prefix

    def __call__(self) -> str:
        return f"{self.prefix}-{next(self._counter)}"


class Events:
    """Builds event dicts; every call gets a fresh event id unless one is given."""

    def __init__(self, prefix: str = "ev") -> None:
        self._ids = itertools.count(1)
        self.prefix = prefix

    def _base(self, type_: str, instance: str, at: float, event_id: str | None) -> dict[str, Any]:
        return {
            "event_id": event_id or f"{self.prefix}-{next(self._ids)}",
            "type": type_,
            "occurred_at": ts(at),
            "instance_id": instance,
        }

    def purchase(
        self,
        instance: str,
        product: str = "ecs",
        *,
        at: float = 0,
        account: str = "acct-1",
        region: str = "cn-hangzhou",
        billing: str = "subscription",
        term: int | None = 12,
        expires: float | None = 365,
        bandwidth: float = 5,
        amount: str | None = None,
        event_id: str | None = None,
    ) -> dict[str, Any]:
        event = self._base("instance.purchased", instance, at, event_id)
        event.update(
            account_id=account,
            product_type=product,
            region=region,
            billing_method=billing,
            public_bandwidth_mbps=bandwidth,
        )
        if billing == "subscription":
            event.update(term_months=term, expires_at=ts(expires))
        if amount is not None:
            event["order_amount_cny"] = amount
        elif product == "marketplace":
            event["order_amount_cny"] = "199"
        return event

    def renew(
        self, instance: str, *, at: float, term: int, expires: float, event_id: str | None = None
    ) -> dict[str, Any]:
        event = self._base("instance.renewed", instance, at, event_id)
        event.update(term_months=term, expires_at=ts(expires))
        return event

    def convert(
        self,
        instance: str,
        billing: str,
        *,
        at: float,
        term: int | None = None,
        expires: float | None = None,
        event_id: str | None = None,
    ) -> dict[str, Any]:
        event = self._base("instance.billing_converted", instance, at, event_id)
        event["billing_method"] = billing
        if billing == "subscription":
            event.update(term_months=term, expires_at=ts(expires))
        return event

    def bandwidth(
        self, instance: str, mbps: float, *, at: float, event_id: str | None = None
    ) -> dict[str, Any]:
        event = self._base("instance.bandwidth_changed", instance, at, event_id)
        event["public_bandwidth_mbps"] = mbps
        return event

    def expire(
        self, instance: str, *, end: float, at: float | None = None, event_id: str | None = None
    ) -> dict[str, Any]:
        event = self._base("instance.expired", instance, end if at is None else at, event_id)
        event["expires_at"] = ts(end)
        return event

    def release(self, instance: str, *, at: float, event_id: str | None = None) -> dict[str, Any]:
        return self._base("instance.released", instance, at, event_id)

    def request(
        self,
        instance: str,
        *,
        at: float = 10,
        account: str = "acct-1",
        event_id: str | None = None,
    ) -> dict[str, Any]:
        event = self._base("service_number.requested", instance, at, event_id)
        event["account_id"] = account
        return event

    def file(
        self,
        instance: str,
        number: str,
        *,
        at: float = 11,
        filing: str | None = None,
        subject: str = "subject-1",
        website: str | None = None,
        product: str = "ecs",
        account: str = "acct-1",
        event_id: str | None = None,
    ) -> dict[str, Any]:
        event = self._base("filing.submitted", instance, at, event_id)
        filing = filing or f"filing-{event['event_id']}"
        event.update(
            account_id=account,
            filing_id=filing,
            service_number=number,
            product_type=product,
            subject_id=subject,
            website=website or f"{filing.lower().replace('_', '-')}.example.com",
        )
        return event

    def withdraw(
        self, instance: str, filing: str, *, at: float = 12, event_id: str | None = None
    ) -> dict[str, Any]:
        event = self._base("filing.withdrawn", instance, at, event_id)
        event["filing_id"] = filing
        return event


class MemoryLedger:
    """The real service (``ledger.service.Ledger``) on ``MemoryStorage``: duplicates, chains,
    decisions, projections and the resequencer without a database, for tests that need
    thousands of examples. The database-backed tests check that the SQL store agrees with it.
    """

    def __init__(self, policy: Policy, new_number: Any = None) -> None:
        self.storage = MemoryStorage()
        self.ledger = Ledger(self.storage, policy, new_number=new_number or Numbers())

    def apply(self, data: dict[str, Any] | Event) -> str:
        """One event on its own; returns its outcome."""
        item = data if isinstance(data, BaseEvent) else parse_event_obj(data)
        (result,) = self.ledger.apply([item])
        return result.outcome

    def apply_all(self, events: Iterable[dict[str, Any]]) -> list[str]:
        return [self.apply(event) for event in events]

    @property
    def states(self) -> dict[str, InstanceState]:
        return self.storage.states

    @property
    def seen(self) -> dict[str, Prior]:
        return self.storage.priors

    @property
    def entries(self) -> dict[str, list[dict[str, Any]]]:
        """Each instance's entries, in order."""
        grouped: dict[str, list[dict[str, Any]]] = {}
        for entry in self.storage.entries:
            grouped.setdefault(entry["instance_id"], []).append(entry)
        return grouped

    def state(self, instance: str) -> InstanceState:
        return self.states.get(instance) or InstanceState(instance)


def message_body(envelope: dict[str, Any]) -> Any:
    """The decoded ``[args, kwargs, embed]`` of a kombu message as Redis stores it: UTF-8 JSON
    text as the project publishes it (the enqueue script writes the sequence into it), or
    base64 as kombu itself and foreign publishers send it."""
    body = envelope["body"]
    if envelope["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return json.loads(body)
