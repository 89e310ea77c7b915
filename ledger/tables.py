"""Every database table of the project (SPEC §6), as SQLModel classes.

The schema itself is owned by the Alembic migrations in ``ledger/migrations``; these classes
must describe exactly the same thing (a test compares them with ``compare_metadata``). So a
change here needs a new migration.

Times are timezone-aware UTC everywhere (``UTCDateTime``). JSON columns hold plain lists and
dicts and are not mutation-tracked: assign a new object instead of changing one in place.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeEngine
from sqlmodel import Field, SQLModel

from ledger.chain import GENESIS_HASH
from ledger.clock import utcnow

__all__ = [
    "DeadLetter",
    "FeedHead",
    "FilingRow",
    "InstanceRow",
    "LedgerChange",
    "LedgerEntry",
    "ParkedEvent",
    "RenewalMark",
    "SequencerGate",
    "ServiceNumberRow",
    "UTCDateTime",
    "WebhookDelivery",
    "WebhookEndpoint",
    "core_table",
    "utcnow",
]


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that only ever holds aware UTC datetimes.

    Writing a naive datetime raises ``ValueError``: its zone would be a guess. PostgreSQL keeps
    ``timestamptz`` and answers in the session's zone, so reads are converted to UTC; SQLite
    has no zone at all and stores text, so writes are normalised to UTC (which also keeps the
    text order equal to the time order) and reads get UTC attached.
    """

    impl = DateTime
    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.__class__ is datetime and value.tzinfo is UTC and dialect.name != "sqlite":
            return value  # already what the rest would make of it: the common case
        moment = _aware_utc(value)
        if dialect.name == "sqlite":
            # SQLite's DATETIME drops the zone silently; store the UTC wall time.
            return moment.replace(tzinfo=None)
        return moment

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def bind_processor(self, dialect: Dialect) -> Any:
        """On SQLite, one function from an aware datetime to the text SQLAlchemy's ``DATETIME``
        stores (``YYYY-MM-DD HH:MM:SS.ffffff``, the UTC wall time), with a cache: the same few
        instants are written over and over (a batch's ``recorded_at``, its events' times), and
        the plain way (``process_bind_param``, then the dialect's own formatting) was ~15 % of
        an embedded write. ``tests/unit/test_hot_paths.py`` pins it to the plain way."""
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)
        return _sqlite_time_text


def _aware_utc(value: Any) -> datetime:
    """``value`` in UTC; a naive datetime or anything else is refused."""
    if not isinstance(value, datetime):
        raise TypeError(f"UTCDateTime needs a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r} refused: give it a timezone")
    return value.astimezone(UTC)


_SQLITE_TIME_FORMAT = "%04d-%02d-%02d %02d:%02d:%02d.%06d"
_sqlite_time_texts: dict[datetime, str] = {}


def _sqlite_time_text(value: Any) -> str | None:
    if value is None:
        return None
    text = _sqlite_time_texts.get(value) if type(value) is datetime else None
    if text is not None:
        return text
    moment = _aware_utc(value)
    text = _SQLITE_TIME_FORMAT % (
        *(moment.year, moment.month, moment.day),
        *(moment.hour, moment.minute, moment.second, moment.microsecond),
    )
    if len(_sqlite_time_texts) >= 100_000:  # a bound, not an LRU: the working set is small
        _sqlite_time_texts.clear()
    _sqlite_time_texts[value] = text
    return text


def _bigint_pk() -> TypeEngine[int]:
    # SQLite only autoincrements a column declared exactly ``INTEGER PRIMARY KEY`` (the rowid).
    return BigInteger().with_variant(Integer(), "sqlite")


def _json() -> TypeEngine[Any]:
    return JSON().with_variant(JSONB(), "postgresql")


class LedgerEntry(SQLModel, table=True):
    """One append-only ledger entry (SPEC §6). UPDATE/DELETE/TRUNCATE are refused by triggers."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        UniqueConstraint("event_id", name="uq_ledger_entries_event_id"),
        UniqueConstraint("instance_id", "instance_seq", name="uq_ledger_entries_instance_seq"),
    )

    # Global commit order; None until flushed.
    seq: int | None = Field(
        default=None,
        sa_column=Column("seq", _bigint_pk(), primary_key=True, autoincrement=True),
    )
    # No index of its own: the unique (instance_id, instance_seq) index serves look-ups by
    # instance (migration 0003 dropped the redundant one).
    instance_id: str = Field(max_length=128)
    instance_seq: int  # 1, 2, … per instance
    event_id: str = Field(max_length=200)
    type: str = Field(max_length=64)
    occurred_at: datetime = Field(sa_column=Column("occurred_at", UTCDateTime(), nullable=False))
    recorded_at: datetime = Field(
        default_factory=utcnow,
        sa_column=Column("recorded_at", UTCDateTime(), nullable=False),
    )
    payload: str = Field(sa_column=Column("payload", Text(), nullable=False))  # canonical JSON
    outcome: str = Field(max_length=16)  # applied | rejected | stale
    reasons: list[str] = Field(
        default_factory=list, sa_column=Column("reasons", _json(), nullable=False)
    )
    result: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column("result", _json(), nullable=False)
    )
    policy_version: str = Field(max_length=64)
    prev_hash: str = Field(min_length=64, max_length=64)
    hash: str = Field(min_length=64, max_length=64)


class InstanceRow(SQLModel, table=True):
    """The projection of one instance: the folded state plus the chain head that guards it."""

    __tablename__ = "instances"
    __table_args__ = (
        # The expiry sweep: status = 'active' AND billing_method = 'subscription' AND
        # expires_at <= now, so its cost follows the due instances only.
        Index("ix_instances_sweep", "status", "billing_method", "expires_at"),
    )

    instance_id: str = Field(max_length=128, primary_key=True)
    account_id: str | None = Field(default=None, max_length=128)
    product_type: str | None = Field(default=None, max_length=64, index=True)
    region: str | None = Field(default=None, max_length=64)
    billing_method: str | None = Field(default=None, max_length=32)
    expires_at: datetime | None = Field(
        default=None, sa_column=Column("expires_at", UTCDateTime(), nullable=True)
    )
    status: str = Field(default="unknown", max_length=16)  # active|expired|released|unknown
    entries: int = 0  # the chain head: number of entries …
    head_hash: str = Field(default=GENESIS_HASH, min_length=64, max_length=64)  # … and last hash
    state: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column("state", _json(), nullable=False)
    )
    updated_at: datetime = Field(
        default_factory=utcnow,
        sa_column=Column("updated_at", UTCDateTime(), nullable=False),
    )


class ServiceNumberRow(SQLModel, table=True):
    """Projection of one issued service number."""

    __tablename__ = "service_numbers"

    number: str = Field(max_length=64, primary_key=True)
    instance_id: str = Field(max_length=128, index=True)
    status: str = Field(max_length=16)  # active | used | invalidated
    issued_at: datetime = Field(sa_column=Column("issued_at", UTCDateTime(), nullable=False))
    issue_order: int  # 1, 2, … within the instance
    filing_id: str | None = Field(default=None, max_length=128)
    website: str | None = Field(default=None, max_length=253)
    subject_id: str | None = Field(default=None, max_length=128)
    used_at: datetime | None = Field(
        default=None, sa_column=Column("used_at", UTCDateTime(), nullable=True)
    )
    invalidated_at: datetime | None = Field(
        default=None, sa_column=Column("invalidated_at", UTCDateTime(), nullable=True)
    )
    invalidated_reason: str | None = Field(default=None, max_length=64)


class FilingRow(SQLModel, table=True):
    """Projection of one accepted filing of an instance (filing ids are per instance)."""

    __tablename__ = "filings"

    instance_id: str = Field(max_length=128, primary_key=True)
    filing_id: str = Field(max_length=128, primary_key=True)
    service_number: str = Field(max_length=64)
    website: str = Field(max_length=253)
    subject_id: str = Field(max_length=128)
    status: str = Field(max_length=16)  # accepted | withdrawn
    accepted_at: datetime = Field(sa_column=Column("accepted_at", UTCDateTime(), nullable=False))
    accept_order: int  # 1, 2, … within the instance
    withdrawn_at: datetime | None = Field(
        default=None, sa_column=Column("withdrawn_at", UTCDateTime(), nullable=True)
    )


class DeadLetter(SQLModel, table=True):
    """An input that was never appended (SPEC §5). ``event_id`` repeats: not unique."""

    __tablename__ = "dead_letters"

    id: int | None = Field(
        default=None,
        sa_column=Column("id", _bigint_pk(), primary_key=True, autoincrement=True),
    )
    received_at: datetime = Field(
        default_factory=utcnow,
        sa_column=Column("received_at", UTCDateTime(), nullable=False, index=True),
    )
    event_id: str | None = Field(default=None, max_length=200, index=True)
    code: str = Field(max_length=32)  # too_large | invalid_event | event_id_reused | …
    error: str = Field(sa_column=Column("error", Text(), nullable=False))
    raw: str = Field(sa_column=Column("raw", Text(), nullable=False))


# --- the resequencer (SPEC §9; ledger/resequencer.py) --------------------------------------------
# Working state of the publish-order gate, not part of the ledger: rows are updated and deleted,
# and ``rebuild`` / ``verify`` neither read nor reset them.


class SequencerGate(SQLModel, table=True):
    """One instance's gate: the broker epoch it follows and the highest filled number."""

    __tablename__ = "sequencer_gates"

    instance_id: str = Field(max_length=128, primary_key=True)
    epoch: int = Field(sa_column=Column("epoch", BigInteger(), nullable=False))
    last: int = Field(sa_column=Column("last", BigInteger(), nullable=False))
    # How many numbers are parked (events and filled placeholders): 0 skips their query.
    parked: int = 0
    updated_at: datetime = Field(
        default_factory=utcnow,
        sa_column=Column("updated_at", UTCDateTime(), nullable=False),
    )


class ParkedEvent(SQLModel, table=True):
    """An event that arrived ahead of a gap, stored until its turn (or a filled placeholder:
    ``raw`` NULL, for an element that was dead-lettered on arrival)."""

    __tablename__ = "parked_events"

    instance_id: str = Field(max_length=128, primary_key=True)
    epoch: int = Field(sa_column=Column("epoch", BigInteger(), primary_key=True))
    n: int = Field(sa_column=Column("n", BigInteger(), primary_key=True))
    event_id: str | None = Field(default=None, max_length=200)
    type: str | None = Field(default=None, max_length=64)
    # The event's text as it arrived (its canonical JSON if it arrived as an object).
    raw: str | None = Field(default=None, sa_column=Column("raw", Text(), nullable=True))
    # Database time: each gap's timeout counts from it.
    parked_at: datetime = Field(
        sa_column=Column("parked_at", UTCDateTime(), nullable=False, index=True)
    )


# --- the change feed (docs/changes.md; ledger/changes.py) ----------------------------------------


class LedgerChange(SQLModel, table=True):
    """One change of meaning, append-only like the ledger (triggers refuse UPDATE, DELETE and
    TRUNCATE). ``position`` is gap-free and increases in commit order (``FeedHead``), so a
    consumer that has read up to ``p`` only ever needs ``position > p``."""

    __tablename__ = "ledger_changes"

    # Assigned from ``ledger_feed_head`` in the writing transaction, never by a sequence (a
    # sequence leaves gaps on rollback and hands out numbers out of commit order).
    position: int = Field(
        sa_column=Column("position", BigInteger(), primary_key=True, autoincrement=False)
    )
    kind: str = Field(max_length=64)  # service_number.issued, filing.accepted, …
    # The instance and the entry that caused the change; NULL for a dead letter (no entry) and
    # for a renewal reminder (caused by the clock, not by an entry).
    instance_id: str | None = Field(default=None, max_length=128, index=True)
    event_id: str | None = Field(default=None, max_length=200)
    instance_seq: int | None = None
    occurred_at: datetime = Field(sa_column=Column("occurred_at", UTCDateTime(), nullable=False))
    recorded_at: datetime = Field(sa_column=Column("recorded_at", UTCDateTime(), nullable=False))
    data: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column("data", _json(), nullable=False)
    )


class FeedHead(SQLModel, table=True):
    """The feed's single counter row (``id`` = 1): the last position handed out. Every writing
    transaction updates it just before commit, so its row lock orders the feed's writers."""

    __tablename__ = "ledger_feed_head"

    id: int = Field(sa_column=Column("id", Integer(), primary_key=True, autoincrement=False))
    position: int = Field(sa_column=Column("position", BigInteger(), nullable=False))


class RenewalMark(SQLModel, table=True):
    """How far the renewal reminders of one threshold have been swept (``swept_until``): the
    next sweep reads only the ends whose crossing came after it."""

    __tablename__ = "renewal_marks"

    threshold_days: int = Field(
        sa_column=Column("threshold_days", Integer(), primary_key=True, autoincrement=False)
    )
    # NULL until the first sweep with this threshold has committed.
    swept_until: datetime | None = Field(
        default=None, sa_column=Column("swept_until", UTCDateTime(), nullable=True)
    )


class WebhookEndpoint(SQLModel, table=True):
    """A registered receiver of the feed (docs/changes.md): its own cursor, its retry state,
    and a lease so that one deliverer at a time works on it (which keeps its order)."""

    __tablename__ = "webhook_endpoints"

    id: int | None = Field(
        default=None,
        sa_column=Column("id", _bigint_pk(), primary_key=True, autoincrement=True),
    )
    url: str = Field(sa_column=Column("url", Text(), nullable=False))
    # The HMAC key: kept as it is, since signing needs it (the database is trusted like the
    # API tokens' environment).
    secret: str = Field(max_length=128)
    kinds: list[str] = Field(
        default_factory=list, sa_column=Column("kinds", _json(), nullable=False)
    )
    enabled: bool = True
    created_at: datetime = Field(sa_column=Column("created_at", UTCDateTime(), nullable=False))
    # The last position delivered (or passed over: a kind it does not want).
    cursor: int = Field(sa_column=Column("cursor", BigInteger(), nullable=False))
    failures: int = 0  # consecutive failed attempts at the change after ``cursor``
    failing_since: datetime | None = Field(
        default=None, sa_column=Column("failing_since", UTCDateTime(), nullable=True)
    )
    next_attempt_at: datetime = Field(
        sa_column=Column("next_attempt_at", UTCDateTime(), nullable=False)
    )
    last_status: int | None = None
    last_error: str | None = Field(default=None, sa_column=Column("last_error", Text()))
    disabled_reason: str | None = Field(default=None, max_length=200)
    lease_token: str | None = Field(default=None, max_length=64)
    lease_until: datetime | None = Field(
        default=None, sa_column=Column("lease_until", UTCDateTime(), nullable=True)
    )


class WebhookDelivery(SQLModel, table=True):
    """One delivery attempt: the delivery log of an endpoint."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_endpoint", "endpoint_id", "id"),)

    id: int | None = Field(
        default=None,
        sa_column=Column("id", _bigint_pk(), primary_key=True, autoincrement=True),
    )
    endpoint_id: int = Field(sa_column=Column("endpoint_id", BigInteger(), nullable=False))
    position: int = Field(sa_column=Column("position", BigInteger(), nullable=False))
    attempt: int
    status: int | None = None  # the HTTP status, None when no answer came
    error: str | None = Field(default=None, sa_column=Column("error", Text()))
    duration_ms: int
    attempted_at: datetime = Field(sa_column=Column("attempted_at", UTCDateTime(), nullable=False))


def core_table(model: type[SQLModel]) -> Table:
    """The Core ``Table`` of a table model, for the write path's plain Core statements (SQLModel's
    classes do not declare ``__table__`` to type checkers)."""
    table: Table = model.__table__  # type: ignore[attr-defined]
    return table
