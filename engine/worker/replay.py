"""Replay or skip a failed message, releasing its patient's held messages in order.

- ``replay``: the failed message is queued again (status ``replayed``), then every message of the
  same patient that was held behind it, in arrival order. If it fails again, it parks its patient
  again and the ones behind it are held again: order is never broken.
- ``skip``: the failed message stays ``error`` (an event records the skip); the held messages are
  queued again in arrival order.

Queued again means: a ``queue_entries`` row (embedded) or a persistent, confirmed publish to the
message's partition queue (RabbitMQ), exactly as at receipt.

- ``requeue_stuck``: messages still waiting (``queued`` or ``replayed``) long after their last
  change whose queue entry is gone — the broker lost its data, a queue was deleted by hand, the
  embedded queue file was restored from an older backup — are queued again, in arrival order. A
  message queued twice is processed once (the second delivery finds it final).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from engine.errors import EngineError
from engine.settings import Settings
from engine.store.schema import message_events, messages, parked_patients, queue_entries

# what queueing a stored message again needs (a queue entry, or the publish as at receipt)
QUEUE_COLUMNS = (messages.c.id, messages.c.uid, messages.c.partition, messages.c.raw, messages.c.charset,
                 messages.c.channel, messages.c.received_at, messages.c.control_id, messages.c.sending_facility,
                 messages.c.batch_uid, messages.c.message_type, messages.c.trigger_event)


class ReplayError(EngineError):
    pass


@dataclass(slots=True)
class Released:
    replayed: str | None
    queued: list[str]  # uids queued again, in order


class Requeue:
    """Where queued-again messages go: one broker connection for many calls (a bulk replay), opened
    when first needed; ``close`` it after. Without a broker: the embedded queue, in the caller's
    transaction."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._publisher: Any = None

    def __call__(self, conn: Any, rows: Sequence[Any], now: datetime) -> None:
        if self.settings.broker_url:
            if rows:
                _publish(rows, self._connect())
        elif rows:
            conn.execute(insert(queue_entries), [
                {"message_uid": r.uid, "partition": r.partition or 0, "enqueued_at": now, "available_at": now,
                 "attempts": 0} for r in rows])

    def _connect(self) -> Any:
        from engine.queue.rabbitmq import RabbitPublisher, declare_topology

        if self._publisher is None:
            url = self.settings.broker_url
            assert url is not None
            try:  # idempotent; and what puts back a partition queue deleted by hand
                declare_topology(url, self.settings.queue_name, self.settings.queue_partitions)
            except Exception as exc:
                raise ReplayError(f"broker unavailable: {str(exc)[:200]}") from None
            publisher = RabbitPublisher(url, self.settings.queue_name)
            if not publisher.wait_connected(10):
                publisher.close()
                raise ReplayError(f"broker unavailable: {publisher.last_error}")
            self._publisher = publisher
        return self._publisher

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None


def release(engine: Engine, settings: Settings, message_id: int, *, skip: bool,
            requeue: Requeue | None = None) -> Released:
    """Replay (or skip) one failed message; ``requeue`` lets several calls share a broker connection."""
    own = requeue is None
    enqueue = requeue if requeue is not None else Requeue(settings)
    try:
        return _release(engine, message_id, skip=skip, enqueue=enqueue)
    finally:
        if own:
            enqueue.close()


def _release(engine: Engine, message_id: int, *, skip: bool, enqueue: Requeue) -> Released:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        row = conn.execute(select(messages.c.id, messages.c.uid, messages.c.status, messages.c.partition,
                                  messages.c.accepted, messages.c.error_step)
                           .where(messages.c.id == message_id)).first()
        if row is None:
            raise ReplayError(f"no message with id {message_id}")
        if row.status != "error":
            raise ReplayError(f"message {message_id} has status {row.status}; only messages in error are "
                              "replayed or skipped")
        if not row.accepted:
            # refused at the door (AR), or not stored when it arrived (AE): the sender was told so and
            # sends it again; queueing this copy would bypass the channel's checks or apply it twice
            raise ReplayError(f"message {message_id} was never accepted (step {row.error_step}: the sender was "
                              "answered AR or AE and must send it again); only messages that failed in "
                              "processing are replayed or skipped")
        parked = conn.execute(select(parked_patients.c.patient_key)
                              .where(parked_patients.c.message_uid == row.uid)).first()
        held = conn.execute(
            select(*QUEUE_COLUMNS)
            .where(messages.c.status == "held", messages.c.error.contains(f"({row.uid})"))
            .order_by(messages.c.id)
        ).all()
        if parked is not None:
            conn.execute(delete(parked_patients).where(parked_patients.c.patient_key == parked.patient_key))
        ids = ([] if skip else [row.id]) + [h.id for h in held]
        conn.execute(insert(message_events).values(message_id=row.id, at=now, status="error" if skip else "replayed",
                                                   step="operator", detail="skipped" if skip else "replayed"))
        if not skip:
            conn.execute(update(messages).where(messages.c.id == row.id)
                         .values(status="replayed", error_step=None, error=None, updated_at=now))
        for h in held:
            conn.execute(update(messages).where(messages.c.id == h.id)
                         .values(status="queued", error_step=None, error=None, updated_at=now))
        rows = conn.execute(
            select(*QUEUE_COLUMNS)
            .where(messages.c.id.in_(ids)).order_by(messages.c.id)
        ).all()
        enqueue(conn, rows, now)  # inside the transaction: if the broker fails, nothing changes
    return Released(None if skip else row.uid, [r.uid for r in rows])


STUCK = ("queued", "replayed")


def requeue_stuck(engine: Engine, settings: Settings, *, older_than: timedelta, dry_run: bool = False,
                  limit: int = 100_000) -> list[int]:
    """Queue again the messages waiting (status queued/replayed) since before ``older_than`` ago:
    with RabbitMQ every such message (the broker cannot be asked for one message; a duplicate is
    harmless), embedded only those without a queue entry. Returns their ids, in arrival order."""
    now = datetime.now(UTC)
    q = select(*QUEUE_COLUMNS).where(messages.c.status.in_(STUCK), messages.c.updated_at < now - older_than)
    if not settings.broker_url:
        q = q.where(~select(queue_entries.c.id).where(queue_entries.c.message_uid == messages.c.uid).exists())
    enqueue = Requeue(settings)
    with engine.begin() as conn:
        rows = conn.execute(q.order_by(messages.c.id).limit(limit)).all()
        if dry_run or not rows:
            return [r.id for r in rows]
        try:
            for start in range(0, len(rows), 500):
                chunk = rows[start:start + 500]
                enqueue(conn, chunk, now)
                conn.execute(insert(message_events), [
                    {"message_id": r.id, "at": now, "status": "queued", "step": "operator", "detail": "requeued"}
                    for r in chunk])
                conn.execute(update(messages).where(messages.c.id.in_([r.id for r in chunk])).values(updated_at=now))
        finally:
            enqueue.close()
    return [r.id for r in rows]


def _publish(rows: Sequence[Any], publisher: Any) -> None:
    """Publish stored messages again, as at receipt (persistent, confirmed), marked as a replay."""
    import pika

    batch = []
    for r in rows:
        label = f"{r.message_type}^{r.trigger_event}" if r.trigger_event else (r.message_type or "")
        batch.append((str(r.partition or 0), bytes(r.raw), pika.BasicProperties(
            delivery_mode=2, message_id=r.uid, timestamp=int(r.received_at.timestamp()),
            content_type="application/hl7-v2", content_encoding=r.charset, type=label,
            headers={"channel": r.channel, "control_id": r.control_id or "",
                     "sending_facility": r.sending_facility or "", "received_at": r.received_at.isoformat(),
                     "partition": r.partition or 0, "batch_uid": r.batch_uid or "", "replay": True},
        )))
    try:
        publisher.publish(batch, 30)
    except EngineError as exc:
        raise ReplayError(str(exc)) from None
