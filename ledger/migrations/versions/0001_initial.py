"""Initial schema: ledger, projections, dead letters; the ledger is append-only.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00

Written by hand on purpose: it must keep describing this revision when ``ledger.tables``
moves on, so it uses plain SQLAlchemy types (``UTCDateTime`` is ``DateTime(timezone=True)`` in
the database; its UTC handling lives in Python).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY = "ledger_entries is append-only"


def _bigint_pk() -> sa.types.TypeEngine[int]:
    # ``INTEGER PRIMARY KEY`` on SQLite (the autoincrementing rowid), BIGSERIAL on PostgreSQL.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _json() -> sa.types.TypeEngine[object]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "ledger_entries",
        sa.Column("seq", _bigint_pk(), primary_key=True, autoincrement=True),
        sa.Column("instance_id", sa.String(128), nullable=False),
        sa.Column("instance_seq", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(200), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("occurred_at", _ts(), nullable=False),
        sa.Column("recorded_at", _ts(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reasons", _json(), nullable=False),
        sa.Column("result", _json(), nullable=False),
        sa.Column("policy_version", sa.String(64), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.UniqueConstraint("event_id", name="uq_ledger_entries_event_id"),
        sa.UniqueConstraint("instance_id", "instance_seq", name="uq_ledger_entries_instance_seq"),
    )
    op.create_index("ix_ledger_entries_instance_id", "ledger_entries", ["instance_id"])

    op.create_table(
        "instances",
        sa.Column("instance_id", sa.String(128), primary_key=True),
        sa.Column("account_id", sa.String(128), nullable=True),
        sa.Column("product_type", sa.String(64), nullable=True),
        sa.Column("region", sa.String(64), nullable=True),
        sa.Column("billing_method", sa.String(32), nullable=True),
        sa.Column("expires_at", _ts(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("entries", sa.Integer(), nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("state", _json(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
    )
    op.create_index("ix_instances_sweep", "instances", ["status", "billing_method", "expires_at"])
    op.create_index("ix_instances_product_type", "instances", ["product_type"])

    op.create_table(
        "service_numbers",
        sa.Column("number", sa.String(64), primary_key=True),
        sa.Column("instance_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("issued_at", _ts(), nullable=False),
        sa.Column("issue_order", sa.Integer(), nullable=False),
        sa.Column("filing_id", sa.String(128), nullable=True),
        sa.Column("website", sa.String(253), nullable=True),
        sa.Column("subject_id", sa.String(128), nullable=True),
        sa.Column("used_at", _ts(), nullable=True),
        sa.Column("invalidated_at", _ts(), nullable=True),
        sa.Column("invalidated_reason", sa.String(64), nullable=True),
    )
    op.create_index("ix_service_numbers_instance_id", "service_numbers", ["instance_id"])

    op.create_table(
        "filings",
        sa.Column("instance_id", sa.String(128), primary_key=True),
        sa.Column("filing_id", sa.String(128), primary_key=True),
        sa.Column("service_number", sa.String(64), nullable=False),
        sa.Column("website", sa.String(253), nullable=False),
        sa.Column("subject_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("accepted_at", _ts(), nullable=False),
        sa.Column("accept_order", sa.Integer(), nullable=False),
        sa.Column("withdrawn_at", _ts(), nullable=True),
    )

    op.create_table(
        "dead_letters",
        sa.Column("id", _bigint_pk(), primary_key=True, autoincrement=True),
        sa.Column("received_at", _ts(), nullable=False),
        sa.Column("event_id", sa.String(200), nullable=True),
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("raw", sa.Text(), nullable=False),
    )
    op.create_index("ix_dead_letters_received_at", "dead_letters", ["received_at"])
    op.create_index("ix_dead_letters_event_id", "dead_letters", ["event_id"])

    _create_append_only_triggers()


def _create_append_only_triggers() -> None:
    """Refuse changes to ledger entries in the database itself, not only in the code."""
    if op.get_bind().dialect.name == "postgresql":
        # restrict_violation (23001): an integrity error, as SQLite's RAISE(ABORT) is.
        op.execute(
            f"""
            CREATE FUNCTION ledger_entries_append_only() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '{APPEND_ONLY}' USING ERRCODE = 'restrict_violation';
            END
            $$
            """
        )
        op.execute(
            "CREATE TRIGGER ledger_entries_no_update_delete"
            " BEFORE UPDATE OR DELETE ON ledger_entries"
            " FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only()"
        )
        # Row triggers do not fire for TRUNCATE.
        op.execute(
            "CREATE TRIGGER ledger_entries_no_truncate"
            " BEFORE TRUNCATE ON ledger_entries"
            " FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_append_only()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER ledger_entries_no_{action.lower()}"
                f" BEFORE {action} ON ledger_entries"
                f" BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS ledger_entries_no_truncate ON ledger_entries")
        op.execute("DROP TRIGGER IF EXISTS ledger_entries_no_update_delete ON ledger_entries")
        op.execute("DROP FUNCTION IF EXISTS ledger_entries_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS ledger_entries_no_update")
        op.execute("DROP TRIGGER IF EXISTS ledger_entries_no_delete")
    op.drop_table("dead_letters")
    op.drop_table("filings")
    op.drop_table("service_numbers")
    op.drop_table("instances")
    op.drop_table("ledger_entries")
