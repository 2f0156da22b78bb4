"""Process one stored message: parse, route, map, write the record — in one transaction with its
status change, so the record's effect happens exactly once however often the message is delivered.

Outcomes:
- ``processed``: facts written (or found already written: the write is idempotent);
- ``filtered``: no route matched and routes.yaml says ``default: filter``;
- ``held``: an earlier message of the same patient failed; this one waits for it (guarantee 4);
- ``error``: a permanent failure (cannot parse, no route with ``default: error``, mapping error,
  record conflict). The message is marked error with the step and reason, and its patient is parked:
  the patient's later messages are held until it is replayed or skipped. Other patients flow on.
Transient failures (database unreachable, deadlock, serialisation) raise ``RetryLater``: nothing is
marked, the source retries with backoff.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, delete, insert, select, update
from sqlalchemy.exc import DBAPIError

from engine.config.routes import Route
from engine.errors import EngineError, HL7Error, short_reason
from engine.hl7.charsets import decode
from engine.hl7.message import Message
from engine.observe import get_logger
from engine.outbound.appack import AppAcks
from engine.outbound.forward import Forwards
from engine.store.bulk import driver_error, one_of
from engine.store.commits import OUTCOMES
from engine.store.keys import Key, search_keys, write_keys
from engine.store.schema import message_events, messages, outbound, parked_patients
from engine.worker.metrics import Reporter
from engine.worker.router import MessageKey, Router
from engine.worker.validate import ValidationFailed, validate

log = get_logger("engine.worker")

FINAL = ("processed", "filtered", "duplicate")
FILTERED = object()  # what _route_and_map returns when no route matched and the default is filter


class RetryLater(EngineError):
    """A transient failure: try the same message again later; nothing was marked."""


class NotCommittedYet(RetryLater):
    """A delivered message whose store row is not visible yet: the store writer publishes a
    transaction's messages and commits it once the broker has confirmed them, so an idle worker
    can receive a message a few milliseconds before its row is committed. Retried within
    milliseconds, not after the backoff of a real failure."""


class PermanentError(EngineError):
    def __init__(self, step: str, reason: str) -> None:
        self.step = step
        self.reason = reason
        super().__init__(f"{step}: {reason}")


@dataclass(slots=True)
class Outcome:
    status: str  # processed, filtered, held, error, skipped (already final), missing
    step: str = ""
    reason: str = ""
    facts: int = 0


# mapping(name) -> object with .apply(message, context) ; context factory builds MapContext
MapFn = Callable[[str, Message, dict[str, Any]], Any]
ApplyFn = Callable[[Connection, Any, str, datetime], int]
# several messages' mapped facts, (mapped, uid, received_at) each, of different patients -> facts written each
WaveFn = Callable[[Connection, list[tuple[Any, str, datetime]]], list[int]]


class Processor:
    """Everything a worker needs to process a message, built once per worker process."""

    def __init__(self, engine: Engine, router: Router, map_message: MapFn, apply_facts: ApplyFn,
                 timezones: dict[str, str], validated: frozenset[str] = frozenset(),
                 apply_wave: WaveFn | None = None, reader: Engine | None = None) -> None:
        self.engine = engine
        # reads before the write transaction; on SQLite an engine without BEGIN IMMEDIATE
        self.reader = reader if reader is not None else engine
        self.apply_wave = apply_wave  # None: every message is written on its own
        self.reporter: Reporter | None = None  # worker metrics (engine.worker.metrics)
        self.validated = validated  # channels with `validation: hl7apy`
        self.router = router
        self.map_message = map_message
        self.apply_facts = apply_facts
        self.timezones = timezones  # channel -> timezone
        self.appacks: AppAcks | None = None  # enhanced-mode channels that send application ACKs
        self.forwards: Forwards | None = None  # routes with mllp or file destinations
        # channels with `ack.after: processed`: on PostgreSQL a batch that decides one of their
        # messages sends NOTIFY (engine.store.commits.OUTCOMES) with its commit, for the listener
        self.notify_channels: frozenset[str] = frozenset()

    def process(self, uid: str, *, after: Callable[[Connection], None] | None = None) -> Outcome:
        """Process the message ``uid``; ``after(conn)`` runs in the same transaction before the commit
        (the embedded queue deletes its entry there)."""
        return self.process_batch([(uid, after)])[0]

    def process_batch(self, items: list[tuple[str, Callable[[Connection], None] | None]]) -> list[Outcome]:
        """Process several messages in ONE transaction (one commit, one fsync), each patient's in order.

        The batch is cut into waves: the n-th message of each patient key goes to wave n, so a wave
        holds at most one message per patient and waves run in order. Each wave's messages are
        parsed, routed and mapped; a permanent failure marks that message error and parks its
        patient (its later messages, in later waves, are then held). The mapped messages of a wave
        are written to the record together (``apply_wave``: a few statements for all of them) in a
        savepoint; when that cannot be done (``NotBatchable``, a record error, a constraint) the
        savepoint is rolled back and they are written one by one, each in its own savepoint, so a
        failure is rolled back alone. A transient failure rolls back the whole batch: RetryLater.

        Round trips are shared by the batch: its message rows are read (and locked) with one query
        and its parked patients with another; the status changes and events are written together
        at the end."""
        outcomes: list[Outcome | None] = [None] * len(items)
        uids = [uid for uid, _ in items]
        started = time.perf_counter()
        try:
            pre = self._premap(uids) if self.engine.dialect.name == "sqlite" else {}
            with self.engine.begin() as conn:
                batch = self._load(conn, uids, pre)
                for wave in self._waves(items, batch):
                    self._run_wave(conn, items, wave, batch, outcomes)
                self._write_marks(conn, batch.marks)
                self._write_outbound(conn, batch)
                write_keys(conn, batch.search)
                self._notify(conn, batch)
        except DBAPIError as exc:
            if self.reporter is not None:
                self.reporter.retry()
            raise RetryLater(short_reason(exc)) from exc
        except RetryLater:
            if self.reporter is not None:
                self.reporter.retry()
            raise
        committed = datetime.now(UTC)
        done = [o for o in outcomes if o is not None]
        assert len(done) == len(items)
        for (uid, _), outcome in zip(items, done, strict=True):
            if outcome.status == "error":
                log.warning("message failed", uid=uid, step=outcome.step, reason=outcome.reason[:300])
            if self.reporter is not None:
                row = batch.rows.get(uid)
                latency = None
                if outcome.status == "processed" and row is not None and row.received_at is not None:
                    latency = max(0.0, (committed - _aware(row.received_at)).total_seconds())
                self.reporter.outcome(outcome.status, outcome.step, outcome.facts, latency)
        if self.reporter is not None:
            self.reporter.batch(time.perf_counter() - started)
        return done

    @staticmethod
    def _waves(items: list[tuple[str, Any]], batch: _Batch) -> list[list[int]]:
        """Indices of ``items`` per wave: the n-th message of each patient key is in wave n."""
        seen: dict[str, int] = {}
        waves: list[list[int]] = []
        for i, (uid, _) in enumerate(items):
            key = batch.keys.get(uid, f"uid:{uid}")
            n = seen.get(key, 0)
            seen[key] = n + 1
            if n == len(waves):
                waves.append([])
            waves[n].append(i)
        return waves

    def _run_wave(self, conn: Connection, items: list[tuple[str, Callable[[Connection], None] | None]],
                  wave: list[int], batch: _Batch, outcomes: list[Outcome | None]) -> None:
        ready: list[_Ready] = []
        for i in wave:
            uid = items[i][0]
            done = _Done()
            try:
                prepared = self._prepare(uid, batch, done)
            except PermanentError as exc:
                outcomes[i] = self._mark_failed(conn, uid, batch, exc)
                continue
            if isinstance(prepared, Outcome):
                batch.keep(done)
                outcomes[i] = prepared
            elif not self.router.writes_record(prepared.routed.route):  # forwarded only: nothing for the record
                prepared.done = done
                self._finish(conn, prepared, batch)
                outcomes[i] = Outcome("processed")
            else:
                prepared.index, prepared.done = i, done
                ready.append(prepared)
        if len(ready) > 1 and self.apply_wave is not None:
            counts = self._write_together(conn, ready)
            if counts is not None:
                for r, n in zip(ready, counts, strict=True):
                    self._finish(conn, r, batch)
                    outcomes[r.index] = Outcome("processed", facts=n)
                ready = []
        for r in ready:
            savepoint = conn.begin_nested()
            try:
                n = self._write_one(conn, r)
                self._finish(conn, r, batch)
                savepoint.commit()
                outcomes[r.index] = Outcome("processed", facts=n)
            except PermanentError as exc:
                savepoint.rollback()
                outcomes[r.index] = self._mark_failed(conn, r.uid, batch, exc)
            except DBAPIError as exc:
                if exc.connection_invalidated or _transient(exc):
                    raise
                savepoint.rollback()  # e.g. a constraint the record refused: this message only
                outcomes[r.index] = self._mark_failed(conn, r.uid, batch, PermanentError("record", short_reason(exc)))
        for i in wave:
            after = items[i][1]
            if after is not None:
                after(conn)

    def _write_together(self, conn: Connection, ready: list[_Ready]) -> list[int] | None:
        """The wave's record writes in one go, or None (rolled back) when they must go one by one."""
        assert self.apply_wave is not None
        savepoint = conn.begin_nested()
        try:
            counts = self.apply_wave(conn, [(r.routed.facts, r.uid, r.row.received_at) for r in ready])
            savepoint.commit()
            return counts
        except RetryLater:
            raise
        except EngineError:  # not batchable, or a message the record refuses: one by one says which
            savepoint.rollback()
        except DBAPIError as exc:
            if exc.connection_invalidated or _transient(exc):
                raise
            savepoint.rollback()  # e.g. another worker created one of the patients meanwhile
        except Exception:  # a bug meeting one of them: one by one finds which (and fails it alone)
            savepoint.rollback()
        return None

    def _write_one(self, conn: Connection, r: _Ready) -> int:
        try:
            return self.apply_facts(conn, r.routed.facts, r.uid, r.row.received_at)
        except (DBAPIError, RetryLater):
            raise
        except EngineError as exc:
            raise PermanentError("record", str(exc)) from None
        except Exception as exc:  # a bug meeting this message: rolled back to its savepoint, it fails alone
            raise internal_error("record", exc) from None

    def _finish(self, conn: Connection, r: _Ready, batch: _Batch) -> None:
        """Mark a written message processed, with its forwards to the route's mllp and file
        destinations; a replayed message that had parked its patient releases it."""
        if r.key is not None and r.key in batch.parked:
            conn.execute(delete(parked_patients).where(parked_patients.c.patient_key == r.key))
            r.done.released = r.key
        now = datetime.now(UTC)
        r.done.mark(r.row.id, r.uid, "processed", "", None, now)
        if self.forwards:
            r.done.outbound = self.forwards.rows(r.routed.route.name, r.row, now)
        batch.keep(r.done)

    @staticmethod
    def _rows(conn: Connection, uids: list[str], *, lock: bool) -> list[MessageRow]:
        wanted = sorted(set(uids))
        if conn.dialect.name == "postgresql":
            return _pg_rows(conn, wanted, lock)
        rows: list[MessageRow] = []
        for start in range(0, len(wanted), CHUNK):  # elsewhere (SQLite) the write transaction locks the database
            q = select(*MESSAGE_COLUMNS).where(one_of(conn, messages.c.uid, wanted[start:start + CHUNK])
                                                  ).order_by(messages.c.id)
            result: Any = conn.execute(q)  # Any: SQLAlchemy types a Row as a tuple, which compiled it is not
            rows += [MessageRow.of(tuple(r)) for r in result]
        return rows

    def _premap(self, uids: list[str]) -> dict[str, tuple[Message | HL7Error, Any]]:
        """SQLite only. Before the write transaction (which holds the database's write lock, which
        the receiving path needs too): read the batch's messages without locking them, then parse,
        route and map them, the CPU-heavy part. The transaction reads them again and decides their
        outcome; raw text, channel and header never change, so the mapping holds.

        On PostgreSQL the transaction locks only its own rows, so the messages are read once, in
        it, and mapped there: the read before it cost a checkout, a statement and the end of a
        transaction per batch (measured: 10-20 % of a worker's wall time at batches of 3), and it
        ended with the pool's ROLLBACK, on which psycopg drops every statement it has prepared on
        the connection."""
        with self.reader.connect() as conn:
            rows = self._rows(conn, uids, lock=False)
        pre: dict[str, tuple[Message | HL7Error, Any]] = {}
        for row in rows:
            if row.status in FINAL:
                continue
            parsed = _parse(row)
            if isinstance(parsed, HL7Error):
                pre[row.uid] = (parsed, None)
                continue
            msg = parsed
            try:
                pre[row.uid] = (msg, self._route_and_map(row, msg))
            except PermanentError as exc:
                pre[row.uid] = (msg, exc)
        return pre

    def _load(self, conn: Connection, uids: list[str], pre: dict[str, tuple[Message | HL7Error, Any]]) -> _Batch:
        """The batch's message rows (locked on PostgreSQL), parsed (and mapped, when ``pre`` has them)
        and the parked state of their patients."""
        batch = _Batch()
        for row in self._rows(conn, uids, lock=True):
            batch.rows[row.uid] = row
            batch.status[row.uid] = row.status
        for uid, row in batch.rows.items():
            if row.status in FINAL:
                continue
            if uid in pre:
                parsed, result = pre[uid]
                batch.parsed[uid] = parsed
                if result is not None:
                    batch.mapped[uid] = result
                if isinstance(parsed, HL7Error):
                    continue
                msg = parsed
            else:
                parsed = _parse(row)
                batch.parsed[uid] = parsed
                if isinstance(parsed, HL7Error):
                    continue
                msg = parsed
            try:
                batch.search[row.id] = search_keys(msg)
            except Exception as exc:  # a bug: the message goes on without search keys
                internal_error("index", exc)
            key = patient_key(msg, row.sending_facility or "")
            if key is not None:
                batch.keys[uid] = key
        keys = sorted(set(batch.keys.values()))
        for start in range(0, len(keys), CHUNK):
            parked: Sequence[Any] = conn.execute(
                select(parked_patients.c.patient_key, parked_patients.c.message_uid)
                .where(one_of(conn, parked_patients.c.patient_key, keys[start:start + CHUNK]))).all()
            for r in parked:
                batch.parked[r.patient_key] = r.message_uid
        return batch

    def _prepare(self, uid: str, batch: _Batch, done: _Done) -> Outcome | _Ready:
        """Everything before the record write (no writes): the outcome when there is nothing to
        write, else what to write. A permanent failure raises PermanentError."""
        row = batch.rows.get(uid)
        if row is None:
            return Outcome("missing")
        if batch.status[uid] in FINAL:
            return Outcome("skipped")
        now = datetime.now(UTC)
        parsed = batch.parsed[uid]
        if isinstance(parsed, HL7Error):
            raise PermanentError("parse", parsed.text) from None
        msg = parsed
        key = batch.keys.get(uid)
        if key is not None:
            parked = batch.parked.get(key)
            if parked is not None and parked != uid:
                reason = f"held: an earlier message of this patient ({parked}) failed; replay or skip it"
                done.mark(row.id, uid, "held", "order", reason, now)
                return Outcome("held", "order", reason)
        result = batch.mapped[uid] if uid in batch.mapped else self._route_and_map(row, msg)
        if isinstance(result, PermanentError):
            raise result
        if result is FILTERED:
            done.mark(row.id, uid, "filtered", "route", "no route matched", now)
            return Outcome("filtered", "route", "no route matched")
        assert isinstance(result, Routed)
        return _Ready(uid, row, result, key)

    def _route_and_map(self, row: MessageRow, msg: Message) -> Routed | object:
        """Validate (when the channel asks), route and map a message: no database access. Returns the
        route with the mapped facts (none for a route that only forwards) or FILTERED; a permanent
        failure raises PermanentError."""
        if row.channel in self.validated:
            try:
                validate(decode(row.raw, row.charset or "utf-8"))
            except ValidationFailed as exc:
                raise PermanentError("validate", exc.reason) from None
        route = self.router.route(MessageKey(row.channel, row.message_type or "", row.trigger_event or "",
                                             row.structure or "", row.sending_facility or "", row.version or ""))
        if route is None:
            if self.router.default == "filter":
                return FILTERED
            raise PermanentError("route", f"no route matches {row.message_type}^{row.trigger_event} "
                                          f"from channel {row.channel!r}")
        if route.mapping is None:  # forwarded as received, not mapped
            return Routed(route, None)
        label = f"{row.message_type}^{row.trigger_event}" if row.trigger_event else (row.message_type or "")
        context = {"channel": row.channel, "timezone": self.timezones.get(row.channel, "UTC"),
                   "control_id": row.control_id or "", "sending_facility": row.sending_facility or "",
                   "message_type": label}
        try:
            return Routed(route, self.map_message(route.mapping, msg, context))
        except RetryLater:
            raise
        except EngineError as exc:
            raise PermanentError("map", str(exc)) from None
        except Exception as exc:  # a bug meeting this message: it fails alone, the others flow on
            raise internal_error("map", exc) from None

    def _mark_failed(self, conn: Connection, uid: str, batch: _Batch, exc: PermanentError) -> Outcome:
        """Mark the message error and park its patient (in the caller's transaction)."""
        now = datetime.now(UTC)
        row = batch.rows.get(uid)
        if row is not None:
            done = _Done()
            done.mark(row.id, uid, "error", exc.step, exc.reason, now)
            key = batch.keys.get(uid)
            if key is not None and key not in batch.parked:
                conn.execute(insert(parked_patients).values(patient_key=key, message_uid=uid, parked_at=now))
                done.parked = key
            batch.keep(done)
        return Outcome("error", exc.step, exc.reason)

    def _write_outbound(self, conn: Connection, batch: _Batch) -> None:
        """What the batch's outcomes owe other systems, committed with them (engine.outbound): the
        forwards of processed messages, and the application ACKs."""
        rows = batch.outbound
        if self.appacks:
            last = {m["b_uid"]: m for m in batch.marks}  # a message's final status in this batch
            rows = rows + self.appacks.rows(((batch.rows[uid], m["b_status"], m["b_step"], m["b_error"])
                                             for uid, m in last.items() if uid in batch.rows), datetime.now(UTC))
        if rows:
            conn.execute(insert(outbound), rows)

    def _notify(self, conn: Connection, batch: _Batch) -> None:
        """Tell listeners waiting for outcomes (``ack.after: processed``) to look now, not at their
        next poll: PostgreSQL delivers the NOTIFY with the commit (SQLite listeners watch the file)."""
        if not self.notify_channels or conn.dialect.name != "postgresql":
            return
        if any(batch.rows[m["b_uid"]].channel in self.notify_channels for m in batch.marks if m["b_uid"] in batch.rows):
            conn.exec_driver_sql(f"NOTIFY {OUTCOMES}")

    @staticmethod
    def _write_marks(conn: Connection, marks: list[dict[str, Any]]) -> None:
        """The batch's status changes and events: on PostgreSQL one statement each, from arrays;
        elsewhere an executemany each."""
        if not marks:
            return
        if conn.dialect.name == "postgresql":
            final = list({m["b_id"]: m for m in marks}.values())  # a message's last mark is its status
            conn.exec_driver_sql(
                "UPDATE messages SET status = u.status, error_step = u.step, error = u.error, updated_at = u.at "
                "FROM unnest(%b::bigint[], %b::text[], %b::text[], %b::text[], %b::timestamptz[]) "
                "AS u(id, status, step, error, at) WHERE messages.id = u.id",
                tuple([m[k] for m in final] for k in ("b_id", "b_status", "b_step", "b_error", "b_at")))
            conn.exec_driver_sql(
                "INSERT INTO message_events (message_id, at, status, step, detail) "
                "SELECT * FROM unnest(%b::bigint[], %b::timestamptz[], %b::text[], %b::text[], %b::text[])",
                tuple([m[k] for m in marks] for k in ("b_id", "b_at", "b_status", "b_step", "b_error")))
            return
        conn.execute(update(messages).where(messages.c.id == bindparam("b_id")).values(
            status=bindparam("b_status", type_=messages.c.status.type),
            error_step=bindparam("b_step", type_=messages.c.error_step.type),
            error=bindparam("b_error", type_=messages.c.error.type),
            updated_at=bindparam("b_at", type_=messages.c.updated_at.type)),
            [{k: v for k, v in m.items() if k != "b_uid"} for m in marks])
        conn.execute(insert(message_events), [
            {"message_id": m["b_id"], "at": m["b_at"], "status": m["b_status"], "step": m["b_step"],
             "detail": m["b_error"]} for m in marks])


CHUNK = 500


MESSAGE_COLUMNS = (messages.c.id, messages.c.uid, messages.c.channel, messages.c.raw, messages.c.charset,
                   messages.c.status, messages.c.sending_facility, messages.c.control_id, messages.c.message_type,
                   messages.c.trigger_event, messages.c.structure, messages.c.version, messages.c.received_at)


class MessageRow:
    """The columns of a ``messages`` row that the worker reads. Not SQLAlchemy's Row: the worker reads
    about twenty of its attributes per message, each a lookup by name there (about 3,600 instructions
    in the compiled worker, under callgrind), a field here."""

    __slots__ = ("channel", "charset", "control_id", "id", "message_type", "raw", "received_at", "sending_facility",
                 "status", "structure", "trigger_event", "uid", "version")

    def __init__(self, id: int, uid: str, channel: str, raw: bytes, charset: str | None, status: str,
                 sending_facility: str | None, control_id: str | None, message_type: str | None,
                 trigger_event: str | None, structure: str | None, version: str | None, received_at: datetime) -> None:
        self.id = id
        self.uid = uid
        self.channel = channel
        self.raw = raw
        self.charset = charset
        self.status = status
        self.sending_facility = sending_facility
        self.control_id = control_id
        self.message_type = message_type
        self.trigger_event = trigger_event
        self.structure = structure
        self.version = version
        self.received_at = received_at

    @staticmethod
    def of(t: tuple[Any, ...]) -> MessageRow:
        """From a result row's values, in ``MESSAGE_COLUMNS`` order."""
        return MessageRow(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10], t[11], t[12])


@dataclass(slots=True)
class _Done:
    """What one message did that the batch keeps once its savepoint is released."""

    marks: list[dict[str, Any]] = field(default_factory=list)
    outbound: list[dict[str, Any]] = field(default_factory=list)  # forwards to the route's destinations
    parked: str | None = None  # patient key parked by this message
    released: str | None = None  # patient key released by this message

    def mark(self, message_id: int, uid: str, status: str, step: str, reason: str | None, now: datetime) -> None:
        self.marks.append({"b_id": message_id, "b_uid": uid, "b_status": status, "b_step": step or None,
                           "b_error": reason, "b_at": now})


@dataclass(slots=True)
class Routed:
    """A message's route, and its mapped facts (None when the route does not write the record)."""

    route: Route
    facts: Any


@dataclass(slots=True, eq=False)
class _Ready:
    """A message mapped and ready for the record write (and its forwards)."""

    uid: str
    row: MessageRow
    routed: Routed
    key: str | None
    index: int = 0
    done: _Done = field(default_factory=_Done)


@dataclass(slots=True)
class _Batch:
    rows: dict[str, MessageRow] = field(default_factory=dict)  # uid -> message row
    status: dict[str, str] = field(default_factory=dict)  # uid -> status, as the batch changed it
    parsed: dict[str, Message | HL7Error] = field(default_factory=dict)
    mapped: dict[str, Any] = field(default_factory=dict)  # uid -> mapped facts, FILTERED or PermanentError
    keys: dict[str, str] = field(default_factory=dict)  # uid -> patient key
    search: dict[int, list[Key]] = field(default_factory=dict)  # message id -> search keys (message_keys)
    parked: dict[str, str] = field(default_factory=dict)  # patient key -> uid of the message that parked it
    marks: list[dict[str, Any]] = field(default_factory=list)
    outbound: list[dict[str, Any]] = field(default_factory=list)  # forwards of the messages processed

    def keep(self, done: _Done) -> None:
        self.marks.extend(done.marks)
        self.outbound.extend(done.outbound)
        for m in done.marks:
            self.status[m["b_uid"]] = m["b_status"]
        if done.released is not None:
            self.parked.pop(done.released, None)
        if done.parked is not None:
            self.parked[done.parked] = done.marks[-1]["b_uid"]


def patient_key(msg: Message, facility: str) -> str | None:
    """The sender's patient: MSH-4 with the first PID-3 identifier and its assigning authority."""
    pid = msg.first("PID")
    if pid is None:
        return None
    ident = pid.value(3, 1, 1) or ""
    authority = pid.value(3, 1, 4) or ""
    if not ident:
        return None
    return f"{facility}|{ident}^{authority}"[:300]


_PG_ROWS = ("SELECT " + ", ".join(c.name for c in MESSAGE_COLUMNS)
            + " FROM messages WHERE uid = ANY(%s) ORDER BY id")


def _pg_rows(conn: Connection, uids: list[str], lock: bool) -> list[MessageRow]:
    """``_rows`` on PostgreSQL: read through the driver's cursor in binary format, in the caller's
    transaction. In text format every message's raw bytes came as hex (twice their size, decoded in
    the worker) and SQLAlchemy processed each row (measured: about 2% of a worker's instructions)."""
    driver: Any = conn.connection.driver_connection
    sql = _PG_ROWS + (" FOR UPDATE" if lock else "")
    rows: list[MessageRow] = []
    try:
        with driver.cursor(binary=True) as cur:
            for start in range(0, len(uids), CHUNK):
                cur.execute(sql, (uids[start:start + CHUNK],))
                for t in cur.fetchall():
                    r = MessageRow.of(t)
                    r.received_at = r.received_at.astimezone(UTC)  # UTCDateTime's form: the session's zone differs
                    rows.append(r)
    except conn.dialect.loaded_dbapi.Error as exc:
        raise driver_error(conn, sql, exc) from exc
    return rows


def _parse(row: MessageRow) -> Message | HL7Error:
    try:
        return Message.parse(decode(row.raw, row.charset or "utf-8"))
    except HL7Error as exc:
        return exc
    except Exception as exc:  # a bug meeting this message: it fails alone at step parse
        err = internal_error("parse", exc)
        return HL7Error("207", "INTERNAL_ERROR", err.reason)


def internal_error(step: str, exc: Exception) -> PermanentError:
    """A permanent failure for an unexpected exception (a bug this message meets). The log gets its
    type and where it was raised, never its text, which may quote the message's values."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb is not None else "?"
    log.error("internal error while processing a message", step=step, error=type(exc).__name__, at=where)
    return PermanentError(step, f"internal error ({type(exc).__name__} at {where}); the message is kept: "
                                "report it, then replay it once fixed")


def _transient(exc: DBAPIError) -> bool:
    """Deadlocks, serialisation failures, lock timeouts and lost connections are worth retrying."""
    code = getattr(exc.orig, "sqlstate", None) or ""
    if code.startswith(("40", "08", "53", "57")) or code == "55P03":
        return True
    text = str(exc.orig).lower()
    return "database is locked" in text or "deadlock" in text


def _aware(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at

