"""record write cost: facts' patient_id is no longer a foreign key; fact columns are json, not jsonb

Measured with bench/worker.py (one worker, ORU^R01 with 10 OBX, batches of 100): the PostgreSQL
server's CPU per message fell by about a third (the foreign-key check locks the patient's row once
per fact row; jsonb converts every fact on write, and the record reads facts whole). See the
docstring of engine.record.models for why the writer keeps the reference right without the check.

On PostgreSQL the type change rewrites each fact table (an ACCESS EXCLUSIVE lock while it runs:
plan it for a quiet hour on a large record). On SQLite the fact tables are copied without the
constraint (Alembic's batch mode); their fact columns were JSON already.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

FACT_TABLES = ('rec_encounters', 'rec_reports', 'rec_observations', 'rec_specimens', 'rec_allergies',
               'rec_immunizations', 'rec_conditions', 'rec_procedures')
JSON_TABLES = ('rec_patients', *FACT_TABLES, 'rec_history')


def _fk(table: str) -> str:
    return f'fk_{table}_patient_id_rec_patients'


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == 'postgresql'
    for table in FACT_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(_fk(table), type_='foreignkey')
    if postgres:
        for table in JSON_TABLES:
            op.alter_column(table, 'fact', type_=sa.JSON(), existing_type=postgresql.JSONB(),
                            existing_nullable=False, postgresql_using='fact::json')


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == 'postgresql'
    if postgres:
        for table in JSON_TABLES:
            op.alter_column(table, 'fact', type_=postgresql.JSONB(), existing_type=sa.JSON(),
                            existing_nullable=False, postgresql_using='fact::jsonb')
    for table in FACT_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.create_foreign_key(_fk(table), 'rec_patients', ['patient_id'], ['id'])
