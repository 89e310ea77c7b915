"""Every rule of the seed, in one place: eligibility, decisions, and the projection fold.

Pure functions over plain data (``ledger.state``), no I/O, no clock: the time of a decision is
the event's ``occurred_at``, and a new service number comes from the ``new_number`` callable the
caller passes in. The storage layer records what :func:`decide` returns in the ledger entry, and
:func:`fold` replays recorded entries, never deciding again, so rebuild reproduces live state.

Where to find a rule:
- who may file at all (product, billing, term, remaining time, bandwidth, order amount, region):
  :func:`eligibility`, figures from ``policy.toml``;
- issuing a service number: :func:`_decide_request`;
- verifying a filing (产品验证): :func:`_decide_filing`;
- facts that commute, stale facts, expiry, late-renewal repair, release: the ``_decide_*`` fact
  handlers and their ``_fold_*`` twins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, get_args

from events import (
    Event,
    FilingSubmitted,
    FilingWithdrawn,
    InstanceBandwidthChanged,
    InstanceBillingConverted,
    InstanceExpired,
    InstancePurchased,
    InstanceReleased,
    InstanceRenewed,
    ServiceNumberRequested,
)
from ledger.policy import Policy, ProductPolicy
from ledger.reasons import in_table_order
from ledger.state import (
    Expiry,
    Extension,
    Filing,
    InstanceState,
    Purchase,
    ServiceNumber,
    Stamped,
    evolve,
)

Outcome = Literal["applied", "rejected", "stale"]
#: What a decision records in its entry (the issued number, numbers invalidated or revived).
Result = dict[str, Any]
EligibilityStatus = Literal["eligible", "ineligible", "unknown", "not_needed", "not_required"]
#: Every eligibility status (SPEC §4), in the order of the SPEC: the one list the CLI and the
#: API offer as choices.
ELIGIBILITY_STATUSES: tuple[str, ...] = get_args(EligibilityStatus)

# Reasons that describe the instance itself (SPEC §4, "Eligibility status").
SUBSCRIPTION = "subscription"


@dataclass(frozen=True)
class Eligibility:
    status: EligibilityStatus
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    """What the ledger decided about one event; recorded verbatim in its entry."""

    outcome: Outcome
    reasons: tuple[str, ...] = ()
    # Issued number, numbers invalidated / revived, expiries voided. Only non-empty keys.
    result: Result = field(default_factory=dict)

    @property
    def service_number(self) -> str | None:
        return self.result.get("service_number")


def applied(**result: Any) -> Decision:
    return Decision("applied", (), {key: value for key, value in result.items() if value})


def rejected(*codes: str) -> Decision:
    return Decision("rejected", in_table_order(codes))


STALE = Decision("stale")


# -- eligibility ---------------------------------------------------------------------------------


def is_expired(state: InstanceState, at: datetime) -> bool:
    """Expired at ``at``: the subscription end has passed, even before the sweep recorded it, or
    an effective expiry says so."""
    end = state.expires_at
    return (end is not None and at >= end) or state.status == "expired"


def product_of(state: InstanceState, policy: Policy) -> ProductPolicy | None:
    return policy.product(state.purchase.product_type) if state.purchase else None


def eligibility(state: InstanceState, policy: Policy, at: datetime) -> Eligibility:
    """May this instance carry ICP filings at ``at``? First match wins (SPEC §4)."""
    if state.released_at is not None:
        return Eligibility("ineligible", ("instance_released",))
    purchase = state.purchase
    if purchase is None:
        return Eligibility("unknown")
    product = policy.product(purchase.product_type)
    if not product.service_number_needed:
        return Eligibility("not_needed")
    if not policy.regions.is_mainland(purchase.region):
        return Eligibility("not_required")

    reasons: list[str] = []
    if state.billing_method == SUBSCRIPTION:
        # A pay-as-you-go instance has no subscription end or term to judge.
        expired = is_expired(state, at)
        if expired:
            reasons.append("instance_expired")
        term = (
            purchase.term_months if product.term_counts == "first_purchase" else state.term_months
        )
        if (term or 0) < product.min_term_months:
            reasons.append("term_too_short")
        end = state.expires_at
        if (
            not expired
            and end is not None
            and end - at < timedelta(days=product.min_remaining_days)
        ):
            reasons.append("remaining_term_too_short")
    elif product.billing == SUBSCRIPTION:
        reasons.append("pay_as_you_go")
    if product.requires_public_bandwidth and state.public_bandwidth_mbps <= 0:
        reasons.append("no_public_bandwidth")
    if product.min_first_order_cny is not None and (
        purchase.order_amount_cny is None or purchase.order_amount_cny < product.min_first_order_cny
    ):
        reasons.append("order_amount_too_low")
    if reasons:
        return Eligibility("ineligible", in_table_order(reasons))
    return Eligibility("eligible")


def website_cap(state: InstanceState, policy: Policy) -> int:
    product = product_of(state, policy)
    return product.website_cap if product else 0


def subject_cap(state: InstanceState, policy: Policy) -> int:
    product = product_of(state, policy)
    return product.subject_cap if product else 0


def free_website_slots(state: InstanceState, policy: Policy) -> int:
    """Issued numbers count against the cap until used or invalidated while unused."""
    return website_cap(state, policy) - state.websites_used - state.websites_reserved


# -- decisions -----------------------------------------------------------------------------------

NumberSource = Callable[[], str]


def decide(
    state: InstanceState, event: Event, policy: Policy, *, new_number: NumberSource
) -> Decision:
    """Decide what ``event`` means for the instance, evaluated at its ``occurred_at``."""
    return _DECIDERS[event.type](state, event, policy, new_number)


def _decide_purchase(
    state: InstanceState, event: InstancePurchased, policy: Policy, _: NumberSource
) -> Decision:
    if state.released_at is not None or state.purchase is not None:
        # Release is final; a second purchase of the same instance changes nothing.
        return STALE
    product = policy.product(event.product_type)
    return _extend(state, event, _subscription_end(event), product, policy)


def _subscription_end(event: InstancePurchased) -> datetime | None:
    """A pay-as-you-go purchase may carry a term and an end; they describe no subscription."""
    return event.expires_at if event.billing_method == SUBSCRIPTION else None


def _decide_renewal(
    state: InstanceState, event: InstanceRenewed, policy: Policy, _: NumberSource
) -> Decision:
    if state.released_at is not None:
        return STALE
    return _extend(state, event, event.expires_at, product_of(state, policy), policy)


def _decide_conversion(
    state: InstanceState, event: InstanceBillingConverted, policy: Policy, _: NumberSource
) -> Decision:
    if state.released_at is not None:
        return STALE
    if event.billing_method != SUBSCRIPTION:
        return applied()
    return _extend(state, event, event.expires_at, product_of(state, policy), policy)


def _extend(
    state: InstanceState,
    event: Event,
    new_end: datetime | None,
    product: ProductPolicy | None,
    policy: Policy,
) -> Decision:
    """A new subscription end. Late renewal repair: it voids every effective expiry that it shows
    was extended before it ran out (occurred at or before the expiry's end, ends after it), and
    revives the numbers those expiries invalidated, oldest first, as far as free slots allow."""
    if new_end is None:
        return applied()
    voided = [
        expiry for expiry in state.effective_expiries if event.occurred_at <= expiry.end < new_end
    ]
    if not voided:
        return applied()
    voided_ids = {expiry.event_id for expiry in voided}
    remaining_ends = [e.end for e in state.effective_expiries if e.event_id not in voided_ids]
    candidates = sorted(
        (
            state.numbers[number]
            for expiry in voided
            for number in expiry.invalidated
            if state.numbers[number].status == "invalidated"
            # Still covered by an expiry that stands: it stays invalid.
            and not any(end >= state.numbers[number].issued_at for end in remaining_ends)
        ),
        key=lambda number: number.issue_order,
    )
    free = (product.website_cap if product else 0) - state.websites_used - state.websites_reserved
    revived = [number.number for number in candidates[: max(free, 0)]]
    return applied(voided=[expiry.event_id for expiry in voided], revived=revived)


def _decide_bandwidth(
    state: InstanceState, event: InstanceBandwidthChanged, policy: Policy, _: NumberSource
) -> Decision:
    return STALE if state.released_at is not None else applied()


def _decide_expiry(
    state: InstanceState, event: InstanceExpired, policy: Policy, _: NumberSource
) -> Decision:
    end = event.expires_at
    if state.released_at is not None:
        return STALE
    if any(expiry.end == end for expiry in state.expiries):
        return STALE  # the same end has already been expired (or voided)
    if any(ext.occurred_at <= end < ext.expires_at for ext in state.extensions):
        return STALE  # void: the subscription was extended before it ran out
    invalidated = [
        number.number
        for number in state.numbers.values()
        if number.status == "active" and number.issued_at <= end
    ]
    return applied(invalidated=invalidated)


def _decide_release(
    state: InstanceState, event: InstanceReleased, policy: Policy, _: NumberSource
) -> Decision:
    if state.released_at is not None:
        return STALE
    invalidated = [n.number for n in state.numbers.values() if n.status == "active"]
    return applied(invalidated=invalidated)


def _decide_request(
    state: InstanceState, event: ServiceNumberRequested, policy: Policy, new_number: NumberSource
) -> Decision:
    """Issue a service number (备案服务号)? Checks in SPEC §4's order; the first failing step
    decides, with all of that step's codes."""
    purchase = state.purchase
    if purchase is None:
        return rejected("instance_unknown")
    if state.released_at is not None:
        return rejected("instance_released")
    product = policy.product(purchase.product_type)
    step3 = []
    if not product.service_number_needed:
        step3.append("service_number_not_needed")
    if not policy.regions.is_mainland(purchase.region):
        step3.append("region_not_mainland")
    if step3:
        return rejected(*step3)
    if event.account_id != purchase.account_id:
        return rejected("account_mismatch")
    verdict = eligibility(state, policy, event.occurred_at)
    if verdict.reasons:
        return rejected(*verdict.reasons)
    if free_website_slots(state, policy) <= 0:
        return rejected("website_limit_reached")
    return applied(service_number=new_number())


def _decide_filing(
    state: InstanceState, event: FilingSubmitted, policy: Policy, _: NumberSource
) -> Decision:
    """Product verification (产品验证) of a filing presenting a service number."""
    purchase = state.purchase
    if purchase is None:
        return rejected("instance_unknown")
    if state.released_at is not None:
        return rejected("instance_released")
    number = state.numbers.get(event.service_number)
    # 如果对应服务器已到期，服务号即失效: an expired server's numbers are invalid too.
    expired = is_expired(state, event.occurred_at)
    if expired:
        return rejected("service_number_invalid", "instance_expired")
    if number is None or number.status == "invalidated":
        return rejected("service_number_invalid")
    if event.product_type != purchase.product_type:
        return rejected("product_type_mismatch")
    if number.status == "used":
        return rejected("service_number_used")
    if event.filing_id in state.filings:
        return rejected("filing_id_reused")
    if event.account_id != purchase.account_id:
        return rejected("account_mismatch")
    other_reasons = [
        code
        for code in eligibility(state, policy, event.occurred_at).reasons
        if code != "instance_expired"
    ]
    if other_reasons:
        return rejected(*other_reasons)
    product = policy.product(purchase.product_type)
    subjects = state.subjects
    if event.subject_id not in subjects and len(subjects) >= product.subject_cap:
        return rejected("subject_limit_reached")
    return applied()


def _decide_withdrawal(
    state: InstanceState, event: FilingWithdrawn, policy: Policy, _: NumberSource
) -> Decision:
    if state.purchase is None:
        return rejected("instance_unknown")
    if state.released_at is not None:
        return rejected("instance_released")
    filing = state.filings.get(event.filing_id)
    if filing is None:
        return rejected("filing_unknown")
    if filing.status == "withdrawn":
        return STALE
    return applied()


_DECIDERS: dict[str, Callable[[InstanceState, Any, Policy, NumberSource], Decision]] = {
    "instance.purchased": _decide_purchase,
    "instance.renewed": _decide_renewal,
    "instance.billing_converted": _decide_conversion,
    "instance.bandwidth_changed": _decide_bandwidth,
    "instance.expired": _decide_expiry,
    "instance.released": _decide_release,
    "service_number.requested": _decide_request,
    "filing.submitted": _decide_filing,
    "filing.withdrawn": _decide_withdrawal,
}


# -- the fold ------------------------------------------------------------------------------------


def fold(
    state: InstanceState,
    event: Event,
    *,
    outcome: str,
    result: Result,
    instance_seq: int,
    entry_hash: str,
) -> InstanceState:
    """The state after one recorded entry. Rejected and stale entries only move the chain head."""
    if outcome == "applied":
        state = _FOLDERS[event.type](state, event, result)
    return evolve(state, entries=instance_seq, head_hash=entry_hash)


def _fold_purchase(state: InstanceState, event: InstancePurchased, result: Result) -> InstanceState:
    state = evolve(
        state,
        purchase=Purchase(
            event_id=event.event_id,
            occurred_at=event.occurred_at,
            account_id=event.account_id,
            product_type=event.product_type,
            region=event.region,
            term_months=event.term_months if event.billing_method == SUBSCRIPTION else None,
            order_amount_cny=event.order_amount_cny,
        ),
    )
    state = _set_billing(state, event, event.billing_method)
    state = _set_bandwidth(state, event, event.public_bandwidth_mbps)
    end = _subscription_end(event)
    return _fold_extension(state, event, event.term_months if end else None, end, result)


def _fold_renewal(state: InstanceState, event: InstanceRenewed, result: Result) -> InstanceState:
    return _fold_extension(state, event, event.term_months, event.expires_at, result)


def _fold_conversion(
    state: InstanceState, event: InstanceBillingConverted, result: Result
) -> InstanceState:
    state = _set_billing(state, event, event.billing_method)
    if event.billing_method != SUBSCRIPTION:
        return state
    return _fold_extension(state, event, event.term_months, event.expires_at, result)


def _fold_extension(
    state: InstanceState,
    event: Event,
    term_months: int | None,
    expires_at: datetime | None,
    result: Result,
) -> InstanceState:
    if expires_at is None:
        return state
    voided = set(result.get("voided", ()))
    numbers = dict(state.numbers)
    for number in result.get("revived", ()):
        numbers[number] = evolve(
            numbers[number], status="active", invalidated_at=None, invalidated_reason=None
        )
    return evolve(
        state,
        term_months=state.term_months + (term_months or 0),
        extensions=(*state.extensions, Extension(event.event_id, event.occurred_at, expires_at)),
        expiries=tuple(
            evolve(expiry, void=True) if expiry.event_id in voided else expiry
            for expiry in state.expiries
        ),
        numbers=numbers,
    )


def _set_billing(state: InstanceState, event: Event, billing_method: str) -> InstanceState:
    stamped = Stamped(event.occurred_at, event.event_id, billing_method)
    return evolve(state, billing=stamped) if stamped.newer_than(state.billing) else state


def _set_bandwidth(state: InstanceState, event: Event, mbps: float) -> InstanceState:
    stamped = Stamped(event.occurred_at, event.event_id, mbps)
    return evolve(state, bandwidth=stamped) if stamped.newer_than(state.bandwidth) else state


def _fold_bandwidth(
    state: InstanceState, event: InstanceBandwidthChanged, result: Result
) -> InstanceState:
    return _set_bandwidth(state, event, event.public_bandwidth_mbps)


def _invalidate(
    state: InstanceState, numbers: list[str], at: datetime, reason: str
) -> dict[str, ServiceNumber]:
    updated = dict(state.numbers)
    for number in numbers:
        updated[number] = evolve(
            updated[number], status="invalidated", invalidated_at=at, invalidated_reason=reason
        )
    return updated


def _fold_expiry(state: InstanceState, event: InstanceExpired, result: Result) -> InstanceState:
    invalidated = list(result.get("invalidated", ()))
    return evolve(
        state,
        expiries=(
            *state.expiries,
            Expiry(event.event_id, event.occurred_at, event.expires_at, tuple(invalidated)),
        ),
        numbers=_invalidate(state, invalidated, event.occurred_at, "instance_expired"),
    )


def _fold_release(state: InstanceState, event: InstanceReleased, result: Result) -> InstanceState:
    invalidated = list(result.get("invalidated", ()))
    return evolve(
        state,
        released_at=event.occurred_at,
        numbers=_invalidate(state, invalidated, event.occurred_at, "instance_released"),
    )


def _fold_request(
    state: InstanceState, event: ServiceNumberRequested, result: Result
) -> InstanceState:
    number = result["service_number"]
    numbers = dict(state.numbers)
    numbers[number] = ServiceNumber(
        number=number, issued_at=event.occurred_at, issue_order=len(numbers) + 1
    )
    return evolve(state, numbers=numbers)


def _fold_filing(state: InstanceState, event: FilingSubmitted, result: Result) -> InstanceState:
    numbers = dict(state.numbers)
    numbers[event.service_number] = evolve(
        numbers[event.service_number],
        status="used",
        filing_id=event.filing_id,
        website=event.website,
        subject_id=event.subject_id,
        used_at=event.occurred_at,
    )
    filings = dict(state.filings)
    filings[event.filing_id] = Filing(
        filing_id=event.filing_id,
        service_number=event.service_number,
        website=event.website,
        subject_id=event.subject_id,
        accepted_at=event.occurred_at,
        accept_order=len(filings) + 1,
    )
    return evolve(state, numbers=numbers, filings=filings)


def _fold_withdrawal(state: InstanceState, event: FilingWithdrawn, result: Result) -> InstanceState:
    filings = dict(state.filings)
    filings[event.filing_id] = evolve(
        filings[event.filing_id], status="withdrawn", withdrawn_at=event.occurred_at
    )
    return evolve(state, filings=filings)


_FOLDERS: dict[str, Callable[[InstanceState, Any, Result], InstanceState]] = {
    "instance.purchased": _fold_purchase,
    "instance.renewed": _fold_renewal,
    "instance.billing_converted": _fold_conversion,
    "instance.bandwidth_changed": _fold_bandwidth,
    "instance.expired": _fold_expiry,
    "instance.released": _fold_release,
    "service_number.requested": _fold_request,
    "filing.submitted": _fold_filing,
    "filing.withdrawn": _fold_withdrawal,
}
