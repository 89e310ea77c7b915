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
from datetime import UTC, datetime, timedelta
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
from ledger.resequencer import (
    AlreadyParked,
    ApplyNow,
    Park,
    Release,
    Step,
    Tag,
    arrive,
    skip_timed_out,
)
from ledger.settings import DEFAULT_GAP_TIMEOUT, DEFAULT_MAX_PARKED
from ledger.state import InstanceState, state_from_json, state_to_json
from ledger.store import database_now, due_gate_instances, load_gates, load_released, write_gates
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
    outcome: str  # applied | rejected | stale | duplicate | invalid | parked
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


def _event_id(item: Parsed) -> str | None:
    return item.event_id


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
        gap_timeout: float = DEFAULT_GAP_TIMEOUT,
        max_parked: int = DEFAULT_MAX_PARKED,
        on_released: Callable[[list[ApplyResult]], None] | None = None,
        on_gaps_skipped: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.new_number = new_number
        self.clock = clock
        self.max_attempts = max_attempts
        # The resequencer (SPEC §9): seconds a gap may stay open, events parked per instance.
        self.gap_timeout = gap_timeout
        self.max_parked = max_parked
        # Observers for the worker's metrics: outcomes of released parked events (answered
        # ``parked`` to their own message long ago), and gaps skipped.
        self.on_released = on_released
        self.on_gaps_skipped = on_gaps_skipped

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
        self,
        items: Sequence[Parsed],
        *,
        raws: Sequence[str | None] | None = None,
        sequence: Sequence[Tag | None] | None = None,
    ) -> list[ApplyResult]:
        """Apply parsed events (and record rejections) in one transaction, retried on conflict.

        ``raws`` optionally gives each item's original text, kept in a dead letter if the item is
        refused later (``event_id_reused``) and in the parked store; without it the canonical
        payload is kept. ``sequence`` gives each item's publish number (SPEC §9), or None for an
        item that bypasses the resequencer; without it every item is applied on arrival.
        """
        return self._retrying(lambda session: self._transaction(session, items, raws, sequence))

    def release_due(self, *, max_instances: int = 200) -> int:
        """The periodic resequencer check (SPEC §9): for every instance whose oldest parked
        event has waited the gap timeout, skip its timed-out gaps and apply the run behind them;
        release what an earlier transaction's budget left ready. Returns how many instances
        were checked (each in its own transaction)."""
        with Session(self.engine) as session:
            connection = session.connection()
            cutoff = database_now(connection) - timedelta(seconds=self.gap_timeout)
            due = due_gate_instances(connection, cutoff=cutoff, limit=max_instances)
        for instance_id in due:
            self._retrying(
                lambda session, iid=instance_id: self._transaction(session, (), None, None, (iid,))
            )
        return len(due)

    def _retrying(self, work: Callable[[Session], list[ApplyResult]]) -> list[ApplyResult]:
        attempt = 1
        while True:
            try:
                with fewer_collections(), Session(self.engine) as session, session.begin():
                    return work(session)
            except Exception as exc:
                retriable = isinstance(exc, IntegrityError) or is_transient_error(exc)
                if not retriable or attempt >= self.max_attempts:
                    raise
                log.info("retrying batch after %s (attempt %d)", type(exc).__name__, attempt)
                time.sleep(min(0.05 * 2**attempt, 2.0))
                attempt += 1

    def _transaction(
        self,
        session: Session,
        items: Sequence[Parsed],
        raws: Sequence[str | None] | None,
        sequence: Sequence[Tag | None] | None,
        gate_checks: Sequence[str] = (),
    ) -> list[ApplyResult]:
        now = self.clock()
        connection = session.connection()
        results: list[ApplyResult | None] = [None] * len(items)
        # (order, row): dead letters are stored in input order, whatever step refused them;
        # released parked events come after the inputs.
        dead_letters: list[tuple[int, dict[str, Any]]] = []

        def refuse(order: int, code: str, error: str, event_id: str | None, raw: str) -> None:
            if order < len(items):
                results[order] = invalid_result(code, error, event_id)
            dead_letters.append(
                (
                    order,
                    {
                        "received_at": now,
                        "event_id": event_id,
                        "code": code,
                        "error": storable_text(error),
                        "raw": storable_text(raw),
                    },
                )
            )

        tags: Sequence[Tag | None] = sequence or [None] * len(items)
        for index, item in enumerate(items):
            if isinstance(item, EventRejection):
                refuse(index, item.code, item.error, item.event_id, item.raw)

        instance_ids = sorted(
            {item.instance_id for item in items if not isinstance(item, EventRejection)}
            | {tag.instance_id for tag in tags if tag is not None}
            | set(gate_checks)
        )
        # Locked and read by the same statements (PostgreSQL: FOR UPDATE).
        rows = {
            instance_id: values[0]
            for instance_id, values in lock_and_load(session, instance_ids, ("state",)).items()
        }

        # The resequencer decides what is applied now and in which order (SPEC §9).
        plan = self._gate(connection, items, raws, tags, gate_checks, results, refuse)

        events = [event for _, event, _ in plan]
        before = {iid: _state_of(rows.get(iid), iid) for iid in instance_ids}
        states = dict(before)
        priors = _load_priors(session, [event.event_id for event in events])

        entries: list[dict[str, Any]] = []
        released: list[ApplyResult] = []
        for order, event, raw_text in plan:
            payload = canonical_payload(event)
            raw = raw_text or payload
            prior = priors.get(event.event_id)
            if prior is not None:
                if prior.instance_id == event.instance_id and prior.payload == payload:
                    result = prior.answer(event.event_id)
                    if order < len(items):
                        results[order] = result
                    else:
                        released.append(result)
                else:
                    refuse(
                        order,
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
                    order, "processing_error", f"{type(exc).__name__}: {exc}", event.event_id, raw
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
            result = ApplyResult(
                event.event_id,
                entry["outcome"],
                tuple(entry["reasons"]),
                entry_service_number(event.type, payload, entry["result"]),
            )
            if order < len(items):
                results[order] = result
            else:
                released.append(result)

        if dead_letters:
            dead_letters.sort(key=lambda pair: pair[0])
            connection.execute(_DEAD_LETTERS.insert(), [row for _, row in dead_letters])
        if entries:
            _insert_rows(session, _ENTRIES, entries)
            _write_projections(session, rows, before, states, now)
        if released and self.on_released is not None:
            self.on_released(released)
        return [result for result in results if result is not None]

    def _gate(
        self,
        connection: Any,
        items: Sequence[Parsed],
        raws: Sequence[str | None] | None,
        tags: Sequence[Tag | None],
        gate_checks: Sequence[str],
        results: list[ApplyResult | None],
        refuse: Callable[[int, str, str, str | None, str], None],
    ) -> list[tuple[int, Event, str | None]]:
        """Pass the items through their instances' gates: answers ``parked`` where they wait,
        and returns what to apply now, in order, as ``(order, event, raw)`` (``order`` is the
        input index, or past the inputs for a released parked event)."""
        gated = sorted({tag.instance_id for tag in tags if tag is not None} | set(gate_checks))
        if not gated:  # nothing sequenced: everything on arrival, in input order
            return [
                self._input(items, raws, index)
                for index, item in enumerate(items)
                if not isinstance(item, EventRejection)
            ]
        gates = load_gates(connection, gated)
        loaded = {iid: (g.epoch, g.last, len(g.parked)) for iid, g in gates.items()}
        steps: list[Step] = []
        for instance_id in gate_checks:
            steps += skip_timed_out(
                gates[instance_id], now=database_now(connection), timeout=self.gap_timeout
            )
        for index, (item, tag) in enumerate(zip(items, tags, strict=True)):
            if tag is None:
                if not isinstance(item, EventRejection):
                    steps.append(ApplyNow(index))
                continue
            has_event = not isinstance(item, EventRejection)
            if has_event and item.instance_id != tag.instance_id:
                refuse(
                    index,
                    "invalid_event",
                    f"sequence names instance {tag.instance_id!r}, the event is of "
                    f"{item.instance_id!r}",
                    item.event_id,
                    (raws[index] if raws else None) or canonical_payload(item),
                )
                has_event = False
            steps += arrive(
                gates[tag.instance_id],
                tag,
                index,
                has_event=has_event,
                max_parked=self.max_parked,
            )
        released = [step for step in steps if isinstance(step, Release)]
        # Numbers parked by this very transaction: not in the store yet.
        parked_here = {
            (tags[step.index].instance_id, step.epoch, step.n): step  # type: ignore[union-attr]
            for step in steps
            if isinstance(step, Park)
        }
        stored = load_released(
            connection,
            [
                r
                for r in released
                if r.has_event and (r.instance_id, r.epoch, r.n) not in parked_here
            ],
        )
        plan: list[tuple[int, Event, str | None]] = []
        extra = len(items)  # orders of released parked events: after every input
        for step in steps:
            if isinstance(step, ApplyNow):
                plan.append(self._input(items, raws, step.index))
            elif isinstance(step, AlreadyParked) or (isinstance(step, Park) and step.has_event):
                results[step.index] = ApplyResult(_event_id(items[step.index]), "parked")
            elif isinstance(step, Release):
                key = (step.instance_id, step.epoch, step.n)
                if key in parked_here:  # parked and released by this very transaction
                    here = parked_here.pop(key)
                    if here.has_event:
                        plan.append(self._input(items, raws, here.index))
                    continue
                row = stored.get(key)
                if not step.has_event or row is None or row.raw is None:
                    continue
                extra += 1
                parsed = parse_event(row.raw)
                if isinstance(parsed, EventRejection) or parsed.instance_id != step.instance_id:
                    error = getattr(parsed, "error", "the parked event names another instance")
                    refuse(extra, "processing_error", error, row.event_id, row.raw)
                    continue
                plan.append((extra, parsed, row.raw))
        parked_rows = [
            self._parked_row(items, raws, instance_id, step)
            for (instance_id, _, _), step in parked_here.items()
        ]
        write_gates(
            connection,
            before=loaded,
            gates=gates.values(),
            parked_rows=parked_rows,
            released=released,
            now=self.clock(),
        )
        skipped = sum(gate.skipped for gate in gates.values())
        if skipped and self.on_gaps_skipped is not None:
            self.on_gaps_skipped(skipped)
        return plan

    @staticmethod
    def _parked_row(
        items: Sequence[Parsed], raws: Sequence[str | None] | None, instance_id: str, step: Park
    ) -> dict[str, Any]:
        item = items[step.index]
        row: dict[str, Any] = {
            "instance_id": instance_id,
            "epoch": step.epoch,
            "n": step.n,
            "event_id": item.event_id,
            "type": None,
            "raw": None,  # a filled placeholder: the element was dead-lettered
        }
        if step.has_event and not isinstance(item, EventRejection):
            text_ = (raws[step.index] if raws else None) or canonical_payload(item)
            row.update(type=item.type, raw=storable_text(text_))
        return row

    @staticmethod
    def _input(
        items: Sequence[Parsed], raws: Sequence[str | None] | None, index: int
    ) -> tuple[int, Event, str | None]:
        item = items[index]
        assert not isinstance(item, EventRejection)
        return index, item, raws[index] if raws else None

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
