"""The service layer: one transaction appends events to the ledger, decides them and updates the
projections. Every entrypoint (CLI ``apply``, Celery tasks, the sweep, the demo) goes through
:meth:`Ledger.apply`, so there is exactly one write path.

What happens to a batch, in one transaction:
1. invalid input (an :class:`~events.EventRejection`) goes to ``dead_letters``;
2. the batch's instances are locked in sorted order (no deadlocks between batches);
3. each event, in input order: a known ``event_id`` with the same canonical payload is a
   ``duplicate`` (nothing appended, the original answer returned); with other content it is
   dead-lettered as ``event_id_reused``; otherwise ``ledger.rules.decide`` decides it, the entry
   is hashed onto the instance's chain and ``ledger.rules.fold`` moves the projection;
4. entries are bulk-inserted, projection rows inserted or updated.

Uniqueness is the database's job (``event_id`` unique, ``(instance_id, instance_seq)`` unique,
service numbers primary key): if two appliers race past the in-memory checks, one transaction
fails and is retried, and the retry sees the winner's rows.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache, partial
from typing import Any

from sqlalchemy import JSON, bindparam, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from events import (
    Event,
    EventRejection,
    canonical_payload,
    iso_utc,
    parse_event,
    validate_event,
)
from ledger.db import id_in, is_transient_error, lock_and_load
from ledger.entries import record
from ledger.gc_tuning import fewer_collections
from ledger.numbers import new_service_number
from ledger.policy import Policy
from ledger.state import InstanceState, state_from_json, state_to_json
from ledger.tables import (
    DeadLetter,
    FilingRow,
    InstanceRow,
    LedgerEntry,
    ServiceNumberRow,
    UTCDateTime,
)

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
Parsed = Event | EventRejection

# SQL parameter lists are chunked so that large batches stay under SQLite's variable limit.
_IN_CHUNK = 500


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ApplyResult:
    """The answer for one input line or message (SPEC §7 ``apply --json``)."""

    event_id: str | None
    outcome: str  # applied | rejected | stale | duplicate | invalid
    reasons: tuple[str, ...] = ()
    service_number: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "event_id": self.event_id,
            "outcome": self.outcome,
            "reasons": list(self.reasons),
            "service_number": self.service_number,
        }
        if self.error is not None:
            data["error"] = self.error
        return data


def storable_text(text: str) -> str:
    """``text`` as any backend can store it: PostgreSQL text refuses NUL and every UTF-8 encoder
    refuses lone surrogates, so both are kept as visible backslash escapes (``\\x00``,
    ``\\ud800``) instead of failing the whole batch."""
    if "\x00" not in text and text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def invalid_result(code: str, error: str, event_id: str | None) -> ApplyResult:
    return ApplyResult(event_id, "invalid", (code,), None, error)


@dataclass(frozen=True)
class _Prior:
    """What the ledger already holds for an ``event_id``."""

    instance_id: str
    type: str
    payload: str
    outcome: str
    reasons: tuple[str, ...]
    result: dict[str, Any]

    def answer(self, event_id: str) -> ApplyResult:
        return ApplyResult(
            event_id,
            "duplicate",
            self.reasons,
            entry_service_number(self.type, self.payload, self.result),
        )


def entry_service_number(event_type: str, payload: str, result: dict[str, Any]) -> str | None:
    """The number issued by a request, or presented by a filing; else None."""
    if "service_number" in result:
        return result["service_number"]
    if event_type == "filing.submitted":
        return json.loads(payload).get("service_number")
    return None


class Ledger:
    """The ledger service bound to one database and one policy."""

    def __init__(
        self,
        engine: Engine,
        policy: Policy,
        *,
        new_number: Callable[[], str] = new_service_number,
        clock: Clock = utcnow,
        max_attempts: int = 8,
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.new_number = new_number
        self.clock = clock
        self.max_attempts = max_attempts

    # -- writing -------------------------------------------------------------------------------

    def apply_lines(self, lines: Iterable[str], *, batch_size: int = 500) -> Iterator[ApplyResult]:
        """Apply JSONL lines (blank ones skipped) in batches; one result per non-blank line."""
        batch: list[str] = []
        for line in lines:
            raw = line.rstrip("\r\n")
            if not raw.strip():
                continue
            batch.append(raw)
            if len(batch) >= batch_size:
                yield from self._apply_raw(batch)
                batch = []
        if batch:
            yield from self._apply_raw(batch)

    def _apply_raw(self, raws: list[str]) -> list[ApplyResult]:
        with fewer_collections():
            parsed: list[Parsed] = [parse_event(raw) for raw in raws]
        return self.apply(parsed)

    def apply(
        self, items: Sequence[Parsed], *, raws: Sequence[str | None] | None = None
    ) -> list[ApplyResult]:
        """Apply parsed events (and record rejections) in one transaction, retried on conflict.

        ``raws`` optionally gives each item's original text, kept in a dead letter if the item is
        refused later (``event_id_reused``); without it the canonical payload is kept.
        """
        attempt = 1
        while True:
            try:
                with fewer_collections(), Session(self.engine) as session, session.begin():
                    return self._apply_in_transaction(session, items, raws)
            except Exception as exc:
                retriable = isinstance(exc, IntegrityError) or is_transient_error(exc)
                if not retriable or attempt >= self.max_attempts:
                    raise
                log.info("retrying batch after %s (attempt %d)", type(exc).__name__, attempt)
                time.sleep(min(0.05 * 2**attempt, 2.0))
                attempt += 1

    def _apply_in_transaction(
        self,
        session: Session,
        items: Sequence[Parsed],
        raws: Sequence[str | None] | None,
    ) -> list[ApplyResult]:
        now = self.clock()
        results: list[ApplyResult | None] = [None] * len(items)
        # (input index, row): dead letters are stored in input order, whatever step refused them.
        dead_letters: list[tuple[int, dict[str, Any]]] = []

        def refuse(index: int, code: str, error: str, event_id: str | None, raw: str) -> None:
            results[index] = invalid_result(code, error, event_id)
            dead_letters.append(
                (
                    index,
                    {
                        "received_at": now,
                        "event_id": event_id,
                        "code": code,
                        "error": storable_text(error),
                        "raw": storable_text(raw),
                    },
                )
            )

        events: list[tuple[int, Event]] = []
        for index, item in enumerate(items):
            if isinstance(item, EventRejection):
                refuse(index, item.code, item.error, item.event_id, item.raw)
            else:
                events.append((index, item))

        instance_ids = sorted({event.instance_id for _, event in events})
        # Locked and read by the same statements (PostgreSQL: FOR UPDATE).
        rows = {
            instance_id: values[0]
            for instance_id, values in lock_and_load(session, instance_ids, ("state",)).items()
        }
        before = {iid: _state_of(rows.get(iid), iid) for iid in instance_ids}
        states = dict(before)
        priors = _load_priors(session, [event.event_id for _, event in events])

        entries: list[dict[str, Any]] = []
        for index, event in events:
            payload = canonical_payload(event)
            raw = (raws[index] if raws else None) or payload
            prior = priors.get(event.event_id)
            if prior is not None:
                if prior.instance_id == event.instance_id and prior.payload == payload:
                    results[index] = prior.answer(event.event_id)
                else:
                    refuse(
                        index,
                        "event_id_reused",
                        f"event_id {event.event_id!r} is already recorded with other content",
                        event.event_id,
                        raw,
                    )
                continue
            state = states[event.instance_id]
            try:
                entry, new_state = self._record(state, event, payload, now)
            except Exception as exc:  # a defect must not take the batch down with it
                log.exception("processing_error for event %s", event.event_id)
                refuse(
                    index, "processing_error", f"{type(exc).__name__}: {exc}", event.event_id, raw
                )
                continue
            states[event.instance_id] = new_state
            entries.append(entry)
            priors[event.event_id] = _Prior(
                event.instance_id,
                event.type,
                payload,
                entry["outcome"],
                tuple(entry["reasons"]),
                entry["result"],
            )
            results[index] = ApplyResult(
                event.event_id,
                entry["outcome"],
                tuple(entry["reasons"]),
                entry_service_number(event.type, payload, entry["result"]),
            )

        if dead_letters:
            dead_letters.sort(key=lambda pair: pair[0])
            session.connection().execute(_DEAD_LETTERS.insert(), [row for _, row in dead_letters])
        if entries:
            _insert_rows(session, _ENTRIES, entries)
            _write_projections(session, rows, before, states, now)
        return [result for result in results if result is not None]

    def _record(
        self, state: InstanceState, event: Event, payload: str, now: datetime
    ) -> tuple[dict[str, Any], InstanceState]:
        fields, new_state = record(
            state, event, payload=payload, policy=self.policy, new_number=self.new_number
        )
        entry = {
            **fields,
            "instance_id": event.instance_id,
            "occurred_at": event.occurred_at,
            "recorded_at": now,
        }
        return entry, new_state

    # -- the expiry sweep ------------------------------------------------------------------------

    def sweep(self, *, now: datetime, chunk_size: int = 500) -> int:
        """Append ``instance.expired`` for every active subscription whose end is at or before
        ``now``; returns how many expiries took effect.

        Walks the due instances by the (status, billing_method, expires_at) index in keyset
        pages, so its cost follows the number of due instances, not of all instances. The event
        id is deterministic, so overlapping sweeps are duplicates, never double expiries.
        """
        expired = 0
        after: tuple[datetime, str] | None = None
        while True:
            with Session(self.engine) as session:
                query = (
                    select(InstanceRow.instance_id, InstanceRow.expires_at)
                    .where(
                        InstanceRow.status == "active",
                        InstanceRow.billing_method == "subscription",
                        InstanceRow.expires_at <= now,
                    )
                    .order_by(InstanceRow.expires_at, InstanceRow.instance_id)
                    .limit(chunk_size)
                )
                if after is not None:
                    query = query.where(
                        # Implied by the keyset condition below; stated so that the index
                        # range starts at the last page's end instead of the first due row.
                        InstanceRow.expires_at >= after[0],
                        (InstanceRow.expires_at > after[0])
                        | (
                            (InstanceRow.expires_at == after[0])
                            & (InstanceRow.instance_id > after[1])
                        )
                    )
                due = session.execute(query).all()
            if not due:
                return expired
            events = [sweep_expiry(instance_id, expires_at) for instance_id, expires_at in due]
            expired += sum(1 for r in self.apply(events) if r.outcome == "applied")
            after = (due[-1][1], due[-1][0])


def sweep_event_id(instance_id: str, expires_at: datetime) -> str:
    return f"sweep:{instance_id}:{expires_at.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}"


def sweep_expiry(instance_id: str, expires_at: datetime) -> Event:
    """The expiry the sweep appends: it occurred when the subscription ended."""
    end = iso_utc(expires_at)
    return validate_event(
        {
            "event_id": sweep_event_id(instance_id, expires_at),
            "type": "instance.expired",
            "occurred_at": end,
            "instance_id": instance_id,
            "expires_at": end,
        }
    )


# -- projection rows -----------------------------------------------------------------------------


# Core tables: the write path runs plain Core statements on the session's connection (same
# SQL, same column types and their bind/result processing, without the ORM's per-row work).
_INSTANCES = InstanceRow.__table__
_ENTRIES = LedgerEntry.__table__
_DEAD_LETTERS = DeadLetter.__table__


def _state_of(state_json: dict[str, Any] | None, instance_id: str) -> InstanceState:
    return state_from_json(state_json) if state_json is not None else InstanceState(instance_id)


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


def _load_priors(session: Session, event_ids: Sequence[str]) -> dict[str, _Prior]:
    priors: dict[str, _Prior] = {}
    unique_ids = sorted(set(event_ids))
    connection = session.connection()
    query = _PRIORS_QUERIES[connection.dialect.name == "postgresql"]
    for start in range(0, len(unique_ids), _IN_CHUNK):
        chunk = unique_ids[start : start + _IN_CHUNK]
        for event_id, instance_id, type_, payload, outcome, reasons, result in (
            connection.execute(query, {"ids": chunk})
        ):
            priors[event_id] = _Prior(
                instance_id, type_, payload, outcome, tuple(reasons or ()), dict(result or {})
            )
    return priors


def instance_row_values(state: InstanceState, now: datetime) -> dict[str, Any]:
    purchase = state.purchase
    return {
        "instance_id": state.instance_id,
        "account_id": purchase.account_id if purchase else None,
        "product_type": purchase.product_type if purchase else None,
        "region": purchase.region if purchase else None,
        "billing_method": state.billing_method,
        "expires_at": state.expires_at,
        "status": state.status,
        "entries": state.entries,
        "head_hash": state.head_hash,
        "state": state_to_json(state),
        "updated_at": now,
    }


def number_row_values(instance_id: str, number: Any) -> dict[str, Any]:
    return {
        "number": number.number,
        "instance_id": instance_id,
        "status": number.status,
        "issued_at": number.issued_at,
        "issue_order": number.issue_order,
        "filing_id": number.filing_id,
        "website": number.website,
        "subject_id": number.subject_id,
        "used_at": number.used_at,
        "invalidated_at": number.invalidated_at,
        "invalidated_reason": number.invalidated_reason,
    }


def filing_row_values(instance_id: str, filing: Any) -> dict[str, Any]:
    return {
        "instance_id": instance_id,
        "filing_id": filing.filing_id,
        "service_number": filing.service_number,
        "website": filing.website,
        "subject_id": filing.subject_id,
        "status": filing.status,
        "accepted_at": filing.accepted_at,
        "accept_order": filing.accept_order,
        "withdrawn_at": filing.withdrawn_at,
    }


# Below this many rows an executemany INSERT is as quick as a COPY.
_COPY_MIN_ROWS = 8


@lru_cache(maxsize=32)
def _copy_plan(
    table: Any, columns: tuple[str, ...], dialect: Any
) -> tuple[str, tuple[Callable[[Any], Any] | None, ...]]:
    """The COPY statement for ``columns`` of ``table`` and, per column, how a value is bound:
    the column type's own conversion (``UTCDateTime`` for times), JSON columns wrapped for
    psycopg's JSON dumper as SQLAlchemy's psycopg dialect does; other values as they are."""
    from psycopg.types.json import Jsonb

    def json_value(value: Any) -> Any:
        return None if value is None else Jsonb(value)

    binders: list[Callable[[Any], Any] | None] = []
    for name in columns:
        column_type = table.c[name].type
        if isinstance(column_type, UTCDateTime):
            binders.append(partial(column_type.process_bind_param, dialect=dialect))
        elif isinstance(column_type, JSON) or isinstance(
            getattr(column_type, "impl", None), JSON
        ):
            binders.append(json_value)
        else:
            binders.append(None)
    return f"COPY {table.name} ({', '.join(columns)}) FROM STDIN", tuple(binders)


def _insert_rows(session: Session, table: Any, rows: list[dict[str, Any]]) -> None:
    """INSERT ``rows`` (dicts with the same keys) into ``table``. On PostgreSQL a batch goes in
    with one ``COPY`` in the same transaction: the same rows as the executemany INSERT, with
    the same conversions, for a fraction of the server's per-row work. A unique violation
    surfaces as SQLAlchemy's ``IntegrityError``, like the INSERT's, so the batch is retried
    the same way."""
    connection = session.connection()
    dialect = connection.dialect
    if dialect.name != "postgresql" or len(rows) < _COPY_MIN_ROWS:
        connection.execute(table.insert(), rows)
        return
    from psycopg import IntegrityError as DriverIntegrityError
    from sqlalchemy.exc import IntegrityError

    columns = tuple(rows[0])
    statement, binders = _copy_plan(table, columns, dialect)
    plan = list(zip(columns, binders, strict=True))
    raw = connection.connection.driver_connection
    try:
        with raw.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(
                    [row[name] if bind is None else bind(row[name]) for name, bind in plan]
                )
    except DriverIntegrityError as exc:
        raise IntegrityError(statement, None, exc) from exc


@lru_cache(maxsize=64)
def _update_statement(table: Any, keys: tuple[str, ...], columns: tuple[str, ...]) -> Any:
    return (
        table.update()
        .where(*(table.c[key] == bindparam(f"key_{key}") for key in keys))
        .values({name: bindparam(name) for name in columns})
    )


def _update_by_key(table: Any, keys: tuple[str, ...], rows: list[dict[str, Any]]) -> tuple:
    """``UPDATE table SET <every other column> WHERE <keys>`` as one executemany: what the
    ORM's bulk UPDATE by primary key sends, as a Core statement (and its parameters)."""
    columns = tuple(name for name in rows[0] if name not in keys)
    statement = _update_statement(table, keys, columns)
    params = [{**row, **{f"key_{key}": row[key] for key in keys}} for row in rows]
    for param in params:
        for key in keys:
            del param[key]
    return statement, params


_KEYS: dict[Any, tuple[str, ...]] = {
    InstanceRow: ("instance_id",),
    ServiceNumberRow: ("number",),
    FilingRow: ("instance_id", "filing_id"),
}


def _write_projections(
    session: Session,
    rows: dict[str, dict[str, Any]],
    before: dict[str, InstanceState],
    after: dict[str, InstanceState],
    now: datetime,
) -> None:
    """Write only what changed: new rows inserted, changed rows updated by primary key."""
    inserts: dict[type, list[dict[str, Any]]] = {
        InstanceRow: [],
        ServiceNumberRow: [],
        FilingRow: [],
    }
    updates: dict[type, list[dict[str, Any]]] = {
        InstanceRow: [],
        ServiceNumberRow: [],
        FilingRow: [],
    }
    for instance_id, state in after.items():
        old = before[instance_id]
        if state is old:
            continue
        values = instance_row_values(state, now)
        (updates if instance_id in rows else inserts)[InstanceRow].append(values)
        for number, issued in state.numbers.items():
            previous = old.numbers.get(number)
            if previous != issued:
                target = inserts if previous is None else updates
                target[ServiceNumberRow].append(number_row_values(instance_id, issued))
        for filing_id, filing in state.filings.items():
            previous = old.filings.get(filing_id)
            if previous != filing:
                target = inserts if previous is None else updates
                target[FilingRow].append(filing_row_values(instance_id, filing))
    connection = session.connection()
    for table, values in inserts.items():
        if values:
            _insert_rows(session, table.__table__, values)
    for table, values in updates.items():
        if values:
            connection.execute(*_update_by_key(table.__table__, _KEYS[table], values))
