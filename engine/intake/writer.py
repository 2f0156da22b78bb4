"""Group commit: many connections' messages share one transaction (and one fsync).

Runs in the store writer processes (``writerproc``). A writer takes every job waiting (up to
``max_batch`` messages) and, in one transaction: find resends (same sending facility + MSH-10 +
same bytes as an accepted message), insert every row, hand the accepted ones to the queue
(embedded: queue rows in the same transaction; RabbitMQ: publish and wait for the broker's
confirms) and commit. Only then are the jobs reported back, and the event loop sends the ACKs. A
failure fails every job of the transaction: nothing half-done is acknowledged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import Connection, Dialect, Engine, bindparam, func, select, update
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from engine.errors import UnavailableError, short_reason
from engine.intake.item import MESSAGE_COLUMNS, Item, Record
from engine.observe import get_logger
from engine.store.bulk import in_list, insert_rows, time_adapter
from engine.store.keys import keys_of, write_keys
from engine.store.schema import messages

log = get_logger("engine.store")


class Enqueuer(Protocol):
    """Where accepted messages go, inside the store transaction, before the commit: ``start`` once
    the rows are inserted (RabbitMQ publishes), ``finish`` just before the commit (embedded: insert
    queue rows; RabbitMQ: wait for the confirms). Both raise UnavailableError.
    ``ready`` says whether ``finish`` would return without waiting; ``depth`` is how many
    transactions are worth keeping open at once (1 when there is nothing to wait for)."""

    name: str
    depth: int

    @property
    def wakeup_fd(self) -> int | None:
        """A descriptor that becomes readable when a hand-off may have become ready (or None)."""

    def drain_wakeups(self) -> None: ...

    def start(self, records: list[Record], deadline: float) -> object: ...

    def ready(self, handle: object) -> bool: ...

    def finish(self, conn: Connection, started: object, records: list[Record], deadline: float) -> None: ...

    def close(self) -> None: ...


@dataclass(slots=True, eq=False)
class Job:
    """One frame's messages, on the event loop side, until the writer reports their outcomes."""

    items: list[Item]
    done: Callable[[Job], None]
    deadline: float  # epoch seconds by which the ACK must go out
    record_only: bool = False  # a refused or failed message recorded for the operators
    key: str = ""  # the connection it came from: its jobs are written in order by one writer
    expired: bool = False  # set by the event loop when the ACK timeout answered for it
    # corrections of rows already stored: (uid, ack code, ack bytes, error text; None keeps the error)
    ack_corrections: list[tuple[str, str | None, bytes | None, str | None]] = field(default_factory=list)

    def wire(self, job_id: int) -> tuple[Any, ...]:
        return job_id, self.deadline, self.record_only, [it.wire() for it in self.items], self.ack_corrections


@dataclass(slots=True, eq=False)
class WireJob:
    """A job in the writer process."""

    id: int
    deadline: float
    record_only: bool
    records: list[Record]
    corrections: list[tuple[str, str | None, bytes | None, str | None]]

    @classmethod
    def from_wire(cls, t: tuple[Any, ...]) -> WireJob:
        job_id, deadline, record_only, items, corrections = t
        return cls(job_id, deadline, record_only, [Record(w) for w in items], corrections)

    def prepare(self, stamp: Any, t: Callable[[datetime | None], Any], partitions: int) -> None:
        for r in self.records:
            r.prepare(stamp, t, partitions)

    def result(self) -> tuple[int, list[tuple[str, int | None, str, str]]]:
        return self.id, [r.result() for r in self.records]


@dataclass(slots=True, eq=False)
class Txn:
    """A store transaction under way: rows inserted, queue hand-off started, not yet committed."""

    jobs: list[WireJob]
    records: list[Record]
    started: float
    deadline: float = 0.0
    conn: Connection | None = None
    trans: Any = None
    slot: int = -1
    accepted: list[Record] = field(default_factory=list)
    handle: object = None
    keys: set[tuple[str, str, str]] = field(default_factory=set)
    result: tuple[int, float, str] | None = None  # set when the transaction is over


def _key(r: Record) -> tuple[str, str, str]:
    return (r.sending_facility or "")[:250], (r.control_id or "")[:199], r.sha256


class BatchWriter:
    """Store transactions for groups of jobs.

    ``write`` does one transaction from start to commit. The writer process pipelines them instead:
    ``begin`` inserts the rows and starts the queue hand-off (RabbitMQ publishes), ``ready`` tells
    when the hand-off can be finished without waiting (the confirms are in), ``complete`` finishes
    it and commits. Up to ``depth`` transactions are open at once, each on its own connection, and
    they are completed in the order they began.
    """

    def __init__(self, engine: Engine, enqueuer: Enqueuer, partitions: int = 1, depth: int = 1) -> None:
        self.engine = engine
        self.enqueuer = enqueuer
        self.partitions = partitions
        # SQLite has one writer at a time: a second open transaction would wait for the first
        self.depth = 1 if engine.dialect.name == "sqlite" else max(1, depth)
        self.t = time_adapter(engine.dialect)
        self._conns: list[Connection | None] = [None] * self.depth
        self._free = list(range(self.depth))
        self._inflight: dict[tuple[str, str, str], int] = {}  # accepted in open transactions

    def stamp(self) -> Any:
        """Now, in the driver's form: the time written on rows prepared together."""
        return self.t(datetime.now(UTC))

    def prepare(self, job: WireJob, stamp: Any = None) -> None:
        """Build the rows of ``job`` (as jobs arrive, before the transaction that writes them);
        ``stamp`` (from ``stamp()``) is shared by the jobs that arrived together."""
        job.prepare(self.stamp() if stamp is None else stamp, self.t, self.partitions)

    @property
    def open(self) -> int:
        return self.depth - len(self._free)

    def conflicts(self, jobs: list[WireJob]) -> bool:
        """Whether ``jobs`` hold a message identical to one in an open transaction (whose rows the
        resend check cannot see yet): then the open transactions must be completed first."""
        return bool(self._inflight) and any(_key(r) in self._inflight for j in jobs for r in j.records)

    def write(self, jobs: list[WireJob]) -> tuple[int, float, str]:
        """Write ``jobs`` in one transaction, start to commit; fills every record's outcome.
        Returns (messages written, seconds, failed service or "")."""
        return self.complete(self.begin(jobs))

    def begin(self, jobs: list[WireJob]) -> Txn:
        """Open a transaction: resend check, queue hand-off started, rows inserted. Never raises; a
        transaction that failed (or had nothing to do) comes back with ``result`` set."""
        now_epoch = time.time()
        now = datetime.fromtimestamp(now_epoch, UTC)
        live: list[WireJob] = []
        for j in jobs:
            if j.record_only or j.deadline > now_epoch:
                live.append(j)
            else:
                for r in j.records:
                    r.outcome, r.failure, r.failure_service = "failed", "ACK timeout reached before the store", "store"
        records = [r for j in live for r in j.records]
        corrections = [c for j in live for c in j.corrections]
        txn = Txn(jobs, records, time.perf_counter())
        if not records and not corrections:
            txn.result = (0, 0.0, "")
            return txn
        txn.slot = self._free.pop(0)
        try:
            conn = txn.conn = self._connection(txn.slot)
            txn.trans = conn.begin()
            if corrections:
                conn.execute(
                    update(messages).where(messages.c.uid == bindparam("u"))
                    .values(ack_code=bindparam("c"), ack=bindparam("a"), updated_at=now,
                            error=func.coalesce(bindparam("e", type_=messages.c.error.type), messages.c.error)),
                    [{"u": u, "c": c, "a": a, "e": e} for u, c, a, e in corrections],
                )
            if records:
                txn.deadline = min(j.deadline for j in live)
                cursor = conn.connection.cursor()
                try:
                    self._dedupe(cursor, conn.dialect, records)
                    txn.accepted = [r for r in records if r.outcome == "accepted"]
                    rows = []
                    for r in records:
                        if not r.row or r.status == "duplicate":
                            r.prepare(self.t(now), self.t, self.partitions)
                        rows.append(r.row)
                    insert_rows(cursor, conn.dialect.paramstyle, messages, MESSAGE_COLUMNS, rows)
                    # published only once the rows are in: a failed INSERT leaves nothing in the
                    # queue (and measured here, publishing earlier slowed the INSERT more than it
                    # gained, pika's work competing with it for the interpreter)
                    if txn.accepted:
                        txn.handle = self.enqueuer.start(txn.accepted, txn.deadline)
                finally:
                    cursor.close()
                self._link_batch_duplicates(conn, records)
                self._index_refused(conn, records)
                txn.keys = {_key(r) for r in txn.accepted}
                for k in txn.keys:
                    self._inflight[k] = self._inflight.get(k, 0) + 1
        except Exception as exc:
            self._abort(txn, exc)
        return txn

    def ready(self, txn: Txn) -> bool:
        """Whether ``complete`` can run without waiting (or the deadline has passed)."""
        if txn.result is not None or not txn.accepted:
            return True
        return self.enqueuer.ready(txn.handle) or time.time() >= txn.deadline

    def complete(self, txn: Txn) -> tuple[int, float, str]:
        """Finish the queue hand-off and commit (or roll back and fail every record).

        If the hand-off fails, jobs that only record something (refusals, failures, ACK corrections)
        do not need the queue: they are written again in a transaction of their own.
        """
        if txn.result is None:
            try:
                assert txn.conn is not None
                if txn.accepted:
                    self.enqueuer.finish(txn.conn, txn.handle, txn.accepted, txn.deadline)
                txn.trans.commit()
                txn.result = (len(txn.records), time.perf_counter() - txn.started, "")
            except Exception as exc:
                self._abort(txn, exc)
            finally:
                self._release(txn)
        assert txn.result is not None
        failed = txn.result[2]
        notes = [j for j in txn.jobs if j.record_only]
        if failed and failed != "store" and notes and len(notes) < len(txn.jobs):
            for j in notes:
                for r in j.records:
                    r.outcome = r.failure = r.failure_service = ""
                    if r.status == "duplicate":
                        r.status = "queued"
            self.write(notes)
        return txn.result

    def _abort(self, txn: Txn, exc: BaseException) -> None:
        if isinstance(exc, UnavailableError):
            reason, service = exc.detail, exc.service
        else:
            if not isinstance(exc, (DBAPIError, SQLAlchemyError, OSError)):
                log.exception("store write failed unexpectedly")
            reason, service = short_reason(exc), "store"
        try:
            if txn.trans is not None and txn.trans.is_active:
                txn.trans.rollback()
        except Exception:
            self._drop(txn.slot)
        if service == "store":
            self._drop(txn.slot)
        self._release(txn)
        self._fail(txn.records, reason, service)
        txn.result = (len(txn.records), time.perf_counter() - txn.started, service)

    def _release(self, txn: Txn) -> None:
        for k in txn.keys:
            n = self._inflight.get(k, 0) - 1
            if n > 0:
                self._inflight[k] = n
            else:
                self._inflight.pop(k, None)
        txn.keys = set()
        if txn.slot >= 0 and txn.slot not in self._free:
            self._free.append(txn.slot)
            self._free.sort()

    def _connection(self, slot: int) -> Connection:
        conn = self._conns[slot]
        if conn is None or conn.closed or conn.invalidated:
            conn = self._conns[slot] = self.engine.connect()
        return conn

    def _drop(self, slot: int) -> None:
        conn = self._conns[slot] if slot >= 0 else None
        if conn is not None:
            self._conns[slot] = None
            try:
                conn.invalidate()
                conn.close()
            except Exception:
                log.debug("closing a failed connection failed")

    def close(self) -> None:
        for i, conn in enumerate(self._conns):
            if conn is not None:
                conn.close()
                self._conns[i] = None

    @staticmethod
    def _dedupe(cursor: Any, dialect: Dialect, records: list[Record]) -> None:
        """A message is a resend when an accepted one has the same MSH-4, MSH-10 and bytes."""
        ids = {r.control_id[:199] for r in records if r.status == "queued" and r.control_id}
        known: dict[tuple[str, str, str], int] = {}
        if ids and dialect.name == "postgresql":  # one statement whatever the count: prepared once
            cursor.execute("SELECT id, sending_facility, control_id, sha256 FROM messages "
                           "WHERE control_id = ANY(%s) AND accepted ORDER BY id", (list(ids),))
        elif ids:
            cursor.execute(
                "SELECT id, sending_facility, control_id, sha256 FROM messages "
                f"WHERE control_id IN ({in_list(dialect.paramstyle, len(ids))}) AND accepted = "
                + ("1" if dialect.name == "sqlite" else "true") + " ORDER BY id",
                tuple(ids),
            )
        if ids:
            for row_id, facility, control, sha in cursor.fetchall():
                known.setdefault((facility or "", control, sha), row_id)
        in_batch: dict[tuple[str, str, str], Record] = {}
        for r in records:
            if r.status != "queued":
                r.outcome = "recorded"
                continue
            key = _key(r)
            if key in known:
                r.status, r.outcome, r.duplicate_of = "duplicate", "duplicate", known[key]
            elif key in in_batch:
                r.status, r.outcome = "duplicate", "duplicate"
                r.duplicate_of_uid = in_batch[key].uid
            else:
                r.outcome = "accepted"
                in_batch[key] = r

    @staticmethod
    def _link_batch_duplicates(conn: Connection, records: list[Record]) -> None:
        links = [{"u": r.uid, "o": r.duplicate_of_uid} for r in records if r.duplicate_of_uid]
        if not links:
            return
        original = select(messages.c.id).where(messages.c.uid == bindparam("o")).scalar_subquery()
        conn.execute(update(messages).where(messages.c.uid == bindparam("u")).values(duplicate_of=original), links)
        ids = dict(conn.execute(select(messages.c.uid, messages.c.duplicate_of)
                                .where(messages.c.uid.in_([link["u"] for link in links]))).all())
        for r in records:
            if r.duplicate_of_uid:
                r.duplicate_of = ids.get(r.uid)

    @staticmethod
    def _index_refused(conn: Connection, records: list[Record]) -> None:
        """Refused messages never reach a worker: their patient and order keys are written here, so
        ``hl7engine messages --patient`` finds them too (rare, so off the accepted messages' path)."""
        refused = {r.uid: keys_of(r.raw, r.charset) for r in records if r.status == "error"}
        refused = {uid: keys for uid, keys in refused.items() if keys}
        if not refused:
            return
        ids = dict(conn.execute(select(messages.c.uid, messages.c.id).where(messages.c.uid.in_(list(refused)))).all())
        write_keys(conn, {ids[uid]: keys for uid, keys in refused.items() if uid in ids})

    @staticmethod
    def _fail(records: list[Record], reason: str, service: str) -> None:
        log.warning("store transaction failed", service=service, messages=len(records), reason=reason)
        for r in records:
            r.outcome, r.failure, r.failure_service = "failed", reason, service
            r.duplicate_of = None
            if r.status == "duplicate":
                r.status = "queued"

