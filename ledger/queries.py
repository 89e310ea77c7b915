"""Read-side queries shared by every interface: keyword-only arguments, an explicit session."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlmodel import Session, col

from ledger.policy import Policy
from ledger.state import InstanceState, state_from_json
from ledger.store.parking import list_parked, parked_counts
from ledger.store.reminders import holds_numbers_or_filings
from ledger.tables import (
    DeadLetter,
    InstanceRow,
    LedgerEntry,
    ParkedEvent,
    ServiceNumberRow,
    core_table,
)
from ledger.views import (
    dead_letter_view,
    entry_view,
    instance_summary,
    instance_view,
    parked_view,
    service_number_view,
)


def load_state(session: Session, *, instance_id: str) -> InstanceState | None:
    row = session.get(InstanceRow, instance_id)
    if row is None or row.entries == 0:
        return None
    return state_from_json(row.state)


def show_instance(
    session: Session, *, instance_id: str, at: datetime, policy: Policy
) -> dict[str, Any] | None:
    """The ``show`` JSON, or None when the ledger knows nothing of the instance: no entry and
    no parked event (SPEC §9: an instance with parked events only shows ``status: unknown``,
    ``entries: 0``)."""
    state = load_state(session, instance_id=instance_id)
    parked = parked_counts(session.connection(), [instance_id]).get(instance_id, 0)
    if state is None:
        if not parked:
            return None
        state = InstanceState(instance_id)
    return {**instance_view(state, policy, at), "parked": parked}


def parked_events(
    session: Session, *, instance_id: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """``parked --json`` (SPEC §9): events waiting behind a gap in their instance's publish
    numbers, ordered by ``parked_at``, ``instance_id``, ``n``."""
    rows = list_parked(session.connection(), instance_id=instance_id, limit=limit)
    return [parked_view(row) for row in rows]


def instance_history(session: Session, *, instance_id: str) -> list[dict[str, Any]]:
    query = (
        select(LedgerEntry)
        .where(col(LedgerEntry.instance_id) == instance_id)
        .order_by(col(LedgerEntry.instance_seq))
    )
    return [entry_view(entry) for entry in session.execute(query).scalars()]


def iter_instances(
    session: Session,
    *,
    policy: Policy,
    at: datetime,
    eligibility: str | None = None,
    product: str | None = None,
    expiring_before: datetime | None = None,
    after: str | None = None,
    limit: int | None = None,
    renewal_due: bool = False,
) -> Iterator[dict[str, Any]]:
    """``instances`` rows ordered by instance id; ``after``/``limit`` page through them.

    Product and expiry filter in SQL; eligibility depends on the clock ``at``, so it is evaluated
    here, on the folded state.
    """
    query = (
        select(InstanceRow)
        .where(col(InstanceRow.entries) > 0)
        .order_by(col(InstanceRow.instance_id))
    )
    if product is not None:
        query = query.where(col(InstanceRow.product_type) == product)
    if expiring_before is not None:
        query = query.where(col(InstanceRow.expires_at) < expiring_before)
    if after is not None:
        query = query.where(col(InstanceRow.instance_id) > after)
    if renewal_due:
        # Due for renewal at ``at``: an active subscription holding numbers or filings whose
        # end is within the policy's largest reminder threshold (docs/changes.md).
        horizon = at + timedelta(days=max(policy.renewal_reminder_days, default=0))
        query = query.where(
            col(InstanceRow.status) == "active",
            col(InstanceRow.billing_method) == "subscription",
            col(InstanceRow.expires_at) > at,
            col(InstanceRow.expires_at) <= horizon,
            holds_numbers_or_filings(col(InstanceRow.instance_id)),
        )
    produced = 0
    for row in session.execute(query.execution_options(yield_per=500)).scalars():
        summary = instance_summary(state_from_json(row.state), policy, at)
        if eligibility is not None and summary["eligibility"] != eligibility:
            continue
        yield summary
        produced += 1
        if limit is not None and produced >= limit:
            return


def list_instances(session: Session, **filters: Any) -> list[dict[str, Any]]:
    return list(iter_instances(session, **filters))


def service_number_info(session: Session, *, number: str) -> dict[str, Any] | None:
    row = session.get(ServiceNumberRow, number)
    return None if row is None else service_number_view(row)


def rejected_events(
    session: Session, *, after_id: int | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    query = select(DeadLetter).order_by(col(DeadLetter.id))
    if after_id is not None:
        query = query.where(col(DeadLetter.id) > after_id)
    if limit is not None:
        query = query.limit(limit)
    return [dead_letter_view(row) for row in session.execute(query).scalars()]


#: Event ids per ``IN (…)`` of :func:`unaccounted_event_ids`.
_IDS_PER_QUERY = 1000


def unaccounted_event_ids(session: Session, *, event_ids: Sequence[str]) -> list[str]:
    """The ids of ``event_ids`` (in their order, each once) that the ledger has neither
    appended, nor dead-lettered, nor parked (stored by the resequencer until its turn): the
    publisher-side check of ``quota-ledger reconcile``. Once
    the broker holds no message any more (nothing queued, nothing delivered and unacknowledged),
    an event whose publish returned and that is still unaccounted for was lost by the broker
    (docs/reliability.md)."""
    wanted = list(dict.fromkeys(event_ids))
    seen: set[str] = set()
    for start in range(0, len(wanted), _IDS_PER_QUERY):
        chunk = wanted[start : start + _IDS_PER_QUERY]
        for model in (LedgerEntry, DeadLetter, ParkedEvent):
            column = core_table(model).c.event_id
            seen.update(session.execute(select(column).where(column.in_(chunk))).scalars())
    return [event_id for event_id in wanted if event_id not in seen]
