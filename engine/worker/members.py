"""Which worker process consumes which RabbitMQ partition queue.

Every worker process that consumes RabbitMQ is a *member*: it keeps a row in ``worker_members``
with a heartbeat on the database's clock (so hosts' clocks do not matter). About once a second it
reads the live rows (a heartbeat within ``LEASE`` seconds) and computes, as every other member does
from the same rows, ``assign(members, partitions)``: each member gets the floor or the ceiling of
partitions / members, and a partition stays with the member that had it unless the balance needs it
elsewhere (rendezvous hashing with capacities), so a worker that joins takes over about its share
and a worker that leaves gives only its own share away.

A member consumes exactly its partitions: it subscribes to the ones it gains and, after finishing
the messages it holds, cancels the ones it loses (``sources.run_rabbit``). The queues are
single-active-consumer, which keeps this safe while members disagree for a moment: a member that
has not seen a newcomer yet keeps delivering a partition the newcomer has already subscribed to;
RabbitMQ makes the newcomer active only when the old consumer cancels, and hands it the messages
the old one had not acknowledged first, so each patient's messages stay in order.

A member that stops cleanly deletes its row: the others take its partitions within a second. One
that dies is forgotten when its lease runs out (``LEASE`` seconds); RabbitMQ has already put its
unacknowledged messages back at the head of their queues.
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, delete, insert, select, text, update

from engine.observe import get_logger
from engine.store.schema import worker_members

log = get_logger("engine.worker")

LEASE = 6.0  # seconds without a heartbeat after which a member no longer counts
FORGET = 3600.0  # rows of members silent this long are deleted (processes that died)


def _score(member: str, partition: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{member}\0{partition}".encode(), digest_size=8).digest(), "big")


def assign(members: Iterable[str], partitions: int) -> dict[str, list[int]]:
    """Partitions ``0 … partitions-1`` shared by ``members``: every member gets ``partitions // n``
    or one more; each partition goes to the member ranking it highest that still has room, so the
    result depends only on the set of members, and changes little when one joins or leaves."""
    ids = sorted(set(members))
    if not ids:
        return {}
    low, extra = divmod(partitions, len(ids))
    out: dict[str, list[int]] = {m: [] for m in ids}
    high = 0  # members already at low + 1
    for p in range(partitions):
        for m in sorted(ids, key=lambda m: _score(m, p), reverse=True):
            k = len(out[m])
            if k < low or (k == low and high < extra):
                if k == low:
                    high += 1
                out[m].append(p)
                break
    return out


def _db_epoch(conn: Connection) -> float:
    """Now, in epoch seconds, on the database's clock (every member compares against the same one)."""
    name = conn.dialect.name
    if name == "postgresql":
        return float(conn.execute(text("SELECT extract(epoch FROM clock_timestamp())")).scalar_one())
    if name == "sqlite":
        return float(conn.execute(text("SELECT (julianday('now') - 2440587.5) * 86400.0")).scalar_one())
    raise NotImplementedError(f"worker membership on {name}")


@dataclass(frozen=True, slots=True)
class Member:
    id: str
    host: str
    pid: int
    started_at: float
    heartbeat_age: float  # seconds since its last heartbeat
    partitions: str  # what it consumes now, e.g. "0,3,5"

    @property
    def live(self) -> bool:
        return self.heartbeat_age <= LEASE


class Membership:
    """This process's row in ``worker_members``; ``beat`` keeps it alive and says what to consume."""

    def __init__(self, engine: Engine, partitions: int, *, lease: float = LEASE) -> None:
        self.engine = engine
        self.partitions = partitions
        self.lease = lease
        self.host = socket.gethostname()[:255]
        self.pid = os.getpid()
        self.id = f"{self.host[:60]}:{self.pid}:{uuid.uuid4().hex[:10]}"
        self.assigned: list[int] | None = None
        self.members = 0

    def beat(self, consuming: Sequence[int]) -> list[int] | None:
        """Record a heartbeat (and the partitions consumed now); return the partitions this member
        should consume, or None when the database cannot be reached (keep consuming what you have)."""
        shown = ",".join(str(p) for p in sorted(consuming))
        try:
            with self.engine.begin() as conn:
                now = _db_epoch(conn)
                mine = worker_members.c.id == self.id
                if not conn.execute(update(worker_members).where(mine)
                                    .values(heartbeat_at=now, partitions=shown)).rowcount:
                    conn.execute(insert(worker_members).values(id=self.id, host=self.host, pid=self.pid,
                                                               started_at=now, heartbeat_at=now, partitions=shown))
                conn.execute(delete(worker_members).where(worker_members.c.heartbeat_at < now - FORGET))
                live = list(conn.execute(select(worker_members.c.id)
                                         .where(worker_members.c.heartbeat_at >= now - self.lease)).scalars())
        except Exception as exc:
            log.warning("worker heartbeat failed; consuming the same partitions", member=self.id,
                        error=str(exc)[:200])
            return self.assigned
        if self.id not in live:  # a database clock that jumped: count ourselves anyway
            live.append(self.id)
        mine_now = assign(live, self.partitions)[self.id]
        if mine_now != self.assigned or len(live) != self.members:
            log.info("partitions assigned", member=self.id, members=len(live),
                     partitions=",".join(map(str, mine_now)) or "none")
        self.assigned, self.members = mine_now, len(live)
        return mine_now

    def leave(self) -> None:
        """Delete this member's row, so the others take its partitions at once (best effort)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(worker_members).where(worker_members.c.id == self.id))
        except Exception as exc:
            log.warning("could not remove the worker's membership row", member=self.id, error=str(exc)[:200])


def list_members(engine: Engine) -> list[Member]:
    """Every member row, live or not, oldest first."""
    with engine.connect() as conn:
        now = _db_epoch(conn)
        rows = conn.execute(select(worker_members).order_by(worker_members.c.started_at, worker_members.c.id)).all()
    return [Member(r.id, r.host, r.pid, r.started_at, max(0.0, now - r.heartbeat_at), r.partitions) for r in rows]


def consumed_partitions(members: Sequence[Member]) -> set[int]:
    """The partitions the live ones among ``members`` consume now."""
    return {int(p) for m in members if m.live for p in m.partitions.split(",") if p}
