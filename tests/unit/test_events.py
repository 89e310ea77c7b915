"""Unit tests for events/: models, validation rules of SPEC §5, canonical form, time format."""

import json
import subprocess
import sys
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import events
from events import (
    EVENT_ADAPTER,
    EVENT_TYPES,
    MAX_EVENT_BYTES,
    PRODUCT_TYPES,
    EventRejection,
    FilingSubmitted,
    InstancePurchased,
    InstanceReleased,
    InvalidEvent,
    canonical_json,
    canonical_payload,
    event_to_payload,
    iso_utc,
    parse_event,
    parse_event_obj,
    parse_iso_utc,
    validate_event,
)
from events.models import BaseEvent

T0 = "2026-01-31T08:00:00Z"
LATER = "2026-04-30T08:00:00Z"
EARLIER = "2025-12-31T08:00:00Z"


def _common(event_type: str, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": f"evt-{event_type}",
        "type": event_type,
        "occurred_at": T0,
        "instance_id": "i-abc123",
        **fields,
    }


# One valid example per event type, as a publisher would send it.
VALID: dict[str, dict[str, Any]] = {
    "instance.purchased": _common(
        "instance.purchased",
        account_id="acct-1",
        product_type="ecs",
        region="cn-hangzhou",
        billing_method="subscription",
        term_months=3,
        expires_at=LATER,
        public_bandwidth_mbps=5,
    ),
    "instance.renewed": _common("instance.renewed", term_months=12, expires_at=LATER),
    "instance.billing_converted": _common(
        "instance.billing_converted",
        billing_method="subscription",
        term_months=3,
        expires_at=LATER,
    ),
    "instance.bandwidth_changed": _common("instance.bandwidth_changed", public_bandwidth_mbps=0),
    "instance.expired": _common("instance.expired", expires_at=T0),
    "instance.released": _common("instance.released"),
    "service_number.requested": _common("service_number.requested", account_id="acct-1"),
    "filing.submitted": _common(
        "filing.submitted",
        account_id="acct-1",
        filing_id="filing-1",
        service_number="SN-7f3a9c",
        product_type="ecs",
        subject_id="sha256:9f86d081884c7d65",
        website="www.example.com",
    ),
    "filing.withdrawn": _common("filing.withdrawn", filing_id="filing-1"),
}


DROP = object()  # marker for ev(): remove this field


def ev(event_type: str, **changes: Any) -> dict[str, Any]:
    """A valid example of `event_type` with some fields replaced (a value of DROP removes)."""
    obj = dict(VALID[event_type])
    for key, value in changes.items():
        if value is DROP:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


PURCHASE = "instance.purchased"
FILING = "filing.submitted"


def _rejects(raw: str | bytes, code: str = "invalid_event") -> EventRejection:
    result = parse_event(raw)
    assert isinstance(result, EventRejection), f"expected a rejection, got {result!r}"
    assert result.code == code
    assert result.error and "\n" not in result.error
    assert "Traceback" not in result.error
    return result


def _rejects_obj(obj: Any) -> EventRejection:
    """Check an object through both entry points; they must agree."""
    via_text = _rejects(json.dumps(obj, ensure_ascii=False))
    via_obj = parse_event_obj(obj)
    assert isinstance(via_obj, EventRejection)
    assert (via_obj.code, via_obj.error, via_obj.event_id) == (
        via_text.code,
        via_text.error,
        via_text.event_id,
    )
    return via_text


# --- valid events --------------------------------------------------------------------------


def test_event_types_and_product_types_are_the_spec_lists() -> None:
    assert set(EVENT_TYPES) == set(VALID)
    assert len(EVENT_TYPES) == 9
    assert PRODUCT_TYPES == (
        "ecs",
        "virtual_host",
        "web_hosting",
        "simple_app_server",
        "ens",
        "marketplace",
        "nat_gateway",
        "ipv6_translation",
        "jushita_ecs",
        "jushita_slb",
        "chengxintong_shop",
    )
    assert events.BILLING_METHODS == ("subscription", "pay_as_you_go")


@pytest.mark.parametrize("event_type", sorted(VALID))
def test_valid_example_of_every_type_parses(event_type: str) -> None:
    result = parse_event(json.dumps(VALID[event_type]))
    assert isinstance(result, BaseEvent), result
    assert result.type == event_type
    assert result.occurred_at == datetime(2026, 1, 31, 8, tzinfo=UTC)
    assert result.occurred_at.tzinfo is UTC
    assert result.schema_version == 1
    assert type(result) is events.EVENT_MODELS[event_type]
    # The discriminated union agrees with the hand dispatch.
    assert EVENT_ADAPTER.validate_python(VALID[event_type]) == result


@pytest.mark.parametrize(
    ("case", "obj"),
    [
        (
            "payg purchase, term fields absent",
            ev(PURCHASE, billing_method="pay_as_you_go", term_months=DROP, expires_at=DROP),
        ),
        (
            "payg purchase, term fields null",
            ev(PURCHASE, billing_method="pay_as_you_go", term_months=None, expires_at=None),
        ),
        (
            "marketplace with amount string",
            ev(PURCHASE, product_type="marketplace", order_amount_cny="99.00", term_months=12),
        ),
        (
            "marketplace with amount number",
            ev(PURCHASE, product_type="marketplace", order_amount_cny=120.5, term_months=12),
        ),
        ("amount zero", ev(PURCHASE, order_amount_cny=0)),
        ("bandwidth default", ev(PURCHASE, public_bandwidth_mbps=DROP)),
        ("bandwidth float", ev(PURCHASE, public_bandwidth_mbps=1.5)),
        ("term 1", ev(PURCHASE, term_months=1)),
        ("term 120", ev(PURCHASE, term_months=120)),
        ("offset timestamp", ev(PURCHASE, occurred_at="2026-01-31T16:00:00+08:00")),
        ("fractional seconds", ev(PURCHASE, occurred_at="2026-01-31T08:00:00.123456Z")),
        ("schema_version 1", ev(PURCHASE, schema_version=1)),
        ("expiry at occurred_at", ev("instance.expired", expires_at=T0)),
        ("expiry before occurred_at", ev("instance.expired", expires_at=EARLIER)),
        (
            "conversion to payg",
            ev(
                "instance.billing_converted",
                billing_method="pay_as_you_go",
                term_months=DROP,
                expires_at=DROP,
            ),
        ),
        (
            "conversion to payg, nulls",
            ev(
                "instance.billing_converted",
                billing_method="pay_as_you_go",
                term_months=None,
                expires_at=None,
            ),
        ),
        ("idna website", ev(FILING, website="例子.中国")),
        ("punycode website", ev(FILING, website="xn--bcher-kva.de")),
        ("63-char label", ev(FILING, website="a" * 63 + ".com")),
        ("253-char domain", ev(FILING, website=".".join(["a" * 63] * 3 + ["b" * 61]))),
        (
            "max-length ids",
            ev(
                FILING,
                event_id="e" * 200,
                instance_id="i" * 128,
                account_id="a" * 128,
                filing_id="f" * 128,
                service_number="s" * 128,
                subject_id="s" * 128,
            ),
        ),
        ("id charset", ev(FILING, event_id="A-z.0_9:x", instance_id="i.0_9:Z-")),
        ("unicode printable ids", ev(FILING, account_id="账户-1", subject_id="主体#1")),
        ("chengxintong", ev(PURCHASE, product_type="chengxintong_shop")),
        ("64-char region", ev(PURCHASE, region="a" * 64)),
    ],
)
def test_valid_variants(case: str, obj: dict[str, Any]) -> None:
    result = parse_event(json.dumps(obj, ensure_ascii=False))
    assert isinstance(result, BaseEvent), f"{case}: {result}"


def test_field_values_are_normalised() -> None:
    e = validate_event(
        ev(
            PURCHASE,
            occurred_at="2026-01-31T16:00:00+08:00",
            product_type="marketplace",
            term_months=12,
            expires_at="2027-01-31T08:00:00.5Z",
            order_amount_cny="99.50",
            public_bandwidth_mbps=10.0,
        )
    )
    assert isinstance(e, InstancePurchased)
    assert e.occurred_at == datetime(2026, 1, 31, 8, tzinfo=UTC)
    assert e.expires_at == datetime(2027, 1, 31, 8, 0, 0, 500000, tzinfo=UTC)
    assert e.order_amount_cny == Decimal("99.5")
    assert e.public_bandwidth_mbps == 10 and type(e.public_bandwidth_mbps) is int
    f = validate_event(ev(FILING, website="WWW.Bücher.DE"))
    assert isinstance(f, FilingSubmitted)
    assert f.website == "www.xn--bcher-kva.de"


def test_models_are_frozen_and_hashable() -> None:
    e = validate_event(VALID["instance.released"])
    with pytest.raises(Exception, match="frozen"):
        e.instance_id = "other"  # type: ignore[misc]
    assert hash(e) == hash(validate_event(VALID["instance.released"]))


def test_models_can_be_built_directly_from_python() -> None:
    e = InstanceReleased(
        event_id="e1",
        occurred_at=datetime(2026, 1, 31, 16, tzinfo=timezone(timedelta(hours=8))),
        instance_id="i-1",
    )
    assert e.type == "instance.released"
    assert e.occurred_at == datetime(2026, 1, 31, 8, tzinfo=UTC)
    with pytest.raises(ValueError, match="no timezone"):
        InstanceReleased(event_id="e1", occurred_at=datetime(2026, 1, 31), instance_id="i-1")


# --- invalid input: one table row per SPEC §5 rule -------------------------------------------

INVALID: list[tuple[str, Any, str]] = [
    # wrong types (no coercion)
    ("event_id number", ev(PURCHASE, event_id=123), "event_id: must be a string (got 123)"),
    ("instance_id number", ev(PURCHASE, instance_id=7), "instance_id: must be a string"),
    ("account_id number", ev(PURCHASE, account_id=1), "account_id: must be a string (got 1)"),
    ("filing_id number", ev(FILING, filing_id=1), "filing_id: must be a string"),
    ("service_number number", ev(FILING, service_number=5), "service_number: must be a string"),
    ("subject_id null", ev(FILING, subject_id=None), "subject_id: must be a string (got null)"),
    ("region number", ev(PURCHASE, region=1), "region: must be a string"),
    ("website number", ev(FILING, website=1), "website: must be a string"),
    ("occurred_at number", ev(PURCHASE, occurred_at=1769846400), "occurred_at: must be an ISO"),
    ("product_type list", ev(PURCHASE, product_type=["ecs"]), "product_type: must be a string"),
    ("billing_method bool", ev(PURCHASE, billing_method=True), "billing_method: must be a str"),
    ("bandwidth string", ev(PURCHASE, public_bandwidth_mbps="10"), "public_bandwidth_mbps:"),
    ("bandwidth bool", ev(PURCHASE, public_bandwidth_mbps=True), "public_bandwidth_mbps:"),
    (
        "bandwidth null",
        ev("instance.bandwidth_changed", public_bandwidth_mbps=None),
        "public_bandwidth_mbps: must be a number >= 0 (got null)",
    ),
    ("amount bool", ev(PURCHASE, order_amount_cny=True), "order_amount_cny:"),
    ("amount exponent", ev(PURCHASE, order_amount_cny="1e2"), "order_amount_cny: must be a pl"),
    ("amount junk", ev(PURCHASE, order_amount_cny="99 CNY"), "order_amount_cny: must be a pla"),
    ("schema_version 2", ev(PURCHASE, schema_version=2), "schema_version: only schema_version"),
    ("schema_version str", ev(PURCHASE, schema_version="1"), "schema_version:"),
    ("schema_version bool", ev(PURCHASE, schema_version=True), "schema_version:"),
    ("amount too many digits", ev(PURCHASE, order_amount_cny=1e300), "order_amount_cny: has too"),
    ("amount 65 digits", ev(PURCHASE, order_amount_cny="9" * 65), "order_amount_cny: must be a"),
    # naive / bad timestamps
    (
        "naive occurred_at",
        ev(PURCHASE, occurred_at="2026-01-31T08:00:00"),
        "occurred_at: timestamp has no timezone",
    ),
    (
        "naive expires_at",
        ev("instance.renewed", expires_at="2026-04-30T08:00:00"),
        "expires_at: timestamp has no timezone",
    ),
    ("date only", ev(PURCHASE, occurred_at="2026-01-31"), "occurred_at: timestamp has no time"),
    ("not a timestamp", ev(PURCHASE, occurred_at="yesterday"), "occurred_at: not an ISO 8601"),
    (
        "impossible date",
        ev(PURCHASE, occurred_at="2026-02-30T00:00:00Z"),
        "occurred_at: not a valid date",
    ),
    ("bad offset", ev(PURCHASE, occurred_at="2026-01-31T08:00:00+25:00"), "occurred_at:"),
    # term_months
    *[
        (
            f"term {label}",
            ev(PURCHASE, term_months=value),
            f"term_months: must be an integer from 1 to 120 (got {label})",
        )
        for label, value in [
            ("0", 0),
            ("121", 121),
            ('"3"', "3"),
            ("3.5", 3.5),
            ("true", True),
            ("3.0", 3.0),
            ("-1", -1),
        ]
    ],
    ("renewal term null", ev("instance.renewed", term_months=None), "term_months: must be an"),
    ("renewal term 0", ev("instance.renewed", term_months=0), "term_months: must be an integer"),
    ("conversion term 121", ev("instance.billing_converted", term_months=121), "term_months:"),
    # expires_at ordering
    (
        "purchase ends at occurred_at",
        ev(PURCHASE, expires_at=T0),
        "expires_at: must be after occurred_at",
    ),
    (
        "purchase ends before occurred_at",
        ev(PURCHASE, expires_at=EARLIER),
        "expires_at: must be after occurred_at",
    ),
    (
        "same instant other offset",
        ev(PURCHASE, expires_at="2026-01-31T16:00:00+08:00"),
        "expires_at: must be after occurred_at",
    ),
    (
        "renewal ends at occurred_at",
        ev("instance.renewed", expires_at=T0),
        "expires_at: must be after occurred_at",
    ),
    (
        "renewal ends before",
        ev("instance.renewed", expires_at=EARLIER),
        "expires_at: must be after occurred_at",
    ),
    (
        "conversion ends before",
        ev("instance.billing_converted", expires_at=EARLIER),
        "expires_at: must be after occurred_at",
    ),
    (
        "expiry end after occurred_at",
        ev("instance.expired", expires_at=LATER),
        "expires_at: must not be after occurred_at",
    ),
    # billing-method dependent fields
    (
        "subscription purchase without term",
        ev(PURCHASE, term_months=DROP),
        "term_months: required for a subscription purchase",
    ),
    (
        "subscription purchase without end",
        ev(PURCHASE, expires_at=None),
        "expires_at: required for a subscription purchase",
    ),
    (
        "conversion to subscription without term",
        ev("instance.billing_converted", term_months=DROP),
        "term_months: required",
    ),
    (
        "conversion to subscription without end",
        ev("instance.billing_converted", expires_at=DROP),
        "expires_at: required",
    ),
    (
        "payg purchase with an end before it occurred",
        ev(PURCHASE, billing_method="pay_as_you_go", expires_at="2025-01-01T00:00:00Z"),
        "expires_at: must be after occurred_at",
    ),
    (
        "marketplace without amount",
        ev(PURCHASE, product_type="marketplace"),
        "order_amount_cny: required for product_type marketplace",
    ),
    (
        "marketplace null amount",
        ev(PURCHASE, product_type="marketplace", order_amount_cny=None),
        "order_amount_cny: required for product_type marketplace",
    ),
    # enumerations
    (
        "unknown product type",
        ev(PURCHASE, product_type="vps"),
        'product_type: unknown product type "vps"',
    ),
    ("product type case", ev(PURCHASE, product_type="ECS"), "product_type: unknown product type"),
    ("unknown filing product type", ev(FILING, product_type="cdn"), "product_type: unknown"),
    (
        "unknown billing method",
        ev(PURCHASE, billing_method="monthly"),
        'billing_method: unknown billing method "monthly"',
    ),
    (
        "unknown conversion method",
        ev("instance.billing_converted", billing_method="prepaid"),
        "billing_method: unknown billing method",
    ),
    # negative numbers
    (
        "negative bandwidth",
        ev(PURCHASE, public_bandwidth_mbps=-1),
        "public_bandwidth_mbps: must be a number >= 0 (got -1)",
    ),
    (
        "negative float bandwidth",
        ev("instance.bandwidth_changed", public_bandwidth_mbps=-0.5),
        "public_bandwidth_mbps: must be a number >= 0",
    ),
    ("negative amount number", ev(PURCHASE, order_amount_cny=-1), "order_amount_cny: must be >="),
    ("negative amount string", ev(PURCHASE, order_amount_cny="-0.01"), "order_amount_cny: must"),
    # bad domains
    ("label > 63", ev(FILING, website="a" * 64 + ".com"), "longer than 63 characters"),
    ("domain > 253", ev(FILING, website=".".join(["a" * 63] * 4)), "at most 253 characters"),
    ("underscore", ev(FILING, website="my_site.com"), 'label "my_site" may only contain'),
    ("empty label", ev(FILING, website="a..com"), "website: has an empty label"),
    ("leading dot", ev(FILING, website=".example.com"), "website: has an empty label"),
    ("trailing dot", ev(FILING, website="example.com."), "website: has an empty label"),
    ("empty website", ev(FILING, website=""), "website: must be a domain name"),
    ("leading hyphen", ev(FILING, website="-a.com"), 'website: label "-a"'),
    ("space in domain", ev(FILING, website="exa mple.com"), "website: label"),
    ("url not domain", ev(FILING, website="http://example.com/"), "website:"),
    ("single label", ev(FILING, website="localhost"), "website: must be a domain name with"),
    ("ip address", ev(FILING, website="192.168.1.1"), "website: top-level label"),
    ("bad punycode", ev(FILING, website="xn--zz.com"), 'website: label "xn--zz" is not valid'),
    ("bad idna", ev(FILING, website="a\u200db.com"), "website: not a valid internationalised"),
    # lengths and charsets
    ("event_id 201", ev(PURCHASE, event_id="e" * 201), "event_id: must be 1 to 200 characters"),
    ("event_id empty", ev(PURCHASE, event_id=""), "event_id: must be 1 to 200 characters"),
    ("instance_id 129", ev(PURCHASE, instance_id="i" * 129), "instance_id: must be 1 to 128"),
    ("account_id 129", ev(PURCHASE, account_id="a" * 129), "account_id: must be 1 to 128"),
    ("filing_id 129", ev("filing.withdrawn", filing_id="f" * 129), "filing_id: must be 1 to 128"),
    ("subject_id 129", ev(FILING, subject_id="s" * 129), "subject_id: must be 1 to 128"),
    ("service_number 129", ev(FILING, service_number="n" * 129), "service_number: must be 1 to"),
    ("service_number empty", ev(FILING, service_number=""), "service_number: must be 1 to 128"),
    ("region 65", ev(PURCHASE, region="a" * 65), "region: must be 1 to 64 characters"),
    ("event_id space", ev(PURCHASE, event_id="evt 1"), "event_id: may only contain"),
    ("event_id slash", ev(PURCHASE, event_id="evt/1"), "event_id: may only contain"),
    ("event_id unicode", ev(PURCHASE, event_id="évt"), "event_id: may only contain"),
    ("instance_id hash", ev(PURCHASE, instance_id="i#1"), "instance_id: may only contain"),
    ("account_id space", ev(PURCHASE, account_id="acct 1"), "account_id: must be printable"),
    ("account_id tab", ev(PURCHASE, account_id="acct\t1"), "account_id: must be printable"),
    ("account_id nul", ev(PURCHASE, account_id="a\x00"), "account_id: must be printable"),
    ("filing_id nbsp", ev("filing.withdrawn", filing_id="f\u00a01"), "filing_id: must be print"),
    ("region underscore", ev(PURCHASE, region="cn_hangzhou"), "region: may only contain"),
    ("region upper", ev(PURCHASE, region="CN-hangzhou"), "region: may only contain"),
    # unknown / missing type, extra fields
    ("unknown type", ev(PURCHASE, type="x.y"), 'type: unknown event type "x.y"'),
    ("missing type", ev(PURCHASE, type=DROP), "type: required field is missing"),
    ("type not string", ev(PURCHASE, type=5), "type: must be a string (got 5)"),
    ("extra field", ev(PURCHASE, foo=1), 'unknown field "foo"'),
    (
        "field of another type",
        ev("instance.released", account_id="a"),
        'unknown field "account_id"',
    ),
    (
        "bandwidth on renewal",
        ev("instance.renewed", public_bandwidth_mbps=1),
        'unknown field "public_bandwidth_mbps"',
    ),
]


@pytest.mark.parametrize(("case", "obj", "fragment"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_event_is_rejected_naming_the_field(case: str, obj: Any, fragment: str) -> None:
    rejection = _rejects_obj(obj)
    assert fragment in rejection.error, rejection.error


def _missing_field_cases() -> list[tuple[str, str]]:
    optional = {"schema_version", "public_bandwidth_mbps", "order_amount_cny", "type"}
    return [
        (event_type, field)
        for event_type, example in VALID.items()
        for field in example
        if field not in optional
    ]


@pytest.mark.parametrize(("event_type", "field"), _missing_field_cases())
def test_missing_field_is_rejected(event_type: str, field: str) -> None:
    rejection = _rejects_obj(ev(event_type, **{field: DROP}))
    assert rejection.error.startswith(f"{field}: "), rejection.error
    assert "required" in rejection.error


def test_numbers_beyond_json_range_are_rejected() -> None:
    huge = 10**5000  # more digits than Python's json can even print
    for obj, field in [
        (ev("instance.bandwidth_changed", public_bandwidth_mbps=huge), "public_bandwidth_mbps"),
        (ev(PURCHASE, order_amount_cny=huge), "order_amount_cny"),
    ]:
        result = parse_event_obj(obj)
        assert isinstance(result, EventRejection), result
        assert result.error.startswith(f"{field}: ")
    raw = json.dumps(VALID["instance.bandwidth_changed"]).replace(": 0", ": 1e999")
    assert "public_bandwidth_mbps: must be a finite number" in _rejects(raw).error


def test_several_problems_are_all_reported() -> None:
    rejection = _rejects_obj(ev(PURCHASE, account_id=1, term_months="3", region="CN", foo=1))
    parts = rejection.error.split("; ")
    assert [p.split(":")[0] for p in parts[:3]] == ["account_id", "region", "term_months"]
    assert parts[3] == 'unknown field "foo"'


def test_many_unknown_fields_give_a_bounded_message() -> None:
    rejection = _rejects_obj(ev(PURCHASE, **{f"x{i}": i for i in range(500)}))
    assert rejection.error.count("unknown field") == 10
    assert rejection.error.endswith("… and 490 more problems")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("{not json", "not valid JSON: Expecting property name enclosed in double quotes at line"),
        ("", "not valid JSON: Expecting value at line 1 column 1"),
        ("   ", "not valid JSON: Expecting value at line 1 column 4"),
        ('{"a": 1} trailing', "not valid JSON: Extra data at line 1 column 10"),
        ('{"event_id": NaN}', "not valid JSON: NaN is not allowed"),
        ('{"a": Infinity}', "not valid JSON: Infinity is not allowed"),
        ('{"type": "a", "type": "b"}', 'not valid JSON: duplicate key "type"'),
        ("[1, 2]", "expected a JSON object, got array"),
        ('"instance.released"', "expected a JSON object, got string"),
        ("42", "expected a JSON object, got number"),
        ("null", "expected a JSON object, got null"),
        ("true", "expected a JSON object, got boolean"),
        ("9" * 5000, "not valid JSON: Exceeds the limit"),
        ("[" * 50_000, "nested too deeply"),
        ('{"a":' * 10_000, "nested too deeply"),
    ],
)
def test_not_json_or_not_an_object(raw: str, fragment: str) -> None:
    rejection = _rejects(raw)
    assert fragment in rejection.error, rejection.error
    assert rejection.event_id is None
    assert rejection.raw == raw


def test_deeply_nested_value_inside_an_event() -> None:
    raw = json.dumps(VALID["instance.released"])[:-1] + ', "x": ' + "[" * 30_000 + "]" * 30_000
    raw += "}"
    assert len(raw) <= MAX_EVENT_BYTES
    rejection = _rejects(raw)
    assert "nested too deeply" in rejection.error


def test_deeply_nested_python_object() -> None:
    nested: list[Any] = []
    for _ in range(100_000):
        nested = [nested]
    for obj in (nested, {**VALID["instance.released"], "x": nested}):
        result = parse_event_obj(obj)
        assert isinstance(result, EventRejection)
        assert result.code == "invalid_event"
        assert "nested too deeply" in result.error


def test_undecodable_utf8_bytes_are_invalid() -> None:
    rejection = _rejects(b'{"event_id": "\xff"}')
    assert rejection.error == "not valid UTF-8: undecodable byte at position 14"
    assert rejection.raw == '{"event_id": "\\xff"}'


def test_lone_surrogate_is_rejected_and_storable() -> None:
    rejection = _rejects(
        '{"event_id": "e1", "type": "instance.released", "instance_id": '
        '"\\ud800", "occurred_at": "2026-01-31T08:00:00Z"}'
    )
    assert rejection.error.startswith("instance_id: may only contain")
    rejection.error.encode("utf-8")  # must be storable as UTF-8 text


# --- the 64 KiB limit --------------------------------------------------------------------------


def _padded(target_bytes: int) -> str:
    """A valid event line padded with JSON white space to exactly target_bytes bytes."""
    base = json.dumps(VALID["filing.submitted"])
    line = base[:-1] + " " * (target_bytes - len(base.encode())) + "}"
    assert len(line.encode()) == target_bytes
    return line


def test_exactly_64_kib_is_accepted() -> None:
    assert MAX_EVENT_BYTES == 65536
    assert isinstance(parse_event(_padded(MAX_EVENT_BYTES)), FilingSubmitted)
    assert isinstance(parse_event(_padded(MAX_EVENT_BYTES).encode()), FilingSubmitted)
    # The line terminator is not part of the line.
    assert isinstance(parse_event(_padded(MAX_EVENT_BYTES) + "\n"), FilingSubmitted)
    assert isinstance(parse_event(_padded(MAX_EVENT_BYTES) + "\r\n"), FilingSubmitted)


def test_one_byte_over_is_too_large_even_if_valid() -> None:
    rejection = _rejects(_padded(MAX_EVENT_BYTES + 1), code="too_large")
    assert "65537 bytes" in rejection.error
    assert rejection.event_id is None


@pytest.mark.parametrize(
    "raw",
    [
        "x" * (MAX_EVENT_BYTES + 1),
        b"x" * (MAX_EVENT_BYTES + 1),
        b"\xff" * (MAX_EVENT_BYTES + 1),  # also not UTF-8
        "[" * (MAX_EVENT_BYTES + 1),  # also too deep
        "é" * (MAX_EVENT_BYTES // 2 + 1),  # 32769 characters, but 65538 UTF-8 bytes
    ],
    ids=["not-json-str", "not-json-bytes", "not-utf8", "deep", "multibyte"],
)
def test_too_large_wins_over_everything_else(raw: str | bytes) -> None:
    rejection = _rejects(raw, code="too_large")
    assert len(rejection.raw) >= MAX_EVENT_BYTES // 2


def test_too_large_object_is_measured_on_canonical_json() -> None:
    big = ev(PURCHASE, padding="x" * MAX_EVENT_BYTES)
    result = parse_event_obj(big)
    assert isinstance(result, EventRejection) and result.code == "too_large"
    small = parse_event_obj(ev(PURCHASE, padding="x"))
    assert isinstance(small, EventRejection) and small.code == "invalid_event"


# --- rejection metadata ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (ev(PURCHASE, term_months=0), VALID[PURCHASE]["event_id"]),
        (ev(PURCHASE, type="x.y"), VALID[PURCHASE]["event_id"]),
        (ev(PURCHASE, event_id="bad id", term_months=0), None),
        (ev(PURCHASE, event_id=5), None),
        (ev(PURCHASE, event_id=DROP), None),
    ],
)
def test_rejection_event_id_only_when_valid(obj: dict[str, Any], expected: str | None) -> None:
    assert _rejects_obj(obj).event_id == expected


def test_rejection_keeps_raw_text() -> None:
    raw = '{"event_id": "e1", "type": "nope"}'
    assert _rejects(raw).raw == raw
    assert _rejects(raw + "\n").raw == raw
    assert parse_event_obj({"a": 1}, raw="original").raw == "original"  # type: ignore[union-attr]
    assert parse_event_obj({"b": 2, "a": 1}).raw == '{"a":1,"b":2}'  # type: ignore[union-attr]


def test_rejection_is_frozen() -> None:
    rejection = _rejects("[]")
    with pytest.raises(FrozenInstanceError):
        rejection.code = "too_large"  # type: ignore[misc]


def test_validate_event_raises_invalid_event() -> None:
    with pytest.raises(InvalidEvent) as info:
        validate_event(ev(PURCHASE, term_months="3"))
    err = info.value
    assert isinstance(err, ValueError)
    assert err.code == "invalid_event"
    assert err.error == 'term_months: must be an integer from 1 to 120 (got "3")'
    assert err.event_id == VALID[PURCHASE]["event_id"]
    with pytest.raises(InvalidEvent) as info:
        validate_event("x" * (MAX_EVENT_BYTES + 1))
    assert info.value.code == "too_large"


def test_validate_event_accepts_text_dicts_and_events() -> None:
    e = validate_event(json.dumps(VALID[FILING]))
    assert validate_event(VALID[FILING]) == e
    assert validate_event(e) == e
    assert parse_event_obj(e) == e


def test_parse_event_rejects_non_text_input_as_programmer_error() -> None:
    with pytest.raises(TypeError):
        parse_event({"a": 1})  # type: ignore[arg-type]


def test_bom_is_ignored() -> None:
    assert isinstance(parse_event("\ufeff" + json.dumps(VALID[FILING])), FilingSubmitted)


# --- canonical form and round trip ------------------------------------------------------------


def test_canonical_json_shape() -> None:
    assert canonical_json({"b": 1, "a": ["é", None]}) == '{"a":["é",null],"b":1}'


def test_canonical_payload_golden() -> None:
    e = validate_event(
        ev(
            PURCHASE,
            occurred_at="2026-01-31T16:00:00+08:00",
            product_type="marketplace",
            term_months=12,
            expires_at="2027-01-31T08:00:00.250Z",
            order_amount_cny="99.00",
        )
    )
    assert canonical_payload(e) == (
        '{"account_id":"acct-1","billing_method":"subscription",'
        '"event_id":"evt-instance.purchased","expires_at":"2027-01-31T08:00:00.250000Z",'
        '"instance_id":"i-abc123","occurred_at":"2026-01-31T08:00:00Z",'
        '"order_amount_cny":"99","product_type":"marketplace","public_bandwidth_mbps":5,'
        '"region":"cn-hangzhou","schema_version":1,"term_months":12,'
        '"type":"instance.purchased"}'
    )
    payg = validate_event(
        ev(PURCHASE, billing_method="pay_as_you_go", term_months=DROP, expires_at=DROP)
    )
    payload = event_to_payload(payg)
    assert payload["term_months"] is None and payload["expires_at"] is None
    assert payload["order_amount_cny"] is None
    assert set(payload) == set(InstancePurchased.model_fields)


def _variants_of(obj: dict[str, Any]) -> list[str]:
    return [
        json.dumps(obj),
        json.dumps(dict(reversed(list(obj.items())))),
        json.dumps(obj, indent=4, ensure_ascii=False),
        "  " + json.dumps(obj, separators=(" , ", " : ")) + "  ",
    ]


@pytest.mark.parametrize(
    ("spellings"),
    [
        # key order / white space
        _variants_of(VALID[PURCHASE]),
        # time zone offset vs Z, fractional zeros
        [
            json.dumps(ev(PURCHASE, occurred_at="2026-01-31T08:00:00Z")),
            json.dumps(ev(PURCHASE, occurred_at="2026-01-31T16:00:00+08:00")),
            json.dumps(ev(PURCHASE, occurred_at="2026-01-31T03:00:00-05:00")),
            json.dumps(ev(PURCHASE, occurred_at="2026-01-31T08:00:00.000Z")),
            json.dumps(ev(PURCHASE, occurred_at="2026-01-31T08:00Z")),
            json.dumps(ev(PURCHASE, occurred_at="2026-01-31T08:00:00+00:00")),
        ],
        # decimal spelling
        [
            json.dumps(ev(PURCHASE, product_type="marketplace", order_amount_cny=amount))
            for amount in (99, 99.0, "99", "99.0", "99.00", "099")
        ],
        # bandwidth int vs integral float
        [json.dumps(ev(PURCHASE, public_bandwidth_mbps=bw)) for bw in (10, 10.0)],
        # defaults omitted vs explicit
        [
            json.dumps(ev(PURCHASE, schema_version=DROP, public_bandwidth_mbps=DROP)),
            json.dumps(ev(PURCHASE, schema_version=1, public_bandwidth_mbps=0)),
        ],
        [
            json.dumps(
                ev(PURCHASE, billing_method="pay_as_you_go", term_months=DROP, expires_at=DROP)
            ),
            json.dumps(
                ev(
                    PURCHASE,
                    billing_method="pay_as_you_go",
                    term_months=None,
                    expires_at=None,
                    order_amount_cny=None,
                )
            ),
        ],
        # website spelling
        [
            json.dumps(ev(FILING, website=w), ensure_ascii=ascii_)
            for w in ("Bücher.de", "bücher.de", "BÜCHER.DE", "xn--bcher-kva.de")
            for ascii_ in (True, False)
        ],
    ],
    ids=[
        "key-order-whitespace",
        "tz-offset",
        "decimal",
        "bandwidth",
        "defaults",
        "payg-nulls",
        "website",
    ],
)
def test_same_content_gives_identical_canonical_payload(spellings: list[str]) -> None:
    payloads = set()
    for raw in spellings:
        result = parse_event(raw)
        assert isinstance(result, BaseEvent), result
        payloads.add(canonical_payload(result))
    assert len(payloads) == 1, payloads


def test_different_content_gives_different_payload() -> None:
    a = validate_event(VALID[PURCHASE])
    b = validate_event(ev(PURCHASE, occurred_at="2026-01-31T08:00:00.000001Z"))
    assert canonical_payload(a) != canonical_payload(b)


@pytest.mark.parametrize("event_type", sorted(VALID))
def test_round_trip(event_type: str) -> None:
    event = validate_event(VALID[event_type])
    text = canonical_payload(event)
    again = parse_event(text)
    assert again == event
    assert canonical_payload(again) == text  # type: ignore[arg-type]
    assert json.loads(text) == event_to_payload(event)
    assert EVENT_ADAPTER.validate_json(text) == event


# --- time format ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dt", "text"),
    [
        (datetime(2026, 1, 31, 8, tzinfo=UTC), "2026-01-31T08:00:00Z"),
        (datetime(2026, 1, 31, 8, 0, 0, 123456, tzinfo=UTC), "2026-01-31T08:00:00.123456Z"),
        (datetime(2026, 1, 31, 8, 0, 0, 500000, tzinfo=UTC), "2026-01-31T08:00:00.500000Z"),
        (datetime(2026, 1, 31, 16, tzinfo=timezone(timedelta(hours=8))), "2026-01-31T08:00:00Z"),
        (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00Z"),
    ],
)
def test_iso_utc(dt: datetime, text: str) -> None:
    assert iso_utc(dt) == text
    assert parse_iso_utc(text) == dt


def test_iso_utc_refuses_naive() -> None:
    with pytest.raises(ValueError, match="naive"):
        iso_utc(datetime(2026, 1, 31))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-31T08:00:00Z", datetime(2026, 1, 31, 8, tzinfo=UTC)),
        ("2026-01-31T16:00:00+08:00", datetime(2026, 1, 31, 8, tzinfo=UTC)),
        ("2026-01-31T16:00:00+0800", datetime(2026, 1, 31, 8, tzinfo=UTC)),
        ("2026-01-31T16:00:00+08", datetime(2026, 1, 31, 8, tzinfo=UTC)),
        ("2026-01-31 08:00:00z", datetime(2026, 1, 31, 8, tzinfo=UTC)),
        ("2026-01-31T08:00Z", datetime(2026, 1, 31, 8, tzinfo=UTC)),
        ("2026-01-31T08:00:00,5Z", datetime(2026, 1, 31, 8, 0, 0, 500000, tzinfo=UTC)),
        ("2026-01-31T08:00:00.1234567Z", datetime(2026, 1, 31, 8, 0, 0, 123456, tzinfo=UTC)),
    ],
)
def test_parse_iso_utc_accepts(text: str, expected: datetime) -> None:
    parsed = parse_iso_utc(text)
    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2026-01-31T08:00:00", "no timezone"),
        ("2026-01-31", "no time of day"),
        ("2026-01-31T08:00:00 +08:00", "not an ISO 8601 timestamp"),
        ("20260131T080000Z", "not an ISO 8601 timestamp"),
        (" 2026-01-31T08:00:00Z", "not an ISO 8601 timestamp"),
        ("2026-13-01T00:00:00Z", "not a valid date and time"),
        ("2026-01-31T24:00:00Z", "not a valid date and time"),
        ("2026-01-31T08:00:00+24:00", r"offset \+24:00 is out of range"),
        ("0001-01-01T00:00:00+08:00", "out of the supported range"),
        ("x" * 1000, "too long"),
        ("", "not an ISO 8601 timestamp"),
    ],
)
def test_parse_iso_utc_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_iso_utc(text)


# --- public surface ---------------------------------------------------------------------------


def test_public_names_are_exported() -> None:
    for name in [
        "Event",
        "InstancePurchased",
        "InstanceRenewed",
        "InstanceBillingConverted",
        "InstanceBandwidthChanged",
        "InstanceExpired",
        "InstanceReleased",
        "ServiceNumberRequested",
        "FilingSubmitted",
        "FilingWithdrawn",
        "EVENT_TYPES",
        "PRODUCT_TYPES",
        "BILLING_METHODS",
        "parse_event",
        "parse_event_obj",
        "validate_event",
        "InvalidEvent",
        "EventRejection",
        "canonical_json",
        "canonical_payload",
        "event_to_payload",
        "iso_utc",
        "parse_iso_utc",
        "MAX_EVENT_BYTES",
    ]:
        assert hasattr(events, name), name
        assert name in events.__all__, name


def test_events_package_does_not_import_celery_or_sqlalchemy() -> None:
    code = (
        "import sys, events; "
        "bad = [m for m in ('celery', 'sqlalchemy', 'sqlmodel', 'kombu') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- properties -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)

_FIELD_NAMES = sorted(
    {key for example in VALID.values() for key in example}
    | {"schema_version", "public_bandwidth_mbps", "order_amount_cny", "extra"}
)


def _check_result(result: object) -> None:
    assert isinstance(result, BaseEvent | EventRejection)
    if isinstance(result, EventRejection):
        assert result.code in ("too_large", "invalid_event")
        assert isinstance(result.error, str) and result.error.strip()
        result.error.encode("utf-8")
        result.raw.encode("utf-8")
    else:
        # Anything accepted must survive the canonical round trip unchanged.
        text = canonical_payload(result)
        assert parse_event(text) == result
        assert canonical_payload(parse_event(text)) == text  # type: ignore[arg-type]


PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(st.text())
def test_parse_event_never_raises_on_text(raw: str) -> None:
    _check_result(parse_event(raw))


@PROPERTY_SETTINGS
@given(st.binary())
def test_parse_event_never_raises_on_bytes(raw: bytes) -> None:
    _check_result(parse_event(raw))


@PROPERTY_SETTINGS
@given(json_values)
def test_parse_event_never_raises_on_json_values(value: Any) -> None:
    _check_result(parse_event(json.dumps(value)))
    _check_result(parse_event_obj(value))


@PROPERTY_SETTINGS
@given(
    st.sampled_from(sorted(VALID)),
    st.dictionaries(st.sampled_from(_FIELD_NAMES), json_values | st.just(DROP), max_size=3),
)
def test_parse_event_never_raises_on_mutated_events(event_type: str, changes: dict) -> None:
    obj = ev(event_type, **changes)
    _check_result(parse_event(json.dumps(obj)))
    _check_result(parse_event_obj(obj))


@PROPERTY_SETTINGS
@given(
    st.sampled_from(sorted(VALID)),
    st.sampled_from(["occurred_at", "expires_at"]),
    st.datetimes(
        min_value=datetime(1900, 1, 1),
        max_value=datetime(2200, 1, 1),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=8)), timezone(timedelta(hours=-5, minutes=-30))]
        ),
    ),
)
def test_timestamps_round_trip(event_type: str, field: str, when: datetime) -> None:
    obj = ev(event_type, **{field: when.isoformat()}) if field in VALID[event_type] else None
    if obj is None:
        return
    result = parse_event(json.dumps(obj))
    _check_result(result)
    if isinstance(result, BaseEvent):
        assert getattr(result, field) == when
        assert event_to_payload(result)[field] == iso_utc(when)


def test_pay_as_you_go_may_carry_term_and_end_which_the_rules_ignore() -> None:
    # Billing systems often send one purchase shape for both methods; refusing the whole event
    # for a harmless extra term would lose a real purchase.
    for data in (
        ev(PURCHASE, billing_method="pay_as_you_go"),
        ev("instance.billing_converted", billing_method="pay_as_you_go"),
    ):
        event = parse_event(json.dumps(data))
        assert not isinstance(event, EventRejection), event
        assert event.term_months == data["term_months"]
