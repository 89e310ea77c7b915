"""SQL of the resequencer (SPEC §9): loading and writing gates and parked events.

Called by the service inside its transaction, after the instances are locked
(``ledger.db.lock_and_load``), so a gate and its parked events are only ever read and written by
the one transaction that holds the instance.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, bindparam, func, select, text
from sqlalchemy.engine import Connection

from ledger.db import id_in
from ledger.resequencer import Gate, Parked, Release
from ledger.tables import ParkedEvent, SequencerGate, core_table

__all__ = [
    "ParkedRow",
    "database_now",
    "due_gate_instances",
    "list_parked",
    "load_gates",
    "load_released",
    "parked_counts",
    "parked_summary",
    "write_gates",
]

_GATES = core_table(SequencerGate)
_PARKED = core_table(ParkedEvent)
_CHUNK = 500


def _postgres(connection: Connection) -> bool:
    return connection.dialect.name == "postgresql"


def database_now(connection: Connection) -> datetime:
    """The database's clock (SPEC §9: gap timeouts count in database time), as aware UTC.

    PostgreSQL: ``now()``, the transaction's start. SQLite (one process, the embedded default)
    has no clock of its own worth the name: its ``'now'`` is the process's clock in UTC.
    """
    if _postgres(connection):
        value = connection.execute(select(func.now())).scalar_one()
        return value.astimezone(UTC)
    text_ = connection.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
    return datetime.fromisoformat(text_).replace(tzinfo=UTC)


def load_gates(connection: Connection, instance_ids: Sequence[str]) -> dict[str, Gate]:
    """The gates of ``instance_ids`` (a fresh one for an instance never sequenced), with the
    numbers parked at each (no payloads)."""
    postgres = _postgres(connection)
    gates = {instance_id: Gate(instance_id) for instance_id in instance_ids}
    with_parked: list[str] = []
    query = select(_GATES.c.instance_id, _GATES.c.epoch, _GATES.c.last, _GATES.c.parked).where(
        id_in(_GATES.c.instance_id, postgres)
    )
    for chunk in _chunks(list(instance_ids)):
        for instance_id, epoch, last, parked in connection.execute(query, {"ids": chunk}):
            gate = gates[instance_id]
            gate.epoch, gate.last = int(epoch), int(last)
            if parked:
                with_parked.append(instance_id)
    parked_query = select(
        _PARKED.c.instance_id,
        _PARKED.c.epoch,
        _PARKED.c.n,
        _PARKED.c.parked_at,
        _PARKED.c.raw.is_not(None),
    ).where(id_in(_PARKED.c.instance_id, postgres))
    for chunk in _chunks(with_parked):
        for instance_id, epoch, n, parked_at, has_event in connection.execute(
            parked_query, {"ids": chunk}
        ):
            gate = gates[instance_id]
            # Only the gate's own epoch is ever parked (a later epoch releases the earlier one).
            if gate.epoch == epoch:
                gate.parked[int(n)] = Parked(int(n), parked_at, bool(has_event))
    return gates


@dataclass(frozen=True)
class ParkedRow:
    """A parked event as stored (``raw`` None: a filled placeholder)."""

    instance_id: str
    epoch: int
    n: int
    event_id: str | None
    raw: str | None


def load_released(
    connection: Connection, releases: Iterable[Release]
) -> dict[tuple[str, int, int], ParkedRow]:
    """The stored parked events of ``releases`` (only those that carry an event), keyed by
    ``(instance_id, epoch, n)``; read in contiguous ranges, as releases come."""
    query = select(
        _PARKED.c.instance_id, _PARKED.c.epoch, _PARKED.c.n, _PARKED.c.event_id, _PARKED.c.raw
    ).where(
        _PARKED.c.instance_id == bindparam("iid"),
        _PARKED.c.epoch == bindparam("epoch"),
        _PARKED.c.n.between(bindparam("lo"), bindparam("hi")),
        _PARKED.c.raw.is_not(None),
    )
    found: dict[tuple[str, int, int], ParkedRow] = {}
    for iid, epoch, lo, hi in _ranges(releases):
        for row in connection.execute(query, {"iid": iid, "epoch": epoch, "lo": lo, "hi": hi}):
            found[(row[0], int(row[1]), int(row[2]))] = ParkedRow(
                row[0], int(row[1]), int(row[2]), row[3], row[4]
            )
    return found


def _ranges(releases: Iterable[Release]) -> list[tuple[str, int, int, int]]:
    """Releases as ``(instance_id, epoch, lo, hi)`` runs of consecutive numbers."""
    runs: list[tuple[str, int, int, int]] = []
    for release in sorted(releases, key=lambda r: (r.instance_id, r.epoch, r.n)):
        if runs:
            iid, epoch, lo, hi = runs[-1]
            if (iid, epoch) == (release.instance_id, release.epoch) and release.n == hi + 1:
                runs[-1] = (iid, epoch, lo, release.n)
                continue
        runs.append((release.instance_id, release.epoch, release.n, release.n))
    return runs


def write_gates(
    connection: Connection,
    *,
    before: dict[str, tuple[int | None, int, int]],
    gates: Iterable[Gate],
    parked_rows: list[dict[str, Any]],
    released: list[Release],
    now: datetime,
) -> None:
    """Store what the transaction did to the gates: new parked rows (``parked_rows``, without
    ``parked_at``: database time is taken here), released ones deleted, gates inserted or
    updated (``before``: ``(epoch, last, parked count)`` as loaded; epoch None = no row)."""
    if released:
        delete = _PARKED.delete().where(
            _PARKED.c.instance_id == bindparam("iid"),
            _PARKED.c.epoch == bindparam("ep"),
            _PARKED.c.n.between(bindparam("lo"), bindparam("hi")),
        )
        connection.execute(
            delete,
            [
                {"iid": iid, "ep": epoch, "lo": lo, "hi": hi}
                for iid, epoch, lo, hi in _ranges(released)
            ],
        )
    if parked_rows:
        parked_at = database_now(connection)
        connection.execute(
            _PARKED.insert(), [{**row, "parked_at": parked_at} for row in parked_rows]
        )
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    for gate in gates:
        if gate.epoch is None:
            continue
        values = (gate.epoch, gate.last, len(gate.parked))
        old = before.get(gate.instance_id)
        if old == values:
            continue
        row = {
            "instance_id": gate.instance_id,
            "epoch": gate.epoch,
            "last": gate.last,
            "parked": len(gate.parked),
            "updated_at": now,
        }
        (inserts if old is None or old[0] is None else updates).append(row)
    if inserts:
        connection.execute(_GATES.insert(), inserts)
    if updates:
        statement = (
            _GATES.update()
            .where(_GATES.c.instance_id == bindparam("key"))
            .values(
                epoch=bindparam("epoch"),
                last=bindparam("last"),
                parked=bindparam("parked"),
                updated_at=bindparam("updated_at"),
            )
        )
        connection.execute(
            statement,
            [
                {**{k: v for k, v in row.items() if k != "instance_id"}, "key": row["instance_id"]}
                for row in updates
            ],
        )


def due_gate_instances(connection: Connection, *, cutoff: datetime, limit: int) -> list[str]:
    """Instances whose gate has work without any arrival: a number parked at or before
    ``cutoff`` (a gap may have timed out) or a parked number that is next (a release that an
    earlier transaction's budget left over)."""
    timed_out = (
        select(_PARKED.c.instance_id)
        .group_by(_PARKED.c.instance_id)
        .having(func.min(_PARKED.c.parked_at) <= cutoff)
    )
    ready = select(_PARKED.c.instance_id).join(
        _GATES,
        and_(
            _GATES.c.instance_id == _PARKED.c.instance_id,
            _GATES.c.epoch == _PARKED.c.epoch,
            _PARKED.c.n == _GATES.c.last + 1,
        ),
    )
    query = timed_out.union(ready).order_by("instance_id").limit(limit)
    return [row[0] for row in connection.execute(query)]


def parked_counts(connection: Connection, instance_ids: Sequence[str]) -> dict[str, int]:
    """How many events are parked per instance (filled placeholders not counted)."""
    postgres = _postgres(connection)
    query = (
        select(_PARKED.c.instance_id, func.count())
        .where(id_in(_PARKED.c.instance_id, postgres), _PARKED.c.raw.is_not(None))
        .group_by(_PARKED.c.instance_id)
    )
    counts: dict[str, int] = {}
    for chunk in _chunks(list(instance_ids)):
        counts.update({iid: int(count) for iid, count in connection.execute(query, {"ids": chunk})})
    return counts


def list_parked(
    connection: Connection, *, instance_id: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Parked events (SPEC §9 ``parked --json``), ordered by ``parked_at``, ``instance_id``,
    ``n``; ``waiting_for`` is the gate's ``last + 1``."""
    query = (
        select(
            _PARKED.c.instance_id,
            _PARKED.c.epoch,
            _PARKED.c.n,
            _PARKED.c.event_id,
            _PARKED.c.type,
            _PARKED.c.parked_at,
            _GATES.c.last,
        )
        .join(_GATES, _GATES.c.instance_id == _PARKED.c.instance_id)
        .where(_PARKED.c.raw.is_not(None))
        .order_by(_PARKED.c.parked_at, _PARKED.c.instance_id, _PARKED.c.n)
    )
    if instance_id is not None:
        query = query.where(_PARKED.c.instance_id == instance_id)
    if limit is not None:
        query = query.limit(limit)
    return [
        {
            "instance_id": iid,
            "epoch": int(epoch),
            "n": int(n),
            "event_id": event_id,
            "type": type_,
            "parked_at": parked_at,
            "waiting_for": int(last) + 1,
        }
        for iid, epoch, n, event_id, type_, parked_at, last in connection.execute(query)
    ]


def parked_summary(connection: Connection) -> tuple[int, datetime | None]:
    """How many events are parked in all, and when the oldest was parked (metrics)."""
    count, oldest = connection.execute(
        select(func.count(), func.min(_PARKED.c.parked_at)).where(_PARKED.c.raw.is_not(None))
    ).one()
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    return int(count), oldest


def _chunks(ids: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(ids), _CHUNK):
        yield ids[start : start + _CHUNK]
