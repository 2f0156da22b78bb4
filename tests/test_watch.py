"""ProcessWatcher against the message store (SQLite and PostgreSQL): callbacks fire once a watched
message reaches a final status, by uid or by row id; a store that cannot be read is waited out."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, update

from engine.intake.watch import Processed, ProcessWatcher
from engine.store.schema import messages


def add(engine: Any, uid: str) -> int:
    with engine.begin() as conn:
        return int(conn.execute(insert(messages).values(
            uid=uid, channel="lab", received_at=datetime.now(UTC), size=3, sha256="0" * 64, accepted=True,
            status="queued", raw=b"MSH").returning(messages.c.id)).scalar_one())


def set_status(engine: Any, uid: str, status: str, step: str | None = None, error: str | None = None) -> None:
    with engine.begin() as conn:
        conn.execute(update(messages).where(messages.c.uid == uid)
                     .values(status=status, error_step=step, error=error))


def test_callbacks_fire_on_final_statuses(db_url: str, engine: Any) -> None:
    first = add(engine, "w1")
    add(engine, "w2")
    add(engine, "w3")

    async def scenario() -> dict[str, Processed]:
        watcher = ProcessWatcher(db_url, interval=0.01)
        seen: dict[str, Processed] = {}
        watcher.watch(lambda r: seen.__setitem__("w1", r), uid="w1")
        watcher.watch(lambda r: seen.__setitem__("resend-of-w1", r), message_id=first)
        watcher.watch(lambda r: seen.__setitem__("w2", r), uid="w2")
        cancel = watcher.watch(lambda r: seen.__setitem__("w3", r), uid="w3")
        await asyncio.sleep(0.1)
        assert not seen and watcher.watching == 4, "queued is not final"
        await asyncio.to_thread(set_status, engine, "w1", "processing")
        await asyncio.sleep(0.1)
        assert not seen
        cancel()
        await asyncio.to_thread(set_status, engine, "w1", "processed")
        await asyncio.to_thread(set_status, engine, "w2", "error", "map", "OBX-3 missing")
        await asyncio.to_thread(set_status, engine, "w3", "filtered", "route", "no route matched")
        for _ in range(200):
            if len(seen) == 3:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert watcher.watching == 0
        await watcher.close()
        return seen

    seen = asyncio.run(scenario())
    assert seen == {"w1": Processed("processed"), "resend-of-w1": Processed("processed"),
                    "w2": Processed("error", "map", "OBX-3 missing")}, "w3 was no longer watched"
    assert seen["w1"].ok and not seen["w2"].ok


def test_an_unreadable_store_is_waited_out(tmp_path: Any) -> None:
    async def scenario() -> int:
        watcher = ProcessWatcher("postgresql+psycopg://nobody@127.0.0.1:1/none", interval=0.01)
        seen: list[Processed] = []
        watcher.watch(seen.append, uid="x")
        await asyncio.sleep(0.3)
        assert not seen
        n = watcher.watching
        await watcher.close()
        return n

    assert asyncio.run(scenario()) == 1, "still waiting: the ACK timeout answers, not the watcher"


def test_on_sqlite_the_next_commit_wakes_the_watcher(tmp_path: Any) -> None:
    """Embedded, the watcher queries at the store's next commit (PRAGMA data_version), not after its
    interval: with an interval of a minute, the outcome still arrives as soon as it is committed."""
    from engine.store import db

    url = f"sqlite:///{tmp_path / 'store.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    add(engine, "c1")

    async def scenario() -> Processed:
        watcher = ProcessWatcher(url, interval=60.0)
        done: asyncio.Future[Processed] = asyncio.get_running_loop().create_future()
        watcher.watch(done.set_result, uid="c1")
        await asyncio.sleep(0.1)  # the first query has run: c1 is queued
        await asyncio.to_thread(set_status, engine, "c1", "processed")
        try:
            return await asyncio.wait_for(done, 30)  # the interval alone would take 60 s
        finally:
            await watcher.close()

    assert asyncio.run(scenario()) == Processed("processed")
    engine.dispose()


def test_on_postgresql_a_workers_notify_wakes_the_watcher(postgres_url: str) -> None:
    """On PostgreSQL the watcher LISTENs: the NOTIFY a worker sends with the commit of an outcome
    wakes it, long before its (here, minute-long) interval."""
    from sqlalchemy import text

    from engine.store import db
    from engine.store.commits import OUTCOMES

    db.upgrade(postgres_url)
    engine = db.make_engine(postgres_url)
    add(engine, "n1")

    def decide() -> None:
        with engine.begin() as conn:
            conn.execute(update(messages).where(messages.c.uid == "n1").values(status="processed"))
            conn.execute(text(f"NOTIFY {OUTCOMES}"))

    async def scenario() -> Processed:
        watcher = ProcessWatcher(postgres_url, interval=60.0)
        done: asyncio.Future[Processed] = asyncio.get_running_loop().create_future()
        watcher.watch(done.set_result, uid="n1")
        try:
            for _ in range(300):  # until the watcher listens (it starts with its first query)
                if watcher._signal is not None:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)  # LISTEN is sent by the notices' thread
            await asyncio.to_thread(decide)
            return await asyncio.wait_for(done, 30)  # the interval alone would take 60 s
        finally:
            await watcher.close()

    assert asyncio.run(scenario()) == Processed("processed")
    engine.dispose()


def test_a_commit_watch_closed_while_another_thread_waits_on_it(tmp_path: Any) -> None:
    """The watcher closes its CommitWatch from one thread while its wait may still be reading in
    another (a cancelled asyncio.to_thread runs on): the reader gets -1 and returns, the process does
    not crash (sqlite3 faults when a connection is closed under a running statement)."""
    import sqlite3
    import threading
    import time

    from engine.store.commits import CommitWatch

    path = str(tmp_path / "w.db")
    sqlite3.connect(path).execute("PRAGMA journal_mode=WAL").close()
    for _ in range(100):
        watch = CommitWatch(path, tick=0.0, slowest=0.0)
        stop = threading.Event()
        seen: list[int] = []

        def read(w: CommitWatch = watch, out: list[int] = seen) -> None:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                v = w.version()
                if v == -1:
                    out.append(v)
                    return

        reader = threading.Thread(target=read)
        waiter = threading.Thread(target=watch.wait, args=(watch.version(), stop, 5.0))
        reader.start()
        waiter.start()
        time.sleep(0.002)
        watch.close()
        reader.join(5)
        waiter.join(5)
        assert seen == [-1] and not waiter.is_alive(), "the reader saw the close; the wait returned"
