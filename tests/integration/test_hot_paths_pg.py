"""PostgreSQL write path of issue #5: a batch's rows go in with COPY, and they are exactly the
rows the executemany INSERT writes; a unique violation during the COPY is retried like one
during an INSERT."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, text

import ledger.store as store
import ledger.store.rows as rows
from ledger.audit import rebuild, verify
from ledger.db import make_engine, upgrade
from ledger.policy import load_policy
from ledger.service import Ledger
from ledger.store import SqlStore
from tests.support import Events, Numbers

pytestmark = pytest.mark.postgres

NOW = datetime(2026, 2, 1, tzinfo=UTC)


@pytest.fixture
def second_postgres_url(pg_admin_engine: Engine) -> Iterator[str]:
    name = f"ql_test_{secrets.token_hex(6)}"
    with pg_admin_engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield pg_admin_engine.url.set(drivername="postgresql", database=name).render_as_string(
            hide_password=False
        )
    finally:
        with pg_admin_engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _events() -> list[dict]:
    ev = Events()
    out = []
    for k in range(12):
        iid = f"i-{k}"
        out += [
            ev.purchase(iid, "ecs" if k % 2 else "virtual_host", at=0),
            ev.request(iid, at=1),
            ev.request(iid, at=2),
            ev.bandwidth(iid, 0 if k % 3 == 0 else 8, at=3),
        ]
    out += [ev.file("i-1", "SN-1", at=5), ev.withdraw("i-1", "filing-ev-49", at=6)]
    return out


def _dump(engine: Engine) -> dict[str, list]:
    queries = {
        "entries": "SELECT instance_id, instance_seq, event_id, type, occurred_at, recorded_at, "
        "payload, outcome, reasons, result, policy_version, prev_hash, hash FROM ledger_entries "
        "ORDER BY instance_id, instance_seq",
        "instances": "SELECT * FROM instances ORDER BY instance_id",
        "numbers": "SELECT * FROM service_numbers ORDER BY number",
        "filings": "SELECT * FROM filings ORDER BY instance_id, filing_id",
    }
    with engine.connect() as conn:
        return {name: [tuple(r) for r in conn.execute(text(q))] for name, q in queries.items()}


def _apply(url: str, events: list[dict]) -> dict[str, list]:
    from events import validate_event

    upgrade(url)
    engine = make_engine(url)
    try:
        ledger = Ledger(engine, load_policy(), new_number=Numbers(), clock=lambda: NOW)
        parsed = [validate_event(e) for e in events]
        for start in range(0, len(parsed), 20):
            ledger.apply(parsed[start : start + 20])
        assert verify(engine).to_json()["ok"]
        assert rebuild(engine, check=True).to_json()["drift"] == []
        return _dump(engine)
    finally:
        engine.dispose()


def test_copy_writes_the_rows_insert_writes(
    postgres_url: str, second_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = _events()
    copied = _apply(postgres_url, events)
    monkeypatch.setattr(rows, "_COPY_MIN_ROWS", 10**9)  # executemany INSERT everywhere
    inserted = _apply(second_postgres_url, events)
    assert copied == inserted
    assert len(copied["entries"]) == len(events)


def test_unique_violation_in_copy_is_retried(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from events import validate_event

    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    try:
        ledger = Ledger(engine, load_policy(), new_number=Numbers(), clock=lambda: NOW)
        events = [validate_event(e) for e in _events()[:20]]
        ledger.apply(events[:10])
        # Pretend the first attempt raced past another applier: it does not see the first ten
        # entries, so its COPY hits uq_ledger_entries_event_id; the retry sees them.
        real = SqlStore.priors
        calls = itertools.count()
        monkeypatch.setattr(
            SqlStore,
            "priors",
            lambda store, ids: {} if next(calls) == 0 else real(store, ids),
        )
        monkeypatch.setattr(store.time, "sleep", lambda _: None)
        results = ledger.apply(events)
        assert next(calls) == 2  # the failed attempt and the retry
        assert [r.outcome for r in results[:10]] == ["duplicate"] * 10
        assert "duplicate" not in [r.outcome for r in results[10:]]
        assert verify(engine).to_json()["ok"]
    finally:
        engine.dispose()


def test_the_merged_feed_statement_writes_what_take_then_insert_writes(postgres_url: str) -> None:
    """``append_changes`` numbers and inserts a few changes in one statement on PostgreSQL;
    the rows are exactly those of the plain path (the counter's UPDATE, then the INSERT): the
    same columns, the same conversions (NULLs, UTC times, JSON data), consecutive positions."""
    from datetime import timedelta

    from ledger.changes import Change
    from ledger.store import feed

    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    changes = [
        Change("service_number.issued", "i-1", "ev-1", 3, NOW, {"number": "ICP-1", "n": 2**40}),
        Change("dead_lettered", None, None, None, NOW + timedelta(microseconds=7), {}),
        Change("renewal.reminder", "i-2", None, None, NOW, {"text": '备案 "x" \\ é', "l": [1]}),
    ]
    recorded = NOW + timedelta(seconds=1)
    columns = "kind, instance_id, event_id, instance_seq, occurred_at, recorded_at, data"
    try:
        with engine.begin() as conn:
            merged_last = feed._take_and_insert(conn, changes, recorded)
            plain_last = feed._take_then_insert(conn, changes, recorded)
            rows = conn.execute(
                text(f"SELECT position, {columns} FROM ledger_changes ORDER BY position")
            ).all()
    finally:
        engine.dispose()
    assert (merged_last, plain_last) == (3, 6)
    assert [row[0] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [tuple(row[1:]) for row in rows[:3]] == [tuple(row[1:]) for row in rows[3:]]
    assert rows[0][7] == {"number": "ICP-1", "n": 2**40} and rows[2][7]["text"] == '备案 "x" \\ é'
    assert rows[1][5] == NOW + timedelta(microseconds=7)
