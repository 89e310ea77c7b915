"""Drop ``ix_ledger_entries_instance_id``: the unique ``(instance_id, instance_seq)`` index
serves every look-up by instance (its first column), so the second index only cost writes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_ledger_entries_instance_id", table_name="ledger_entries")


def downgrade() -> None:
    op.create_index("ix_ledger_entries_instance_id", "ledger_entries", ["instance_id"])
