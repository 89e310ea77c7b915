"""Renewal reminders' SQL (docs/changes.md): which instances' remaining term crossed a
threshold since the last sweep, and the ``instance.renewal_due`` changes for them, written
with the new sweep marks in one transaction, so each (instance, threshold, end) fires once.

Per threshold ``d`` the sweep reads the ends in ``reminder_window`` — those whose crossing
(end − d) fell between the last sweep and now — with the instances index
(status, billing_method, expires_at): its cost follows what became due, not the number of
instances. The marks rows are locked first (``FOR UPDATE`` on PostgreSQL), so two sweeps
that overlap run one after the other and the second finds nothing new.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, exists, select, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session

from ledger.changes import Change, reminder_window, renewal_due_change
from ledger.db import is_postgres
from ledger.store.feed import append_changes
from ledger.tables import FilingRow, InstanceRow, RenewalMark, ServiceNumberRow, core_table

__all__ = ["due_renewals", "holds_numbers_or_filings", "remind_renewals"]

_INSTANCES = core_table(InstanceRow).c
_NUMBERS = core_table(ServiceNumberRow).c
_FILINGS = core_table(FilingRow).c
_MARKS = core_table(RenewalMark)
_PAGE = 1000


def holds_numbers_or_filings(instance_id: Any) -> ColumnElement[bool]:
    """The instance holds an active service number or an accepted filing: what makes a
    renewal reminder worth sending (``instance_id``: the outer query's column)."""
    numbers = exists().where(_NUMBERS.instance_id == instance_id, _NUMBERS.status == "active")
    filings = exists().where(_FILINGS.instance_id == instance_id, _FILINGS.status == "accepted")
    return numbers | filings


def due_renewals(
    connection: Connection, *, lo: datetime, hi: datetime
) -> list[tuple[str, datetime]]:
    """Active subscriptions ending in ``(lo, hi]`` that hold an active service number or an
    accepted filing, by (expires_at, instance_id), read in keyset pages."""
    due: list[tuple[str, datetime]] = []
    after: tuple[datetime, str] | None = None
    while True:
        query = (
            select(_INSTANCES.instance_id, _INSTANCES.expires_at)
            .where(
                _INSTANCES.status == "active",
                _INSTANCES.billing_method == "subscription",
                _INSTANCES.expires_at > lo,
                _INSTANCES.expires_at <= hi,
                holds_numbers_or_filings(_INSTANCES.instance_id),
            )
            .order_by(_INSTANCES.expires_at, _INSTANCES.instance_id)
            .limit(_PAGE)
        )
        if after is not None:
            query = query.where(
                (_INSTANCES.expires_at > after[0])
                | ((_INSTANCES.expires_at == after[0]) & (_INSTANCES.instance_id > after[1]))
            )
        page = [(iid, end) for iid, end in connection.execute(query)]
        due += page
        if len(page) < _PAGE:
            return due
        after = (page[-1][1], page[-1][0])


def _lock_marks(connection: Connection, thresholds: Sequence[int]) -> dict[int, datetime | None]:
    """Each threshold's mark (None: never swept), locked until the commit. A new threshold's
    row is inserted first: a second sweep inserting the same row waits for the first one's
    commit (the primary key), then does nothing and reads the mark the first one left."""
    connection.execute(
        text(
            "INSERT INTO renewal_marks (threshold_days, swept_until) VALUES (:days, NULL)"
            " ON CONFLICT (threshold_days) DO NOTHING"
        ),
        [{"days": days} for days in thresholds],
    )
    query = select(_MARKS.c.threshold_days, _MARKS.c.swept_until).where(
        _MARKS.c.threshold_days.in_(list(thresholds))
    )
    if is_postgres(connection):
        query = query.with_for_update()
    return {int(days): until for days, until in connection.execute(query)}


def remind_renewals(
    engine: Engine, *, now: datetime, thresholds: Sequence[int], recorded_at: datetime
) -> int:
    """Write the reminders that came due up to ``now`` and move the marks; returns how many.
    Within one sweep an instance gets only its most urgent (smallest) threshold: a first
    sweep that finds an end 12 hours away says "1 day", not "30, 7 and 1"."""
    with Session(engine) as session, session.begin():
        connection = session.connection()
        marks = _lock_marks(connection, thresholds)
        changes: list[Change] = []
        reminded: set[str] = set()
        for days in sorted(thresholds):
            window = reminder_window(days, marks.get(days), now)
            if window is None:
                continue
            for instance_id, end in due_renewals(connection, lo=window[0], hi=window[1]):
                if instance_id not in reminded:
                    reminded.add(instance_id)
                    changes.append(
                        renewal_due_change(
                            instance_id=instance_id, threshold_days=days, expires_at=end
                        )
                    )
        for days in thresholds:
            until = marks.get(days)
            moved = now if until is None else max(until, now)
            if moved != until:
                connection.execute(
                    _MARKS.update().where(_MARKS.c.threshold_days == days).values(swept_until=moved)
                )
        append_changes(connection, changes, recorded_at)
        return len(changes)
