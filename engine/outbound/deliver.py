"""Deliver what ``outbound`` holds: application ACKs to the senders' listeners (enhanced mode) and
processed messages to their routes' ``mllp`` and ``file`` destinations.

Runs in the listener process (``hl7engine run`` / ``listen``), in a thread of its own. Every
``interval`` it looks for rows that are due; when there are some it claims them (PostgreSQL: an
advisory lock for the claim, ``FOR UPDATE SKIP LOCKED`` and a lease, so several listener hosts never
send the same row at once) and delivers them, oldest first per stream (an application ACK's channel,
a destination's name; none while an older row of the stream waits for its retry or is claimed by
another listener). MLLP peers get each message on a connection kept open between rounds, and its
answer is awaited (unless the peer never answers: ``commit_ack: false`` / ``wait_for_ack: false``):

- CA or AA whose MSA-2 is the message's MSH-10: ``sent``;
- CR or AR: ``refused``, not sent again (the peer will never take it: see its MSA-3/ERR);
- CE/AE, no answer within ``answer_timeout``, no connection: tried again after a backoff (1 s,
  doubling up to 5 min), the stream's later rows waiting behind it; after ``give_up_after``
  since it was due (written, or resent by an operator): ``expired``.

A file destination writes the message to a temporary file beside its final name, flushes it to
disk, renames it and flushes the directory: ``sent``; an error (disk full, permissions) is retried
the same way.

Delivery is at least once: a crash after the peer's answer (or the rename) and before the row is
marked delivers it again, with the same bytes (and, for a file, the same name).
"""

from __future__ import annotations

import contextlib
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, and_, bindparam, false, or_, select, text, update

from engine.config.models import ChannelConfig, MLLPPeerConfig
from engine.config.routes import FileDestination, Forward
from engine.errors import short_reason
from engine.mllp.client import MLLPClient, client_tls_context, read_acks
from engine.observe import APPLICATION_ACKS, FORWARDS, get_logger
from engine.outbound.appack import KIND as APP_ACK
from engine.store import db
from engine.store.schema import outbound

log = get_logger("engine.outbound")

LEASE = 120.0  # seconds a claimed row is left alone by other listeners (a crash mid-round frees it then)
IDLE_CLOSE = 30.0  # close a peer connection unused this long
BATCH = 200


@dataclass(slots=True)
class _Attempt:
    outcome: str  # sent, refused, failed
    answer: str = ""
    error: str = ""
    code: str = ""  # the peer's MSA-1


class _Target:
    """Where one stream's rows go."""

    kind: str
    name: str  # the stream: a channel (application ACKs) or a destination's name
    give_up_after: float

    def where(self, row: Any) -> str:
        return str(row.destination)

    def attempt(self, row: Any) -> _Attempt:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def close_idle(self, now: float) -> None:
        pass

    def count(self, outcome: str) -> None:
        raise NotImplementedError

    def log(self, level: str, event: str, row: Any, **kw: Any) -> None:
        raise NotImplementedError


class _Peer(_Target):
    """An MLLP listener: a sender's (application ACKs) or a downstream system's (mllp destination)."""

    def __init__(self, kind: str, name: str, cfg: MLLPPeerConfig) -> None:
        self.kind = kind
        self.name = name
        self.cfg = cfg
        self.give_up_after = cfg.give_up_after
        self.tls: ssl.SSLContext | None = client_tls_context(cfg.tls)
        self.client: MLLPClient | None = None
        self.used = 0.0

    def connect(self) -> MLLPClient:
        if self.client is not None and not self.client.alive():  # the peer dropped an idle connection
            self.close()
        if self.client is None:
            server_name = self.cfg.tls.server_name if self.cfg.tls is not None else None
            self.client = MLLPClient(self.cfg.host, self.cfg.port, timeout=self.cfg.connect_timeout, tls=self.tls,
                                     server_hostname=server_name or self.cfg.host)
        self.used = time.monotonic()
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def close_idle(self, now: float) -> None:
        if self.client is not None and now - self.used > IDLE_CLOSE:
            with contextlib.suppress(Exception):
                self.close()

    def where(self, row: Any) -> str:
        return self.cfg.to

    def attempt(self, row: Any) -> _Attempt:
        try:
            if not self.cfg.waits_for_ack:  # a peer that never answers: written is delivered
                self.connect().write(bytes(row.payload))
                return _Attempt("sent", "written (no commit ACK asked)" if self.kind == APP_ACK
                                else "written (no ACK awaited)")
            reply = self.connect().send(bytes(row.payload), timeout=self.cfg.answer_timeout)
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            self.close()
            return _Attempt("failed", error=f"{type(exc).__name__}: {exc}"[:300])
        error = ""
        if reply is None:
            error = f"no answer within {self.cfg.answer_timeout:g}s"
        elif not (acks := read_acks(reply)):
            error = "the answer holds no MSA segment"
        elif acks[0].control_id[:64] != row.control_id:
            error = f"the answer is for another message (MSA-2 {acks[0].control_id[:40]!r})"
        else:
            code = acks[0].code
            answer = f"{code} {acks[0].text}".strip()[:300]
            if code in ("CA", "AA"):
                return _Attempt("sent", answer, code=code)
            if code in ("CR", "AR"):
                return _Attempt("refused", answer, answer, code=code)
            error = f"the peer answered {answer}"
        self.close()  # a late answer must not be read as the next one's
        return _Attempt("failed", error=error)

    def count(self, outcome: str) -> None:
        if self.kind == APP_ACK:
            APPLICATION_ACKS.labels(self.name, outcome).inc()
        else:
            FORWARDS.labels(self.name, outcome).inc()

    def log(self, level: str, event: str, row: Any, **kw: Any) -> None:
        what = "application ACK" if self.kind == APP_ACK else "forwarded message"
        where = {"channel": self.name} if self.kind == APP_ACK else {"destination": self.name, "channel": row.channel}
        getattr(log, level)(f"{what} {event}", **where, control_id=row.control_id, **kw)


class _Files(_Target):
    """A file destination: one file per message under ``directory``."""

    def __init__(self, dest: FileDestination) -> None:
        self.kind = "file"
        self.name = dest.name
        self.directory = dest.directory
        self.give_up_after = dest.give_up_after

    def attempt(self, row: Any) -> _Attempt:
        path = self.directory / str(row.destination)
        try:
            write_file(path, bytes(row.payload))
        except OSError as exc:
            return _Attempt("failed", error=f"{type(exc).__name__}: {exc.strerror or exc}"[:300])
        return _Attempt("sent", f"written {row.destination}"[:300])

    def count(self, outcome: str) -> None:
        FORWARDS.labels(self.name, outcome).inc()

    def log(self, level: str, event: str, row: Any, **kw: Any) -> None:
        kw.pop("answer", None)
        getattr(log, level)(f"file {event}", destination=self.name, channel=row.channel,
                            control_id=row.control_id, **kw)


FILE_MODE = 0o640


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the whole file or none, and it survives a
    power cut once this returns: a temporary name in the same directory, fsync, rename, fsync of
    the directory. An existing file of that name (a replay, or a retry after a crash) is replaced."""
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        # patient data: readable by the owner and its group only (the umask may take more away)
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class _Result:
    target: _Target
    id: int
    status: str
    attempts: int
    next_attempt_at: datetime
    destination: str
    sent_at: datetime | None = None
    answer: str | None = None
    last_error: str | None = None
    outcome: str = ""  # for the metric: sent, refused, retry, expired (or waiting behind a retry)


class Deliverer:
    """Delivers the due ``outbound`` rows of the given channels' application ACKs and of the given
    route destinations; ``start`` runs it in a thread."""

    def __init__(self, database_url: str, channels: Iterable[tuple[str, ChannelConfig]],
                 destinations: Iterable[Forward] = (), *, interval: float = 0.05,
                 backoff_first: float = 1.0, backoff_most: float = 300.0,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.database_url = database_url
        self.targets: dict[tuple[str, str], _Target] = {}
        for name, cfg in channels:
            if cfg.ack.mode == "enhanced" and cfg.ack.application_acks is not None:
                self.targets[(APP_ACK, name)] = _Peer(APP_ACK, name, cfg.ack.application_acks)
        for d in destinations:
            self.targets[(d.type, d.name)] = _Files(d) if isinstance(d, FileDestination) else _Peer(d.type, d.name, d)
        streams: dict[str, list[str]] = {}
        for kind, name in sorted(self.targets):
            streams.setdefault(kind, []).append(name)
        # the rows this deliverer may send: its application ACK channels' and destinations'
        self._ours = or_(false(), *(and_(outbound.c.kind == kind, outbound.c.target.in_(names))
                                    for kind, names in streams.items()))
        self.interval = interval
        self.backoff_first = backoff_first
        self.backoff_most = backoff_most
        self.now = now
        self._engine: Engine | None = None
        self._reader: Engine | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def __bool__(self) -> bool:
        return bool(self.targets)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbound", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for target in self.targets.values():
            target.close()
        for e in (self._engine, self._reader):
            if e is not None:
                e.dispose()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
                if self._failing:
                    log.info("outbound delivery works again")
                    self._failing = False
            except Exception as exc:  # e.g. the store unreachable: keep trying, say so once
                busy = 0
                if not self._failing:
                    log.error("outbound delivery failed; retrying", error=short_reason(exc))
                    self._failing = True
                self._stop.wait(min(5.0, self.interval * 10))
            now = time.monotonic()
            for target in self.targets.values():
                target.close_idle(now)
            if busy < BATCH:
                self._stop.wait(self.interval)

    def _engines(self) -> tuple[Engine, Engine]:
        if self._engine is None:
            sqlite = db.is_sqlite(self.database_url)
            # a mark lost to a power cut means one more delivery, which at-least-once allows
            self._engine = db.make_engine(self.database_url, pool_size=1, writer=sqlite, repeatable=True)
            # on SQLite, the check for due rows must not take the write lock the store writer needs
            self._reader = db.make_engine(self.database_url, pool_size=1) if sqlite else self._engine
        assert self._reader is not None
        return self._engine, self._reader

    def run_once(self) -> int:
        """One round: claim the due rows, deliver them, record what happened. Returns how many rows."""
        engine, reader = self._engines()
        now = self.now()
        # due, unless an older one of its stream is waiting (a retry later, or claimed by another
        # listener): a stream's rows leave in the order they were written
        h = outbound.alias("earlier")
        waiting = select(h.c.id).where(h.c.kind == outbound.c.kind, h.c.target == outbound.c.target,
                                       h.c.status == "pending", h.c.id < outbound.c.id,
                                       h.c.next_attempt_at > now).exists()
        due = (outbound.c.status == "pending") & (outbound.c.next_attempt_at <= now) & self._ours & ~waiting
        with reader.connect() as conn:
            if conn.execute(select(outbound.c.id).where(due).limit(1)).first() is None:
                return 0
        with engine.begin() as conn:
            q = select(outbound.c.id, outbound.c.kind, outbound.c.target, outbound.c.channel, outbound.c.control_id,
                       outbound.c.payload, outbound.c.attempts, outbound.c.due_at, outbound.c.destination
                       ).where(due).order_by(outbound.c.id).limit(BATCH)
            if conn.dialect.name == "postgresql":
                # one listener claims at a time (SQLite: BEGIN IMMEDIATE), so a claim always sees the
                # previous one's lease and the order rule above holds across listeners
                if not conn.execute(text("SELECT pg_try_advisory_xact_lock(7412)")).scalar():
                    return 0
                q = q.with_for_update(skip_locked=True)
            rows = conn.execute(q).all()
            if rows:
                conn.execute(update(outbound).where(outbound.c.id.in_([r.id for r in rows]))
                             .values(next_attempt_at=now + timedelta(seconds=LEASE)))
        results: list[_Result] = []
        by_stream: dict[tuple[str, str], list[Any]] = {}
        for r in rows:
            by_stream.setdefault((r.kind, r.target), []).append(r)
        # the lease must outlast the round: what is not sent by half of it goes back, due at once
        deadline = time.monotonic() + LEASE / 2
        for stream, items in by_stream.items():
            results += self._send(self.targets[stream], items, deadline)
        if results:
            with engine.begin() as conn:
                # only rows still pending: one an operator cancelled meanwhile stays cancelled
                conn.execute(update(outbound).where(outbound.c.id == bindparam("b_id"),
                                                    outbound.c.status == "pending").values(
                    status=bindparam("b_status"), attempts=bindparam("b_attempts"),
                    next_attempt_at=bindparam("b_next", type_=outbound.c.next_attempt_at.type),
                    sent_at=bindparam("b_sent", type_=outbound.c.sent_at.type), answer=bindparam("b_answer"),
                    last_error=bindparam("b_error"), destination=bindparam("b_dest")),
                    [{"b_id": x.id, "b_status": x.status, "b_attempts": x.attempts, "b_next": x.next_attempt_at,
                      "b_sent": x.sent_at, "b_answer": x.answer, "b_error": x.last_error, "b_dest": x.destination}
                     for x in results])
            for x in results:
                if x.outcome != "waiting":
                    x.target.count(x.outcome)
        return len(rows)

    def _send(self, target: _Target, rows: list[Any], deadline: float) -> list[_Result]:
        """Deliver a stream's rows in order; at the first failure the rest wait with it. Past
        ``deadline`` the rest are given back unsent, due at once."""
        out: list[_Result] = []
        for i, r in enumerate(rows):
            now = self.now()
            if time.monotonic() > deadline:
                out += [_Result(target, w.id, "pending", w.attempts, now, w.destination, outcome="waiting")
                        for w in rows[i:]]
                break
            done = target.attempt(r)
            attempts = r.attempts + 1
            dest = target.where(r)
            if done.outcome == "sent":
                out.append(_Result(target, r.id, "sent", attempts, now, dest, sent_at=now, answer=done.answer,
                                   outcome="sent"))
                target.log("info", "sent", r, answer=done.code)
                continue
            if done.outcome == "refused":
                out.append(_Result(target, r.id, "refused", attempts, now, dest, answer=done.answer,
                                   last_error=done.error, outcome="refused"))
                target.log("warning", "refused by the peer", r, answer=done.code)
                continue
            due = r.due_at if r.due_at.tzinfo else r.due_at.replace(tzinfo=UTC)
            if now - due >= timedelta(seconds=target.give_up_after):
                out.append(_Result(target, r.id, "expired", attempts, now, dest, last_error=done.error,
                                   outcome="expired"))
                target.log("error", "not delivered; giving up", r, attempts=attempts, error=done.error)
                continue
            delay = min(self.backoff_most, self.backoff_first * 2 ** min(r.attempts, 20))
            later = now + timedelta(seconds=delay)
            out.append(_Result(target, r.id, "pending", attempts, later, dest, last_error=done.error,
                               outcome="retry"))
            target.log("warning", "not delivered; will retry", r, attempts=attempts, retry_in=delay,
                       error=done.error)
            # the stream's later rows wait behind this one (their order is kept); no attempt counted
            out += [_Result(target, w.id, "pending", w.attempts, later, w.destination, outcome="waiting")
                    for w in rows[i + 1:]]
            break
        return out
