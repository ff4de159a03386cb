"""usage cost and upstream model

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 08:52:09.583622
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("usage_logs", sa.Column("upstream_model", sa.String(length=200), nullable=True))
    op.add_column("usage_logs", sa.Column("cost", sa.Float(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("usage_logs", schema=None) as batch_op:
        batch_op.drop_column("cost")
        batch_op.drop_column("upstream_model")
