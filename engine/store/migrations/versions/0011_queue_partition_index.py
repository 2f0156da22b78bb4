"""the embedded queue drops its (partition, id) index, which no claim used

``ix_queue_entries_partition_id`` dates from the first schema. Workers claim entries in id order
(``ORDER BY id LIMIT n``, with ``partition % count = index`` when several share the queue): the
primary key answers that, and the index never served it. The store writer still paid for it on every
commit: with eight partitions each transaction of the receiving path rewrote up to eight of its leaf
pages. Measured on SQLite (batches of 16 ORU, store writer alone): 22% fewer page writes and 19%
fewer bytes written to the write-ahead log per message; the embedded engine's peak throughput
(32 connections) rose about 18% in alternating runs.

The one reader it did serve is the ``/metrics`` gauge of waiting messages per partition (at most once
per ``ttl``), which now counts by scanning the table: with a backlog of a million entries, 0.34 s
instead of 0.05 s on SQLite, once per scrape interval and without blocking writers.

Dropping the index takes no time on either database; the downgrade builds it again.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08
"""

from __future__ import annotations

from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

INDEX = 'ix_queue_entries_partition_id'


def upgrade() -> None:
    op.drop_index(INDEX, table_name='queue_entries')


def downgrade() -> None:
    op.create_index(INDEX, 'queue_entries', ['partition', 'id'], unique=False)
