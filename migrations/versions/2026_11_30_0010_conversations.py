"""conversations: per-channel results, the conversation and its escalation flag

results.channels holds one entry per speaker (a channel of the recording), results.conversation the
conversation's metrics and transcript; jobs.escalation copies the conversation's flag so the history
filter stays on the jobs table. All NULL on results from before.

Revision ID: 20261130_0010
Revises: 20261121_0009
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '20261130_0010'
down_revision: str | None = '20261121_0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.add_column(sa.Column('channels', JSON, nullable=True))
        batch_op.add_column(sa.Column('conversation', JSON, nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('escalation', sa.Boolean(), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_escalation'), ['escalation'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_escalation'))
        batch_op.drop_column('escalation')
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.drop_column('conversation')
        batch_op.drop_column('channels')
