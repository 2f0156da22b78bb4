"""Knowing, within milliseconds, that another connection committed to an SQLite store.

Embedded mode has no broker to push work: a worker waiting for the queue, or the listener waiting
for a processing outcome (``ack.after: processed``), would otherwise poll the database with sleeps.
"""

from __future__ import annotations

import sqlite3
import threading
import time

from sqlalchemy import Engine


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
            if stop.wait(min(tick, deadline - now)):
                return
            if self.version() != since:
                return

    def close(self) -> None:
        self._conn.close()
