"""outbound.target: the ordered stream a row belongs to (an application ACK's channel, a route
destination's name), now that rows are also messages forwarded to route destinations

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('outbound', sa.Column('target', sa.String(length=64), server_default='', nullable=False))
    op.execute("UPDATE outbound SET target = channel WHERE kind = 'app_ack'")


def downgrade() -> None:
    with op.batch_alter_table('outbound') as batch:
        batch.drop_column('target')
