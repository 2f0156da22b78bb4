"""Retention: remove from the message store what is older than the retention period and finished.

The central record is not touched: its rows keep the ``message_uid`` that wrote them (not a foreign
key, so they outlive the message). Only messages nobody will act on again go:

- ``processed``, ``filtered`` and ``duplicate``;
- refused or unstored at receipt (status ``error``, never accepted: the sender was answered AR or
  AE and resends);
- with ``include_errors``, also messages that failed in processing and park no patient (skipped by
  an operator, or without a patient key). A message that parks its patient, a ``held``, ``queued``
  or ``replayed`` one is never removed.

With a message go its history (``message_events``), its search keys (``message_keys``), its queue
entry if one was left, and its ``outbound`` rows that are finished (a pending forward or application
ACK stays, with its own copy of the bytes, and is delivered). An original that a newer duplicate
still points at (``duplicate_of``) is kept until that duplicate goes too.

A resend of a removed message is no longer recognised as a duplicate at receipt: it is stored and
processed again, and the record's business keys make that a no-op (guarantee 3). Rows are removed
in batches, one transaction each, oldest first, found by a binary search on the primary key rather
than an index on ``received_at`` (the receiving path keeps its indexes few).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, delete, or_, select, text

from engine.errors import short_reason
from engine.observe import get_logger
from engine.store import db
from engine.store.query import ID_MARGIN, first_id_since
from engine.store.schema import message_events, message_keys, messages, outbound, parked_patients, queue_entries

log = get_logger("engine.store")

FINISHED = ("processed", "filtered", "duplicate")
# rows per transaction: on SQLite a batch holds the write lock the receiving path needs, so less,
# and after each one the purge waits (YIELD times as long as the batch took, at least YIELD_MIN
# seconds) so that the store writer, whose busy handler polls, gets the lock between batches
BATCH = {"sqlite": 200, "postgresql": 2000}
YIELD = 3.0
YIELD_MIN = 0.1
LOCK = 7413  # PostgreSQL advisory lock: one purge at a time across hosts


@dataclass(slots=True)
class Purged:
    messages: int = 0
    events: int = 0
    keys: int = 0
    outbound: int = 0
    kept_for_duplicates: int = 0  # old enough, but a newer duplicate points at them
    by_status: dict[str, int] = field(default_factory=dict)
    cutoff: datetime | None = None


def purge(engine: Engine, older_than: timedelta, *, include_errors: bool = False, dry_run: bool = False,
          now: datetime | None = None, batch: int | None = None) -> Purged:
    """Remove finished messages received more than ``older_than`` ago (see the module's text).
    ``dry_run`` counts what would go and removes nothing."""
    cutoff = (now or datetime.now(UTC)) - older_than
    out = Purged(cutoff=cutoff)
    batch = batch or BATCH.get(engine.dialect.name, 1000)
    with engine.connect() as conn:
        # every id from here on was received after the cutoff (ids follow receipt times within seconds)
        upper = first_id_since(conn, cutoff + 2 * ID_MARGIN)
    gone = or_(messages.c.status.in_(FINISHED), and_(messages.c.status == "error", ~messages.c.accepted))
    if include_errors:
        parks = select(parked_patients.c.message_uid).where(parked_patients.c.message_uid == messages.c.uid)
        gone = or_(gone, and_(messages.c.status == "error", messages.c.accepted, ~parks.exists()))
    # duplicates first, so that an original they point at can go in the same run
    gone_before: set[int] = set()  # a dry run's duplicates, which a real run would have removed
    sqlite = engine.dialect.name == "sqlite"
    for which in (messages.c.status == "duplicate", and_(gone, messages.c.status != "duplicate")):
        with engine.connect() as conn:
            if sqlite:
                # SQLite checks each deleted message against queue_entries, which has no index on
                # message_uid (the receiving path does not pay for one): with a backlog queued that
                # scan made each batch hold the write lock for hundreds of milliseconds. The purge
                # removes the children itself and keeps the originals duplicates point at.
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
            try:
                _purge_pass(conn, which, cutoff, upper, out, gone_before, dry_run=dry_run, batch=batch,
                            pause=sqlite and not dry_run)
            finally:
                if sqlite:
                    conn.rollback()
                    conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]
    return out


def _purge_pass(db_conn: Connection, which: Any, cutoff: datetime, upper: int, out: Purged, gone_before: set[int],
                *, dry_run: bool, batch: int, pause: bool) -> None:
    after = 0
    took = 0.0
    while True:
        if took and pause:
            time.sleep(max(YIELD_MIN, YIELD * took))
        started = time.monotonic()
        took = 0.0
        with db_conn.begin():
            conn = db_conn
            if conn.dialect.name == "postgresql" and not dry_run:
                conn.execute(text(f"SELECT pg_advisory_xact_lock({LOCK})"))
            rows = conn.execute(select(messages.c.id, messages.c.uid, messages.c.status)
                                .where(messages.c.id > after, messages.c.id < upper, messages.c.received_at < cutoff,
                                       which).order_by(messages.c.id).limit(batch)).all()
            if not rows:
                break
            after = rows[-1].id
            ids = {r.id for r in rows}
            # an original still pointed at by a duplicate that stays (newer, or not in this batch)
            pointed = {r.duplicate_of for r in conn.execute(
                select(messages.c.id, messages.c.duplicate_of)
                .where(messages.c.duplicate_of.in_(sorted(ids)), messages.c.duplicate_of.is_not(None)))
                if r.id not in ids and r.id not in gone_before}
            if pointed:
                out.kept_for_duplicates += len(pointed)
                rows = [r for r in rows if r.id not in pointed]
                ids -= pointed
            if not rows:
                continue
            for r in rows:
                out.by_status[r.status] = out.by_status.get(r.status, 0) + 1
            out.messages += len(rows)
            if dry_run:
                gone_before.update(r.id for r in rows if r.status == "duplicate")
                continue
            id_list = sorted(ids)
            out.events += conn.execute(delete(message_events).where(message_events.c.message_id.in_(id_list))).rowcount
            out.keys += conn.execute(delete(message_keys).where(message_keys.c.message_id.in_(id_list))).rowcount
            out.outbound += conn.execute(delete(outbound).where(outbound.c.message_id.in_(id_list),
                                                                outbound.c.status != "pending")).rowcount
            conn.execute(delete(queue_entries).where(queue_entries.c.message_uid.in_(sorted(r.uid for r in rows))))
            conn.execute(delete(messages).where(messages.c.id.in_(id_list)))
        took = time.monotonic() - started


class Pruner:
    """Runs ``purge`` every ``every`` seconds in a thread of the listener process, when the store
    has a retention period (``HL7ENGINE_RETAIN_MESSAGES``)."""

    def __init__(self, database_url: str, retain: float, *, every: float = 3600.0, first_after: float = 60.0) -> None:
        self.database_url = database_url
        self.retain = timedelta(seconds=retain)
        self.every = every
        self.first_after = first_after
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._engine is not None:
            self._engine.dispose()

    def run_once(self) -> Purged:
        if self._engine is None:
            self._engine = db.make_engine(self.database_url, pool_size=1, writer=db.is_sqlite(self.database_url),
                                          repeatable=True)
        done = purge(self._engine, self.retain)
        if done.messages:
            log.info("retention: messages removed", messages=done.messages, outbound=done.outbound,
                     kept_for_duplicates=done.kept_for_duplicates, received_before=done.cutoff.isoformat()
                     if done.cutoff else None)
        return done

    def _run(self) -> None:
        wait = self.first_after
        while not self._stop.wait(wait):
            try:
                self.run_once()
                wait = self.every
            except Exception as exc:  # the store unreachable, say: try again later
                log.error("retention: purge failed; will try again", error=short_reason(exc))
                wait = min(self.every, 300.0)
