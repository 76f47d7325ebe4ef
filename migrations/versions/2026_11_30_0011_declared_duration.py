"""declared duration: the header's length, kept when the worker decodes another

jobs.duration_s holds the header's length until a worker decodes the recording, then the decoded
length. When the two differ by more than codecs account for (a copy cut short decodes in part),
jobs.declared_duration_s keeps the header's. NULL on jobs from before, and when they agree.

Revision ID: 20261130_0011
Revises: 20261130_0010
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '20261130_0011'
down_revision: str | None = '20261130_0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('declared_duration_s', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('declared_duration_s')
