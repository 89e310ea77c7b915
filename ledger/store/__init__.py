"""Every SQL statement of the write path, behind the narrow interface the service calls.

:func:`transaction` opens one transaction and yields a :class:`SqlStore` bound to it; the service
(``ledger/service.py``) asks it to lock and load instances, look up prior event ids, load
resequencer gates and parked events, and finally to save what the use case decided. The store
decides nothing: it reads and writes rows.

- ``ledger/store/rows.py``: projection row values, bulk INSERT (COPY on PostgreSQL), UPDATE by key;
- ``ledger/store/parking.py``: the resequencer's gates and parked events (SPEC §9);
- here: the transaction, locks and loads, idempotency look-ups, dead letters and entries, the
  sweep's keyset query and its advisory lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from ledger.changes import Change
from ledger.db import advisory_key, id_in, is_postgres, is_transient_error, lock_and_load
from ledger.resequencer import Gate, Release
from ledger.results import Prior
from ledger.state import InstanceState, state_from_json
from ledger.store import feed, parking, reminders
from ledger.store.parking import ParkedRow
from ledger.store.rows import insert_rows, write_projections
from ledger.tables import DeadLetter, InstanceRow, LedgerEntry, core_table

__all__ = [
    "ParkedRow",
    "SqlStorage",
    "SqlStore",
    "Storage",
    "Transaction",
    "due_expiries",
    "due_gate_instances",
    "in_transaction",
    "sweep_lock",
    "transaction",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

_ENTRIES = core_table(LedgerEntry)
_DEAD_LETTERS = core_table(DeadLetter)
# SQL parameter lists are chunked so that large batches stay under SQLite's variable limit.
_IN_CHUNK = 500

_PRIORS_QUERIES = {
    postgres: select(
        _ENTRIES.c.event_id,
        _ENTRIES.c.instance_id,
        _ENTRIES.c.type,
        _ENTRIES.c.payload,
        _ENTRIES.c.outcome,
        _ENTRIES.c.reasons,
        _ENTRIES.c.result,
    ).where(id_in(_ENTRIES.c.event_id, postgres))
    for postgres in (False, True)
}


class Transaction(Protocol):
    """What the service asks of its storage inside one transaction (SPEC §6: the instances it
    touches are locked from ``lock`` until the end)."""

    def lock(self, instance_ids: Sequence[str]) -> dict[str, InstanceState]: ...
    def priors(self, event_ids: Iterable[str]) -> dict[str, Prior]: ...
    def gates(self, instance_ids: Sequence[str]) -> dict[str, Gate]: ...
    def parked(self, releases: Iterable[Release]) -> dict[tuple[str, int, int], ParkedRow]: ...
    def now(self) -> datetime: ...
    def save(
        self,
        *,
        dead_letters: list[dict[str, Any]],
        entries: list[dict[str, Any]],
        states: dict[str, InstanceState],
        recorded_at: datetime,
        gates: Iterable[Gate] = (),
        parked: list[dict[str, Any]] | None = None,
        released: list[Release] | None = None,
        changes: Sequence[Change] = (),
    ) -> None: ...


class Storage(Protocol):
    """Where the ledger lives: transactions, and the two queries that find work without an
    arrival (due gap timeouts, due expiries). ``SqlStorage`` is the real one;
    ``ledger.store.memory.MemoryStorage`` the same on plain dicts, for the rule and property
    tests and the simulation's model."""

    def run(self, work: Callable[[Transaction], T], max_attempts: int) -> T: ...
    def due_gate_instances(self, *, timeout: float, limit: int) -> list[str]: ...
    def due_expiries(
        self, *, now: datetime, after: tuple[datetime, str] | None, limit: int
    ) -> list[tuple[str, datetime]]: ...
    def remind_renewals(
        self, *, now: datetime, thresholds: Sequence[int], recorded_at: datetime
    ) -> int: ...


class SqlStore:
    """The ledger's storage inside one open transaction."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.connection = session.connection()
        # What was loaded, so that only what changed is written back.
        self._rows: dict[str, Any] = {}
        self._states: dict[str, InstanceState] = {}
        self._gates: dict[str, tuple[int | None, int, int]] = {}

    def lock(self, instance_ids: Sequence[str]) -> dict[str, InstanceState]:
        """Serialise with every other transaction on these instances (PostgreSQL: row locks,
        or advisory locks for instances without a row) and load their states."""
        self._rows = {
            instance_id: values[0]
            for instance_id, values in lock_and_load(self.session, instance_ids, ("state",)).items()
        }
        self._states = {
            instance_id: (
                state_from_json(self._rows[instance_id])
                if instance_id in self._rows
                else InstanceState(instance_id)
            )
            for instance_id in instance_ids
        }
        return dict(self._states)

    def priors(self, event_ids: Iterable[str]) -> dict[str, Prior]:
        """What the ledger holds for each of ``event_ids`` that it has seen."""
        priors: dict[str, Prior] = {}
        unique_ids = sorted(set(event_ids))
        query = _PRIORS_QUERIES[is_postgres(self.connection)]
        for start in range(0, len(unique_ids), _IN_CHUNK):
            chunk = unique_ids[start : start + _IN_CHUNK]
            for (
                event_id,
                instance_id,
                type_,
                payload,
                outcome,
                reasons,
                result,
            ) in self.connection.execute(query, {"ids": chunk}):
                priors[event_id] = Prior(
                    instance_id, type_, payload, outcome, tuple(reasons or ()), dict(result or {})
                )
        return priors

    def gates(self, instance_ids: Sequence[str]) -> dict[str, Gate]:
        gates = parking.load_gates(self.connection, instance_ids)
        self._gates = {iid: (g.epoch, g.last, len(g.parked)) for iid, g in gates.items()}
        return gates

    def parked(self, releases: Iterable[Release]) -> dict[tuple[str, int, int], ParkedRow]:
        return parking.load_released(self.connection, releases)

    def now(self) -> datetime:
        """The database's clock."""
        return parking.database_now(self.connection)

    def save(
        self,
        *,
        dead_letters: list[dict[str, Any]],
        entries: list[dict[str, Any]],
        states: dict[str, InstanceState],
        recorded_at: datetime,
        gates: Iterable[Gate] = (),
        parked: list[dict[str, Any]] | None = None,
        released: list[Release] | None = None,
        changes: Sequence[Change] = (),
    ) -> None:
        """Write the transaction's outcome: dead letters, entries, the projections that changed,
        the gates, parked and released events, and last the feed's changes (their position
        counter is a lock every writer shares: held from here to the commit, and no longer)."""
        if dead_letters:
            self.connection.execute(_DEAD_LETTERS.insert(), dead_letters)
        if entries:
            insert_rows(self.connection, _ENTRIES, entries)
            write_projections(self.connection, self._rows, self._states, states, recorded_at)
        if self._gates or parked or released:
            parking.write_gates(
                self.connection,
                before=self._gates,
                gates=gates,
                parked_rows=parked or [],
                released=released or [],
                now=recorded_at,
            )
        if changes:
            feed.append_changes(self.connection, changes, recorded_at)


@contextmanager
def transaction(engine: Engine) -> Iterator[SqlStore]:
    """One transaction (committed on success, rolled back on error) and its store."""
    with Session(engine) as session, session.begin():
        yield SqlStore(session)


def in_transaction(engine: Engine, work: Callable[[SqlStore], T], max_attempts: int) -> T:
    """``work(store)`` in a transaction, run again on a unique violation (two appliers raced
    past the in-memory checks: the retry sees the winner's rows) or a transient error (lost
    connection, deadlock, serialization failure, SQLite busy), at most ``max_attempts`` times."""
    attempt = 1
    while True:
        try:
            with transaction(engine) as store:
                return work(store)
        except Exception as exc:
            retriable = isinstance(exc, IntegrityError) or is_transient_error(exc)
            if not retriable or attempt >= max_attempts:
                raise
            log.info("retrying batch after %s (attempt %d)", type(exc).__name__, attempt)
            time.sleep(min(0.05 * 2**attempt, 2.0))
            attempt += 1


def due_gate_instances(engine: Engine, *, timeout: float, limit: int) -> list[str]:
    """Instances whose gate has work without any arrival (SPEC §9 gap timeout)."""
    with Session(engine) as session:
        connection = session.connection()
        cutoff = parking.database_now(connection) - timedelta(seconds=timeout)
        return parking.due_gate_instances(connection, cutoff=cutoff, limit=limit)


def due_expiries(
    engine: Engine, *, now: datetime, after: tuple[datetime, str] | None, limit: int
) -> list[tuple[str, datetime]]:
    """A keyset page of active subscriptions whose end is at or before ``now``, by
    ``(expires_at, instance_id)`` after ``after``: the (status, billing_method, expires_at)
    index serves it, so the sweep's cost follows the due instances, not all instances."""
    rows = core_table(InstanceRow).c
    query = (
        select(rows.instance_id, rows.expires_at)
        .where(
            rows.status == "active",
            rows.billing_method == "subscription",
            rows.expires_at <= now,
        )
        .order_by(rows.expires_at, rows.instance_id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(
            # Implied by the keyset condition below; stated so that the index range starts at
            # the last page's end instead of the first due row.
            rows.expires_at >= after[0],
            (rows.expires_at > after[0])
            | ((rows.expires_at == after[0]) & (rows.instance_id > after[1])),
        )
    with Session(engine) as session:
        return [(iid, expires_at) for iid, expires_at in session.execute(query).all()]


#: The fixed PostgreSQL advisory-lock key that serialises sweeps across beats and workers.
SWEEP_LOCK_KEY = advisory_key("quota-ledger:expiry-sweep")


@contextmanager
def sweep_lock(engine: Engine) -> Iterator[bool]:
    """Hold the sweep's lock for the duration, if it is free: yields False when another sweep
    holds it. PostgreSQL: ``pg_try_advisory_xact_lock`` in a transaction of its own connection;
    SQLite (one writer at a time anyway): always True."""
    if not is_postgres(engine):
        yield True
        return
    with engine.connect() as connection, connection.begin():
        locked = connection.execute(
            text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": SWEEP_LOCK_KEY}
        ).scalar_one()
        yield bool(locked)


class SqlStorage:
    """:class:`Storage` on a SQLAlchemy engine (PostgreSQL or SQLite)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(self, work: Callable[[Transaction], T], max_attempts: int) -> T:
        return in_transaction(self.engine, work, max_attempts)

    def due_gate_instances(self, *, timeout: float, limit: int) -> list[str]:
        return due_gate_instances(self.engine, timeout=timeout, limit=limit)

    def due_expiries(
        self, *, now: datetime, after: tuple[datetime, str] | None, limit: int
    ) -> list[tuple[str, datetime]]:
        return due_expiries(self.engine, now=now, after=after, limit=limit)

    def remind_renewals(
        self, *, now: datetime, thresholds: Sequence[int], recorded_at: datetime
    ) -> int:
        return reminders.remind_renewals(
            self.engine, now=now, thresholds=thresholds, recorded_at=recorded_at
        )
