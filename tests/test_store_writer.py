"""The store transaction (BatchWriter) on SQLite and PostgreSQL: resend detection, all-or-nothing
with the queue, expired jobs, ACK corrections; and the writer process driven by StoreClient."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection

from engine.errors import UnavailableError
from engine.hl7.header import read_header
from engine.intake import writerproc
from engine.intake.item import Item, Record, new_uid
from engine.intake.store_client import StoreClient
from engine.intake.writer import BatchWriter, Job, WireJob
from engine.queue.dbqueue import DatabaseQueue
from engine.settings import Settings
from engine.store import db
from engine.store.query import MessageFilter, list_messages
from tests.support import downgrade, queue_rows, store_rows


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        u = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        u = request.getfixturevalue("postgres_url")
    db.upgrade(u)
    return u


def msg(cid: str, facility: str = "WLAB", body: str = "A", patient: str = "77") -> bytes:
    return (f"MSH|^~\\&|LIS|{facility}|HL7ENGINE|CENTRAL|20261122101500||ORU^R01^ORU_R01|{cid}|P|2.5.1\r"
            f"PID|1||{patient}^^^{facility}^MR||DOE^{body}\r").encode()


def wire_job(*raws: bytes, status: str = "queued", deadline: float | None = None, job_id: int = 1) -> WireJob:
    items = []
    for raw in raws:
        h = read_header(raw, "utf-8")
        items.append(Item(new_uid(), "w", time.time(), "127.0.0.1:1", raw, h, status, "AA", b"ACK"))
    job = Job(items, lambda j: None, deadline if deadline is not None else time.time() + 30)
    return WireJob.from_wire(job.wire(job_id))


def write(writer: BatchWriter, *jobs: WireJob) -> tuple[int, float, str]:
    for j in jobs:
        writer.prepare(j)
    return writer.write(list(jobs))


def test_resends_are_duplicates_of_the_accepted_original(url: str) -> None:
    w = BatchWriter(db.make_engine(url, writer=True), DatabaseQueue(), partitions=8)
    first = wire_job(msg("D1"))
    write(w, first)
    assert first.records[0].outcome == "accepted"
    same = wire_job(msg("D1"))
    changed = wire_job(msg("D1", body="B"))  # same control ID, other bytes: a new message
    other_sender = wire_job(msg("D1", facility="OTHER"))
    write(w, same, changed, other_sender)
    assert same.records[0].outcome == "duplicate"
    assert changed.records[0].outcome == "accepted"
    assert other_sender.records[0].outcome == "accepted"
    rows = {r["uid"]: r for r in store_rows(url)}
    original = rows[first.records[0].uid]
    dup = rows[same.records[0].uid]
    assert dup["status"] == "duplicate" and dup["duplicate_of"] == original["id"] and not dup["accepted"]
    queued = [q["message_uid"] for q in queue_rows(url)]
    assert queued == [first.records[0].uid, changed.records[0].uid, other_sender.records[0].uid]


def test_overlong_header_fields_are_cut_to_their_columns(url: str) -> None:
    """MSH fields longer than their columns are stored cut (PostgreSQL would refuse the whole
    transaction otherwise); short and empty ones as they are; the raw message keeps everything."""
    raw = ("MSH|^~\\&|" + "A" * 300 + "|" + "F" * 300 + "|HL7ENGINE||20261122101500||"
           + "ORU^R01^" + "S" * 20 + "|" + "C" * 300 + "|P|2.5.1\rPID|1||77^^^WLAB^MR||DOE^A\r").encode()
    w = BatchWriter(db.make_engine(url, writer=True), DatabaseQueue(), partitions=8)
    job = wire_job(raw)
    write(w, job)
    assert job.records[0].outcome == "accepted"
    (row,) = store_rows(url)
    assert row["sending_application"] == "A" * 250 and row["sending_facility"] == "F" * 250
    assert row["control_id"] == "C" * 199 and row["structure"] == "S" * 16
    assert row["receiving_application"] == "HL7ENGINE" and row["receiving_facility"] in ("", None)
    assert row["message_type"] == "ORU" and row["version"] == "2.5.1" and bytes(row["raw"]) == raw


def test_identical_messages_in_one_transaction(url: str) -> None:
    w = BatchWriter(db.make_engine(url, writer=True), DatabaseQueue())
    a, b = wire_job(msg("SAME")), wire_job(msg("SAME"))
    write(w, a, b)
    assert (a.records[0].outcome, b.records[0].outcome) == ("accepted", "duplicate")
    rows = {r["uid"]: r for r in store_rows(url)}
    assert rows[b.records[0].uid]["duplicate_of"] == rows[a.records[0].uid]["id"]
    assert b.records[0].duplicate_of == rows[a.records[0].uid]["id"]
    assert len(queue_rows(url)) == 1


def test_resends_of_a_stored_message_twice_in_one_transaction(url: str) -> None:
    """Both copies point at the stored original; neither is queued."""
    w = BatchWriter(db.make_engine(url, writer=True), DatabaseQueue())
    first = wire_job(msg("TWICE"))
    write(w, first)
    again, new, again2 = wire_job(msg("TWICE")), wire_job(msg("FRESH")), wire_job(msg("TWICE"))
    write(w, again, new, again2)
    assert [j.records[0].outcome for j in (again, new, again2)] == ["duplicate", "accepted", "duplicate"]
    rows = {r["uid"]: r for r in store_rows(url)}
    original = rows[first.records[0].uid]["id"]
    for j in (again, again2):
        row = rows[j.records[0].uid]
        assert (row["status"], row["accepted"], row["duplicate_of"]) == ("duplicate", False, original)
        assert j.records[0].duplicate_of == original
    assert rows[new.records[0].uid]["status"] == "queued"
    assert [q["message_uid"] for q in queue_rows(url)] == [first.records[0].uid, new.records[0].uid]


def test_refused_messages_are_recorded_not_queued(url: str) -> None:
    w = BatchWriter(db.make_engine(url, writer=True), DatabaseQueue())
    j = wire_job(msg("REF", patient="4711"), status="error")
    write(w, j)
    assert j.records[0].outcome == "recorded"
    assert store_rows(url)[0]["status"] == "error"
    assert queue_rows(url) == []
    # no worker will see it: the writer indexes it, so a search by patient finds it
    found = list_messages(db.make_engine(url), MessageFilter(patient="4711^WLAB"))
    assert [r["control_id"] for r in found] == ["REF"]


class BrokenQueue:
    """A broker that never confirms: the hand-off fails when it is finished."""

    name = "broken"
    depth = 1
    wakeup_fd = None

    def drain_wakeups(self) -> None:
        return None

    def start(self, records: list[Record], deadline: float) -> object:
        return None

    def ready(self, handle: object) -> bool:
        return True

    def finish(self, conn: Connection, started: object, records: list[Record], deadline: float) -> None:
        raise UnavailableError("broker", "no publisher confirm within 3.0s")

    def close(self) -> None:
        return None


def test_queue_failure_rolls_back_the_whole_transaction(url: str) -> None:
    w = BatchWriter(db.make_engine(url, writer=True), BrokenQueue())
    jobs = [wire_job(msg(f"RB{i}"), job_id=i) for i in range(3)]
    count, _, failed = write(w, *jobs)
    assert failed == "broker" and count == 3
    assert all(j.records[0].outcome == "failed" and j.records[0].failure_service == "broker" for j in jobs)
    assert store_rows(url) == [], "nothing half-done is kept"


class CountingQueue(DatabaseQueue):
    """The embedded queue, counting what is handed to it."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def start(self, records: list[Record], deadline: float) -> object:
        self.started += [r.uid for r in records]
        return super().start(records, deadline)


def test_a_failed_insert_hands_nothing_to_the_queue(url: str) -> None:
    """The resend check and the INSERT share one round trip on PostgreSQL: when the INSERT fails
    (here a uid already stored), nothing is handed to the queue, every job fails with the store
    as the cause, and the writer's connection serves the next transaction."""
    q = CountingQueue()
    w = BatchWriter(db.make_engine(url, writer=True), q)
    first = wire_job(msg("U1"))
    write(w, first)
    clash = wire_job(msg("U2"), job_id=2)
    clash.records[0].uid = first.records[0].uid
    other = wire_job(msg("U3"), job_id=3)
    _, _, failed = write(w, clash, other)
    assert failed == "store"
    assert [j.records[0].outcome for j in (clash, other)] == ["failed", "failed"]
    assert q.started == [first.records[0].uid]
    after = wire_job(msg("U4"), job_id=4)
    write(w, after)
    assert after.records[0].outcome == "accepted"
    assert sorted(r["control_id"] for r in store_rows(url)) == ["U1", "U4"]


def test_expired_job_is_not_written(url: str) -> None:
    w = BatchWriter(db.make_engine(url, writer=True), DatabaseQueue())
    late = wire_job(msg("LATE"), deadline=time.time() - 1)
    on_time = wire_job(msg("ONTIME"), job_id=2)
    write(w, late, on_time)
    assert late.records[0].outcome == "failed" and "ACK timeout" in late.records[0].failure
    assert [r["control_id"] for r in store_rows(url)] == ["ONTIME"]


def test_ack_correction(url: str) -> None:
    w = BatchWriter(db.make_engine(url, writer=True), DatabaseQueue())
    j = wire_job(msg("CORR"))
    write(w, j)
    fix = WireJob(9, time.time() + 30, True, [], [(j.records[0].uid, "AE", b"AE-ACK", "ACK timeout: ...")])
    write(w, fix)
    row = store_rows(url)[0]
    assert (row["ack_code"], bytes(row["ack"]), row["error"]) == ("AE", b"AE-ACK", "ACK timeout: ...")
    assert row["status"] == "queued", "the message stays queued: it is durable"


def test_patient_partition_is_stable(url: str) -> None:
    w = BatchWriter(db.make_engine(url, writer=True), DatabaseQueue(), partitions=8)
    jobs = [wire_job(msg(f"PP{i}", patient=str(i % 3)), job_id=i) for i in range(30)]
    write(w, *jobs)
    by_patient: dict[str, set[int]] = {}
    for j in jobs:
        r = j.records[0]
        by_patient.setdefault(r.raw.split(b"PID|1||")[1].split(b"^")[0].decode(), set()).add(r.partition)
    assert all(len(p) == 1 for p in by_patient.values()), "one patient, one partition"
    assert len({next(iter(p)) for p in by_patient.values()}) > 1 or len(by_patient) == 1


def test_store_client_runs_the_writer_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    db.upgrade(url)

    async def main() -> list[str]:
        client = StoreClient(url, Settings(), writers=1)
        await client.start()
        done: asyncio.Queue[Job] = asyncio.Queue()
        for i in range(20):
            raw = msg(f"SC{i}")
            item = Item(new_uid(), "w", time.time(), "127.0.0.1:1", raw, read_header(raw, "utf-8"), "queued",
                        "AA", b"ACK")
            client.submit(Job([item], done.put_nowait, time.time() + 30))
        outcomes = [(await asyncio.wait_for(done.get(), 30)).items[0].outcome for _ in range(20)]
        assert await client.drain(5)
        await client.close()
        return outcomes

    assert asyncio.run(main()) == ["accepted"] * 20
    assert len(store_rows(url)) == 20


def test_records_survive_a_queue_failure_of_their_transaction(url: str) -> None:
    """A refused message's record shares a transaction with messages the broker then fails: the
    record does not need the queue and is written on its own."""
    w = BatchWriter(db.make_engine(url, writer=True), BrokenQueue())
    live = wire_job(msg("LIVE"), job_id=1)
    note = wire_job(msg("NOTE"), status="error", job_id=2)
    note.record_only = True
    write(w, live, note)
    assert live.records[0].outcome == "failed"
    assert note.records[0].outcome == "recorded"
    assert [r["control_id"] for r in store_rows(url)] == ["NOTE"]


class SlowQueue:
    """A broker whose confirms take ``delay`` seconds, with a wake-up descriptor like RabbitQueue's."""

    name = "slow"
    depth = 3

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self.open = 0
        self.max_open = 0
        self.finished: list[list[str]] = []

    @property
    def wakeup_fd(self) -> int:
        return self._r

    def drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 4096)

    def start(self, records: list[Record], deadline: float) -> object:
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        threading.Timer(self.delay, os.write, (self._w, b"!")).start()
        return time.monotonic() + self.delay

    def ready(self, handle: object) -> bool:
        assert isinstance(handle, float)
        return time.monotonic() >= handle

    def finish(self, conn: Connection, started: object, records: list[Record], deadline: float) -> None:
        assert isinstance(started, float)
        time.sleep(max(0.0, started - time.monotonic()))
        self.open -= 1
        self.finished.append([r.control_id for r in records])

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


def test_writer_process_pipelines_transactions_in_order(url: str) -> None:
    """While one transaction waits for its confirms the next is begun (on a server database);
    outcomes come back in the order the jobs were sent, and a resend of a message whose
    transaction is still open waits for it and is answered as a duplicate."""
    queue = SlowQueue(0.05)
    w = BatchWriter(db.make_engine(url, pool_size=4, writer=True), queue, partitions=8, depth=3)
    ours, theirs = socket.socketpair()
    reports: list[tuple[list[int], str]] = []
    engine_side = threading.Thread(
        target=writerproc.run, args=(theirs, w, lambda jobs, st: reports.append(([j.id for j in jobs], st[2])), 1))
    engine_side.start()
    raws = [msg(f"P{i}") for i in range(12)] + [msg("P3")]  # the last one resends P3
    for i, raw in enumerate(raws):
        ours.sendall(writerproc.encode([_wire(raw, i)]))
    ours.shutdown(socket.SHUT_WR)
    engine_side.join(30)
    assert not engine_side.is_alive()
    assert [ids for ids, _ in reports] == [[i] for i in range(13)], "reported one by one, in order"
    assert all(failed == "" for _, failed in reports)
    rows = {(r["control_id"], r["status"]) for r in store_rows(url)}
    assert ("P3", "duplicate") in rows and len(store_rows(url)) == 13
    assert [c for batch in queue.finished for c in batch] == [f"P{i}" for i in range(12)], "a resend is not queued"
    if url.startswith("postgresql"):
        assert queue.max_open > 1, "transactions overlapped"
    else:
        assert queue.max_open == 1, "SQLite writes one transaction at a time"
    ours.close()
    theirs.close()


def _wire(raw: bytes, job_id: int) -> tuple[Any, ...]:
    h = read_header(raw, "utf-8")
    item = Item(new_uid(), "w", time.time(), "127.0.0.1:1", raw, h, "queued", "AA", b"ACK")
    return Job([item], lambda j: None, time.time() + 30).wire(job_id)


def test_sqlite_time_is_sqlalchemys_text() -> None:
    """The receiving path writes times without SQLAlchemy's per-row processing: its text must be
    what SQLAlchemy writes (and reads back), before 1970 and in other zones too."""
    from datetime import UTC, datetime, timedelta, timezone

    from sqlalchemy.dialects import sqlite

    from engine.store.bulk import sqlite_time

    process = sqlite.DATETIME().bind_processor(sqlite.dialect())
    assert process is not None
    for dt in (datetime(1965, 1, 1, 0, 0, 0, 500000, tzinfo=UTC), datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
               datetime(1970, 1, 1, tzinfo=UTC), datetime(2026, 12, 7, 13, 1, 2, 999999, tzinfo=UTC),
               datetime(2026, 12, 7, 16, 1, 2, 123456, tzinfo=timezone(timedelta(hours=3)))):
        assert sqlite_time(dt) == process(dt.astimezone(UTC).replace(tzinfo=None)), dt
    assert sqlite_time(None) is None


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_0011_queue_claims_need_no_partition_index(backend: str, request: pytest.FixtureRequest,
                                                             tmp_path: Path) -> None:
    """0011 drops the embedded queue's (partition, id) index: the workers' claims read the primary
    key in order (no sort) with or without it, entries written before survive both ways, and the
    per-partition gauges still count them."""
    from sqlalchemy import inspect, select

    from engine.admin.state import read_store
    from engine.store.schema import messages, queue_entries
    from engine.worker.sources import claim_query

    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    db.upgrade(url, "0010")
    eng = db.make_engine(url)
    db_time = datetime.fromtimestamp(time.time(), UTC)
    try:
        with eng.begin() as conn:
            for n, part in enumerate([1, 2, 1]):
                conn.execute(messages.insert(), {
                    "uid": f"u{n}", "channel": "lab", "received_at": db_time, "size": 1, "sha256": "0" * 64,
                    "accepted": True, "status": "queued", "raw": b"MSH|"})
                conn.execute(queue_entries.insert(), {"message_uid": f"u{n}", "partition": part,
                                                      "enqueued_at": db_time, "available_at": db_time, "attempts": 0})
    finally:
        eng.dispose()

    def check(after: bool) -> None:
        e = db.make_engine(url)
        try:
            with e.begin() as conn:
                names = {ix["name"] for ix in inspect(conn).get_indexes("queue_entries")}
                assert ("ix_queue_entries_partition_id" in names) is not after, names
                for count, index, uids in [(1, 0, ["u0", "u1", "u2"]), (2, 1, ["u0", "u2"]), (2, 0, ["u1"])]:
                    q = claim_query(50, index, count)
                    assert [u for _, u in conn.execute(q)] == uids
                    sql = str(q.compile(conn, compile_kwargs={"literal_binds": True}))
                    if backend == "postgresql":
                        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
                        plan = "\n".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN {sql}"))
                        assert "Index Scan using pk_queue_entries" in plan and "Sort" not in plan, plan
                    else:
                        plan = "\n".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
                        assert "TEMP B-TREE" not in plan, plan
            snap = read_store(e, embedded_queue=True)
            assert sorted(snap.queue) == [("p1", 2), ("p2", 1)]
            with e.connect() as conn:
                assert len(conn.execute(select(queue_entries.c.id)).all()) == 3
        finally:
            e.dispose()

    db.upgrade(url)
    check(after=True)
    downgrade(url, "0010")
    check(after=False)
    db.upgrade(url)
    check(after=True)


def test_sqlite_binds_none_bytes_and_bool_as_it_did_without_adapters() -> None:
    """The adapters registered for speed (db.bind_plain_values_directly) store exactly what the
    sqlite3 module's own path stored: NULL, the same blob, 1 and 0."""
    import sqlite3

    db.bind_plain_values_directly()
    for kind in (type(None), bytes, bool):
        assert (kind, sqlite3.PrepareProtocol) in sqlite3.adapters
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (a, b, c, d)")
        conn.execute("INSERT INTO t VALUES (?, ?, ?, ?)", (None, b"\x00\xffMSH|", True, False))
        assert conn.execute("SELECT typeof(a), typeof(b), typeof(c), typeof(d), a, b, c, d FROM t").fetchall() == [
            ("null", "blob", "integer", "integer", None, b"\x00\xffMSH|", 1, 0)]
    finally:
        conn.close()


def test_the_store_writer_takes_sqlites_write_lock_as_soon_as_it_is_free(tmp_path: Path) -> None:
    """On SQLite the store writer tries again for the write lock every LOCK_POLL seconds while a
    worker holds it (instead of SQLite's growing sleeps): it gets it once released, its statements
    keep the usual busy timeout, and a lock that stays taken ends in SQLite's own error."""
    import sqlite3

    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'store.db'}"
    db.upgrade(url)
    holder = sqlite3.connect(tmp_path / "store.db", isolation_level=None, check_same_thread=False)
    eng = db.make_engine(url, writer=True, lock_poll=writerproc.LOCK_POLL)
    try:
        holder.execute("BEGIN IMMEDIATE")
        release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
        release.start()
        with eng.begin() as conn:  # waits for the holder, then has the lock
            assert not holder.in_transaction
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            conn.execute(text("INSERT INTO alembic_version (version_num) VALUES ('x')"))
        release.join()

        holder.execute("BEGIN IMMEDIATE")
        with eng.connect() as conn:
            raw = conn.connection.dbapi_connection
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                db.begin_immediate_polling(raw, 0.001, timeout=0.05)
            assert raw.execute("PRAGMA busy_timeout").fetchone() == (30000,)
        holder.execute("ROLLBACK")
    finally:
        holder.close()
        eng.dispose()
