"""The embedded queue: rows in ``queue_entries``, in the message store's own database.

Used when no broker is configured. The queue entry is written in the same transaction as the
message row, so a message is durable and queued at the same instant, before the ACK. On PostgreSQL
the transaction also sends ``NOTIFY hl7engine_queued``, which idle workers listen for.
"""

from __future__ import annotations

from sqlalchemy import Connection

from engine.intake.item import Record
from engine.store.bulk import insert_rows
from engine.store.commits import QUEUED
from engine.store.schema import queue_entries


class DatabaseQueue:
    name = "database"
    depth = 1  # nothing to wait for: each transaction completes at once
    wakeup_fd = None

    def ready(self, handle: object) -> bool:
        return True

    def drain_wakeups(self) -> None:
        return None

    COLUMNS = ("message_uid", "partition", "enqueued_at", "available_at", "attempts")

    def start(self, records: list[Record], deadline: float) -> object:
        return None

    def finish(self, conn: Connection, started: object, records: list[Record], deadline: float) -> None:
        rows = []
        for r in records:
            at = r.row[2]  # received_at, already in the driver's form
            rows.append((r.uid, r.partition, at, at, 0))
        cursor = conn.connection.cursor()
        try:
            insert_rows(cursor, conn.dialect.paramstyle, queue_entries, self.COLUMNS, rows)
            if conn.dialect.name == "postgresql":  # delivered with the commit: idle workers look now
                cursor.execute(f"NOTIFY {QUEUED}")
        finally:
            cursor.close()

    def close(self) -> None:
        return None

