"""ix_messages_duplicate_of: a partial index on the few rows that are duplicates, for retention (an
original is kept while a newer duplicate points at it) and for PostgreSQL's foreign-key check when a
message row is deleted

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_messages_duplicate_of', 'messages', ['duplicate_of'], unique=False,
                    sqlite_where=sa.text('duplicate_of IS NOT NULL'),
                    postgresql_where=sa.text('duplicate_of IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_messages_duplicate_of', table_name='messages')
