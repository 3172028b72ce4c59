"""watched plans: a watch may hold a merge plan instead of scan options

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('watches', schema=None) as batch_op:
        batch_op.add_column(sa.Column('merge', sa.JSON(), nullable=True))
        # a plan's watch has no scan options
        batch_op.alter_column('scan', existing_type=sa.JSON(), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM watches WHERE scan IS NULL")  # plans' watches: no scan to keep
    with op.batch_alter_table('watches', schema=None) as batch_op:
        batch_op.alter_column('scan', existing_type=sa.JSON(), nullable=False)
        batch_op.drop_column('merge')
