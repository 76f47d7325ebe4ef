"""worker heartbeats, job holders and idempotency leases

Recovery after a kill -9: each job records the worker node holding its unfinished stage
(jobs.worker, jobs.worker_at), worker nodes write heartbeats (worker_heartbeats), and an
Idempotency-Key claim is a short lease (owner, lease_until) bound to its batch once committed
(batch_id). Transcripts left pending by a killed worker before this revision are handed to the
reconciler (jobs.worker = 'broker'), which re-sends them at its next pass.

Revision ID: 20261121_0009
Revises: 20261121_0008
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = '20261121_0009'
down_revision: str | None = '20261121_0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('worker_heartbeats',
    sa.Column('node', sa.String(length=200), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('node', name=op.f('pk_worker_heartbeats'))
    )
    with op.batch_alter_table('worker_heartbeats', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_worker_heartbeats_seen_at'), ['seen_at'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('worker', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('worker_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index('ix_jobs_worker', ['worker'], unique=False)

    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('batch_id', sa.Uuid(), nullable=True))

    # Transcripts a killed worker left pending for good: the reconciler re-sends them.
    results = sa.table('results', sa.column('job_id', sa.Uuid()),
                       sa.column('transcript', sa.JSON().with_variant(JSONB(), 'postgresql')))
    jobs = sa.table('jobs', sa.column('id', sa.Uuid()), sa.column('status', sa.String()),
                    sa.column('worker', sa.String()))
    pending = sa.select(results.c.job_id).where(results.c.transcript['status'].as_string() == 'pending')
    op.execute(jobs.update().where(jobs.c.id.in_(pending), jobs.c.status.in_(('succeeded', 'failed')))
               .values(worker='broker'))


def downgrade() -> None:
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.drop_column('batch_id')
        batch_op.drop_column('lease_until')
        batch_op.drop_column('owner')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_worker')
        batch_op.drop_column('worker_at')
        batch_op.drop_column('worker')

    with op.batch_alter_table('worker_heartbeats', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_worker_heartbeats_seen_at'))

    op.drop_table('worker_heartbeats')
