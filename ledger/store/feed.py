"""The change feed's SQL: number a transaction's changes and insert them, read a page.

Positions are gap-free and increase in commit order. Each writing transaction takes them from
the single row of ``ledger_feed_head`` with one ``UPDATE … RETURNING`` as its last statement
before commit. The row lock that UPDATE takes is held until commit (or rollback, which undoes
the increment: no gap), so a second writer waits there and numbers after the first has
committed: no reader can ever see position ``p + 1`` committed while ``p`` is still in
flight, which is what lets a consumer keep a plain "last position read" cursor. A sequence
could not promise either (it leaves gaps on rollback and hands out numbers in start order,
not commit order). The cost is that writers with changes serialise for the few milliseconds
between that UPDATE and their commit; the instance locks are always taken before it, so the
lock order is the same everywhere and it adds no deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.engine import Connection

from ledger.changes import Change
from ledger.db import json_dumps
from ledger.store.rows import insert_rows
from ledger.tables import LedgerChange, LedgerEntry, UTCDateTime, core_table

__all__ = ["append_changes", "change_rows", "feed_head", "read_changes"]

_CHANGES = core_table(LedgerChange)
_ENTRIES = core_table(LedgerEntry)
_UTC_TIME = UTCDateTime()
_TAKE = text("UPDATE ledger_feed_head SET position = position + :n WHERE id = 1 RETURNING position")


def change_rows(
    changes: Sequence[Change], first: int, recorded_at: datetime
) -> list[dict[str, Any]]:
    """The rows of ``changes``, numbered from ``first``."""
    return [
        {
            "position": first + offset,
            "kind": change.kind,
            "instance_id": change.instance_id,
            "event_id": change.event_id,
            "instance_seq": change.instance_seq,
            "occurred_at": change.occurred_at,
            "recorded_at": recorded_at,
            "data": change.data,
        }
        for offset, change in enumerate(changes)
    ]


def append_changes(connection: Connection, changes: Sequence[Change], recorded_at: datetime) -> int:
    """Number ``changes`` and insert them; returns the last position. Call it last in the
    transaction (see the module docstring).

    On PostgreSQL a few changes (a one-event message's) are numbered and inserted by one
    statement (:data:`_TAKE_AND_INSERT`), a round trip less per transaction; many go in with
    the counter's ``UPDATE`` and one ``COPY``, as on SQLite with an ``INSERT``."""
    if not changes:
        return 0
    if connection.dialect.name == "postgresql" and len(changes) < _MERGE_MAX_ROWS:
        return _take_and_insert(connection, changes, recorded_at)
    return _take_then_insert(connection, changes, recorded_at)


def _take_then_insert(
    connection: Connection, changes: Sequence[Change], recorded_at: datetime
) -> int:
    """The plain path: take the positions, then insert the rows (COPY on PostgreSQL)."""
    last = connection.execute(_TAKE, {"n": len(changes)}).scalar_one()
    insert_rows(connection, _CHANGES, change_rows(changes, last - len(changes) + 1, recorded_at))
    return int(last)


#: Up to this many changes, one merged statement; above, UPDATE then COPY (faster in bulk).
_MERGE_MAX_ROWS = 8

#: The counter's UPDATE and the INSERT of the numbered changes in one statement. The changes
#: come as parallel arrays; ``data`` as JSON text, cast to jsonb by the server.
_TAKE_AND_INSERT = text(
    """
    WITH head AS (
        UPDATE ledger_feed_head SET position = position + :n WHERE id = 1 RETURNING position
    ), added AS (
        INSERT INTO ledger_changes
            (position, kind, instance_id, event_id, instance_seq, occurred_at, recorded_at, data)
        SELECT head.position - :n + c.ord, c.kind, c.instance_id, c.event_id, c.instance_seq,
               c.occurred_at, :recorded_at, CAST(c.data AS jsonb)
        FROM head, unnest(
            CAST(:ords AS bigint[]), CAST(:kinds AS text[]), CAST(:instance_ids AS text[]),
            CAST(:event_ids AS text[]), CAST(:instance_seqs AS integer[]),
            CAST(:occurred_ats AS timestamptz[]), CAST(:datas AS text[])
        ) AS c(ord, kind, instance_id, event_id, instance_seq, occurred_at, data)
        RETURNING position
    )
    SELECT max(position) FROM added
    """
)


def _take_and_insert(
    connection: Connection, changes: Sequence[Change], recorded_at: datetime
) -> int:
    """:data:`_TAKE_AND_INSERT` for ``changes``: the rows of :func:`change_rows`, the same
    conversions (aware UTC times, JSON data)."""
    rows = change_rows(changes, 1, recorded_at)
    bind_time = _UTC_TIME.process_bind_param
    dialect = connection.dialect
    last = connection.execute(
        _TAKE_AND_INSERT,
        {
            "n": len(rows),
            "recorded_at": bind_time(recorded_at, dialect),
            "ords": [row["position"] for row in rows],
            "kinds": [row["kind"] for row in rows],
            "instance_ids": [row["instance_id"] for row in rows],
            "event_ids": [row["event_id"] for row in rows],
            "instance_seqs": [row["instance_seq"] for row in rows],
            "occurred_ats": [bind_time(row["occurred_at"], dialect) for row in rows],
            "datas": [json_dumps(row["data"]) for row in rows],
        },
    ).scalar_one()
    return int(last)


def feed_head(connection: Connection) -> int:
    """The last position handed out (and committed, seen from outside a writer)."""
    return int(
        connection.execute(text("SELECT position FROM ledger_feed_head WHERE id = 1")).scalar_one()
    )


def read_changes(connection: Connection, *, after: int, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` changes after ``after``, in position order, each with its entry's
    ``seq`` (joined on the unique ``event_id``; None for changes without an entry)."""
    query = (
        select(_CHANGES, _ENTRIES.c.seq)
        .outerjoin(_ENTRIES, _ENTRIES.c.event_id == _CHANGES.c.event_id)
        .where(_CHANGES.c.position > after)
        .order_by(_CHANGES.c.position)
        .limit(limit)
    )
    return [dict(row._mapping) for row in connection.execute(query)]
