"""record write cost, second part: the observations' alternate-code index leaves out the rows
without one; message events no longer check their foreign key to messages

- ``ix_rec_observations_patient_id_alt_code`` only lists observations that have an alternate code
  (OBX-3's second coding, or the code a ``lab_codes`` table adds). Many senders send one coding:
  every such row cost an index entry that no search can use (``alt_code = X`` implies it is not
  null, so the searches use the partial index as they used the full one). Measured: inserting
  200,000 observation rows without alternate codes took 9-15% less time.
- ``message_events.message_id`` is no longer a foreign key (as ``message_keys`` and ``outbound``):
  events are written only by the worker and replay, for a message row they hold locked in the same
  transaction, and retention deletes a message's events with it. The check ran a query per event:
  inserting 100,000 events into a copy of the table took 2.8 times as long with it (rows of messages
  not locked before; perf put the check at about 5% of PostgreSQL's CPU in a worker's transactions).

On PostgreSQL the index is built again (``CREATE INDEX`` takes a lock that blocks writes to
rec_observations while it runs: plan it for a quiet hour on a large record). On SQLite
message_events is copied without the constraint (Alembic's batch mode).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

INDEX = 'ix_rec_observations_patient_id_alt_code'
FK = 'fk_message_events_message_id_messages'


def upgrade() -> None:
    op.drop_index(INDEX, table_name='rec_observations')
    op.create_index(INDEX, 'rec_observations', ['patient_id', 'alt_code'], unique=False,
                    postgresql_where=sa.text('alt_code IS NOT NULL'), sqlite_where=sa.text('alt_code IS NOT NULL'))
    with op.batch_alter_table('message_events') as batch:
        batch.drop_constraint(FK, type_='foreignkey')


def downgrade() -> None:
    with op.batch_alter_table('message_events') as batch:
        batch.create_foreign_key(FK, 'messages', ['message_id'], ['id'])
    op.drop_index(INDEX, table_name='rec_observations')
    op.create_index(INDEX, 'rec_observations', ['patient_id', 'alt_code'], unique=False)
