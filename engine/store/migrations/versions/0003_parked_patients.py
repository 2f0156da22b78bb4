"""parked patients (per-patient ordering: a failed message holds its patient's later ones)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('parked_patients',
    sa.Column('patient_key', sa.String(length=300), nullable=False),
    sa.Column('message_uid', sa.String(length=32), nullable=False),
    sa.Column('parked_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('patient_key', name=op.f('pk_parked_patients'))
    )


def downgrade() -> None:
    op.drop_table('parked_patients')
