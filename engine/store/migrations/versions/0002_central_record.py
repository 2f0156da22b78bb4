"""central record (patients, identifiers, merge links, facts, history), readable as FHIR R4

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('rec_history',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('fact_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('patient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('key', sa.String(length=512), nullable=True),
    sa.Column('fact', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('message_uid', sa.String(length=32), nullable=False),
    sa.Column('message_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('superseded_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('superseded_by', sa.String(length=32), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rec_history'))
    )
    op.create_index('ix_rec_history_kind_fact_id', 'rec_history', ['kind', 'fact_id'], unique=False)
    op.create_table('rec_patients',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('fact', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('message_uid', sa.String(length=32), nullable=False),
    sa.Column('message_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rec_patients'))
    )
    op.create_table('rec_allergies',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('patient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('key', sa.String(length=512), nullable=False),
    sa.Column('fact', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('code', sa.String(length=250), nullable=True),
    sa.Column('code_system', sa.String(length=250), nullable=True),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('message_uid', sa.String(length=32), nullable=False),
    sa.Column('message_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['rec_patients.id'], name=op.f('fk_rec_allergies_patient_id_rec_patients')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rec_allergies')),
    sa.UniqueConstraint('patient_id', 'key', name=op.f('uq_rec_allergies_patient_id_key'))
    )
    op.create_table('rec_conditions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('patient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('key', sa.String(length=512), nullable=False),
    sa.Column('fact', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('code', sa.String(length=250), nullable=True),
    sa.Column('code_system', sa.String(length=250), nullable=True),
    sa.Column('onset', sa.DateTime(timezone=True), nullable=True),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('message_uid', sa.String(length=32), nullable=False),
    sa.Column('message_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['rec_patients.id'], name=op.f('fk_rec_conditions_patient_id_rec_patients')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rec_conditions')),
    sa.UniqueConstraint('patient_id', 'key', name=op.f('uq_rec_conditions_patient_id_key'))
    )
    op.create_table('rec_encounters',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('patient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('key', sa.String(length=512), nullable=False),
    sa.Column('fact', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=True),
    sa.Column('class_code', sa.String(length=32), nullable=True),
    sa.Column('period_start', sa.DateTime(timezone=True), nullable=True),
    sa.Column('period_end', sa.DateTime(timezone=True), nullable=True),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('message_uid', sa.String(length=32), nullable=False),
    sa.Column('message_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['rec_patients.id'], name=op.f('fk_rec_encounters_patient_id_rec_patients')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rec_encounters')),
    sa.UniqueConstraint('patient_id', 'key', name=op.f('uq_rec_encounters_patient_id_key'))
    )
    op.create_table('rec_immunizations',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('patient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('key', sa.String(length=512), nullable=False),
    sa.Column('fact', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('code', sa.String(length=250), nullable=True),
    sa.Column('code_system', sa.String(length=250), nullable=True),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('occurrence', sa.DateTime(timezone=True), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('message_uid', sa.String(length=32), nullable=False),
    sa.Column('message_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['rec_patients.id'], name=op.f('fk_rec_immunizations_patient_id_rec_patients')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rec_immunizations')),
    sa.UniqueConstraint('patient_id', 'key', name=op.f('uq_rec_immunizations_patient_id_key'))
    )
    op.create_table('rec_observations',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('patient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('key', sa.String(length=512), nullable=False),
    sa.Column('fact', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('report_key', sa.String(length=512), nullable=True),
    sa.Column('code', sa.String(length=250), nullable=True),
    sa.Column('code_system', sa.String(length=250), nullable=True),
    sa.Column('alt_code', sa.String(length=250), nullable=True),
    sa.Column('alt_code_system', sa.String(length=250), nullable=True),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('value_type', sa.String(length=16), nullable=True),
    sa.Column('effective', sa.DateTime(timezone=True), nullable=True),
    sa.Column('issued', sa.DateTime(timezone=True), nullable=True),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('message_uid', sa.String(length=32), nullable=False),
    sa.Column('message_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['rec_patients.id'], name=op.f('fk_rec_observations_patient_id_rec_patients')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rec_observations')),
    sa.UniqueConstraint('patient_id', 'key', name=op.f('uq_rec_observations_patient_id_key'))
    )
    op.create_index('ix_rec_observations_patient_id_alt_code', 'rec_observations', ['patient_id', 'alt_code'], unique=False)
    op.create_index('ix_rec_observations_patient_id_code', 'rec_observations', ['patient_id', 'code'], unique=False)
    op.create_index('ix_rec_observations_patient_id_report_key', 'rec_observations', ['patient_id', 'report_key'], unique=False)
    op.create_table('rec_patient_identifiers',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('patient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('namespace', sa.String(length=300), nullable=False),
    sa.Column('value', sa.String(length=250), nullable=False),
    sa.Column('system', sa.String(length=300), nullable=True),
    sa.Column('type', sa.String(length=16), nullable=True),
    sa.Column('assigner', sa.String(length=250), nullable=True),
    sa.Column('message_uid', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['rec_patients.id'], name=op.f('fk_rec_patient_identifiers_patient_id_rec_patients')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rec_patient_identifiers')),
    sa.UniqueConstraint('namespace', 'value', name=op.f('uq_rec_patient_identifiers_namespace_value'))
    )
    op.create_index('ix_rec_patient_identifiers_patient_id', 'rec_patient_identifiers', ['patient_id'], unique=False)
    op.create_index('ix_rec_patient_identifiers_value', 'rec_patient_identifiers', ['value'], unique=False)
    op.create_table('rec_patient_links',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('patient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('replaced_by_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('message_uid', sa.String(length=32), nullable=False),
    sa.Column('message_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['rec_patients.id'], name=op.f('fk_rec_patient_links_patient_id_rec_patients')),
    sa.ForeignKeyConstraint(['replaced_by_id'], ['rec_patients.id'], name=op.f('fk_rec_patient_links_replaced_by_id_rec_patients')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rec_patient_links')),
    sa.UniqueConstraint('patient_id', name=op.f('uq_rec_patient_links_patient_id'))
    )
    op.create_index('ix_rec_patient_links_replaced_by_id', 'rec_patient_links', ['replaced_by_id'], unique=False)
    op.create_table('rec_procedures',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('patient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('key', sa.String(length=512), nullable=False),
    sa.Column('fact', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('code', sa.String(length=250), nullable=True),
    sa.Column('code_system', sa.String(length=250), nullable=True),
    sa.Column('performed', sa.DateTime(timezone=True), nullable=True),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('message_uid', sa.String(length=32), nullable=False),
    sa.Column('message_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['rec_patients.id'], name=op.f('fk_rec_procedures_patient_id_rec_patients')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rec_procedures')),
    sa.UniqueConstraint('patient_id', 'key', name=op.f('uq_rec_procedures_patient_id_key'))
    )
    op.create_table('rec_reports',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('patient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('key', sa.String(length=512), nullable=False),
    sa.Column('fact', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('code', sa.String(length=250), nullable=True),
    sa.Column('code_system', sa.String(length=250), nullable=True),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('filler_number', sa.String(length=250), nullable=True),
    sa.Column('placer_number', sa.String(length=250), nullable=True),
    sa.Column('effective', sa.DateTime(timezone=True), nullable=True),
    sa.Column('issued', sa.DateTime(timezone=True), nullable=True),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('message_uid', sa.String(length=32), nullable=False),
    sa.Column('message_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['rec_patients.id'], name=op.f('fk_rec_reports_patient_id_rec_patients')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rec_reports')),
    sa.UniqueConstraint('patient_id', 'key', name=op.f('uq_rec_reports_patient_id_key'))
    )
    op.create_index('ix_rec_reports_filler_number', 'rec_reports', ['filler_number'], unique=False)
    op.create_index('ix_rec_reports_patient_id_code', 'rec_reports', ['patient_id', 'code'], unique=False)
    op.create_index('ix_rec_reports_placer_number', 'rec_reports', ['placer_number'], unique=False)
    op.create_table('rec_specimens',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('patient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('key', sa.String(length=512), nullable=False),
    sa.Column('fact', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('report_key', sa.String(length=512), nullable=True),
    sa.Column('type_code', sa.String(length=250), nullable=True),
    sa.Column('collected', sa.DateTime(timezone=True), nullable=True),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('message_uid', sa.String(length=32), nullable=False),
    sa.Column('message_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['rec_patients.id'], name=op.f('fk_rec_specimens_patient_id_rec_patients')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rec_specimens')),
    sa.UniqueConstraint('patient_id', 'key', name=op.f('uq_rec_specimens_patient_id_key'))
    )
    op.create_index('ix_rec_specimens_patient_id_report_key', 'rec_specimens', ['patient_id', 'report_key'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_rec_specimens_patient_id_report_key', table_name='rec_specimens')
    op.drop_table('rec_specimens')
    op.drop_index('ix_rec_reports_placer_number', table_name='rec_reports')
    op.drop_index('ix_rec_reports_patient_id_code', table_name='rec_reports')
    op.drop_index('ix_rec_reports_filler_number', table_name='rec_reports')
    op.drop_table('rec_reports')
    op.drop_table('rec_procedures')
    op.drop_index('ix_rec_patient_links_replaced_by_id', table_name='rec_patient_links')
    op.drop_table('rec_patient_links')
    op.drop_index('ix_rec_patient_identifiers_value', table_name='rec_patient_identifiers')
    op.drop_index('ix_rec_patient_identifiers_patient_id', table_name='rec_patient_identifiers')
    op.drop_table('rec_patient_identifiers')
    op.drop_index('ix_rec_observations_patient_id_report_key', table_name='rec_observations')
    op.drop_index('ix_rec_observations_patient_id_code', table_name='rec_observations')
    op.drop_index('ix_rec_observations_patient_id_alt_code', table_name='rec_observations')
    op.drop_table('rec_observations')
    op.drop_table('rec_immunizations')
    op.drop_table('rec_encounters')
    op.drop_table('rec_conditions')
    op.drop_table('rec_allergies')
    op.drop_table('rec_patients')
    op.drop_index('ix_rec_history_kind_fact_id', table_name='rec_history')
    op.drop_table('rec_history')
