"""Deliver the application ACKs in ``outbound`` to the senders' listeners (enhanced mode).

Runs in the listener process (``hl7engine run`` / ``listen``), in a thread of its own. Every
``interval`` it looks for rows that are due; when there are some it claims them (PostgreSQL: an
advisory lock for the claim, ``FOR UPDATE SKIP LOCKED`` and a lease, so several listener hosts never
send the same row at once) and sends them over MLLP, oldest first per channel (none while an older
one of the channel waits for its retry or is claimed by another listener), on a connection kept
open between rounds. Each application ACK asks for a commit ACK (MSH-15 AL) and waits for it:

- CA (or AA) with our MSH-10 in MSA-2: ``sent``;
- CR (or AR): ``refused``, not sent again (the peer will never take it: see its MSA-3/ERR);
- CE/AE, no answer within ``answer_timeout``, no connection: tried again after a backoff (1 s,
  doubling up to 5 min), the channel's later rows waiting behind it; after ``give_up_after``
  since it was due (written, or resent by an operator): ``expired``.

Delivery is at least once: a crash after the peer's CA and before the row is marked sends it again,
with the same bytes and MSH-10, which the peer can recognise.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, bindparam, select, text, update

from engine.config.models import ApplicationAcksConfig, ChannelConfig
from engine.errors import short_reason
from engine.mllp.client import MLLPClient, client_tls_context, read_acks
from engine.observe import APPLICATION_ACKS, get_logger
from engine.store import db
from engine.store.schema import outbound

log = get_logger("engine.outbound")

LEASE = 120.0  # seconds a claimed row is left alone by other listeners (a crash mid-round frees it then)
IDLE_CLOSE = 30.0  # close a peer connection unused this long
BATCH = 200


@dataclass(slots=True)
class _Peer:
    channel: str
    cfg: ApplicationAcksConfig
    tls: ssl.SSLContext | None
    client: MLLPClient | None = None
    used: float = 0.0

    def connect(self) -> MLLPClient:
        if self.client is not None and not self.client.alive():  # the sender dropped an idle connection
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


@dataclass(slots=True)
class _Result:
    channel: str
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
    """Sends due application ACKs of the given channels; ``start`` runs it in a thread."""

    def __init__(self, database_url: str, channels: Iterable[tuple[str, ChannelConfig]], *, interval: float = 0.05,
                 backoff_first: float = 1.0, backoff_most: float = 300.0,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.database_url = database_url
        self.peers = {name: _Peer(name, cfg.ack.application_acks, client_tls_context(cfg.ack.application_acks.tls))
                      for name, cfg in channels
                      if cfg.ack.mode == "enhanced" and cfg.ack.application_acks is not None}
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
        return bool(self.peers)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="application-acks", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for peer in self.peers.values():
            peer.close()
        for e in (self._engine, self._reader):
            if e is not None:
                e.dispose()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
                if self._failing:
                    log.info("application ACK delivery works again")
                    self._failing = False
            except Exception as exc:  # e.g. the store unreachable: keep trying, say so once
                busy = 0
                if not self._failing:
                    log.error("application ACK delivery failed; retrying", error=short_reason(exc))
                    self._failing = True
                self._stop.wait(min(5.0, self.interval * 10))
            self._close_idle()
            if busy < BATCH:
                self._stop.wait(self.interval)

    def _engines(self) -> tuple[Engine, Engine]:
        if self._engine is None:
            sqlite = db.is_sqlite(self.database_url)
            self._engine = db.make_engine(self.database_url, pool_size=1, writer=sqlite)
            # on SQLite, the check for due rows must not take the write lock the store writer needs
            self._reader = db.make_engine(self.database_url, pool_size=1) if sqlite else self._engine
        assert self._reader is not None
        return self._engine, self._reader

    def run_once(self) -> int:
        """One round: claim the due rows, send them, record what happened. Returns how many rows."""
        engine, reader = self._engines()
        now = self.now()
        # due, unless an older one of its channel is waiting (a retry later, or claimed by another
        # listener): a channel's application ACKs leave in the order they were written
        h = outbound.alias("earlier")
        waiting = select(h.c.id).where(h.c.channel == outbound.c.channel, h.c.status == "pending",
                                       h.c.id < outbound.c.id, h.c.next_attempt_at > now).exists()
        due = (outbound.c.status == "pending") & (outbound.c.next_attempt_at <= now) \
            & outbound.c.channel.in_(sorted(self.peers)) & ~waiting
        with reader.connect() as conn:
            if conn.execute(select(outbound.c.id).where(due).limit(1)).first() is None:
                return 0
        with engine.begin() as conn:
            q = select(outbound.c.id, outbound.c.channel, outbound.c.control_id, outbound.c.payload,
                       outbound.c.attempts, outbound.c.due_at, outbound.c.destination
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
        by_channel: dict[str, list[Any]] = {}
        for r in rows:
            by_channel.setdefault(r.channel, []).append(r)
        # the lease must outlast the round: what is not sent by half of it goes back, due at once
        deadline = time.monotonic() + LEASE / 2
        for channel, items in by_channel.items():
            results += self._send(self.peers[channel], items, deadline)
        if results:
            with engine.begin() as conn:
                conn.execute(update(outbound).where(outbound.c.id == bindparam("b_id")).values(
                    status=bindparam("b_status"), attempts=bindparam("b_attempts"),
                    next_attempt_at=bindparam("b_next", type_=outbound.c.next_attempt_at.type),
                    sent_at=bindparam("b_sent", type_=outbound.c.sent_at.type), answer=bindparam("b_answer"),
                    last_error=bindparam("b_error"), destination=bindparam("b_dest")),
                    [{"b_id": x.id, "b_status": x.status, "b_attempts": x.attempts, "b_next": x.next_attempt_at,
                      "b_sent": x.sent_at, "b_answer": x.answer, "b_error": x.last_error, "b_dest": x.destination}
                     for x in results])
            for x in results:
                if x.outcome != "waiting":
                    APPLICATION_ACKS.labels(x.channel, x.outcome).inc()
        return len(rows)

    def _send(self, peer: _Peer, rows: list[Any], deadline: float) -> list[_Result]:
        """Send a channel's rows in order; at the first failure the rest wait with it. Past
        ``deadline`` the rest are given back unsent, due at once."""
        out: list[_Result] = []
        dest = peer.cfg.to
        for i, r in enumerate(rows):
            now = self.now()
            if time.monotonic() > deadline:
                out += [_Result(peer.channel, w.id, "pending", w.attempts, now, w.destination or dest,
                                outcome="waiting") for w in rows[i:]]
                break
            error = ""
            answer = ""
            code = ""
            try:
                if not peer.cfg.commit_ack:  # a sender that never answers an ACK: written is delivered
                    peer.connect().write(bytes(r.payload))
                    code, answer = "CA", "written (no commit ACK asked)"
                elif (reply := peer.connect().send(bytes(r.payload), timeout=peer.cfg.answer_timeout)) is None:
                    error = f"no answer within {peer.cfg.answer_timeout:g}s"
                else:
                    acks = read_acks(reply)
                    if not acks:
                        error = "the answer holds no MSA segment"
                    elif acks[0].control_id != r.control_id:
                        error = f"the answer is for another message (MSA-2 {acks[0].control_id[:40]!r})"
                    else:
                        code = acks[0].code
                        answer = f"{code} {acks[0].text}".strip()[:300]
            except (OSError, ssl.SSLError, ConnectionError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
            if error:
                peer.close()  # a late answer must not be read as the next one's
            attempts = r.attempts + 1
            if code in ("CA", "AA"):
                out.append(_Result(peer.channel, r.id, "sent", attempts, now, dest, sent_at=now, answer=answer,
                                   outcome="sent"))
                log.info("application ACK sent", channel=peer.channel, control_id=r.control_id, answer=code)
                continue
            if code in ("CR", "AR"):
                out.append(_Result(peer.channel, r.id, "refused", attempts, now, dest, answer=answer, last_error=answer,
                                   outcome="refused"))
                log.warning("application ACK refused by the peer", channel=peer.channel, control_id=r.control_id,
                            answer=code)
                continue
            if code:
                error = f"the peer answered {answer}"
                peer.close()
            due = r.due_at if r.due_at.tzinfo else r.due_at.replace(tzinfo=UTC)
            if now - due >= timedelta(seconds=peer.cfg.give_up_after):
                out.append(_Result(peer.channel, r.id, "expired", attempts, now, dest, last_error=error,
                                   outcome="expired"))
                log.error("application ACK not delivered; giving up", channel=peer.channel,
                          control_id=r.control_id, attempts=attempts, error=error)
                continue
            delay = min(self.backoff_most, self.backoff_first * 2 ** min(r.attempts, 20))
            later = now + timedelta(seconds=delay)
            out.append(_Result(peer.channel, r.id, "pending", attempts, later, dest, last_error=error, outcome="retry"))
            log.warning("application ACK not delivered; will retry", channel=peer.channel, control_id=r.control_id,
                        attempts=attempts, retry_in=delay, error=error)
            # the channel's later rows wait behind this one (their order is kept); no attempt counted
            out += [_Result(peer.channel, w.id, "pending", w.attempts, later, w.destination or dest, outcome="waiting")
                    for w in rows[i + 1:]]
            break
        return out

    def _close_idle(self) -> None:
        t = time.monotonic()
        for peer in self.peers.values():
            if peer.client is not None and t - peer.used > IDLE_CLOSE:
                with contextlib.suppress(Exception):
                    peer.close()
