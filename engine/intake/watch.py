"""Waiting for a message's processing outcome, for channels with ``ack.after: processed``.

The listener does not know where the workers run (in-process, ``hl7engine work`` on other hosts),
but every worker writes its outcome into the message store. So the listener polls the store: one
query every ``interval`` for all the messages it is waiting for, only while it waits for some, in
a thread of its own so the event loop keeps answering other senders. On SQLite it queries at the
store's next commit instead (``CommitWatch``, looked at every 5 ms, and at least once a second); on
PostgreSQL also when a worker's NOTIFY says it decided messages of such a channel (``Notices``),
so the ACK leaves within milliseconds of the worker's commit. A message is done when its status is
final for the sender: processed or filtered (AA), error or held (AE).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, or_, select

from engine.observe import get_logger
from engine.store import db
from engine.store.commits import OUTCOMES, CommitWatch, Notices
from engine.store.schema import messages

log = get_logger("engine.intake")

DONE = frozenset({"processed", "filtered", "error", "held"})
CHUNK = 400


@dataclass(frozen=True, slots=True)
class Processed:
    """What the workers made of a message: its status, and for error/held the step and reason."""

    status: str
    step: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("processed", "filtered")


Callback = Callable[[Processed], None]


class ProcessWatcher:
    """Tells callbacks (on the event loop) when watched messages are processed.

    ``watch(uid=...)`` follows a message; ``watch(message_id=...)`` follows one by its row id (the
    original of a resend). Each returns a function that stops watching (e.g. at the ACK timeout).
    """

    def __init__(self, database_url: str, *, interval: float = 0.02) -> None:
        self.database_url = database_url
        self.interval = interval
        self._waiting: dict[tuple[str, str | int], list[Callback]] = {}  # ("uid", uid) or ("id", row id)
        self._engine: Engine | None = None
        self._commits: CommitWatch | None = None  # SQLite: query at the next commit, not every interval
        self._notices: Notices | None = None  # PostgreSQL: query when a worker's NOTIFY comes
        self._woken: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failing_since = 0.0

    @property
    def watching(self) -> int:
        return len(self._waiting)

    def watch(self, callback: Callback, *, uid: str | None = None, message_id: int | None = None) -> Callable[[], None]:
        if uid is not None and message_id is None:
            key: tuple[str, str | int] = ("uid", uid)
        elif message_id is not None and uid is None:
            key = ("id", message_id)
        else:
            raise ValueError("watch needs exactly one of uid and message_id")
        self._waiting.setdefault(key, []).append(callback)
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="processing-watch")

        def cancel() -> None:
            waiting = self._waiting.get(key)
            if waiting is not None and callback in waiting:
                waiting.remove(callback)
                if not waiting:
                    del self._waiting[key]

        return cancel

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._commits is not None:
            self._commits.close()
            self._commits = None
        if self._notices is not None:
            await asyncio.to_thread(self._notices.stop)
            self._notices = None
        if self._engine is not None:
            await asyncio.to_thread(self._engine.dispose)
            self._engine = None

    # -- polling -----------------------------------------------------------------------------------

    async def _poll(self) -> None:
        try:
            while self._waiting:
                seen = self._commits.version() if self._commits is not None else 0
                if self._woken is not None:
                    self._woken.clear()  # a NOTIFY from now on wakes the wait after this query
                uids = [str(v) for kind, v in self._waiting if kind == "uid"]
                ids = [int(v) for kind, v in self._waiting if kind == "id"]
                try:
                    rows = await asyncio.to_thread(self._query, uids, ids)
                except Exception as exc:  # the store is down: keep waiting; the ACK timeout answers AE
                    now = time.monotonic()
                    if not self._failing_since or now - self._failing_since > 30:
                        self._failing_since = now
                        log.warning("cannot read processing outcomes from the store", error=str(exc)[:200])
                    await asyncio.sleep(max(self.interval, 0.5))
                    continue
                self._failing_since = 0.0
                self._listen()
                for row_id, uid, status, step, reason in rows:
                    if status not in DONE:
                        continue
                    outcome = Processed(status, step or "", reason or "")
                    for callback in self._waiting.pop(("uid", uid), []) + self._waiting.pop(("id", row_id), []):
                        try:
                            callback(outcome)
                        except Exception:
                            log.exception("answering a processed message failed")
                await self._next_look(seen)
        finally:
            self._task = None

    async def _next_look(self, seen: int) -> None:
        """Wait before the next query: ``interval``, or on SQLite until the store's next commit
        (looked at every ``CommitWatch.tick``; a second at most)."""
        commits = self._commits
        if commits is None:
            if self._woken is None:
                await asyncio.sleep(self.interval)
            else:  # PostgreSQL: the interval still, unless a worker's NOTIFY comes first
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), self.interval)
            return
        deadline = time.monotonic() + 1.0
        while self._waiting and time.monotonic() < deadline:
            await asyncio.sleep(commits.tick)
            if commits.version() != seen:  # a few microseconds: no need to leave the event loop
                return

    def _listen(self) -> None:
        """On PostgreSQL, once the store answers: LISTEN for the workers' NOTIFY (engine.store.commits)."""
        if self._notices is not None or self._closed or self._engine is None:
            return
        if self._engine.dialect.name != "postgresql":
            return
        loop = asyncio.get_running_loop()
        woken = self._woken = asyncio.Event()

        def wake() -> None:  # from the notices' thread
            loop.call_soon_threadsafe(woken.set)

        self._notices = Notices(self.database_url, OUTCOMES, wake)
        self._notices.start()

    def _query(self, uids: list[str], ids: list[int]) -> list[tuple[int, str, str, str | None, str | None]]:
        if self._engine is None:
            self._engine = db.make_engine(self.database_url, pool_size=1)
            self._commits = CommitWatch.of(self._engine)
        out: list[tuple[int, str, str, str | None, str | None]] = []
        cols = (messages.c.id, messages.c.uid, messages.c.status, messages.c.error_step, messages.c.error)
        with self._engine.connect() as conn:
            for i in range(0, max(len(uids), len(ids)), CHUNK):
                u, n = uids[i:i + CHUNK], ids[i:i + CHUNK]
                cond = ([messages.c.uid.in_(u)] if u else []) + ([messages.c.id.in_(n)] if n else [])
                result = conn.execute(select(*cols).where(or_(*cond)))
                out.extend((r[0], r[1], r[2], r[3], r[4]) for r in result)
        return out
