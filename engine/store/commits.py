"""Knowing, within milliseconds, that another connection committed to the store.

Embedded mode has no broker to push work: a worker waiting for the queue, or the listener waiting
for a processing outcome (``ack.after: processed``), would otherwise poll the database with sleeps.
``CommitSignal`` is what they use: on SQLite a ``CommitWatch``, on PostgreSQL ``Notices``
(LISTEN/NOTIFY), elsewhere plain sleeps.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable

from sqlalchemy import Engine, make_url

from engine.observe import get_logger

log = get_logger("engine.store")


class CommitWatch:
    """Tells a worker (or the listener), within milliseconds, that something was committed to an
    SQLite store, so that it reads the queue (or the outcomes) then, instead of polling with sleeps
    (which kept a message waiting up to 0.25 s at low traffic). ``PRAGMA data_version`` on a
    connection of its own changes whenever another connection commits; it reads the WAL index in
    shared memory (about 3 µs here) and takes no lock the receiving path waits for.

    It is asked every ``tick`` seconds while commits keep coming, and every ``slowest`` seconds
    once there was none for ``quiet`` seconds, so that an idle worker does not wake 200 times a
    second: the first message after a quiet spell waits up to ``slowest``, the next ones ``tick``."""

    def __init__(self, path: str, tick: float = 0.005, slowest: float = 0.05, quiet: float = 2.0) -> None:
        self.tick, self.slowest, self.quiet = tick, slowest, quiet
        # no busy wait: the listener asks from its event loop, which must never block
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
        # close() may come from another thread while a wait() is still reading: sqlite3 crashes the
        # process (a segmentation fault) when a connection is closed during a statement on it
        self._lock = threading.Lock()
        self._closed = False
        self._changed = time.monotonic()  # when the version was last seen to change
        self._last = -1

    @classmethod
    def of(cls, engine: Engine) -> CommitWatch | None:
        """A watch on ``engine``'s database file, or None (not SQLite, or in memory)."""
        database = engine.url.database
        if engine.dialect.name != "sqlite" or not database or database == ":memory:":
            return None
        return cls(database)

    def version(self) -> int:
        """The store's data version, or -1 when it cannot be read now (busy, closed, gone): callers
        then read the store itself, whose errors they handle, as after a commit."""
        with self._lock:
            if self._closed:
                return -1
            try:
                row = self._conn.execute("PRAGMA data_version").fetchone()
            except sqlite3.Error:
                return -1
        version = int(row[0]) if row else -1
        if version != self._last:  # busy: the fast ticks go on while the store keeps changing
            self._last, self._changed = version, time.monotonic()
        return version

    def wait(self, since: int, stop: threading.Event, timeout: float) -> None:
        """Return once the version is no longer ``since`` (a commit by another connection), when
        ``stop`` is set, or after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            tick = self.tick if now - self._changed < self.quiet else self.slowest
            if stop.wait(min(tick, deadline - now)) or self._closed:
                return
            if self.version() != since:
                return

    def close(self) -> None:
        """Close the watch's connection; safe while another thread is in ``wait`` (it returns)."""
        with self._lock:
            self._closed = True
            self._conn.close()


OUTCOMES = "hl7engine_outcomes"  # NOTIFY channel: processing outcomes were committed (PostgreSQL)
QUEUED = "hl7engine_queued"  # NOTIFY channel: messages were queued in the embedded queue (PostgreSQL)


class Notices:
    """PostgreSQL's counterpart: ``LISTEN`` on a connection of its own, in a thread of its own,
    calling ``wake`` for each notification on ``channel`` and once after every (re)connection, for
    what was committed while nobody listened. Workers send OUTCOMES with the commit of a batch that
    decided messages of an ``ack.after: processed`` channel (for the listener); the store writer
    sends QUEUED with the commit of messages put in the embedded queue (for the workers, when the
    store is PostgreSQL and there is no broker). It reconnects by itself; callers keep their own
    polling as the safety net, so a lost notification only costs latency."""

    def __init__(self, url: str, channel: str, wake: Callable[[], None]) -> None:
        self.conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.channel, self.wake = channel, wake
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"listen-{channel}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        import psycopg

        delay = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=3) as conn:
                    conn.execute(f"LISTEN {self.channel}")
                    delay = 0.5
                    self.wake()
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=0.5):
                            self.wake()
            except Exception as exc:
                log.debug("LISTEN failed", channel=self.channel, error=str(exc)[:200])
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)


class CommitSignal:
    """Waiting for the store's next commit, whatever the database: ``arm()`` before reading the
    store, then ``wait(stop, timeout)`` when the read found nothing to do. It returns at the first
    commit after ``arm()`` (SQLite: any commit, seen by a CommitWatch; PostgreSQL: a NOTIFY on
    ``channel``), when ``stop`` is set, or after ``timeout`` seconds, the caller's safety net. A
    CommitWatch misses no commit, so on SQLite the safety read comes once a second at most often."""

    def __init__(self, engine: Engine, channel: str) -> None:
        self._watch = CommitWatch.of(engine)
        self._seen = 0
        self._notified = threading.Event()
        self._notices: Notices | None = None
        if engine.dialect.name == "postgresql":
            self._notices = Notices(engine.url.render_as_string(hide_password=False), channel, self._notified.set)
            self._notices.start()

    def arm(self) -> None:
        if self._watch is not None:
            self._seen = self._watch.version()
        self._notified.clear()

    def wait(self, stop: threading.Event, timeout: float) -> None:
        if self._watch is not None:
            self._watch.wait(self._seen, stop, max(timeout, 1.0))
            return
        if self._notices is None:
            stop.wait(timeout)
            return
        until = time.monotonic() + timeout
        while not (self._notified.is_set() or stop.is_set()) and time.monotonic() < until:
            self._notified.wait(min(0.25, max(0.0, until - time.monotonic())))

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        if self._notices is not None:
            self._notices.stop()
