"""worker members (RabbitMQ workers share the partitions by a heartbeat table)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('worker_members',
    sa.Column('id', sa.String(length=100), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=False),
    sa.Column('heartbeat_at', sa.Float(), nullable=False),
    sa.Column('partitions', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_worker_members'))
    )


def downgrade() -> None:
    op.drop_table('worker_members')
