"""Where workers take messages from: the embedded queue table, or RabbitMQ.

Both keep per-partition order: a partition's messages are processed one after another, and a
transient failure retries the same message (with backoff) instead of moving past it.

- Embedded (``queue_entries``): the entry is deleted in the same transaction that writes the facts
  and the status, so the effect is exactly once. Worker processes split the partitions between
  them (partition % count == index); for several hosts use RabbitMQ.
- RabbitMQ: one consumer per partition queue with manual acks and a prefetch window; the queues are
  declared single-active-consumer, so when workers on several hosts consume the same partition only
  one is active and order holds. A message is acked after its transaction commits; a redelivered
  one finds its status final and is acked again without effect (idempotent). A permanent failure
  is rejected without requeue: it goes to the dead-letter queue, and stays in the store as error,
  ready for replay.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Engine, delete, insert, select

from engine.hl7.charsets import clean
from engine.hl7.header import read_header
from engine.observe import get_logger
from engine.store.schema import messages, queue_entries
from engine.worker.processor import Outcome, Processor, RetryLater

log = get_logger("engine.worker")

T = TypeVar("T")
BATCH = 50  # messages per transaction: one commit (one fsync) for all of them
ADOPT_AFTER = 60.0  # seconds: a queued message whose row is still missing after this was never committed


class Backoff:
    def __init__(self, first: float = 0.1, most: float = 10.0) -> None:
        self.first, self.most, self.delay = first, most, first

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.delay * 2, self.most)
        return d

    def reset(self) -> None:
        self.delay = self.first


def retrying(process: Callable[[], T], stop: threading.Event, sleep: Callable[[float], object]) -> T | None:
    """Run ``process`` until it does not raise RetryLater (None if stopped first)."""
    backoff = Backoff()
    while not stop.is_set():
        try:
            return process()
        except RetryLater as exc:
            delay = backoff.next()
            log.warning("transient failure, retrying", reason=str(exc)[:200], delay=delay)
            sleep(delay)
    return None


def run_db_queue(processor: Processor, engine: Engine, stop: threading.Event, *, index: int = 0, count: int = 1,
                 batch: int = BATCH, on_outcome: Callable[[Outcome], None] | None = None) -> None:
    """Consume the embedded queue until ``stop`` is set: up to ``batch`` messages per transaction."""
    q = select(queue_entries.c.id, queue_entries.c.message_uid).order_by(queue_entries.c.id).limit(batch)
    if count > 1:
        q = q.where((queue_entries.c.partition % count) == index)
    idle = Backoff(0.01, 0.25)
    while not stop.is_set():
        try:
            with engine.connect() as conn:
                rows = conn.execute(q).all()
        except Exception as exc:  # database down: wait for it
            log.warning("embedded queue unreadable", error=str(exc)[:200])
            stop.wait(idle.next())
            continue
        if not rows:
            stop.wait(idle.next())
            continue
        idle.reset()
        ids = [entry_id for entry_id, _ in rows]

        def delete_entries(conn: Any, ids: list[int] = ids) -> None:
            conn.execute(delete(queue_entries).where(queue_entries.c.id.in_(ids)))

        # every entry is deleted by the last item's ``after``: once, in the batch's transaction
        items: list[tuple[str, Callable[[Any], None] | None]] = [(uid, None) for _, uid in rows]
        items[-1] = (items[-1][0], delete_entries)
        def once(items: list[tuple[str, Callable[[Any], None] | None]] = items) -> list[Outcome]:
            return processor.process_batch(items)

        outcomes = retrying(once, stop, stop.wait)
        if outcomes is None:
            return
        if on_outcome is not None:
            for outcome in outcomes:
                on_outcome(outcome)


def run_rabbit(processor: Processor, engine: Engine, url: str, name: str, partitions: list[int],
               stop: threading.Event, *, prefetch: int = 2 * BATCH,
               on_outcome: Callable[[Outcome], None] | None = None) -> None:
    """Consume ``<name>.p<N>`` for each partition until ``stop`` is set; reconnects by itself."""
    import pika

    from engine.queue.rabbitmq import connection_parameters, queue_names

    names = queue_names(name, max(partitions) + 1) if partitions else []
    backoff = Backoff(0.5, 10)
    while not stop.is_set():
        try:
            conn = pika.BlockingConnection(connection_parameters(url))
        except Exception as exc:
            log.warning("broker unreachable", error=str(exc)[:200])
            stop.wait(backoff.next())
            continue
        backoff.reset()
        try:
            ch = conn.channel()
            ch.basic_qos(prefetch_count=prefetch)

            pending: list[tuple[Any, Any, bytes]] = []  # (delivery tag, properties, body), in order

            def on_message(ch: Any, method: Any, props: Any, body: bytes,
                           pending: list[tuple[Any, Any, bytes]] = pending) -> None:
                pending.append((method.delivery_tag, props, body))

            def flush(ch: Any = ch, conn: Any = conn, pending: list[tuple[Any, Any, bytes]] = pending) -> bool:
                """Process what was delivered in one transaction, then ack. False when stopping."""
                batch = pending[:]
                pending.clear()

                def once() -> list[Outcome]:
                    outcomes = processor.process_batch([(props.message_id or "", None) for _, props, _ in batch])
                    missing = [i for i, o in enumerate(outcomes) if o.status == "missing"]
                    if missing:  # raises RetryLater while the writer may still be committing them
                        for i in missing:
                            adopt(engine, batch[i][1].message_id or "", batch[i][1], batch[i][2])
                        outcomes = processor.process_batch([(props.message_id or "", None) for _, props, _ in batch])
                    return outcomes

                outcomes = retrying(once, stop, conn.sleep)
                if outcomes is None:  # stopping: leave them unacked, they will be redelivered
                    return False
                settle(ch, [(tag, outcome.status == "error") for (tag, _, _), outcome in zip(batch, outcomes,
                                                                                          strict=True)])
                if on_outcome is not None:
                    for outcome in outcomes:
                        on_outcome(outcome)
                return True

            for p in partitions:
                ch.basic_consume(names[p], on_message, auto_ack=False)
            log.info("consuming", queues=len(partitions), prefetch=prefetch)
            while not stop.is_set():
                conn.process_data_events(time_limit=0.2 if not pending else 0)
                if pending and not flush():
                    break
            ch.cancel()
            conn.close()
            return
        except Exception as exc:
            log.warning("broker connection lost", error=str(exc)[:200])
            try:
                conn.close()
            except Exception:
                log.debug("closing a failed broker connection failed")
            stop.wait(backoff.next())


def settle(ch: Any, deliveries: list[tuple[int, bool]]) -> None:
    """Ack the deliveries ``(delivery tag, failed)`` of a committed batch; a failed one is rejected
    (to the dead-letter queue; the store says error). Runs of successes are acked with one
    ``multiple`` ack each (one frame and one write instead of one per message): a failed tag is
    rejected before any ack passes it, so it is never acked."""
    run_end: int | None = None
    for tag, failed in sorted(deliveries):
        if failed:
            if run_end is not None:
                ch.basic_ack(run_end, multiple=True)
                run_end = None
            ch.basic_nack(tag, requeue=False)
        else:
            run_end = tag
    if run_end is not None:
        ch.basic_ack(run_end, multiple=True)


def adopt(engine: Engine, uid: str, props: Any, body: bytes) -> None:
    """A queued message without its store row: the writer published it and then failed to commit
    (the sender got no AA and will resend). Once it is clearly not a commit still under way, store
    it so it is processed like any other (the record's dedupe keys make the resend harmless)."""
    headers = props.headers or {}
    received = headers.get("received_at") or ""
    try:
        received_at = datetime.fromisoformat(received)
    except ValueError:
        received_at = datetime.fromtimestamp(props.timestamp or time.time(), UTC)
    if (datetime.now(UTC) - received_at).total_seconds() < ADOPT_AFTER:
        raise RetryLater("message row not committed yet")
    charset = props.content_encoding or "utf-8"
    h = read_header(body, charset)

    def c(v: str) -> str:
        return clean(v, charset)

    with engine.begin() as conn:
        if conn.execute(select(messages.c.id).where(messages.c.uid == uid)).first() is not None:
            return
        now = datetime.now(UTC)
        conn.execute(insert(messages).values(
            uid=uid, channel=str(headers.get("channel") or "unknown"), received_at=received_at,
            sending_application=c(h.sending_application)[:250], sending_facility=c(h.sending_facility)[:250],
            receiving_application=c(h.receiving_application)[:250], receiving_facility=c(h.receiving_facility)[:250],
            message_type=c(h.message_type)[:16], trigger_event=c(h.trigger_event)[:16], structure=c(h.structure)[:16],
            control_id=c(h.control_id)[:199], processing_id=c(h.processing_id)[:8], version=c(h.version)[:16],
            charset=charset,
            size=len(body), sha256=hashlib.sha256(body).hexdigest(), accepted=True, status="queued",
            partition=headers.get("partition"), raw=body, error_step="store",
            error="adopted by a worker: queued, but its store row was never committed (no ACK outcome known)",
            updated_at=now,
        ))
    log.warning("adopted a queued message without a store row", uid=uid)
