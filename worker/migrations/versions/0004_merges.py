"""merges: a job's kind (a scan, or a merge plan) on the scans table

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('scans', schema=None) as batch_op:
        # every row so far is a scan
        batch_op.add_column(sa.Column('kind', sa.String(length=8), server_default='scan',
                                      nullable=False))
        batch_op.create_index(batch_op.f('ix_scans_kind'), ['kind'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('scans', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_scans_kind'))
        batch_op.drop_column('kind')
