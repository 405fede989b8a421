"""observation input key and per-step state

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 19:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("observations") as batch:
        batch.add_column(sa.Column("input_key", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("steps", sa.JSON(), nullable=True))
        batch.create_index("ix_observations_input_key", ["input_key"], unique=True)


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("observations") as batch:
        batch.drop_index("ix_observations_input_key")
        batch.drop_column("steps")
        batch.drop_column("input_key")
