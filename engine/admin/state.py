"""Gauges of the shared state for /metrics: what waits in the queue, what failed, who is parked,
what is owed to other systems.

The counters of the listeners and workers say what happened; an on-call engineer also needs what is
true now: "no message older than five minutes waits", "no patient is parked", "no forward is owed
for an hour". These are read from the message store (and, with RabbitMQ, from the broker) when
``/metrics`` is scraped, at most once per ``ttl`` seconds, with queries that indexes answer (except
the embedded queue's count per partition, which scans ``queue_entries``: no index there, see
migration 0011; 0.34 s for a backlog of a million entries on SQLite, none when it is empty):

- ``hl7engine_store_messages{channel,status}``: messages now in one of the statuses that need
  someone or are in flight (received, processing, replayed, held, error; not the many queued,
  processed, filtered and duplicate ones, which no index the receiving path pays for can count);
- ``hl7engine_queue_messages{queue}``: messages waiting in each partition of the queue (embedded:
  ``queue_entries``, every partition reported, 0 when empty; RabbitMQ: the ready messages of
  ``<name>.p0``… and of the dead-letter queue as ``dead``), and ``hl7engine_queue_oldest_seconds``
  (embedded only: RabbitMQ does not tell);
- ``hl7engine_parked_patients`` and ``hl7engine_parked_oldest_seconds``;
- ``hl7engine_outbound_messages{kind,target,status}`` (pending, expired) and
  ``hl7engine_outbound_oldest_seconds{kind,target}``: how long the oldest pending one has been owed;
- ``hl7engine_live_workers`` and ``hl7engine_partitions_unconsumed`` (RabbitMQ: workers register
  in the store; a partition nobody consumes waits);
- ``hl7engine_state_up{source}``: 1 when the store (``store``) or the broker (``broker``) answered
  the last read, else 0 (and that source's gauges are left out).

Every process serving the HTTP API (``run``, ``api``) reports the same numbers: the state is
shared. Counts hold no patient data; channel, kind and target are configuration names.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, Select, func, select
from sqlalchemy.exc import SQLAlchemyError

from engine.observe import get_logger
from engine.store.schema import messages, outbound, parked_patients, queue_entries

log = get_logger("engine.admin")

# statuses counted: few rows each, all in the partial index ix_messages_status_attention
ATTENTION = ("received", "processing", "replayed", "held", "error")
OWED = ("pending", "expired")


@dataclass(slots=True)
class StoreSnapshot:
    messages: list[tuple[str, str, int]] = field(default_factory=list)  # channel, status, count
    queue: list[tuple[str, int]] = field(default_factory=list)  # queue (p0, p1, …), count
    queue_oldest: float | None = None  # seconds
    parked: int = 0
    parked_oldest: float | None = None
    outbound: list[tuple[str, str, str, int]] = field(default_factory=list)  # kind, target, status, count
    outbound_oldest: list[tuple[str, str, float]] = field(default_factory=list)  # kind, target, seconds
    # RabbitMQ workers (the embedded queue's workers do not register): live ones, partitions they consume
    live_workers: int | None = None
    consumed: set[int] = field(default_factory=set)

    def unconsumed(self, partitions: int) -> list[int]:
        """RabbitMQ: the partitions no live worker consumes ([] with the embedded queue)."""
        return [] if self.live_workers is None else sorted(set(range(partitions)) - self.consumed)


def _age(now: datetime, at: datetime | None) -> float | None:
    if at is None:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return max(0.0, (now - at).total_seconds())


def attention_query() -> Select[str, str, int]:
    """Messages per channel and status, for the statuses in ATTENTION."""
    return (select(messages.c.channel, messages.c.status, func.count())
            .where(messages.c.status.in_(ATTENTION))
            # the partial index's own condition: SQLite's planner uses the index only when it is there
            .where(messages.c.status.notin_(["queued", "processed"]))
            .group_by(messages.c.channel, messages.c.status))


def read_store(engine: Engine, *, embedded_queue: bool) -> StoreSnapshot:
    """One read of the store's state (raises SQLAlchemyError when the store does not answer)."""
    now = datetime.now(UTC)
    snap = StoreSnapshot()
    with engine.connect() as conn:
        snap.messages = [(str(c), str(s), int(n)) for c, s, n in conn.execute(attention_query()).all()]
        if embedded_queue:
            partitions = conn.execute(select(queue_entries.c.partition, func.count())
                                      .group_by(queue_entries.c.partition)).all()
            snap.queue = [(f"p{p}", int(n)) for p, n in partitions]
            # entries go in with increasing ids and times: the first by id is the oldest (no index on
            # enqueued_at, and none is needed)
            oldest = conn.execute(select(queue_entries.c.enqueued_at).order_by(queue_entries.c.id).limit(1)).scalar()
            snap.queue_oldest = _age(now, oldest)
        count, oldest = conn.execute(select(func.count(), func.min(parked_patients.c.parked_at))).one()
        snap.parked, snap.parked_oldest = int(count), _age(now, oldest)
        owed = conn.execute(select(outbound.c.kind, outbound.c.target, outbound.c.status, func.count(),
                                   func.min(outbound.c.due_at))
                            .where(outbound.c.status.in_(OWED))
                            .group_by(outbound.c.kind, outbound.c.target, outbound.c.status)).all()
        for kind, target, status, n, due in owed:
            snap.outbound.append((str(kind), str(target), str(status), int(n)))
            age = _age(now, due)
            if status == "pending" and age is not None:
                snap.outbound_oldest.append((str(kind), str(target), age))
    if not embedded_queue:
        from engine.worker.members import consumed_partitions, list_members

        members = list_members(engine)
        snap.live_workers = sum(1 for m in members if m.live)
        snap.consumed = consumed_partitions(members)
    return snap


class StateCollector(Collector):
    """Prometheus collector of the shared state; reads at most once per ``ttl`` seconds.

    ``broker_depths``: with RabbitMQ, a function returning the ready messages per queue label (it
    raises when the broker does not answer); None with the embedded queue."""

    def __init__(self, engine: Engine, broker_depths: Callable[[], list[tuple[str, int]]] | None = None,
                 ttl: float = 10.0, partitions: int = 0) -> None:
        self.engine = engine
        self.broker_depths = broker_depths
        self.partitions = partitions  # embedded queue: partitions reported as 0 when empty
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at = -1e18
        self._store: StoreSnapshot | None = None
        self._broker: list[tuple[str, int]] | None = None

    def _refresh(self) -> None:
        with self._lock:
            if time.monotonic() - self._at < self.ttl:
                return
            try:
                self._store = read_store(self.engine, embedded_queue=self.broker_depths is None)
            except SQLAlchemyError as exc:
                log.warning("state for /metrics: the store did not answer", error=type(exc).__name__)
                self._store = None
            if self.broker_depths is not None:
                try:
                    self._broker = self.broker_depths()
                except Exception as exc:  # any failure of the broker read: reported as down
                    log.warning("state for /metrics: the broker did not answer", error=type(exc).__name__)
                    self._broker = None
            self._at = time.monotonic()

    def _embedded(self, store: StoreSnapshot) -> list[tuple[str, int]]:
        counts = dict(store.queue)
        for i in range(self.partitions):
            counts.setdefault(f"p{i}", 0)
        return sorted(counts.items(), key=lambda kv: int(kv[0][1:]))

    def collect(self) -> Iterator[Metric]:
        self._refresh()
        store, broker = self._store, self._broker
        up = GaugeMetricFamily("hl7engine_state_up", "1 when the source answered the last state read for "
                               "/metrics, else 0", labels=["source"])
        up.add_metric(["store"], 1 if store is not None else 0)
        if self.broker_depths is not None:
            up.add_metric(["broker"], 1 if broker is not None else 0)
        yield up
        queue = GaugeMetricFamily("hl7engine_queue_messages", "Messages waiting in each queue partition "
                                  "(RabbitMQ: ready messages, and the dead-letter queue as 'dead')",
                                  labels=["queue"])
        depths = broker if self.broker_depths is not None else (self._embedded(store) if store is not None else None)
        for name, n in depths or []:
            queue.add_metric([name], n)
        if depths is not None:
            yield queue
        if store is None:
            return
        by_status = GaugeMetricFamily("hl7engine_store_messages", "Messages now in a status that needs "
                                      "attention or is in flight", labels=["channel", "status"])
        for channel, status, n in store.messages:
            by_status.add_metric([channel, status], n)
        yield by_status
        if self.broker_depths is None:
            yield GaugeMetricFamily("hl7engine_queue_oldest_seconds", "Age of the oldest message waiting in "
                                    "the embedded queue (0 when it is empty)", value=store.queue_oldest or 0.0)
        yield GaugeMetricFamily("hl7engine_parked_patients", "Patients whose messages are held behind a "
                                "failed one", value=store.parked)
        yield GaugeMetricFamily("hl7engine_parked_oldest_seconds", "Time since the longest-parked patient was "
                                "parked (0 when none is)", value=store.parked_oldest or 0.0)
        owed = GaugeMetricFamily("hl7engine_outbound_messages", "Forwards and application ACKs owed (pending) "
                                 "or given up (expired)", labels=["kind", "target", "status"])
        for kind, target, status, n in store.outbound:
            owed.add_metric([kind, target, status], n)
        yield owed
        if store.live_workers is not None:
            yield GaugeMetricFamily("hl7engine_live_workers", "Worker processes consuming RabbitMQ with a "
                                    "heartbeat in the last few seconds, on every host", value=store.live_workers)
            if self.partitions:
                yield GaugeMetricFamily("hl7engine_partitions_unconsumed", "Queue partitions no live worker "
                                        "consumes (for a few seconds while workers join or leave)",
                                        value=len(store.unconsumed(self.partitions)))
        oldest = GaugeMetricFamily("hl7engine_outbound_oldest_seconds", "How long the oldest pending forward "
                                   "or application ACK has been owed", labels=["kind", "target"])
        for kind, target, age in store.outbound_oldest:
            oldest.add_metric([kind, target], age)
        yield oldest
