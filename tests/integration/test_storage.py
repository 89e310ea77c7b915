"""The storage contract (ledger/tables.py, ledger/db.py, ledger/migrations) on both backends."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, StatementError
from sqlmodel import Session, SQLModel, select

import ledger.db
from ledger.chain import GENESIS_HASH, entry_hash, verify_chain
from ledger.db import (
    current_revision,
    ensure_schema,
    head_revision,
    is_postgres,
    is_transient_error,
    lock_instances,
    make_engine,
    normalize_url,
    session_scope,
    upgrade,
)
from ledger.tables import DeadLetter, FilingRow, InstanceRow, LedgerEntry, ServiceNumberRow

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 1, 31, 8, 0, tzinfo=UTC)
CST = timezone(timedelta(hours=8))

# The documented schema (SPEC §6 and the storage brief): table → columns.
SCHEMA: dict[str, set[str]] = {
    "ledger_entries": {
        "seq", "instance_id", "instance_seq", "event_id", "type", "occurred_at", "recorded_at",
        "payload", "outcome", "reasons", "result", "policy_version", "prev_hash", "hash",
    },
    "instances": {
        "instance_id", "account_id", "product_type", "region", "billing_method", "expires_at",
        "status", "entries", "head_hash", "state", "updated_at",
    },
    "service_numbers": {
        "number", "instance_id", "status", "issued_at", "issue_order", "filing_id", "website",
        "subject_id", "used_at", "invalidated_at", "invalidated_reason",
    },
    "filings": {
        "instance_id", "filing_id", "service_number", "website", "subject_id", "status",
        "accepted_at", "accept_order", "withdrawn_at",
    },
    "dead_letters": {"id", "received_at", "event_id", "code", "error", "raw"},
    # The resequencer's working state (SPEC §9), outside the ledger.
    "sequencer_gates": {"instance_id", "epoch", "last", "parked", "updated_at"},
    "parked_events": {"instance_id", "epoch", "n", "event_id", "type", "raw", "parked_at"},
    # The change feed (docs/changes.md): append-only, numbered by its one-row counter.
    "ledger_changes": {
        "position", "kind", "instance_id", "event_id", "instance_seq", "occurred_at",
        "recorded_at", "data",
    },
    "ledger_feed_head": {"id", "position"},
    "renewal_marks": {"threshold_days", "swept_until"},
    "webhook_endpoints": {
        "id", "url", "secret", "kinds", "enabled", "created_at", "cursor", "failures",
        "failing_since", "next_attempt_at", "last_status", "last_error", "disabled_reason",
        "lease_token", "lease_until",
    },
    "webhook_deliveries": {
        "id", "endpoint_id", "position", "attempt", "status", "error", "duration_ms",
        "attempted_at",
    },
}  # fmt: skip


def make_entries(instance_id: str, n: int, *, start: int = 1) -> list[LedgerEntry]:
    """n chained entries as the service would record them (hashes included)."""
    entries: list[LedgerEntry] = []
    prev = GENESIS_HASH
    for seq in range(start, start + n):
        fields: dict[str, Any] = {
            "instance_seq": seq,
            "event_id": f"{instance_id}:e{seq}",
            "type": "service_number.requested",
            "occurred_at": T0 + timedelta(minutes=seq, microseconds=seq * 7),
            "payload": f'{{"event_id":"{instance_id}:e{seq}","type":"service_number.requested"}}',
            "outcome": "applied",
            "reasons": ["term_too_short"] if seq % 2 else [],
            "result": {"service_number": f"SN-{instance_id}-{seq}", "revived": ["a", "网"]},
            "policy_version": "2026.1",
            "prev_hash": prev,
        }
        digest = entry_hash(**fields)
        entries.append(LedgerEntry(instance_id=instance_id, hash=digest, **fields))
        prev = digest
    return entries


def add_all(engine: Engine, *rows: SQLModel) -> None:
    with session_scope(engine) as session:
        session.add_all(rows)


# --- schema and migrations ---------------------------------------------------------------


def test_migrations_ship_inside_the_package() -> None:
    migrations = files("ledger") / "migrations"
    assert (migrations / "env.py").is_file()
    assert (migrations / "script.py.mako").is_file()
    assert (migrations / "versions" / "0001_initial.py").is_file()
    assert (migrations / "versions" / "0002_resequencer.py").is_file()
    assert (migrations / "versions" / "0003_drop_redundant_entry_index.py").is_file()
    assert (migrations / "versions" / "0004_change_feed.py").is_file()
    assert head_revision() == "0004"


def test_upgrade_is_idempotent(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) is None
        ensure_schema(engine)  # empty database: migrates
        assert current_revision(engine) == head_revision()
        upgrade(engine)
        upgrade(db_url)  # by URL, with a temporary engine
        assert current_revision(engine) == head_revision()

        def must_not_run(_: object) -> None:
            raise AssertionError("ensure_schema upgraded a database already at head")

        monkeypatch.setattr(ledger.db, "upgrade", must_not_run)
        ensure_schema(engine)
        assert set(SCHEMA) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_concurrent_upgrades_run_one_after_the_other(db_url: str) -> None:
    """Processes starting together on a fresh database (say workers) all succeed: SQLite's
    BEGIN IMMEDIATE or PostgreSQL's migration advisory lock puts them in a queue."""
    start_at = time.time() + 3  # past every child's import time, so they really collide
    child = (
        "import sys, time; from ledger.db import upgrade; "
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); upgrade(sys.argv[1])"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", child, db_url, str(start_at)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outcomes = [(p.communicate(timeout=120)[1], p.returncode) for p in procs]
    assert [err for err, code in outcomes if code != 0] == []
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_upgrade_is_thread_safe_within_a_process(db_url: str) -> None:
    """Alembic's context proxies are process globals; upgrade() must not let threads mix."""
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def run() -> None:
        start.wait(10)
        try:
            upgrade(db_url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []


def test_tables_and_columns_are_as_documented(engine: Engine) -> None:
    inspector = inspect(engine)
    assert set(inspector.get_table_names()) == {*SCHEMA, "alembic_version"}
    for table, columns in SCHEMA.items():
        assert {c["name"] for c in inspector.get_columns(table)} == columns, table
    unique = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("ledger_entries")}
    assert {("event_id",), ("instance_id", "instance_seq")} <= unique
    indexed = {tuple(i["column_names"]) for i in inspector.get_indexes("instances")}
    assert {("status", "billing_method", "expires_at"), ("product_type",)} <= indexed
    assert inspector.get_pk_constraint("filings")["constrained_columns"] == [
        "instance_id",
        "filing_id",
    ]
    # Dead letters: the same event id may be refused many times.
    assert ("event_id",) not in {
        tuple(u["column_names"]) for u in inspector.get_unique_constraints("dead_letters")
    }


def test_migration_matches_the_models(engine: Engine) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == []


def test_drift_check_is_not_vacuous(engine: Engine) -> None:
    """The comparison above would see a changed type, nullability or index."""
    changed = sa.MetaData()
    for table in SQLModel.metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["ledger_entries"].c.outcome.type = sa.String(17)
    changed.tables["instances"].c.region.nullable = False
    sa.Index("ix_extra", changed.tables["filings"].c.website)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), changed)
    kinds = {d[0] if isinstance(d, tuple) else d[0][0] for d in diff}
    assert kinds == {"modify_type", "modify_nullable", "add_index"}


def test_alembic_cli_upgrades_and_reports_no_drift(db_url: str) -> None:
    def alembic(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), *args],
            cwd=REPO,
            env={**os.environ, "QUOTA_LEDGER_DATABASE_URL": db_url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    alembic("upgrade", "head")
    assert f"{head_revision()} (head)" in alembic("current")
    assert "No new upgrade operations detected" in alembic("check")


# --- the ledger is append-only, unique and chained ---------------------------------------


def test_entries_get_increasing_seq_and_round_trip_to_a_sound_chain(engine: Engine) -> None:
    add_all(engine, *make_entries("i-1", 2))
    add_all(engine, *make_entries("i-2", 1))
    with session_scope(engine) as session:
        rows = session.exec(select(LedgerEntry).order_by(LedgerEntry.seq)).all()
        assert [(r.seq, r.instance_id) for r in rows] == [(1, "i-1"), (2, "i-1"), (3, "i-2")]
        assert rows[0].result == {"service_number": "SN-i-1-1", "revived": ["a", "网"]}
        assert rows[0].reasons == ["term_too_short"]
        chain_1 = [r for r in rows if r.instance_id == "i-1"]
        assert verify_chain(chain_1, head=(2, chain_1[-1].hash)) is None


def _assert_refused(engine: Engine, statement: str) -> None:
    add_all(engine, *make_entries("i-1", 3))
    with pytest.raises(IntegrityError, match="append-only"), engine.begin() as conn:
        conn.execute(text(statement))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM ledger_entries")).scalar_one() == 3
        outcomes = conn.execute(text("SELECT DISTINCT outcome FROM ledger_entries")).scalars()
        assert list(outcomes) == ["applied"]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger_entries SET outcome = 'rejected'",
        "UPDATE ledger_entries SET hash = prev_hash WHERE instance_seq = 2",
        "DELETE FROM ledger_entries WHERE instance_seq = 2",
        "DELETE FROM ledger_entries",  # SQLite's truncate optimisation must not bypass it
    ],
)
def test_the_database_refuses_to_change_entries(engine: Engine, statement: str) -> None:
    _assert_refused(engine, statement)


@pytest.mark.postgres
def test_postgres_refuses_truncate(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        upgrade(engine)
        _assert_refused(engine, "TRUNCATE ledger_entries")
    finally:
        engine.dispose()


def test_event_id_is_unique(engine: Engine) -> None:
    add_all(engine, *make_entries("i-1", 1))
    clash = make_entries("i-2", 1)[0]
    clash.event_id = "i-1:e1"
    with pytest.raises(IntegrityError):
        add_all(engine, clash)


def test_instance_seq_is_unique_per_instance(engine: Engine) -> None:
    add_all(engine, *make_entries("i-1", 1))
    clash = make_entries("i-1", 1)[0]
    clash.event_id = "another"
    with pytest.raises(IntegrityError):
        add_all(engine, clash)
    add_all(engine, *make_entries("i-2", 1))  # same instance_seq, other instance: fine


def test_dead_letters_repeat_event_ids_and_autoincrement(engine: Engine) -> None:
    add_all(
        engine,
        DeadLetter(event_id="e-1", code="invalid_event", error="bad", raw="{"),
        DeadLetter(event_id="e-1", code="event_id_reused", error="again", raw="{}"),
        DeadLetter(event_id=None, code="too_large", error="big", raw="x" * 70_000),
    )
    with session_scope(engine) as session:
        rows = session.exec(select(DeadLetter).order_by(DeadLetter.id)).all()
    assert [r.id for r in rows] == [1, 2, 3]
    assert rows[2].event_id is None and len(rows[2].raw) == 70_000


# --- time ------------------------------------------------------------------------------------


def test_utc_datetime_round_trips_aware_times_as_utc(engine: Engine) -> None:
    local = datetime(2026, 1, 31, 16, 0, 0, 123456, tzinfo=CST)
    add_all(
        engine,
        InstanceRow(instance_id="i-1", status="active", expires_at=local, updated_at=local),
        ServiceNumberRow(
            number="SN-1", instance_id="i-1", status="active", issued_at=local, issue_order=1
        ),
        FilingRow(
            instance_id="i-1",
            filing_id="f-1",
            service_number="SN-1",
            website="example.com",
            subject_id="s-1",
            status="accepted",
            accepted_at=local,
            accept_order=1,
        ),
    )
    with session_scope(engine) as session:
        row = session.get(InstanceRow, "i-1")
        number = session.get(ServiceNumberRow, "SN-1")
        filing = session.get(FilingRow, ("i-1", "f-1"))
    assert row is not None and number is not None and filing is not None
    for value in (row.expires_at, row.updated_at, number.issued_at, filing.accepted_at):
        assert value == datetime(2026, 1, 31, 8, 0, 0, 123456, tzinfo=UTC)
        assert value.tzinfo is UTC
    assert number.used_at is None and filing.withdrawn_at is None
    assert row.state == {} and row.head_hash == GENESIS_HASH and row.entries == 0


def test_utc_datetime_compares_instants_whatever_the_offset(engine: Engine) -> None:
    for i, hours in enumerate([1, 3, 5]):
        add_all(engine, InstanceRow(instance_id=f"i-{i}", expires_at=T0 + timedelta(hours=hours)))
    # 17:00+08:00 is 09:00Z: only the instances ending at 11:00Z and 13:00Z are later. On
    # SQLite this is a text comparison, right only because every stored time is UTC.
    bound = datetime(2026, 1, 31, 17, 0, tzinfo=CST)
    with session_scope(engine) as session:
        later = session.exec(
            select(InstanceRow.instance_id)
            .where(InstanceRow.expires_at > bound)  # type: ignore[operator]
            .order_by(InstanceRow.instance_id)
        ).all()
        at_or_later = session.exec(
            select(InstanceRow.instance_id).where(InstanceRow.expires_at >= bound)  # type: ignore[operator]
        ).all()
    assert later == ["i-1", "i-2"]
    assert sorted(at_or_later) == ["i-0", "i-1", "i-2"]


def test_utc_datetime_refuses_naive_times(engine: Engine) -> None:
    with pytest.raises(StatementError, match="naive"):
        add_all(
            engine, DeadLetter(received_at=datetime(2026, 1, 31, 8, 0), code="x", error="", raw="")
        )
    with session_scope(engine) as session:
        assert session.exec(select(DeadLetter)).first() is None


# --- engines ---------------------------------------------------------------------------------


def test_normalize_url_pins_psycopg_and_refuses_others() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"
    with pytest.raises(ValueError, match="unsupported"):
        normalize_url("mysql://u@h/db")
    with pytest.raises(ValueError, match="unsupported"):
        normalize_url("postgresql+psycopg2://u@h/db")


def test_sqlite_memory_is_one_shared_database() -> None:
    engine = make_engine("sqlite://")
    try:
        upgrade(engine)
        add_all(engine, *make_entries("i-1", 1))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM ledger_entries")).scalar_one() == 1
    finally:
        engine.dispose()


def test_sqlite_connections_are_configured(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 30_000
    finally:
        engine.dispose()


def test_sqlite_transactions_take_the_write_lock_at_begin(sqlite_url: str) -> None:
    """BEGIN IMMEDIATE: even a transaction that has only read holds off every other writer."""
    engine = make_engine(sqlite_url)
    upgrade(engine)
    path = normalize_url(sqlite_url).database
    assert path is not None
    try:
        with session_scope(engine) as session:
            session.exec(select(InstanceRow)).all()
            other = sqlite3.connect(path, timeout=0.1, isolation_level=None)
            try:
                with pytest.raises(sqlite3.OperationalError, match="locked") as refused:
                    other.execute("BEGIN IMMEDIATE")
                assert is_transient_error(refused.value)
            finally:
                other.close()
    finally:
        engine.dispose()


def test_session_scope_rolls_back_on_error(engine: Engine) -> None:
    with pytest.raises(RuntimeError), session_scope(engine) as session:
        session.add(InstanceRow(instance_id="i-1"))
        session.flush()
        raise RuntimeError("boom")
    with session_scope(engine) as session:
        assert session.get(InstanceRow, "i-1") is None


def test_lock_instances_is_harmless_on_every_backend(engine: Engine, db_url: str) -> None:
    add_all(engine, InstanceRow(instance_id="i-1"))
    with session_scope(engine) as session:
        expect_pg = db_url.startswith("postgresql")
        assert is_postgres(engine) is is_postgres(session) is is_postgres(session.connection())
        assert is_postgres(engine) is expect_pg
        lock_instances(session, [])
        lock_instances(session, ["i-2", "i-1", "i-2"])
        session.add(InstanceRow(instance_id="i-2"))


# --- errors ----------------------------------------------------------------------------------


def test_transient_error_classification(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with pytest.raises(OperationalError) as missing, engine.connect() as conn:
            conn.execute(text("SELECT * FROM no_such_table"))
        assert not is_transient_error(missing.value)  # permanent, though an OperationalError
        upgrade(engine)
        add_all(engine, *make_entries("i-1", 1))
        with pytest.raises(IntegrityError) as clash:
            add_all(engine, *make_entries("i-1", 1))
        assert not is_transient_error(clash.value)
    finally:
        engine.dispose()
    locked = OperationalError("BEGIN", {}, sqlite3.OperationalError("database is locked"))
    assert is_transient_error(locked)
    assert is_transient_error(ConnectionResetError())
    assert not is_transient_error(ValueError("bad input"))


# --- PostgreSQL: lock_instances really serialises appliers ----------------------------------

LOCK_WAIT = "SET LOCAL lock_timeout = '300ms'"


def _blocked(engine: Engine, instance_ids: list[str]) -> bool:
    """Whether lock_instances(instance_ids) has to wait (given up after 300 ms)."""
    with Session(engine) as session:
        session.execute(text(LOCK_WAIT))
        try:
            lock_instances(session, instance_ids)
        except DBAPIError as exc:
            assert is_transient_error(exc), exc  # lock timeouts are retried, not dead-lettered
            return True
        finally:
            session.rollback()
    return False


@pytest.mark.postgres
@pytest.mark.parametrize("row_exists", [False, True], ids=["first-event", "known-instance"])
def test_lock_instances_blocks_a_second_applier(postgres_url: str, row_exists: bool) -> None:
    engine = make_engine(postgres_url)
    try:
        upgrade(engine)
        if row_exists:
            add_all(engine, InstanceRow(instance_id="i-1"))
        with Session(engine) as holder:
            lock_instances(holder, ["i-1"])
            assert _blocked(engine, ["i-1"])
            assert _blocked(engine, ["i-0", "i-1", "i-9"])
            assert not _blocked(engine, ["i-2"])
            holder.rollback()
        assert not _blocked(engine, ["i-1"])
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_first_event_appliers_queue_and_then_hold_the_new_row(postgres_url: str) -> None:
    """A creates the instance; B, waiting on the advisory lock, gets in only after A commits,
    sees A's row and locks it, so C (who finds the row) queues behind B."""
    engine = make_engine(postgres_url)
    try:
        upgrade(engine)
        # When A starts to commit: the server releases A's locks at commit, so B may be in
        # before A's client has even seen the commit's answer.
        a_committing_at: list[float] = []
        b_state: dict[str, Any] = {}
        b_locked, b_release = threading.Event(), threading.Event()

        def applier_b() -> None:
            with Session(engine) as session:
                lock_instances(session, ["i-1"])
                b_state["locked_at"] = time.monotonic()
                b_state["row"] = session.get(InstanceRow, "i-1")
                b_locked.set()
                b_release.wait(10)
                session.rollback()

        with Session(engine) as a:
            lock_instances(a, ["i-1"])
            thread = threading.Thread(target=applier_b)
            thread.start()
            time.sleep(0.3)
            assert not b_locked.is_set(), "B got in while A held the instance"
            a.add(InstanceRow(instance_id="i-1", status="active"))
            a_committing_at.append(time.monotonic())
            a.commit()
        try:
            assert b_locked.wait(10)
            assert b_state["locked_at"] >= a_committing_at[0]
            assert b_state["row"] is not None and b_state["row"].status == "active"
            assert _blocked(engine, ["i-1"])  # C: finds the row, waits for B's row lock
        finally:
            b_release.set()
            thread.join(10)
        assert not _blocked(engine, ["i-1"])
    finally:
        engine.dispose()
