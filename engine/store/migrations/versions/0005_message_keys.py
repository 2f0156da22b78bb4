"""message keys (search messages by patient identifier and order number)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('message_keys',
    sa.Column('message_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('value', sa.String(length=100), nullable=False),
    sa.Column('authority', sa.String(length=100), nullable=False),
    sa.PrimaryKeyConstraint('message_id', 'kind', 'value', 'authority', name=op.f('pk_message_keys'))
    )
    op.create_index('ix_message_keys_value', 'message_keys', ['value', 'kind'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_message_keys_value', table_name='message_keys')
    op.drop_table('message_keys')
