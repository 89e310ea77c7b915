"""Rebuild and verify: the auditor's two questions.

- ``verify``: does every instance's hash chain recompute, link, and end at the head its
  projection recorded? Finds changed, removed (the last ones included), inserted or reordered
  entries.
- ``rebuild``: does folding the recorded entries give exactly the stored projections? It never
  decides again (decisions are in the entries), and it never lowers a head: an instance whose
  entries end before its recorded head, or whose chain does not verify, is ``broken`` and left
  as it is, so a rebuild can never launder tampering.

Both stream the ledger ordered by (instance_id, instance_seq) and work a page of instances at a
time, so memory stays flat however large the ledger is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from itertools import groupby, islice
from operator import itemgetter
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col

from events import event_from_payload
from ledger.chain import CHAIN_FIELDS, GENESIS_HASH, verify_chain
from ledger.clock import utcnow
from ledger.db import id_in, is_postgres, lock_instances
from ledger.rules import fold
from ledger.state import InstanceState
from ledger.store.rows import filing_row_values, instance_row_values, number_row_values
from ledger.tables import (
    FeedHead,
    FilingRow,
    InstanceRow,
    LedgerChange,
    LedgerEntry,
    ServiceNumberRow,
    core_table,
)

Progress = Callable[[int], None]
_PAGE = 500


@dataclass
class FeedReport:
    """The change feed against the ledger: positions 1..``position`` all present (``gaps`` =
    how many are missing), and every change that names an entry names one the ledger holds
    (``orphans``: positions of those that do not, at most 100)."""

    changes: int = 0
    position: int = 0
    gaps: int = 0
    orphans: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.gaps and not self.orphans

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "changes": self.changes,
            "position": self.position,
            "gaps": self.gaps,
            "orphans": self.orphans,
        }


@dataclass
class VerifyReport:
    entries: int = 0
    instances: int = 0
    broken: list[str] = field(default_factory=list)
    feed: FeedReport = field(default_factory=FeedReport)

    def to_json(self) -> dict[str, Any]:
        """SPEC §7's shape exactly; the feed's own figures are ``self.feed`` (the CLI prints
        them on stderr when the feed does not match the ledger)."""
        return {
            "ok": not self.broken and self.feed.ok,
            "entries": self.entries,
            "instances": self.instances,
            "broken": sorted(self.broken),
        }


@dataclass
class RebuildReport:
    instances: int = 0
    entries: int = 0
    drift: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "instances": self.instances,
            "entries": self.entries,
            "drift": sorted(self.drift),
            "broken": sorted(self.broken),
        }


# The instance, then the chain fields and ``hash`` in the order ``verify_chain`` reads them.
_ENTRY_COLUMNS = tuple(
    core_table(LedgerEntry).c[name] for name in ("instance_id", *CHAIN_FIELDS, "hash")
)


class ChainEntry(NamedTuple):
    """One ledger entry as rebuild and verify read it: the chain fields, then ``hash`` (a
    plain tuple with named fields, much cheaper than a result row per entry)."""

    instance_seq: int
    event_id: str
    type: str
    occurred_at: datetime
    payload: str
    outcome: str
    reasons: list[str]
    result: dict[str, Any]
    policy_version: str
    prev_hash: str
    hash: str


def _instance_pages(engine: Engine) -> Iterator[list[str]]:
    """The ledger's instance ids in pages, by keyset on the instance_id index.

    Each page is then read and checked in a transaction of its own: no transaction stays open
    across the whole ledger (SQLite has a single writer, and PostgreSQL would hold a snapshot
    for the whole run).
    """
    last: str | None = None
    while True:
        instance_id = col(LedgerEntry.instance_id)
        query = select(instance_id).distinct().order_by(instance_id)
        if last is not None:
            query = query.where(instance_id > last)
        with Session(engine) as session:
            page = list(session.execute(query.limit(_PAGE)).scalars())
        if not page:
            return
        yield page
        last = page[-1]


def _chains(session: Session, instance_ids: list[str]) -> list[tuple[str, list[Any]]]:
    connection = session.connection()
    query = (
        select(*_ENTRY_COLUMNS)
        .where(id_in(core_table(LedgerEntry).c.instance_id, is_postgres(session)))
        .order_by(col(LedgerEntry.instance_id), col(LedgerEntry.instance_seq))
    )
    rows = connection.execute(query, {"ids": instance_ids})
    make = ChainEntry._make
    return [
        (iid, [make(islice(row, 1, None)) for row in group])
        for iid, group in groupby(rows, key=itemgetter(0))
    ]


_INSTANCES = core_table(InstanceRow)


def _heads(session: Session, instance_ids: list[str]) -> dict[str, Any]:
    """The projection rows (plain rows, attribute access by column name, no ORM objects)."""
    query = select(*_INSTANCES.c).where(id_in(_INSTANCES.c.instance_id, is_postgres(session)))
    rows = session.connection().execute(query, {"ids": instance_ids})
    return {row.instance_id: row for row in rows}


def _orphan_heads(session: Session, seen: set[str]) -> list[str]:
    """Projection rows that claim entries the ledger does not have at all.

    Streamed (a server-side cursor on PostgreSQL): one row per instance, so buffering the
    whole answer would cost as much memory as the rest of the run."""
    query = select(_INSTANCES.c.instance_id).where(_INSTANCES.c.entries > 0)
    rows = session.connection().execution_options(yield_per=10_000).execute(query)
    return [iid for (iid,) in rows if iid not in seen]


def verify(engine: Engine, *, progress: Progress | None = None) -> VerifyReport:
    report = VerifyReport()
    seen: set[str] = set()

    def verify_one(instance_ids: list[str]) -> tuple[int, list[str], list[str]]:
        with Session(engine) as session:
            heads = _heads(session, instance_ids)
            chains = _chains(session, instance_ids)
        entries, broken = 0, []
        for instance_id, rows in chains:
            head = heads.get(instance_id)
            expected = (head.entries, head.head_hash) if head else (0, GENESIS_HASH)
            if head is None or verify_chain(rows, head=expected) is not None:
                broken.append(instance_id)
            entries += len(rows)
        return entries, broken, [instance_id for instance_id, _ in chains]

    for _, (entries, broken, chained) in _each_page(engine, verify_one):
        seen.update(chained)
        report.broken.extend(broken)
        report.entries += entries
        if progress:
            progress(entries)
    with Session(engine) as session:
        orphans = _orphan_heads(session, seen)
    report.broken.extend(orphans)
    report.instances = len(seen) + len(orphans)
    report.feed, feed_broken = verify_feed(engine)
    # An instance whose change names an entry it no longer has lost that entry: broken too.
    report.broken.extend(sorted(set(feed_broken) - set(report.broken)))
    return report


_ORPHANS_SHOWN = 100


def verify_feed(engine: Engine) -> tuple[FeedReport, list[str]]:
    """Check the change feed (docs/changes.md) against the ledger and its counter; returns the
    report and the instances named by orphan changes. A count, and an anti join on the
    unique ``event_id``."""
    changes_table, entries_table = core_table(LedgerChange), core_table(LedgerEntry)
    changes, entries = changes_table.c, entries_table.c
    with Session(engine) as session:
        connection = session.connection()
        count, top = connection.execute(
            select(func.count(), func.coalesce(func.max(changes.position), 0))
        ).one()
        head = connection.execute(select(core_table(FeedHead).c.position)).scalar_one_or_none()
        orphan_rows = connection.execute(
            select(changes.position, changes.instance_id)
            .select_from(changes_table)
            .outerjoin(entries_table, entries.event_id == changes.event_id)
            .where(
                changes.event_id.is_not(None),
                (entries.seq.is_(None))
                | (entries.instance_id != changes.instance_id)
                | (entries.instance_seq != changes.instance_seq),
            )
            .order_by(changes.position)
        ).all()
    position = int(head or 0)
    report = FeedReport(
        changes=int(count),
        position=position,
        # Missing positions below the counter, or rows above it (written around the counter).
        gaps=max(position, int(top)) - int(count),
        orphans=[int(p) for p, _ in orphan_rows[:_ORPHANS_SHOWN]],
    )
    return report, sorted({iid for _, iid in orphan_rows if iid is not None})


def fold_entries(instance_id: str, rows: list[Any]) -> InstanceState:
    """The projection of one instance from its recorded entries (never deciding again)."""
    state = InstanceState(instance_id)
    for row in rows:
        try:
            # The stored canonical payload, decoded without validating it again (it was
            # validated when appended; callers verify the chain first).
            event = event_from_payload(row.payload)
        except ValueError as exc:
            raise ValueError(f"entry {row.event_id} holds an unparsable payload: {exc}") from None
        state = fold(
            state,
            event,
            outcome=row.outcome,
            result=row.result or {},
            instance_seq=row.instance_seq,
            entry_hash=row.hash,
        )
    return state


def _stored_rows(
    session: Session, table: type, instance_ids: list[str]
) -> dict[str, list[dict[str, Any]]]:
    by_instance: dict[str, list[dict[str, Any]]] = {iid: [] for iid in instance_ids}
    columns = core_table(table).c
    query = select(*columns).where(id_in(columns.instance_id, is_postgres(session)))
    result = session.connection().execute(query, {"ids": instance_ids})
    keys = tuple(result.keys())
    for row in result:
        values = dict(zip(keys, row, strict=True))
        by_instance[values["instance_id"]].append(values)
    return by_instance


def _key(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda row: row[key])


def rebuild(
    engine: Engine,
    *,
    check: bool = False,
    progress: Progress | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> RebuildReport:
    report = RebuildReport()
    seen: set[str] = set()

    def rebuild_one(instance_ids: list[str]) -> RebuildReport:
        page_report = RebuildReport()
        with Session(engine) as session, session.begin():
            # Lock the page's instances so a concurrent applier cannot move a head between
            # our read of the entries and our write of the projection.
            lock_instances(session, instance_ids)
            chains = _chains(session, instance_ids)
            _rebuild_page(session, chains, page_report, check=check, now=clock())
        return page_report

    for instance_ids, page_report in _each_page(engine, rebuild_one):
        report.entries += page_report.entries
        report.drift.extend(page_report.drift)
        report.broken.extend(page_report.broken)
        seen.update(instance_ids)
        if progress:
            progress(page_report.entries)
    with Session(engine) as session:
        orphans = _orphan_heads(session, seen)
    report.broken.extend(orphans)
    report.instances = len(seen) + len(orphans)
    return report


_T = TypeVar("_T")
# Pages worked on at once on PostgreSQL: while one page waits for the server, the other one is
# hashed and folded. Each page is its own transaction on its own connection, and pages hold
# disjoint instances, so they neither see nor lock each other. SQLite has one writer: 1.
_PAGES_IN_FLIGHT = 2


def _each_page(engine: Engine, work: Callable[[list[str]], _T]) -> Iterator[tuple[list[str], _T]]:
    """``(page, work(page))`` for every page of instance ids, in page order."""
    pages = _instance_pages(engine)
    if not is_postgres(engine):
        for page in pages:
            yield page, work(page)
        return
    with ThreadPoolExecutor(_PAGES_IN_FLIGHT, thread_name_prefix="ledger-audit") as pool:
        pending: deque[tuple[list[str], Future[_T]]] = deque()
        for page in pages:
            pending.append((page, pool.submit(work, page)))
            if len(pending) >= _PAGES_IN_FLIGHT:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _rebuild_page(
    session: Session,
    page: list[tuple[str, list[Any]]],
    report: RebuildReport,
    *,
    check: bool,
    now: datetime,
) -> None:
    instance_ids = [iid for iid, _ in page]
    heads = _heads(session, instance_ids)
    numbers = _stored_rows(session, ServiceNumberRow, instance_ids)
    filings = _stored_rows(session, FilingRow, instance_ids)
    for instance_id, rows in page:
        report.entries += len(rows)
        head = heads.get(instance_id)
        if (head is not None and head.entries > len(rows)) or verify_chain(rows) is not None:
            report.broken.append(instance_id)
            continue
        state = fold_entries(instance_id, rows)
        wanted = instance_row_values(state, now)
        wanted_numbers = [number_row_values(instance_id, n) for n in state.numbers.values()]
        wanted_filings = [filing_row_values(instance_id, f) for f in state.filings.values()]
        same = (
            head is not None
            and all(
                getattr(head, key) == value for key, value in wanted.items() if key != "updated_at"
            )
            and _key(numbers[instance_id], "number") == _key(wanted_numbers, "number")
            and _key(filings[instance_id], "filing_id") == _key(wanted_filings, "filing_id")
        )
        if same:
            continue
        report.drift.append(instance_id)
        if check:
            continue
        if head is None:
            session.execute(insert(InstanceRow), [wanted])
        else:
            session.execute(update(InstanceRow), [wanted])
        session.execute(
            delete(ServiceNumberRow).where(col(ServiceNumberRow.instance_id) == instance_id)
        )
        session.execute(delete(FilingRow).where(col(FilingRow.instance_id) == instance_id))
        if wanted_numbers:
            session.execute(insert(ServiceNumberRow), wanted_numbers)
        if wanted_filings:
            session.execute(insert(FilingRow), wanted_filings)
