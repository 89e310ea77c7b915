"""Rows of the projection tables and how they are written: value builders shared by the
service, rebuild and the benchmarks' bulk loader; bulk INSERT (COPY on PostgreSQL) and UPDATE by
primary key; and "write only what changed" between two states of the same instances."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import lru_cache, partial
from typing import Any

from sqlalchemy import JSON, bindparam
from sqlalchemy.engine import Connection

from ledger.state import InstanceState, state_to_json
from ledger.tables import FilingRow, InstanceRow, ServiceNumberRow, UTCDateTime, core_table

__all__ = [
    "filing_row_values",
    "insert_rows",
    "instance_row_values",
    "number_row_values",
    "write_projections",
]


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
        elif isinstance(column_type, JSON) or isinstance(getattr(column_type, "impl", None), JSON):
            binders.append(json_value)
        else:
            binders.append(None)
    return f"COPY {table.name} ({', '.join(columns)}) FROM STDIN", tuple(binders)


def insert_rows(connection: Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    """INSERT ``rows`` (dicts with the same keys) into ``table``. On PostgreSQL a batch goes in
    with one ``COPY`` in the same transaction: the same rows as the executemany INSERT, with
    the same conversions, for a fraction of the server's per-row work. A unique violation
    surfaces as SQLAlchemy's ``IntegrityError``, like the INSERT's, so the batch is retried
    the same way."""
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
    assert raw is not None  # a live psycopg connection: the session's transaction holds it
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


def _update_by_key(
    table: Any, keys: tuple[str, ...], rows: list[dict[str, Any]]
) -> tuple[Any, list[dict[str, Any]]]:
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


def write_projections(
    connection: Connection,
    rows: dict[str, Any],
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
            previous_number = old.numbers.get(number)
            if previous_number != issued:
                target = inserts if previous_number is None else updates
                target[ServiceNumberRow].append(number_row_values(instance_id, issued))
        for filing_id, filing in state.filings.items():
            previous_filing = old.filings.get(filing_id)
            if previous_filing != filing:
                target = inserts if previous_filing is None else updates
                target[FilingRow].append(filing_row_values(instance_id, filing))
    for model, rows_of_model in inserts.items():
        if rows_of_model:
            insert_rows(connection, core_table(model), rows_of_model)
    for model, rows_of_model in updates.items():
        if rows_of_model:
            connection.execute(*_update_by_key(core_table(model), _KEYS[model], rows_of_model))
