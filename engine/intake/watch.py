"""Waiting for a message's processing outcome, for channels with ``ack.after: processed``.

The listener does not know where the workers run (in-process, ``hl7engine work`` on other hosts),
but every worker writes its outcome into the message store. So the listener polls the store: one
query every ``interval`` for all the messages it is waiting for, only while it waits for some, in
a thread of its own so the event loop keeps answering other senders. It queries sooner when it
learns that a worker committed (``CommitSignal``: on SQLite any commit, looked at every 5 ms; on
PostgreSQL a worker's NOTIFY that it decided messages of such a channel), so the ACK leaves within
milliseconds of the worker's commit. A message is done when its status is final for the sender:
processed or filtered (AA), error or held (AE).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, or_, select

from engine.observe import get_logger
from engine.store import db
from engine.store.commits import OUTCOMES, CommitSignal
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
        self._signal: CommitSignal | None = None  # query at the workers' next commit, not every interval
        self._stop = threading.Event()  # ends a wait for that commit
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
        self._stop.set()
        if self._signal is not None:
            await asyncio.to_thread(self._signal.close)
            self._signal = None
        if self._engine is not None:
            await asyncio.to_thread(self._engine.dispose)
            self._engine = None

    # -- polling -----------------------------------------------------------------------------------

    async def _poll(self) -> None:
        try:
            while self._waiting:
                if self._signal is not None:
                    self._signal.arm()  # a commit from now on ends the wait after this query
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
                for row_id, uid, status, step, reason in rows:
                    if status not in DONE:
                        continue
                    outcome = Processed(status, step or "", reason or "")
                    for callback in self._waiting.pop(("uid", uid), []) + self._waiting.pop(("id", row_id), []):
                        try:
                            callback(outcome)
                        except Exception:
                            log.exception("answering a processed message failed")
                if self._signal is None:
                    await asyncio.sleep(self.interval)
                else:  # the interval, unless a worker commits first (a thread waits, not the loop)
                    await asyncio.to_thread(self._signal.wait, self._stop, self.interval)
        finally:
            self._task = None

    def _query(self, uids: list[str], ids: list[int]) -> list[tuple[int, str, str, str | None, str | None]]:
        if self._engine is None:
            self._engine = db.make_engine(self.database_url, pool_size=1)
            self._signal = CommitSignal(self._engine, OUTCOMES)
        out: list[tuple[int, str, str, str | None, str | None]] = []
        cols = (messages.c.id, messages.c.uid, messages.c.status, messages.c.error_step, messages.c.error)
        with self._engine.connect() as conn:
            for i in range(0, max(len(uids), len(ids)), CHUNK):
                u, n = uids[i:i + CHUNK], ids[i:i + CHUNK]
                cond = ([messages.c.uid.in_(u)] if u else []) + ([messages.c.id.in_(n)] if n else [])
                result = conn.execute(select(*cols).where(or_(*cond)))
                out.extend((r[0], r[1], r[2], r[3], r[4]) for r in result)
        return out
