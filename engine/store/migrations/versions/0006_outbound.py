"""outbound (application ACKs owed to senders, delivered after the commit that decides them)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('outbound',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('message_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('channel', sa.String(length=64), nullable=False),
    sa.Column('destination', sa.String(length=300), nullable=False),
    sa.Column('control_id', sa.String(length=64), nullable=False),
    sa.Column('code', sa.String(length=2), nullable=False),
    sa.Column('payload', sa.LargeBinary(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('due_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('answer', sa.String(length=300), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbound'))
    )
    op.create_index('ix_outbound_status_next_attempt_at', 'outbound', ['status', 'next_attempt_at'], unique=False)
    op.create_index('ix_outbound_message_id', 'outbound', ['message_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_outbound_message_id', table_name='outbound')
    op.drop_index('ix_outbound_status_next_attempt_at', table_name='outbound')
    op.drop_table('outbound')
