"""Message store tables (SQLAlchemy Core). Alembic migrations in ``migrations/`` create them.

``messages`` keeps every message as received (raw bytes) with its lifecycle, the ACK that was
sent and the error with its step. ``queue_entries`` is the embedded queue (used when no broker is
configured): a message and its queue entry are committed in one transaction, before the ACK.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)

# Lifecycle of a stored message (design-notes guarantee 2).
STATUSES = ("received", "queued", "processing", "processed", "filtered", "error", "held", "replayed", "duplicate")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps them as naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        dt: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
        return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


Id = BigInteger().with_variant(Integer, "sqlite")

messages = Table(
    "messages",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("uid", String(32), nullable=False, unique=True),
    Column("channel", String(64), nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    Column("peer", String(64)),
    Column("sending_application", String(250)),
    Column("sending_facility", String(250)),
    Column("receiving_application", String(250)),
    Column("receiving_facility", String(250)),
    Column("message_type", String(16)),
    Column("trigger_event", String(16)),
    Column("structure", String(16)),
    Column("control_id", String(199)),
    Column("processing_id", String(8)),
    Column("version", String(16)),
    Column("charset", String(32)),
    Column("size", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("accepted", Boolean, nullable=False),
    Column("status", String(16), nullable=False),
    Column("duplicate_of", Id, ForeignKey("messages.id")),
    Column("batch_uid", String(32)),
    Column("partition", SmallInteger),
    Column("raw", LargeBinary, nullable=False),
    Column("ack_code", String(2)),
    Column("ack", LargeBinary),
    Column("acked_at", UTCDateTime),
    Column("error_step", String(16)),
    Column("error", Text),
    Column("updated_at", UTCDateTime),
)
# Every index costs a page rewrite per commit on the receiving path, so only these:
# - control ID (+ sending facility): operators' search, and resend detection (same MSH-4 + MSH-10);
# - a partial index on the statuses operators look for (not the many queued/processed rows);
# - uid (unique): the cross-system identity used by the queue, workers and replay.
Index("ix_messages_control_id", messages.c.control_id, messages.c.sending_facility)
Index("ix_messages_status_attention", messages.c.status, messages.c.id,
      sqlite_where=messages.c.status.notin_(["queued", "processed"]),
      postgresql_where=messages.c.status.notin_(["queued", "processed"]))
# - duplicate_of, only on the few duplicate rows: retention keeps an original a newer duplicate points
#   at, and PostgreSQL checks that foreign key when a message row is deleted.
Index("ix_messages_duplicate_of", messages.c.duplicate_of,
      sqlite_where=messages.c.duplicate_of.is_not(None), postgresql_where=messages.c.duplicate_of.is_not(None))

# What operators search messages by (``hl7engine messages --patient/--order``): the patient
# identifiers (PID-2/3/4, MRG-1) and order numbers (ORC/OBR placer and filler, SPM specimen IDs) of
# each message, written by the worker that takes it (off the receiving path, whose indexes are
# kept few) and by ``hl7engine messages reindex`` for the rest.
message_keys = Table(
    "message_keys",
    metadata,
    # no foreign key: the row is written in the transaction that reads the message (a per-row check
    # would cost the workers ~3% for nothing)
    Column("message_id", Id, primary_key=True),
    Column("kind", String(16), primary_key=True),  # patient | order
    Column("value", String(100), primary_key=True),  # CX-1 / EI-1
    Column("authority", String(100), primary_key=True, default=""),  # CX-4.1 / EI-2, or ""
)
Index("ix_message_keys_value", message_keys.c.value, message_keys.c.kind)

queue_entries = Table(
    "queue_entries",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("message_uid", String(32), ForeignKey("messages.uid"), nullable=False),
    Column("partition", SmallInteger, nullable=False),
    Column("enqueued_at", UTCDateTime, nullable=False),
    Column("available_at", UTCDateTime, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("claimed_by", String(64)),
    Column("claimed_at", UTCDateTime),
)
# no secondary index (migration 0011): workers claim in id order, which the primary key answers, and
# each index here would cost every commit of the receiving path

message_events = Table(
    "message_events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("message_id", Id, nullable=False),  # no foreign key (migration 0010), as message_keys
    Column("at", UTCDateTime, nullable=False),
    Column("status", String(16), nullable=False),
    Column("step", String(16)),
    Column("detail", Text),
)
Index("ix_message_events_message_id", message_events.c.message_id)

# Messages this engine owes to other systems, written in the transaction that decides them and
# delivered afterwards (at least once, in id order per stream): the application ACKs of enhanced-mode
# channels (kind app_ack), sent to the sender's own listener, and messages forwarded to a route's
# mllp or file destinations (kind mllp, file).
OUTBOUND_STATUSES = ("pending", "sent", "refused", "expired", "cancelled")  # cancelled: by an operator
outbound = Table(
    "outbound",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("message_id", Id, nullable=False),  # the message it answers (no foreign key, as message_keys)
    Column("kind", String(16), nullable=False),  # app_ack, or a route destination's type: mllp, file
    Column("channel", String(64), nullable=False),  # the message's channel
    # the ordered stream: rows of one (kind, target) are delivered in id order. app_ack: the channel;
    # mllp, file: the destination's name in routes.yaml
    Column("target", String(64), nullable=False, server_default=""),
    Column("destination", String(300), nullable=False),  # host:port; file: the file name in its directory
    Column("control_id", String(64), nullable=False),  # MSH-10 sent (app_ack: ours, the same on every attempt)
    Column("code", String(2), nullable=False),  # app_ack: MSA-1 we send (AA, AE); forwards: empty
    Column("payload", LargeBinary, nullable=False),
    Column("status", String(16), nullable=False, default="pending"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False),
    Column("due_at", UTCDateTime, nullable=False),  # since when it is owed: created_at, or a resend
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("sent_at", UTCDateTime),
    Column("answer", String(300)),  # the peer's MSA-1 and text
    Column("last_error", Text),
)
Index("ix_outbound_status_next_attempt_at", outbound.c.status, outbound.c.next_attempt_at)
Index("ix_outbound_message_id", outbound.c.message_id)

# Patients whose stream is parked (design-notes guarantee 4): a message of theirs failed; their
# later messages are held (status held) until it is replayed or skipped.
parked_patients = Table(
    "parked_patients",
    metadata,
    Column("patient_key", String(300), primary_key=True),
    Column("message_uid", String(32), nullable=False),
    Column("parked_at", UTCDateTime, nullable=False),
)

# Worker processes consuming RabbitMQ, one row each (engine/worker/members.py): a heartbeat on the
# database's clock, and the partitions the process consumes. Every member computes the same
# assignment of partitions from the live rows, so adding or removing a worker rebalances the work.
worker_members = Table(
    "worker_members",
    metadata,
    Column("id", String(100), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", Float, nullable=False),  # epoch seconds, database clock
    Column("heartbeat_at", Float, nullable=False),  # epoch seconds, database clock
    Column("partitions", Text, nullable=False, default=""),  # consumed now, e.g. "0,3,5"
)

