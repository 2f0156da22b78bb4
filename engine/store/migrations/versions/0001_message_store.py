"""message store

Revision ID: 0001
Revises: 
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op



revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('messages',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('uid', sa.String(length=32), nullable=False),
    sa.Column('channel', sa.String(length=64), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('peer', sa.String(length=64), nullable=True),
    sa.Column('sending_application', sa.String(length=250), nullable=True),
    sa.Column('sending_facility', sa.String(length=250), nullable=True),
    sa.Column('receiving_application', sa.String(length=250), nullable=True),
    sa.Column('receiving_facility', sa.String(length=250), nullable=True),
    sa.Column('message_type', sa.String(length=16), nullable=True),
    sa.Column('trigger_event', sa.String(length=16), nullable=True),
    sa.Column('structure', sa.String(length=16), nullable=True),
    sa.Column('control_id', sa.String(length=199), nullable=True),
    sa.Column('processing_id', sa.String(length=8), nullable=True),
    sa.Column('version', sa.String(length=16), nullable=True),
    sa.Column('charset', sa.String(length=32), nullable=True),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('accepted', sa.Boolean(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('duplicate_of', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('batch_uid', sa.String(length=32), nullable=True),
    sa.Column('partition', sa.SmallInteger(), nullable=True),
    sa.Column('raw', sa.LargeBinary(), nullable=False),
    sa.Column('ack_code', sa.String(length=2), nullable=True),
    sa.Column('ack', sa.LargeBinary(), nullable=True),
    sa.Column('acked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error_step', sa.String(length=16), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['duplicate_of'], ['messages.id'], name=op.f('fk_messages_duplicate_of_messages')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_messages')),
    sa.UniqueConstraint('uid', name=op.f('uq_messages_uid'))
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index('ix_messages_control_id', ['control_id', 'sending_facility'], unique=False)
        batch_op.create_index('ix_messages_status_attention', ['status', 'id'], unique=False, sqlite_where=sa.text("(status NOT IN ('queued', 'processed'))"), postgresql_where=sa.text("(status NOT IN ('queued', 'processed'))"))

    op.create_table('message_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('message_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('step', sa.String(length=16), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['message_id'], ['messages.id'], name=op.f('fk_message_events_message_id_messages')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_message_events'))
    )
    with op.batch_alter_table('message_events', schema=None) as batch_op:
        batch_op.create_index('ix_message_events_message_id', ['message_id'], unique=False)

    op.create_table('queue_entries',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('message_uid', sa.String(length=32), nullable=False),
    sa.Column('partition', sa.SmallInteger(), nullable=False),
    sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('available_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('claimed_by', sa.String(length=64), nullable=True),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['message_uid'], ['messages.uid'], name=op.f('fk_queue_entries_message_uid_messages')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_queue_entries'))
    )
    with op.batch_alter_table('queue_entries', schema=None) as batch_op:
        batch_op.create_index('ix_queue_entries_partition_id', ['partition', 'id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('queue_entries', schema=None) as batch_op:
        batch_op.drop_index('ix_queue_entries_partition_id')

    op.drop_table('queue_entries')
    with op.batch_alter_table('message_events', schema=None) as batch_op:
        batch_op.drop_index('ix_message_events_message_id')

    op.drop_table('message_events')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_status_attention', sqlite_where=sa.text("(status NOT IN ('queued', 'processed'))"), postgresql_where=sa.text("(status NOT IN ('queued', 'processed'))"))
        batch_op.drop_index('ix_messages_control_id')

    op.drop_table('messages')
