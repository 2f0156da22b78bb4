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

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlalchemy.exc import DBAPIError

from engine.errors import EngineError, HL7Error
from engine.hl7.charsets import decode
from engine.hl7.message import Message
from engine.observe import get_logger
from engine.store.schema import message_events, messages, parked_patients
from engine.worker.router import MessageKey, Router

log = get_logger("engine.worker")

FINAL = ("processed", "filtered", "duplicate")


class RetryLater(EngineError):
    """A transient failure: try the same message again later; nothing was marked."""


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


class Processor:
    """Everything a worker needs to process a message, built once per worker process."""

    def __init__(self, engine: Engine, router: Router, map_message: MapFn, apply_facts: ApplyFn,
                 timezones: dict[str, str]) -> None:
        self.engine = engine
        self.router = router
        self.map_message = map_message
        self.apply_facts = apply_facts
        self.timezones = timezones  # channel -> timezone

    def process(self, uid: str, *, after: Callable[[Connection], None] | None = None) -> Outcome:
        """Process the message ``uid``; ``after(conn)`` runs in the same transaction before the commit
        (the embedded queue deletes its entry there)."""
        return self.process_batch([(uid, after)])[0]

    def process_batch(self, items: list[tuple[str, Callable[[Connection], None] | None]]) -> list[Outcome]:
        """Process several messages, in order, in ONE transaction (one commit, one fsync); each in a
        savepoint, so a permanent failure is rolled back alone and marked (its patient parked) in
        the same transaction. A transient failure rolls back the whole batch: RetryLater."""
        outcomes: list[Outcome] = []
        try:
            with self.engine.begin() as conn:
                for uid, after in items:
                    savepoint = conn.begin_nested()
                    try:
                        outcome = self._process(conn, uid)
                        savepoint.commit()
                    except PermanentError as exc:
                        savepoint.rollback()
                        outcome = self._mark_failed(conn, uid, exc)
                    except DBAPIError as exc:
                        if exc.connection_invalidated or _transient(exc):
                            raise
                        savepoint.rollback()  # e.g. a constraint the record refused: this message only
                        outcome = self._mark_failed(conn, uid, PermanentError("record", _short(exc)))
                    if after is not None:
                        after(conn)
                    outcomes.append(outcome)
        except DBAPIError as exc:
            raise RetryLater(_short(exc)) from exc
        for (uid, _), outcome in zip(items, outcomes, strict=True):
            if outcome.status == "error":
                log.warning("message failed", uid=uid, step=outcome.step, reason=outcome.reason[:300])
        return outcomes

    def _process(self, conn: Connection, uid: str) -> Outcome:
        q = select(messages.c.id, messages.c.channel, messages.c.raw, messages.c.charset, messages.c.status,
                   messages.c.sending_facility, messages.c.control_id, messages.c.message_type,
                   messages.c.trigger_event, messages.c.structure, messages.c.version,
                   messages.c.received_at).where(messages.c.uid == uid)
        if conn.dialect.name == "postgresql":
            q = q.with_for_update()
        row = conn.execute(q).first()
        if row is None:
            return Outcome("missing")
        if row.status in FINAL:
            return Outcome("skipped")
        now = datetime.now(UTC)
        try:
            msg = Message.parse(decode(row.raw, row.charset or "utf-8"))
        except HL7Error as exc:
            raise PermanentError("parse", exc.text) from None
        key = patient_key(msg, row.sending_facility or "")
        if key is not None:
            parked = conn.execute(select(parked_patients.c.message_uid)
                                  .where(parked_patients.c.patient_key == key)).first()
            if parked is not None and parked.message_uid != uid:
                reason = f"held: an earlier message of this patient ({parked.message_uid}) failed; replay or skip it"
                self._mark(conn, row.id, uid, "held", "order", reason, now)
                return Outcome("held", "order", reason)
        route = self.router.route(MessageKey(row.channel, row.message_type or "", row.trigger_event or "",
                                             row.structure or "", row.sending_facility or "", row.version or ""))
        if route is None:
            if self.router.default == "filter":
                self._mark(conn, row.id, uid, "filtered", "route", "no route matched", now)
                return Outcome("filtered", "route", "no route matched")
            raise PermanentError("route", f"no route matches {row.message_type}^{row.trigger_event} "
                                          f"from channel {row.channel!r}")
        label = f"{row.message_type}^{row.trigger_event}" if row.trigger_event else (row.message_type or "")
        context = {"channel": row.channel, "timezone": self.timezones.get(row.channel, "UTC"),
                   "control_id": row.control_id or "", "sending_facility": row.sending_facility or "",
                   "message_type": label}
        try:
            mapped = self.map_message(route.mapping, msg, context)
        except RetryLater:
            raise
        except EngineError as exc:
            raise PermanentError("map", str(exc)) from None
        try:
            facts = self.apply_facts(conn, mapped, uid, row.received_at)
        except (DBAPIError, RetryLater):
            raise
        except EngineError as exc:
            raise PermanentError("record", str(exc)) from None
        if key is not None:  # a replayed message that had parked its patient releases it
            conn.execute(delete(parked_patients).where(parked_patients.c.patient_key == key))
        self._mark(conn, row.id, uid, "processed", "", None, now)
        return Outcome("processed", facts=facts)

    def _mark_failed(self, conn: Connection, uid: str, exc: PermanentError) -> Outcome:
        """Mark the message error and park its patient (in the caller's transaction)."""
        now = datetime.now(UTC)
        row = conn.execute(select(messages.c.id, messages.c.raw, messages.c.charset, messages.c.sending_facility)
                           .where(messages.c.uid == uid)).first()
        if row is not None:
            self._mark(conn, row.id, uid, "error", exc.step, exc.reason, now)
            try:
                key = patient_key(Message.parse(decode(row.raw, row.charset or "utf-8")), row.sending_facility or "")
            except HL7Error:
                key = None
            if key is not None and conn.execute(select(parked_patients.c.message_uid)
                                                .where(parked_patients.c.patient_key == key)).first() is None:
                conn.execute(insert(parked_patients).values(patient_key=key, message_uid=uid, parked_at=now))
        return Outcome("error", exc.step, exc.reason)

    @staticmethod
    def _mark(conn: Connection, message_id: int, uid: str, status: str, step: str, reason: str | None,
              now: datetime) -> None:
        conn.execute(update(messages).where(messages.c.id == message_id)
                     .values(status=status, error_step=step or None, error=reason, updated_at=now))
        conn.execute(insert(message_events).values(message_id=message_id, at=now, status=status,
                                                   step=step or None, detail=reason))


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


def _transient(exc: DBAPIError) -> bool:
    """Deadlocks, serialisation failures, lock timeouts and lost connections are worth retrying."""
    code = getattr(exc.orig, "sqlstate", None) or ""
    if code.startswith(("40", "08", "53", "57")) or code == "55P03":
        return True
    text = str(exc.orig).lower()
    return "database is locked" in text or "deadlock" in text


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
