"""The resequencer's working tables (SPEC §9): per-instance gates and parked events.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 00:00:00

Not part of the append-only ledger: rows are updated and deleted as events park and drain.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sequencer_gates",
        sa.Column("instance_id", sa.String(128), primary_key=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("last", sa.BigInteger(), nullable=False),
        sa.Column("parked", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "parked_events",
        sa.Column("instance_id", sa.String(128), primary_key=True),
        sa.Column("epoch", sa.BigInteger(), primary_key=True),
        sa.Column("n", sa.BigInteger(), primary_key=True),
        sa.Column("event_id", sa.String(200), nullable=True),
        sa.Column("type", sa.String(64), nullable=True),
        sa.Column("raw", sa.Text(), nullable=True),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_parked_events_parked_at", "parked_events", ["parked_at"])


def downgrade() -> None:
    op.drop_index("ix_parked_events_parked_at", table_name="parked_events")
    op.drop_table("parked_events")
    op.drop_table("sequencer_gates")
