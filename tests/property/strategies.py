"""Hypothesis strategies: random but valid event histories over a small world, so that
collisions (same instance, same numbers, same filing ids, same subjects) happen often."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from tests.support import ts

INSTANCES = ("i1", "i2")
PRODUCTS = ("ecs", "nat_gateway", "marketplace", "virtual_host", "web_hosting")
ACCOUNTS = ("a1", "a1", "a2")  # mostly the owner
SUBJECTS = ("s1", "s2", "s3", "s4", "s5", "s6")
FILINGS = tuple(f"F{k}" for k in range(1, 13))
NUMBERS = tuple(f"SN-{k}" for k in range(1, 13))

days = st.integers(min_value=0, max_value=400)


def _common(type_: str, instance: str, at: int) -> dict[str, Any]:
    return {"type": type_, "instance_id": instance, "occurred_at": ts(at)}


@st.composite
def purchase(draw: st.DrawFn, instance: str | None = None) -> dict[str, Any]:
    """Mostly an eligible ECS (so that numbers are issued and filings accepted), else anything."""
    instance = instance or draw(st.sampled_from(INSTANCES))
    at = draw(st.integers(0, 60))
    event = _common("instance.purchased", instance, at)
    if draw(st.integers(0, 9)) < 6:
        event.update(
            account_id="a1",
            product_type="ecs",
            region="cn-hangzhou",
            billing_method="subscription",
            public_bandwidth_mbps=5,
            term_months=12,
            expires_at=ts(at + draw(st.integers(300, 500))),
        )
        return event
    product = draw(st.sampled_from(PRODUCTS))
    billing = draw(st.sampled_from(("subscription", "subscription", "pay_as_you_go")))
    event.update(
        account_id="a1",
        product_type=product,
        region=draw(st.sampled_from(("cn-hangzhou", "cn-hangzhou", "cn-hongkong"))),
        billing_method=billing,
        public_bandwidth_mbps=draw(st.sampled_from((0, 5, 5))),
    )
    if billing == "subscription":
        event.update(
            term_months=draw(st.integers(1, 24)), expires_at=ts(at + draw(st.integers(20, 400)))
        )
    if product == "marketplace":
        event["order_amount_cny"] = draw(st.sampled_from(("50", "99", "199")))
    return event


@st.composite
def renewal(draw: st.DrawFn, instance: str | None = None) -> dict[str, Any]:
    instance = instance or draw(st.sampled_from(INSTANCES))
    at = draw(days)
    event = _common("instance.renewed", instance, at)
    event.update(
        term_months=draw(st.integers(1, 12)), expires_at=ts(at + draw(st.integers(1, 400)))
    )
    return event


@st.composite
def conversion(draw: st.DrawFn, instance: str | None = None) -> dict[str, Any]:
    instance = instance or draw(st.sampled_from(INSTANCES))
    at = draw(days)
    event = _common("instance.billing_converted", instance, at)
    billing = draw(st.sampled_from(("subscription", "pay_as_you_go")))
    event["billing_method"] = billing
    if billing == "subscription":
        event.update(
            term_months=draw(st.integers(1, 12)), expires_at=ts(at + draw(st.integers(1, 400)))
        )
    return event


@st.composite
def bandwidth(draw: st.DrawFn, instance: str | None = None) -> dict[str, Any]:
    event = _common(
        "instance.bandwidth_changed", instance or draw(st.sampled_from(INSTANCES)), draw(days)
    )
    event["public_bandwidth_mbps"] = draw(st.sampled_from((0, 1, 10)))
    return event


@st.composite
def expiry(draw: st.DrawFn, instance: str | None = None) -> dict[str, Any]:
    end = draw(st.integers(20, 460))
    event = _common(
        "instance.expired",
        instance or draw(st.sampled_from(INSTANCES)),
        end + draw(st.integers(0, 3)),
    )
    event["expires_at"] = ts(end)
    return event


@st.composite
def release(draw: st.DrawFn) -> dict[str, Any]:
    return _common("instance.released", draw(st.sampled_from(INSTANCES)), draw(days))


early = st.integers(min_value=0, max_value=250)


@st.composite
def request(draw: st.DrawFn) -> dict[str, Any]:
    event = _common("service_number.requested", draw(st.sampled_from(INSTANCES)), draw(early))
    event["account_id"] = draw(st.sampled_from(ACCOUNTS))
    return event


@st.composite
def filing(draw: st.DrawFn) -> dict[str, Any]:
    event = _common("filing.submitted", draw(st.sampled_from(INSTANCES)), draw(early))
    filing_id = draw(st.sampled_from(FILINGS))
    event.update(
        account_id=draw(st.sampled_from(ACCOUNTS)),
        filing_id=filing_id,
        # Mostly the first few numbers, which the requests before it have likely issued.
        service_number=draw(st.sampled_from(NUMBERS[:4]) | st.sampled_from(NUMBERS)),
        product_type=draw(st.sampled_from(("ecs", "ecs", "ecs", *PRODUCTS))),
        subject_id=draw(st.sampled_from(SUBJECTS)),
        website=f"{filing_id.lower()}.example.com",
    )
    return event


@st.composite
def withdrawal(draw: st.DrawFn) -> dict[str, Any]:
    event = _common("filing.withdrawn", draw(st.sampled_from(INSTANCES)), draw(early))
    event["filing_id"] = draw(st.sampled_from(FILINGS))
    return event


def _numbered(events: list[dict[str, Any]], prefix: str = "e") -> list[dict[str, Any]]:
    return [{**event, "event_id": f"{prefix}{index}"} for index, event in enumerate(events)]


any_event = st.one_of(
    purchase(),
    renewal(),
    conversion(),
    bandwidth(),
    expiry(),
    release(),
    request(),
    request(),
    request(),
    filing(),
    filing(),
    filing(),
    withdrawal(),
)


@st.composite
def early_request(draw: st.DrawFn) -> dict[str, Any]:
    """A request by the owner soon after the purchases: most of these are issued."""
    event = _common(
        "service_number.requested", draw(st.sampled_from(INSTANCES)), draw(st.integers(0, 30))
    )
    event["account_id"] = "a1"
    return event


@st.composite
def histories(draw: st.DrawFn, max_size: int = 40) -> list[dict[str, Any]]:
    """Purchases first (mostly), some early requests, then anything: requests, filings, facts,
    expiries, releases, in any order."""
    # Most histories purchase every instance first; some leave one unknown.
    head = [draw(purchase(instance)) for instance in INSTANCES if draw(st.integers(0, 4))]
    issued = draw(st.lists(early_request(), max_size=12))
    tail = draw(st.lists(any_event, max_size=max_size))
    return _numbered(head + issued + tail)


@st.composite
def fact_histories(draw: st.DrawFn) -> list[dict[str, Any]]:
    """One purchase and any facts of one instance but release (release ends the commuting)."""
    facts = st.one_of(renewal("i1"), conversion("i1"), bandwidth("i1"), expiry("i1"))
    events = [draw(purchase("i1")), *draw(st.lists(facts, max_size=12))]
    return _numbered(events)
