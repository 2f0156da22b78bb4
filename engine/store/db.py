"""Database engines for the message store: SQLite (embedded) or a server such as PostgreSQL."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import orjson
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def bind_plain_values_directly() -> None:
    """Let Python's sqlite3 bind None, bytes and bool without looking for an adapter.

    The module binds only exact int, float, str and bytearray directly; every other value (None,
    bytes, bool included) first goes through its adapter protocol, whose lookup of ``__adapt__`` on
    the protocol class raises and formats an AttributeError each time. Registering what that path
    ends up doing anyway (None stays None, bytes stay the same object, a bool becomes the 0 or 1
    SQLite stores) skips the exception. Measured with callgrind: 6% of the store writer's
    instructions (a message row holds two blobs, a bool and several NULLs), 2% of a worker's. The
    registry is the sqlite3 module's, for the whole process; these three leave every value bound
    exactly as before."""
    sqlite3.register_adapter(type(None), cast("Callable[[None], None]", {}.get))  # C, returns None for None
    sqlite3.register_adapter(bytes, bytes)  # bytes(b) is b for an exact bytes object
    sqlite3.register_adapter(bool, int)


BUSY_TIMEOUT = 30.0  # seconds a SQLite statement waits for another connection's lock


def begin_immediate_polling(dbapi_conn: Any, poll: float, timeout: float = BUSY_TIMEOUT) -> None:
    """``BEGIN IMMEDIATE`` on SQLite, retried every ``poll`` seconds while another connection holds
    the write lock (up to ``timeout``, then SQLite's "database is locked" error is raised).

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50 and then 100 ms between
    attempts: a connection that finds the lock taken often wakes long after it was released, or
    finds it taken again by another waiter that woke sooner. For the store writer, whose commits
    the senders' ACKs wait for, that was most of the embedded engine's ACK latency once workers
    write the record (they share the lock)."""
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA busy_timeout=0")
        deadline = time.monotonic() + timeout
        while True:
            try:
                cur.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                busy = (getattr(exc, "sqlite_errorcode", sqlite3.SQLITE_BUSY) & 0xFF) == sqlite3.SQLITE_BUSY
                if not busy or time.monotonic() >= deadline:
                    raise
            time.sleep(poll)
    finally:
        cur.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
        cur.close()


def make_engine(url: str, *, pool_size: int = 5, writer: bool = False, repeatable: bool = False,
                custom_plans: bool = False, lock_poll: float | None = None) -> Engine:
    """Create an engine. SQLite runs in WAL mode with ``synchronous=FULL`` (a commit survives a
    crash and a power cut) and, for writers, ``BEGIN IMMEDIATE`` transactions so that several
    processes can share the file without deadlocks on lock upgrade.

    ``repeatable``: every write of this engine's is one that is simply done again if a power cut
    loses it (outbound delivery marks: the row is delivered again, at least once as designed; a
    retention purge: the next one removes it). On SQLite its commits then skip the fsync
    (``synchronous=NORMAL``, still atomic and crash-safe in WAL mode), so they cost the receiving
    path, which shares the file, nothing but the write lock.

    ``custom_plans`` (PostgreSQL): plan every statement for its parameters' values, even once it is
    prepared (``plan_cache_mode=force_custom_plan``). For the workers: their lookups take IN lists
    of patient IDs and fact keys, for which the generic plan PostgreSQL switches to after five
    executions of a prepared statement was measured at 10-20 ms against well under 1 ms.

    ``lock_poll`` (SQLite writers): wait for the write lock by trying again every ``lock_poll``
    seconds (``begin_immediate_polling``) instead of with SQLite's growing sleeps. For the store
    writer: the receiving path then gets the lock soon after a worker's transaction ends."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        bind_plain_values_directly()
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            u, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=pool_size,
            max_overflow=4, pool_pre_ping=False, json_serializer=json_text,
        )
        begin = "BEGIN IMMEDIATE" if writer else "BEGIN"

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA page_size=2048")  # new stores: less rewritten per commit (no effect later)
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL" if repeatable else "PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            if writer and lock_poll is not None:
                begin_immediate_polling(conn.connection.dbapi_connection, lock_poll)
            else:
                conn.exec_driver_sql(begin)

        return engine
    connect_args: dict[str, Any] = {}
    if u.get_backend_name() == "postgresql":
        connect_args = {"connect_timeout": 3}
        if custom_plans:  # added to any options the URL sets (connect_args would replace them)
            given = u.query.get("options") or ""
            given = " ".join(given) if isinstance(given, tuple) else given
            connect_args["options"] = f"{given} -c plan_cache_mode=force_custom_plan".strip()
    return create_engine(
        u, pool_size=pool_size, max_overflow=4, pool_pre_ping=True, pool_recycle=1800,
        connect_args=connect_args, json_serializer=json_text,
    )


class JsonText(str):
    """A value already serialised as JSON text (the record's facts, see ``engine.record.writer.dump``):
    a JSON column stores it as it is, instead of serialising it again as a JSON string."""

    __slots__ = ()


def json_text(value: Any) -> str:
    """JSON columns' serializer: orjson (the record's facts are its main JSON), json for what it refuses;
    a ``JsonText`` is already JSON."""
    if type(value) is JsonText:
        return str(value)
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (idempotent; safe when several processes start at once)."""
    # one process at a time: SQLite's BEGIN IMMEDIATE (writer=True) or a PostgreSQL advisory lock;
    # the next one then finds the schema at head and does nothing
    engine = make_engine(url, pool_size=1, writer=is_sqlite(url))
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7411)")  # any fixed number: "hl7engine migrations"
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
