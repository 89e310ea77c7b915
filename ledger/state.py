"""The folded state of one instance: plain, immutable data with no I/O.

An :class:`InstanceState` is what ``ledger.rules.fold`` builds from an instance's recorded entries
and what ``ledger.rules.decide`` reads. It is stored whole, as JSON, in the ``instances``
projection row so that a decision needs one row read, and ``rebuild`` recomputes it from the
ledger to prove the two agree.

Everything is frozen; a fold step copies the few small containers it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, TypeVar

from events import iso_utc, parse_iso_utc
from ledger.chain import GENESIS_HASH

_D = TypeVar("_D")


def evolve(obj: _D, **changes: Any) -> _D:
    """``dataclasses.replace`` for the frozen dataclasses of this module, without its per-call
    field introspection (the fold calls it for every entry, so it was the rebuild's single
    largest cost). The same result: none of these classes has ``__post_init__``, slots or
    ``init=False`` fields, so a copy of the instance dict with ``changes`` applied is exactly
    what ``replace`` would construct. Unknown names are refused like ``replace`` does."""
    new = object.__new__(obj.__class__)
    values = new.__dict__
    values.update(obj.__dict__)
    for name in changes:
        if name not in values:
            raise TypeError(f"{obj.__class__.__name__} has no field {name!r}")
    values.update(changes)
    return new


InstanceStatus = Literal["active", "expired", "released", "unknown"]
NumberStatus = Literal["active", "used", "invalidated"]
FilingStatus = Literal["accepted", "withdrawn"]


@dataclass(frozen=True)
class Purchase:
    """The first purchase of the instance: its account, product, region and first term stand."""

    event_id: str
    occurred_at: datetime
    account_id: str
    product_type: str
    region: str
    term_months: int | None
    order_amount_cny: Decimal | None


@dataclass(frozen=True)
class Stamped:
    """A value that the event with the latest ``occurred_at`` decides (ties: greater event id)."""

    occurred_at: datetime
    event_id: str
    value: Any

    def newer_than(self, other: Stamped | None) -> bool:
        return other is None or (self.occurred_at, self.event_id) > (
            other.occurred_at,
            other.event_id,
        )


@dataclass(frozen=True)
class Extension:
    """A subscription end carried by a purchase, renewal or conversion to subscription."""

    event_id: str
    occurred_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class Expiry:
    """An applied (effective when recorded) ``instance.expired`` with end ``end``.

    ``void`` turns true when a late purchase/renewal/conversion shows the subscription was
    extended before ``end``; a void expiry stops counting.
    """

    event_id: str
    occurred_at: datetime
    end: datetime
    invalidated: tuple[str, ...]
    void: bool = False


@dataclass(frozen=True)
class ServiceNumber:
    number: str
    issued_at: datetime
    issue_order: int
    status: NumberStatus = "active"
    filing_id: str | None = None
    website: str | None = None
    subject_id: str | None = None
    used_at: datetime | None = None
    invalidated_at: datetime | None = None
    invalidated_reason: str | None = None


@dataclass(frozen=True)
class Filing:
    filing_id: str
    service_number: str
    website: str
    subject_id: str
    accepted_at: datetime
    accept_order: int
    status: FilingStatus = "accepted"
    withdrawn_at: datetime | None = None


@dataclass(frozen=True)
class InstanceState:
    instance_id: str
    purchase: Purchase | None = None
    released_at: datetime | None = None
    # Sum of the terms of the purchase, every renewal and every conversion to subscription.
    term_months: int = 0
    billing: Stamped | None = None
    bandwidth: Stamped | None = None
    extensions: tuple[Extension, ...] = ()
    expiries: tuple[Expiry, ...] = ()
    # Insertion order is issue order / acceptance order.
    numbers: dict[str, ServiceNumber] = field(default_factory=dict)
    filings: dict[str, Filing] = field(default_factory=dict)
    # The chain head: how many entries the instance has and the last one's hash.
    entries: int = 0
    head_hash: str = GENESIS_HASH

    # -- facts derived from the folded events ------------------------------------------------

    @property
    def expires_at(self) -> datetime | None:
        """The latest end carried by any purchase, renewal or conversion."""
        return max((ext.expires_at for ext in self.extensions), default=None)

    @property
    def billing_method(self) -> str | None:
        return self.billing.value if self.billing else None

    @property
    def public_bandwidth_mbps(self) -> float:
        return self.bandwidth.value if self.bandwidth else 0

    @property
    def effective_expiries(self) -> tuple[Expiry, ...]:
        return tuple(expiry for expiry in self.expiries if not expiry.void)

    @property
    def status(self) -> InstanceStatus:
        if self.released_at is not None:
            return "released"
        if self.purchase is None:
            return "unknown"
        end = self.expires_at
        if any(end is None or expiry.end >= end for expiry in self.effective_expiries):
            return "expired"
        return "active"

    @property
    def websites_used(self) -> int:
        return sum(1 for number in self.numbers.values() if number.status == "used")

    @property
    def websites_reserved(self) -> int:
        return sum(1 for number in self.numbers.values() if number.status == "active")

    @property
    def subjects(self) -> set[str]:
        """Distinct subjects of every filing ever accepted (withdrawing frees nothing)."""
        return {filing.subject_id for filing in self.filings.values()}


# -- JSON form (stored in instances.state) -----------------------------------------------------


def _time(value: datetime | None) -> str | None:
    return iso_utc(value) if value is not None else None


def _parse_time(value: str | None) -> datetime | None:
    return parse_iso_utc(value) if value is not None else None


def state_to_json(state: InstanceState) -> dict[str, Any]:
    purchase = state.purchase
    return {
        "instance_id": state.instance_id,
        "purchase": None
        if purchase is None
        else {
            "event_id": purchase.event_id,
            "occurred_at": iso_utc(purchase.occurred_at),
            "account_id": purchase.account_id,
            "product_type": purchase.product_type,
            "region": purchase.region,
            "term_months": purchase.term_months,
            "order_amount_cny": None
            if purchase.order_amount_cny is None
            else str(purchase.order_amount_cny),
        },
        "released_at": _time(state.released_at),
        "term_months": state.term_months,
        "billing": _stamped_to_json(state.billing),
        "bandwidth": _stamped_to_json(state.bandwidth),
        "extensions": [
            [ext.event_id, iso_utc(ext.occurred_at), iso_utc(ext.expires_at)]
            for ext in state.extensions
        ],
        "expiries": [
            {
                "event_id": expiry.event_id,
                "occurred_at": iso_utc(expiry.occurred_at),
                "end": iso_utc(expiry.end),
                "invalidated": list(expiry.invalidated),
                "void": expiry.void,
            }
            for expiry in state.expiries
        ],
        "numbers": [
            {
                "number": n.number,
                "issued_at": iso_utc(n.issued_at),
                "issue_order": n.issue_order,
                "status": n.status,
                "filing_id": n.filing_id,
                "website": n.website,
                "subject_id": n.subject_id,
                "used_at": _time(n.used_at),
                "invalidated_at": _time(n.invalidated_at),
                "invalidated_reason": n.invalidated_reason,
            }
            for n in state.numbers.values()
        ],
        "filings": [
            {
                "filing_id": f.filing_id,
                "service_number": f.service_number,
                "website": f.website,
                "subject_id": f.subject_id,
                "accepted_at": iso_utc(f.accepted_at),
                "accept_order": f.accept_order,
                "status": f.status,
                "withdrawn_at": _time(f.withdrawn_at),
            }
            for f in state.filings.values()
        ],
        "entries": state.entries,
        "head_hash": state.head_hash,
    }


def _stamped_to_json(stamped: Stamped | None) -> list[Any] | None:
    if stamped is None:
        return None
    return [iso_utc(stamped.occurred_at), stamped.event_id, stamped.value]


def _stamped_from_json(data: list[Any] | None) -> Stamped | None:
    if data is None:
        return None
    occurred_at, event_id, value = data
    return Stamped(parse_iso_utc(occurred_at), event_id, value)


def state_from_json(data: dict[str, Any]) -> InstanceState:
    purchase = data["purchase"]
    return InstanceState(
        instance_id=data["instance_id"],
        purchase=None
        if purchase is None
        else Purchase(
            event_id=purchase["event_id"],
            occurred_at=parse_iso_utc(purchase["occurred_at"]),
            account_id=purchase["account_id"],
            product_type=purchase["product_type"],
            region=purchase["region"],
            term_months=purchase["term_months"],
            order_amount_cny=None
            if purchase["order_amount_cny"] is None
            else Decimal(purchase["order_amount_cny"]),
        ),
        released_at=_parse_time(data["released_at"]),
        term_months=data["term_months"],
        billing=_stamped_from_json(data["billing"]),
        bandwidth=_stamped_from_json(data["bandwidth"]),
        extensions=tuple(
            Extension(event_id, parse_iso_utc(occurred_at), parse_iso_utc(expires_at))
            for event_id, occurred_at, expires_at in data["extensions"]
        ),
        expiries=tuple(
            Expiry(
                event_id=e["event_id"],
                occurred_at=parse_iso_utc(e["occurred_at"]),
                end=parse_iso_utc(e["end"]),
                invalidated=tuple(e["invalidated"]),
                void=e["void"],
            )
            for e in data["expiries"]
        ),
        numbers={
            n["number"]: ServiceNumber(
                number=n["number"],
                issued_at=parse_iso_utc(n["issued_at"]),
                issue_order=n["issue_order"],
                status=n["status"],
                filing_id=n["filing_id"],
                website=n["website"],
                subject_id=n["subject_id"],
                used_at=_parse_time(n["used_at"]),
                invalidated_at=_parse_time(n["invalidated_at"]),
                invalidated_reason=n["invalidated_reason"],
            )
            for n in data["numbers"]
        },
        filings={
            f["filing_id"]: Filing(
                filing_id=f["filing_id"],
                service_number=f["service_number"],
                website=f["website"],
                subject_id=f["subject_id"],
                accepted_at=parse_iso_utc(f["accepted_at"]),
                accept_order=f["accept_order"],
                status=f["status"],
                withdrawn_at=_parse_time(f["withdrawn_at"]),
            )
            for f in data["filings"]
        },
        entries=data["entries"],
        head_hash=data["head_hash"],
    )
