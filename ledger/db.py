"""Engines, schema migration, sessions, per-instance locking and error classification.

Two backends: SQLite (the embedded, single-writer default) and PostgreSQL (many workers on many
machines). Everything backend-specific about *storage* lives here so the rest of ``ledger``
does not need to know which one it runs on.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import orjson
import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, any_, bindparam, create_engine, event, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.pool import StaticPool
from sqlmodel import Session

from ledger.tables import InstanceRow, core_table

__all__ = [
    "MissingDatabaseDirectory",
    "advisory_key",
    "alembic_config",
    "current_revision",
    "ensure_schema",
    "error_line",
    "exception_chain",
    "head_revision",
    "id_in",
    "is_postgres",
    "is_transient_error",
    "lock_and_load",
    "lock_instances",
    "make_engine",
    "normalize_url",
    "session_scope",
    "upgrade",
]

SQLITE_BUSY_TIMEOUT_S = 30.0

# The transaction-scoped advisory lock every PostgreSQL migration run takes first, so that two
# processes starting at once (say two workers on a fresh database) run it one after the other;
# the second then finds the schema at head and does nothing.
MIGRATION_LOCK_NAME = "quota-ledger:schema-migration"


# --- engines -------------------------------------------------------------------------------


def normalize_url(url: str | URL) -> URL:
    """Parse ``url`` and pin the PostgreSQL driver to psycopg 3 (the one installed).

    ``postgresql://`` and ``postgres://`` would otherwise mean psycopg2 to SQLAlchemy.
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername not in ("postgresql+psycopg", "sqlite", "sqlite+pysqlite"):
        raise ValueError(
            f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}: "
            "use sqlite:///PATH, sqlite:// or postgresql://…"
        )
    return parsed


def json_loads(data: str | bytes) -> Any:
    """The JSON columns' decoder: orjson (the same values as ``json.loads``, several times
    faster), with a shortcut for the values most rows hold (the ledger's ``reasons`` and
    ``result`` are mostly ``[]`` and ``{}``). A text with a run of 19 digits goes to
    ``json.loads``: orjson reads an integer beyond 64 bits as a float, silently
    (``tests/property/test_json_codecs.py`` found it)."""
    if data == b"[]" or data == "[]":
        return []
    if data == b"{}" or data == "{}":
        return {}
    long_number = _LONG_DIGITS_BYTES if isinstance(data, bytes) else _LONG_DIGITS_TEXT
    if long_number.search(data) is not None:  # type: ignore[arg-type]
        return json.loads(data)
    return orjson.loads(data)


_LONG_DIGITS_TEXT = re.compile(r"[0-9]{19}")
_LONG_DIGITS_BYTES = re.compile(rb"[0-9]{19}")


def json_dumps(value: Any) -> str:
    """The JSON columns' encoder: orjson, compact UTF-8. The database needs valid JSON of the
    same value, not the canonical spelling (that is only for the hashed payload), and
    ``json.dumps`` of the instance state was the largest single cost of a write
    (docs/performance.md). What orjson refuses (a non-string key, an int beyond 64 bits) goes
    through ``json.dumps``, as before."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value)


def _is_sqlite_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or bool(url.query.get("mode") == "memory")


class MissingDatabaseDirectory(FileNotFoundError, ValueError):
    """A SQLite URL whose directory does not exist: an I/O problem, and a bad setting (callers
    that refuse a bad database URL with ``ValueError`` refuse this one the same way)."""


def make_engine(url: str | URL) -> Engine:
    """An engine for ``url``: ``sqlite:///PATH``, ``sqlite://`` (memory), ``postgresql://…``.

    SQLite gets WAL, a 30 s busy timeout, foreign keys and BEGIN IMMEDIATE transactions;
    PostgreSQL gets psycopg 3 and pre-ping. Nothing is cached: each call is a new pool.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _make_sqlite_engine(parsed)
    # pre_ping: a worker outlives database restarts and idle-connection reapers.
    return create_engine(
        parsed, pool_pre_ping=True, json_serializer=json_dumps, json_deserializer=json_loads
    )


def _make_sqlite_engine(url: URL) -> Engine:
    kwargs: dict[str, Any] = {
        "json_serializer": json_dumps,
        "json_deserializer": json_loads,
        # The sqlite3 driver's own wait for a lock; the PRAGMA below says the same.
        "connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
    }
    if _is_sqlite_memory(url):
        # One connection for everybody, or each connection would see its own empty database.
        kwargs["poolclass"] = StaticPool
    elif url.database and not Path(url.database).parent.is_dir():
        # SQLite would only say "unable to open database file", on first use.
        directory = Path(url.database).parent.absolute()
        raise MissingDatabaseDirectory(
            f"the directory {directory} of the SQLite database {url.database} does not exist "
            "(create it first)"
        )
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # Take transaction control away from the sqlite3 driver (which would BEGIN only before
        # DML, and DEFERRED); ``_on_begin`` emits the BEGIN instead. This is the documented
        # SQLAlchemy pysqlite recipe.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            # WAL: readers never block the writer nor the other way round. Persistent in the
            # file; repeating it on every connection is a no-op once set.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock up front. A DEFERRED transaction that reads and then
        # writes must upgrade its lock and fails with SQLITE_BUSY at once (no busy wait) when
        # another writer got there first; IMMEDIATE waits in busy_timeout instead, making
        # SQLite a plain single-writer store.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def is_postgres(bind: Engine | Connection | OrmSession) -> bool:
    """True if ``bind`` (an engine, a connection or a session) talks to PostgreSQL."""
    if isinstance(bind, OrmSession):
        return bind.get_bind().dialect.name == "postgresql"
    return bind.dialect.name == "postgresql"


# --- schema --------------------------------------------------------------------------------


def _migrations_dir() -> Path:
    # Found as package data, so it works wherever ``ledger`` is installed (the wheel ships
    # ``ledger/migrations``). Alembic needs a real directory; pip installs packages unzipped.
    return Path(str(files("ledger").joinpath("migrations")))


def alembic_config() -> Config:
    """An Alembic config for the shipped migrations, independent of the CWD and any ini file."""
    config = Config()
    config.set_main_option("script_location", str(_migrations_dir()))
    return config


# Alembic's ``context``/``op`` are module-level proxies installed per run: two runs in threads of
# one process would clobber each other's. Processes are serialised by the database instead.
_UPGRADE_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def head_revision() -> str | None:
    """The newest migration shipped with this code (cached: the scripts do not change)."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def upgrade(target: str | URL | Engine) -> None:
    """Create or migrate the schema to head, in one transaction. Idempotent.

    With a URL a temporary engine is used and disposed (so ``sqlite://`` is pointless here).
    """
    engine = target if isinstance(target, Engine) else make_engine(target)
    try:
        config = alembic_config()
        # One transaction around the whole run: on SQLite it is BEGIN IMMEDIATE, on PostgreSQL
        # env.py takes the migration advisory lock in it. Alembic sees a connection already in
        # a transaction and leaves commit to us.
        with _UPGRADE_LOCK, engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        if engine is not target:
            engine.dispose()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def ensure_schema(engine: Engine) -> None:
    """Upgrade only if the database is not at head: one cheap query when it already is."""
    if current_revision(engine) != head_revision():
        upgrade(engine)


# --- sessions and locks --------------------------------------------------------------------


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session in one transaction: committed if the block succeeds, rolled back if not.

    ``expire_on_commit=False``: objects read inside stay readable after the block.
    """
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def advisory_key(instance_id: str) -> int:
    """The signed 64-bit advisory-lock key of an instance: first 8 bytes of sha256(id)."""
    digest = hashlib.sha256(instance_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_instances(session: Session, instance_ids: Iterable[str]) -> None:
    """Serialise this transaction with every other one touching any of ``instance_ids``.

    Call it first in the transaction, with every instance the transaction will change.

    PostgreSQL: the ``instances`` rows that exist are locked ``FOR UPDATE``. An instance that
    has no row yet (its first event) cannot be row-locked, so a transaction-scoped advisory lock
    on its id stands in; after getting it the row is selected ``FOR UPDATE`` again, because
    another transaction may have created and committed it meanwhile, and later arrivals lock
    that row rather than the advisory key: holding both keeps us serialised with either kind.
    Ids are sorted so that two multi-instance transactions (the sweep) take locks in the same
    order; a remaining deadlock is detected by PostgreSQL and is a transient error. Relies on
    READ COMMITTED (PostgreSQL's default): each statement sees rows committed before it.

    SQLite: nothing to do. Every transaction of ``make_engine`` starts with BEGIN IMMEDIATE,
    which already admits one writer at a time for the whole database.
    """
    lock_and_load(session, instance_ids)


_INSTANCES = core_table(InstanceRow)
_ADVISORY_LOCKS = text(
    # One round trip for every key, taken in the order of the array (sorted ids).
    "SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) AS k"
)


def id_in(column: Any, postgres: bool, name: str = "ids") -> Any:
    """``column IN (:ids …)``, bound with a list; on PostgreSQL ``column = ANY(:ids)``: one
    array parameter, so the statement text is the same for any number of ids (psycopg caches
    and prepares it, the server plans it once) instead of one placeholder per id."""
    if postgres:
        return column == any_(bindparam(name, type_=ARRAY(column.type)))
    return column.in_(bindparam(name, expanding=True))


@lru_cache(maxsize=16)
def _instances_query(columns: tuple[str, ...], postgres: bool) -> Any:
    """PostgreSQL: the rows ``FOR UPDATE``; SQLite (nothing to lock): a plain read."""
    table = _INSTANCES
    stmt = (
        select(table.c.instance_id, *(table.c[name] for name in columns))
        .where(id_in(table.c.instance_id, postgres))
        .order_by(table.c.instance_id)
    )
    return stmt.with_for_update() if postgres else stmt


def lock_and_load(
    session: Session, instance_ids: Iterable[str], columns: tuple[str, ...] = ()
) -> dict[str, tuple[Any, ...]]:
    """:func:`lock_instances`, and the ``columns`` of the ``instances`` rows that exist, read
    by the same statements that lock them (``{instance_id: (values…)}``; with no columns, the
    rows' ids map to ``()``). On SQLite (nothing to lock) the rows are read only if ``columns``
    are asked for.

    The advisory locks of all the instances without a row are taken in one statement, in
    sorted order, and those instances are then selected ``FOR UPDATE`` again in one statement:
    the same locks, in the same order, as one lock and one select per instance.
    """
    ids = sorted(set(instance_ids))
    if not ids:
        return {}
    postgres = is_postgres(session)
    if not postgres and not columns:
        return {}
    # Through the session's connection: same transaction, and works for any Session class.
    connection = session.connection()
    if not postgres:
        query = _instances_query(columns, False)
        found: dict[str, tuple[Any, ...]] = {}
        for start in range(0, len(ids), 500):  # under SQLite's variable limit
            for row in connection.execute(query, {"ids": ids[start : start + 500]}):
                found[row[0]] = tuple(row[1:])
        return found

    query = _instances_query(columns, True)

    def select_for_update(wanted: list[str]) -> dict[str, tuple[Any, ...]]:
        return {row[0]: tuple(row[1:]) for row in connection.execute(query, {"ids": wanted})}

    found = select_for_update(ids)
    missing = [instance_id for instance_id in ids if instance_id not in found]
    if missing:
        connection.execute(
            _ADVISORY_LOCKS, {"keys": [advisory_key(instance_id) for instance_id in missing]}
        ).all()
        found.update(select_for_update(missing))
    return found


# --- errors --------------------------------------------------------------------------------

# sqlite3.OperationalError also covers permanent faults (syntax, "no such table"); only these
# messages mean "try again later".
_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "database is busy")


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps (a driver's ``orig``, ``__cause__``,
    ``__context__``), each once."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend([getattr(current, "orig", None), current.__cause__, current.__context__])


def error_line(exc: BaseException) -> str:
    """An error's first line, for logs and one-line messages: a driver error's own text when
    SQLAlchemy wraps one (it appends the SQL and its parameters on later lines), the type's
    name when there is no text at all."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_transient_error(exc: BaseException) -> bool:
    """True if retrying the whole transaction later may succeed (the Celery retry test).

    Transient: lost or refused connections, pool timeouts, PostgreSQL serialization failures,
    deadlocks, lock/statement timeouts and shutdowns (psycopg files all of these under
    ``OperationalError``), and SQLite's "database is locked". Not transient: integrity errors,
    bad SQL, missing tables, data errors.
    """
    for cause in exception_chain(exc):
        if isinstance(cause, sa_exc.DBAPIError) and cause.connection_invalidated:
            return True
        if isinstance(cause, sa_exc.DisconnectionError | sa_exc.TimeoutError | ConnectionError):
            return True
        if isinstance(cause, sqlite3.OperationalError):
            message = str(cause).lower()
            return any(marker in message for marker in _SQLITE_TRANSIENT)
        sqlstate = getattr(cause, "sqlstate", None)
        if isinstance(sqlstate, str) and (
            sqlstate in ("40001", "40P01", "55P03") or sqlstate[:2] in ("08", "53", "57")
        ):
            return True
        if isinstance(cause, psycopg.OperationalError):
            return True
    # An OperationalError of a driver we did not recognise above: assume the benign case.
    return isinstance(exc, sa_exc.OperationalError) and not isinstance(
        getattr(exc, "orig", None), sqlite3.Error
    )
