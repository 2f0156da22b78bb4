"""Group commit: many connections' messages share one transaction (and one fsync).

Runs in the store writer process (``writerproc``). Writer threads take every job waiting (up to
``max_batch`` messages) and, in one transaction: find resends (same sending facility + MSH-10 +
same bytes as an accepted message), insert every row, hand the accepted ones to the queue
(embedded: queue rows in the same transaction; RabbitMQ: publish and wait for the broker's
confirms) and commit. Only then are the jobs reported back, and the event loop sends the ACKs. A
failure fails every job of the transaction: nothing half-done is acknowledged.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import Connection, Dialect, Engine, bindparam, select, update
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from engine.errors import UnavailableError
from engine.intake.item import MESSAGE_COLUMNS, Item, Record
from engine.observe import get_logger
from engine.store.bulk import in_list, insert_rows, time_adapter
from engine.store.schema import messages

log = get_logger("engine.store")


class Enqueuer(Protocol):
    """Where accepted messages go, called inside the store transaction, before the commit."""

    name: str

    def enqueue(self, conn: Connection, records: list[Record], deadline: float) -> None: ...

    def close(self) -> None: ...


@dataclass(slots=True, eq=False)
class Job:
    """One frame's messages, on the event loop side, until the writer reports their outcomes."""

    items: list[Item]
    done: Callable[[Job], None]
    deadline: float  # epoch seconds by which the ACK must go out
    record_only: bool = False  # a refused or failed message recorded for the operators
    expired: bool = False  # set by the event loop when the ACK timeout answered for it
    # corrections of rows already stored: (uid, ack code, ack bytes, error text)
    ack_corrections: list[tuple[str, str | None, bytes | None, str]] = field(default_factory=list)

    def wire(self, job_id: int) -> tuple[Any, ...]:
        return job_id, self.deadline, self.record_only, [it.wire() for it in self.items], self.ack_corrections


@dataclass(slots=True, eq=False)
class WireJob:
    """A job in the writer process."""

    id: int
    deadline: float
    record_only: bool
    records: list[Record]
    corrections: list[tuple[str, str | None, bytes | None, str]]

    @classmethod
    def from_wire(cls, t: tuple[Any, ...]) -> WireJob:
        job_id, deadline, record_only, items, corrections = t
        return cls(job_id, deadline, record_only, [Record(w) for w in items], corrections)

    def prepare(self, stamp: Any, t: Callable[[datetime | None], Any], partitions: int) -> None:
        for r in self.records:
            r.prepare(stamp, t, partitions)

    def result(self) -> tuple[int, list[tuple[str, int | None, str, str]]]:
        return self.id, [r.result() for r in self.records]


class BatchWriter:
    """The store transaction for a group of jobs. Each writer thread keeps its own connection."""

    def __init__(self, engine: Engine, enqueuer: Enqueuer, partitions: int = 1) -> None:
        self.engine = engine
        self.enqueuer = enqueuer
        self.partitions = partitions
        self.t = time_adapter(engine.dialect)
        self._local = threading.local()

    def prepare(self, job: WireJob) -> None:
        """Build the rows of ``job`` (called as jobs arrive, off the writer threads)."""
        job.prepare(self.t(datetime.now(UTC)), self.t, self.partitions)

    def _connection(self) -> Connection:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.invalidated:
            conn = self._local.conn = self.engine.connect()
        return conn

    def _drop_connection(self) -> None:
        conn: Connection | None = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception:
                log.debug("closing a failed connection failed")

    def write(self, jobs: list[WireJob]) -> tuple[int, float, str]:
        """Write ``jobs`` in one transaction; fills every record's outcome.

        If the queue hand-off fails, the jobs that only record something (refusals, failures, ACK
        corrections) do not need the queue: they are written again in a transaction of their own.
        Returns (messages written, seconds, failed service or "").
        """
        count, seconds, failed = self._write(jobs)
        notes = [j for j in jobs if j.record_only]
        if failed and failed != "store" and notes and len(notes) < len(jobs):
            for j in notes:
                for r in j.records:
                    r.outcome = r.failure = r.failure_service = ""
                    if r.status == "duplicate":
                        r.status = "queued"
            self._write(notes)
        return count, seconds, failed

    def _write(self, jobs: list[WireJob]) -> tuple[int, float, str]:
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
        if not records and not corrections:
            return 0, 0.0, ""
        started = time.perf_counter()
        try:
            conn = self._connection()
            with conn.begin():
                if corrections:
                    conn.execute(
                        update(messages).where(messages.c.uid == bindparam("u"))
                        .values(ack_code=bindparam("c"), ack=bindparam("a"), error=bindparam("e"), updated_at=now),
                        [{"u": u, "c": c, "a": a, "e": e} for u, c, a, e in corrections],
                    )
                if records:
                    cursor = conn.connection.cursor()
                    try:
                        self._dedupe(cursor, conn.dialect, records)
                        rows = []
                        for r in records:
                            if not r.row or r.status == "duplicate":
                                r.prepare(self.t(now), self.t, self.partitions)
                            rows.append(r.row)
                        insert_rows(cursor, conn.dialect.paramstyle, messages, MESSAGE_COLUMNS, rows)
                    finally:
                        cursor.close()
                    self._link_batch_duplicates(conn, records)
                    accepted = [r for r in records if r.outcome == "accepted"]
                    if accepted:
                        self.enqueuer.enqueue(conn, accepted, min(j.deadline for j in live))
        except UnavailableError as exc:
            self._fail(records, exc.detail, exc.service)
            return len(records), time.perf_counter() - started, exc.service
        except (DBAPIError, SQLAlchemyError, OSError) as exc:
            self._drop_connection()
            self._fail(records, _short(exc), "store")
            return len(records), time.perf_counter() - started, "store"
        except Exception as exc:  # never leave a job without an answer
            log.exception("store write failed unexpectedly")
            self._drop_connection()
            self._fail(records, _short(exc), "store")
            return len(records), time.perf_counter() - started, "store"
        return len(records), time.perf_counter() - started, ""

    def close(self) -> None:
        """Close this thread's connection (each writer thread calls it as it ends)."""
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @staticmethod
    def _dedupe(cursor: Any, dialect: Dialect, records: list[Record]) -> None:
        """A message is a resend when an accepted one has the same MSH-4, MSH-10 and bytes."""
        ids = {r.control_id[:199] for r in records if r.status == "queued" and r.control_id}
        known: dict[tuple[str, str, str], int] = {}
        if ids:
            cursor.execute(
                "SELECT id, sending_facility, control_id, sha256 FROM messages "
                f"WHERE control_id IN ({in_list(dialect.paramstyle, len(ids))}) AND accepted = "
                + ("1" if dialect.name == "sqlite" else "true") + " ORDER BY id",
                tuple(ids),
            )
            for row_id, facility, control, sha in cursor.fetchall():
                known.setdefault((facility or "", control, sha), row_id)
        in_batch: dict[tuple[str, str, str], Record] = {}
        for r in records:
            if r.status != "queued":
                r.outcome = "recorded"
                continue
            key = ((r.sending_facility or "")[:250], (r.control_id or "")[:199], r.sha256)
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
    def _fail(records: list[Record], reason: str, service: str) -> None:
        log.warning("store transaction failed", service=service, messages=len(records), reason=reason)
        for r in records:
            r.outcome, r.failure, r.failure_service = "failed", reason, service
            r.duplicate_of = None
            if r.status == "duplicate":
                r.status = "queued"


class WriterThreads:
    """Threads taking jobs in groups and reporting each group when its transaction is over."""

    def __init__(self, writer: BatchWriter, report: Callable[[list[WireJob], tuple[int, float, str]], None], *,
                 threads: int = 1, max_batch: int = 256) -> None:
        self.writer = writer
        self.report = report
        self.max_batch = max_batch
        self._jobs: queue.SimpleQueue[WireJob | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"store-writer-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, job: WireJob) -> None:
        self._jobs.put(job)

    def close(self, timeout: float = 60) -> None:
        """Finish every job already submitted, then stop."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(timeout=timeout)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self.writer.close()

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._jobs.get()
            if first is None:
                return
            jobs = [first]
            n = len(first.records)
            while n < self.max_batch:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
                n += len(nxt.records)
            stats = self.writer.write(jobs)
            try:
                self.report(jobs, stats)
            except Exception:
                log.exception("reporting store results failed")


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
