"""The change feed: ``ledger_changes`` (append-only), its position counter, and how far the
renewal reminders have been swept; webhook endpoints and their delivery log.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 12:00:00

Positions come from the single row of ``ledger_feed_head``, updated by each writing
transaction just before it commits (docs/changes.md). Entries recorded before this revision
have no changes: the feed starts here (no backfill).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY = "ledger_changes is append-only"


def upgrade() -> None:
    op.create_table(
        "ledger_changes",
        sa.Column("position", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("instance_id", sa.String(128), nullable=True),
        sa.Column("event_id", sa.String(200), nullable=True),
        sa.Column("instance_seq", sa.Integer(), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "data",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=False,
        ),
    )
    op.create_index("ix_ledger_changes_instance_id", "ledger_changes", ["instance_id"])
    op.create_table(
        "ledger_feed_head",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
    )
    op.execute("INSERT INTO ledger_feed_head (id, position) VALUES (1, 0)")
    op.create_table(
        "renewal_marks",
        sa.Column("threshold_days", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("swept_until", sa.DateTime(timezone=True), nullable=True),
    )
    _create_webhook_tables()
    _create_append_only_triggers()


def _create_webhook_tables() -> None:
    ts = sa.DateTime(timezone=True)
    bigint_pk = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", bigint_pk, primary_key=True, autoincrement=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column(
            "kinds", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
        ),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("cursor", sa.BigInteger(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("failing_since", ts, nullable=True),
        sa.Column("next_attempt_at", ts, nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("disabled_reason", sa.String(200), nullable=True),
        sa.Column("lease_token", sa.String(64), nullable=True),
        sa.Column("lease_until", ts, nullable=True),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", bigint_pk, primary_key=True, autoincrement=True),
        sa.Column("endpoint_id", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("attempted_at", ts, nullable=False),
    )
    op.create_index("ix_webhook_deliveries_endpoint", "webhook_deliveries", ["endpoint_id", "id"])


def _create_append_only_triggers() -> None:
    """As for ``ledger_entries`` (0001): the database refuses to change the feed."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"""
            CREATE FUNCTION ledger_changes_append_only() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '{APPEND_ONLY}' USING ERRCODE = 'restrict_violation';
            END
            $$
            """
        )
        op.execute(
            "CREATE TRIGGER ledger_changes_no_update_delete"
            " BEFORE UPDATE OR DELETE ON ledger_changes"
            " FOR EACH ROW EXECUTE FUNCTION ledger_changes_append_only()"
        )
        op.execute(
            "CREATE TRIGGER ledger_changes_no_truncate"
            " BEFORE TRUNCATE ON ledger_changes"
            " FOR EACH STATEMENT EXECUTE FUNCTION ledger_changes_append_only()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER ledger_changes_no_{action.lower()}"
                f" BEFORE {action} ON ledger_changes"
                f" BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS ledger_changes_no_truncate ON ledger_changes")
        op.execute("DROP TRIGGER IF EXISTS ledger_changes_no_update_delete ON ledger_changes")
        op.execute("DROP FUNCTION IF EXISTS ledger_changes_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS ledger_changes_no_update")
        op.execute("DROP TRIGGER IF EXISTS ledger_changes_no_delete")
    op.drop_index("ix_webhook_deliveries_endpoint", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_endpoints")
    op.drop_table("renewal_marks")
    op.drop_table("ledger_feed_head")
    op.drop_index("ix_ledger_changes_instance_id", table_name="ledger_changes")
    op.drop_table("ledger_changes")
