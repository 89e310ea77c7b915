"""The fast paths taken for the benchmarks (issue #5) give exactly what the plain code gives:
stored payloads decode to the validated event, ``evolve`` is ``dataclasses.replace``, the UTC
shortcut of ``iso_utc`` and the cached ``parse_iso_utc`` spell and parse as before, the JSON
column loader equals ``json.loads``."""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from events import (
    EventRejection,
    canonical_payload,
    event_from_payload,
    iso_utc,
    parse_event,
    parse_iso_utc,
)
from events.models import EVENT_MODELS
from ledger.db import json_loads
from ledger.state import Expiry, Filing, InstanceState, ServiceNumber, evolve
from tests.property import strategies

T = datetime(2026, 1, 1, tzinfo=UTC)


@settings(max_examples=400, deadline=None)
@given(strategies.any_event)
def test_stored_payload_decodes_to_the_validated_event(data: dict) -> None:
    event = parse_event(json.dumps({**data, "event_id": "e-1"}))
    assume(not isinstance(event, EventRejection))
    payload = canonical_payload(event)
    validated = parse_event(payload)
    fast = event_from_payload(payload)
    assert type(fast) is type(validated)
    assert fast == validated
    assert fast.__dict__ == validated.__dict__
    assert list(fast.__dict__) == list(validated.__dict__)
    assert fast.model_fields_set == validated.model_fields_set
    assert repr(fast) == repr(validated)
    assert canonical_payload(fast) == payload


def test_stored_payload_with_amount_and_fraction_bandwidth() -> None:
    line = json.dumps(
        {
            "event_id": "e1",
            "type": "instance.purchased",
            "occurred_at": "2026-03-01T10:00:00.250+08:00",
            "instance_id": "i1",
            "account_id": "a1",
            "product_type": "marketplace",
            "region": "cn-hangzhou",
            "billing_method": "subscription",
            "term_months": 12,
            "expires_at": "2027-03-01T10:00:00+08:00",
            "public_bandwidth_mbps": 2.5,
            "order_amount_cny": "99.50",
        }
    )
    payload = canonical_payload(parse_event(line))
    fast, validated = event_from_payload(payload), parse_event(payload)
    assert fast == validated and fast.order_amount_cny == Decimal("99.5")
    assert isinstance(fast.public_bandwidth_mbps, float)


@pytest.mark.parametrize(
    "payload",
    [
        '{"type": "instance.released"}',  # missing fields: validated, refused
        '{"event_id":"e1","instance_id":"i1","occurred_at":"2026-01-01T00:00:00Z",'
        '"schema_version":1,"type":"instance.released","extra":1}',
        '{"event_id":"e1","instance_id":"i1","occurred_at":"yesterday",'
        '"schema_version":1,"type":"instance.released"}',
        "[1, 2]",
    ],
)
def test_payloads_of_another_shape_are_validated(payload: str) -> None:
    with pytest.raises(ValueError):
        event_from_payload(payload)


def test_every_model_field_is_in_the_payload() -> None:
    for model in EVENT_MODELS.values():
        assert "type" in model.model_fields and "occurred_at" in model.model_fields


@pytest.mark.parametrize(
    ("obj", "changes"),
    [
        (InstanceState("i1"), {"entries": 3, "head_hash": "a" * 64}),
        (ServiceNumber("n", T, 1), {"status": "used", "filing_id": "f"}),
        (Filing("f", "n", "w.cn", "s", T, 1), {"status": "withdrawn", "withdrawn_at": T}),
        (Expiry("e", T, T, ("n",)), {"void": True}),
    ],
)
def test_evolve_is_replace(obj, changes) -> None:
    fast, slow = evolve(obj, **changes), dataclasses.replace(obj, **changes)
    assert fast == slow and type(fast) is type(slow) and fast.__dict__ == slow.__dict__
    assert obj == dataclasses.replace(obj)  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.entries = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        evolve(obj, no_such_field=1)


def _slow_iso(dt: datetime) -> str:
    utc = dt.astimezone(UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds" if utc.microsecond else "seconds") + "Z"


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    )
)
def test_iso_utc_shortcut_spells_like_the_conversion(dt: datetime) -> None:
    assert iso_utc(dt) == _slow_iso(dt)
    assert parse_iso_utc(iso_utc(dt)) == dt


def test_iso_utc_other_zones_and_errors() -> None:
    plus8 = timezone(timedelta(hours=8))
    assert iso_utc(datetime(2026, 1, 1, 8, tzinfo=plus8)) == "2026-01-01T00:00:00Z"
    with pytest.raises(ValueError):
        iso_utc(datetime(2026, 1, 1))
    with pytest.raises(TypeError):
        iso_utc("2026-01-01")  # type: ignore[arg-type]


def test_cached_parse_still_refuses_and_returns_utc() -> None:
    for _ in range(2):  # the second time from the cache
        assert parse_iso_utc("2026-01-01T08:00:00+08:00") == T
        assert parse_iso_utc("2026-01-01T08:00:00+08:00").tzinfo is UTC
        with pytest.raises(ValueError):
            parse_iso_utc("2026-01-01T08:00:00")
        with pytest.raises(ValueError):
            parse_iso_utc(12)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text", ["[]", "{}", '["a"]', '{"a": [1, {}]}', "[ ]", "null", '"x"', "1.5"]
)
def test_json_column_loader_is_json_loads(text: str) -> None:
    for data in (text, text.encode()):
        value = json_loads(data)
        assert value == json.loads(data) and type(value) is type(json.loads(data))
    first, second = json_loads("[]"), json_loads("[]")
    assert first is not second  # never a shared mutable value


def test_printable_ids_need_only_the_space_check() -> None:
    """events.models._check_printable_id relies on this: among printable characters, the
    ASCII space is the only whitespace."""
    odd = [
        cp
        for cp in range(sys.maxunicode + 1)
        if (chr(cp).isprintable() and chr(cp).isspace()) != (cp == 32)
    ]
    assert odd == []


def test_batch_tuning_raises_the_threshold_once_and_leaves_an_off_collector_off() -> None:
    import gc

    from worker.bootstrap import BATCH_THRESHOLD, tune_for_batches

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, *before[1:])
        tune_for_batches()
        assert gc.get_threshold() == (BATCH_THRESHOLD, *before[1:])
        tune_for_batches()  # idempotent: the workers' runtimes and CLI commands call it freely
        assert gc.get_threshold() == (BATCH_THRESHOLD, *before[1:])
        gc.set_threshold(0, *before[1:])  # a process that turned the collector off keeps it off
        tune_for_batches()
        assert gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*before)


# -- SQLite time binding ---------------------------------------------------------------------


def _plain_sqlite_time(value: Any) -> Any:
    """What SQLAlchemy writes for a ``UTCDateTime`` on SQLite without the fast path: the
    decorator's ``process_bind_param``, then the dialect's own ``DATETIME`` formatting."""
    from sqlalchemy import DateTime
    from sqlalchemy.dialects import sqlite

    from ledger.tables import UTCDateTime

    dialect = sqlite.dialect()
    inner = DateTime(timezone=True).dialect_impl(dialect).bind_processor(dialect)
    assert inner is not None
    return inner(UTCDateTime().process_bind_param(value, dialect))


@settings(max_examples=500)
@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.timezones() | st.just(UTC),
    )
)
def test_sqlite_time_binding_is_sqlalchemys(moment: datetime) -> None:
    from sqlalchemy.dialects import sqlite

    from ledger.tables import UTCDateTime

    fast = UTCDateTime().bind_processor(sqlite.dialect())
    assert fast(moment) == _plain_sqlite_time(moment)
    assert fast(moment) == _plain_sqlite_time(moment)  # from the cache


def test_sqlite_time_binding_refuses_what_the_plain_way_refuses() -> None:
    from sqlalchemy.dialects import sqlite

    from ledger.tables import UTCDateTime

    fast = UTCDateTime().bind_processor(sqlite.dialect())
    assert fast(None) is None and _plain_sqlite_time(None) is None
    for bad, error in ((datetime(2026, 1, 1), ValueError), ("2026-01-01", TypeError)):
        with pytest.raises(error):
            fast(bad)
        with pytest.raises(error):
            _plain_sqlite_time(bad)


@settings(max_examples=200)
@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
def test_postgres_time_binding_of_a_utc_datetime_is_the_general_path(wall: datetime) -> None:
    """The shortcut for a datetime already in UTC gives what the general path gives for the
    same instant in another zone (the COPY path binds every time through it)."""
    from sqlalchemy.dialects import postgresql

    from ledger.tables import UTCDateTime

    dialect = postgresql.dialect()
    utc = wall.replace(tzinfo=UTC)
    elsewhere = utc.astimezone(timezone(timedelta(hours=-3)))
    bind = UTCDateTime().process_bind_param
    fast, general = bind(utc, dialect), bind(elsewhere, dialect)
    assert fast == general and fast is not None and fast.utcoffset() == timedelta(0)
    assert (fast.tzinfo, general.tzinfo) == (UTC, UTC)
