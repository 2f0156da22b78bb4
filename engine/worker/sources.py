"""Where workers take messages from: the embedded queue table, or RabbitMQ.

Both keep per-partition order: a partition's messages are processed one after another, and a
transient failure retries the same message (with backoff) instead of moving past it.

- Embedded (``queue_entries``): the entry is deleted in the same transaction that writes the facts
  and the status, so the effect is exactly once. Worker processes split the partitions between
  them (partition % count == index); for several hosts use RabbitMQ.
- RabbitMQ: one channel and consumer per partition queue, manual acks and a prefetch window. Which
  worker process consumes which partitions is decided by ``members`` (a heartbeat table shared by
  every worker on every host); the queues are declared single-active-consumer, so while a partition
  moves from one worker to another only one of them is active, and order holds. A message is acked
  after its transaction commits; a redelivered one finds its status final and is acked again
  without effect (idempotent). A permanent failure is rejected without requeue: it goes to the
  dead-letter queue, and stays in the store as error, ready for replay.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Engine, Select, delete, insert, select

from engine.hl7.charsets import clean
from engine.hl7.header import read_header
from engine.observe import get_logger
from engine.store.commits import QUEUED, CommitSignal
from engine.store.schema import messages, queue_entries
from engine.worker.processor import NotCommittedYet, Outcome, Processor, RetryLater

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
    """Run ``process`` until it does not raise RetryLater (None if stopped first).

    A message row not committed yet (NotCommittedYet) is the normal race between the store writer's
    commit and the broker's delivery, over within milliseconds: it is retried after 5 ms, doubling
    up to 5 s, and logged (as a warning) only once it has lasted a second. Any other transient failure waits
    0.1 s, doubling up to 10 s, and is logged each time."""
    backoff = Backoff()
    soon = Backoff(0.005, 5.0)
    waited = 0.0
    while not stop.is_set():
        try:
            return process()
        except NotCommittedYet as exc:
            delay = soon.next()
            waited += delay
            if waited >= 1.0:
                log.warning("transient failure, retrying", reason=str(exc)[:200], delay=delay)
            sleep(delay)
        except RetryLater as exc:
            delay = backoff.next()
            log.warning("transient failure, retrying", reason=str(exc)[:200], delay=delay)
            sleep(delay)
    return None


def claim_query(batch: int, index: int = 0, count: int = 1) -> Select[tuple[int, str]]:
    """The oldest ``batch`` entries of the embedded queue for worker ``index`` of ``count``: in id
    order, which the primary key answers without a sort (the table has no other index: each would
    cost every commit of the receiving path)."""
    q = select(queue_entries.c.id, queue_entries.c.message_uid).order_by(queue_entries.c.id).limit(batch)
    if count > 1:
        q = q.where((queue_entries.c.partition % count) == index)
    return q


def run_db_queue(processor: Processor, engine: Engine, stop: threading.Event, *, index: int = 0, count: int = 1,
                 batch: int = BATCH, on_outcome: Callable[[Outcome], None] | None = None,
                 idle: Backoff | None = None) -> None:
    """Consume the embedded queue until ``stop`` is set: up to ``batch`` messages per transaction.

    When the queue is empty, wait for the store's next commit (``CommitSignal``: on SQLite any
    commit, at most a second between reads; on PostgreSQL the store writer's NOTIFY) or ``idle``
    (default 10 ms, doubling up to 0.25 s), whichever comes first."""
    q = claim_query(batch, index, count)
    idle = idle if idle is not None else Backoff(0.01, 0.25)
    # the queue is read through the processor's reader: on SQLite an engine whose transactions do
    # not take the write lock (the worker's own begins BEGIN IMMEDIATE)
    reader = processor.reader if engine is processor.engine else engine
    signal = CommitSignal(reader, QUEUED)
    try:
        while not stop.is_set():
            signal.arm()
            try:
                with reader.connect() as conn:
                    rows = conn.execute(q).all()
            except Exception as exc:  # database down: wait for it
                log.warning("embedded queue unreadable", error=str(exc)[:200])
                stop.wait(idle.next())
                continue
            if not rows:
                signal.wait(stop, idle.next())
                continue
            idle.reset()
            _process_entries(processor, rows, stop, on_outcome)
    finally:
        signal.close()


def _process_entries(processor: Processor, rows: Sequence[Any], stop: threading.Event,
                     on_outcome: Callable[[Outcome], None] | None) -> None:
    """Process one read of the embedded queue in one transaction, which deletes its entries."""
    ids = [entry_id for entry_id, _ in rows]

    def delete_entries(conn: Any) -> None:
        conn.execute(delete(queue_entries).where(queue_entries.c.id.in_(ids)))

    # every entry is deleted by the last item's ``after``: once, in the batch's transaction
    items: list[tuple[str, Callable[[Any], None] | None]] = [(uid, None) for _, uid in rows]
    items[-1] = (items[-1][0], delete_entries)
    outcomes = retrying(lambda: processor.process_batch(items), stop, stop.wait)
    if outcomes is not None and on_outcome is not None:
        for outcome in outcomes:
            on_outcome(outcome)


TICK = 1.0  # seconds between asking which partitions to consume


def run_rabbit(processor: Processor, engine: Engine, url: str, name: str,
               partitions: Sequence[int] | Callable[[Sequence[int]], Sequence[int] | None], stop: threading.Event,
               *, prefetch: int = BATCH, on_outcome: Callable[[Outcome], None] | None = None,
               declare: int = 0) -> None:
    """Consume ``<name>.p<N>`` until ``stop`` is set; reconnects by itself. With ``declare``, first
    declare the exchange and that many partition queues (idempotent; a worker may start first).

    ``partitions`` is a fixed list, or a function called about every second with the partitions
    consumed now that returns those to consume (None: no change), e.g. ``Membership.beat``. Each
    partition queue has its own channel (and ``prefetch``), so one can be handed over alone: its
    channel is dropped (``drop_channel``) between batches, and RabbitMQ gives the queue, with what was
    delivered but not processed back at its head, to the next consumer.
    """
    import pika

    from engine.queue.rabbitmq import connection_parameters, declare_topology

    wanted = partitions if callable(partitions) else (lambda _now, fixed=list(partitions): fixed)
    backoff = Backoff(0.5, 10)
    while not stop.is_set():
        try:
            if declare:
                declare_topology(url, name, declare)
            conn = pika.BlockingConnection(connection_parameters(url))
        except Exception as exc:
            log.warning("broker unreachable", error=str(exc)[:200])
            stop.wait(backoff.next())
            continue
        backoff.reset()
        try:
            _Consumer(processor, engine, conn, name, prefetch, stop, on_outcome).run(wanted)
            conn.close()
            return
        except Exception as exc:
            log.warning("broker connection lost", error=str(exc)[:200])
            try:
                conn.close()
            except Exception:
                log.debug("closing a failed broker connection failed")
            stop.wait(backoff.next())


class _Consumer:
    """One broker connection's consumption: a channel per partition, batches in delivery order."""

    def __init__(self, processor: Processor, engine: Engine, conn: Any, name: str, prefetch: int,
                 stop: threading.Event, on_outcome: Callable[[Outcome], None] | None) -> None:
        self.processor, self.engine, self.conn, self.name = processor, engine, conn, name
        self.prefetch, self.stop, self.on_outcome = prefetch, stop, on_outcome
        self.channels: dict[int, Any] = {}
        # delivered, not yet settled, in arrival order: (partition, delivery tag, properties, body)
        self.pending: list[tuple[int, int, Any, bytes]] = []

    def run(self, wanted: Callable[[Sequence[int]], Sequence[int] | None]) -> None:
        next_tick = 0.0
        while not self.stop.is_set():
            if time.monotonic() >= next_tick:
                self.rebalance(wanted(sorted(self.channels)))
                next_tick = time.monotonic() + TICK
            self.conn.process_data_events(time_limit=0.2 if not self.pending else 0)
            if self.pending and not self.flush():
                break
        for ch in self.channels.values():  # unprocessed deliveries return to their queues, in order
            drop_channel(ch)

    def on_message(self, partition: int, ch: Any, method: Any, props: Any, body: bytes) -> None:
        if self.channels.get(partition) is ch:
            self.pending.append((partition, method.delivery_tag, props, body))

    def flush(self) -> bool:
        """Process up to 2 * BATCH delivered messages in one transaction, then ack them. False when
        stopping (they are put back, unsettled)."""
        batch = self.pending[:2 * BATCH]
        del self.pending[:2 * BATCH]
        done: list[Outcome | None] = [None] * len(batch)

        def handle(indices: list[int]) -> None:
            outs = self.processor.process_batch([(batch[i][2].message_id or "", None) for i in indices])
            for i, o in zip(indices, outs, strict=True):
                done[i] = o

        def once() -> list[Outcome]:
            # only what has no outcome yet: a pass that committed is not handled again when a later
            # step asks for a retry (an orphan not adopted yet), or a failed message would be failed,
            # logged and counted twice
            handle([i for i, o in enumerate(done) if o is None or o.status == "missing"])
            missing = [i for i, o in enumerate(done) if o is not None and o.status == "missing"]
            if missing:  # raises RetryLater while the writer may still be committing them
                for i in missing:
                    adopt(self.engine, batch[i][2].message_id or "", batch[i][2], batch[i][3])
                handle(missing)
            outcomes = [o for o in done if o is not None]
            assert len(outcomes) == len(batch)
            return outcomes

        outcomes = retrying(once, self.stop, self.conn.sleep)
        if outcomes is None:
            self.pending[:0] = batch
            return False
        settled: dict[int, list[tuple[int, bool]]] = {}
        for (p, tag, _, _), outcome in zip(batch, outcomes, strict=True):
            settled.setdefault(p, []).append((tag, outcome.status == "error"))
        for p, deliveries in settled.items():
            settle(self.channels[p], deliveries)
        if self.on_outcome is not None:
            for outcome in outcomes:
                self.on_outcome(outcome)
        return True

    def rebalance(self, want: Sequence[int] | None) -> None:
        """Consume the partitions in ``want`` (None: no change)."""
        from engine.queue.rabbitmq import queue_name

        if want is None:
            return
        lost = sorted(set(self.channels) - set(want))
        gained = sorted(set(want) - set(self.channels))
        if lost:  # what was delivered and not processed goes back to the queue, in order
            self.pending[:] = [d for d in self.pending if d[0] not in lost]
            for p in lost:
                drop_channel(self.channels.pop(p))
        for p in gained:
            ch = self.conn.channel()
            ch.basic_qos(prefetch_count=self.prefetch)
            ch.basic_consume(queue_name(self.name, p), functools.partial(self.on_message, p), auto_ack=False)
            self.channels[p] = ch
        if lost or gained:
            log.info("consuming", partitions=",".join(map(str, sorted(self.channels))) or "none",
                     released=",".join(map(str, lost)), prefetch=self.prefetch)


def drop_channel(ch: Any) -> None:
    """Close a consuming channel without cancelling its consumer first.

    RabbitMQ then treats the consumer as gone (as when a worker dies): in one step it puts every
    message the channel had not acknowledged back at the head of the queue, in delivery order, and
    makes the next single-active consumer active, which receives them first. A Basic.Cancel before
    the close (what pika's ``close`` does) would make the next consumer active while this channel
    still holds messages, and those would come back after later ones: a patient's order broken.
    (Seen in tests/test_members.py. pika 1.x has no public call for this: the consumers are marked
    as already cancelled on the channel implementation, so its ``close`` sends Channel.Close alone.)
    """
    impl = ch._impl
    impl._cancelled.update(impl._consumers)
    ch._consumer_infos.clear()
    ch.close()


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
        raise NotCommittedYet("message row not committed yet")
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
