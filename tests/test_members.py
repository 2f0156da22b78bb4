"""Worker membership: RabbitMQ partitions shared by every worker process on every host.

The assignment itself (pure), the heartbeat table (SQLite and PostgreSQL), and two "hosts" (each a
worker with its own processor and membership) on the real broker and database: a worker that joins
takes over half of the partitions while messages flow, one that leaves gives them back, and every
patient's messages are applied once each, in the order they were sent.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import create_engine, func, select

from engine.hl7.header import read_header
from engine.intake.item import Item, new_uid
from engine.intake.writer import BatchWriter, Job, WireJob
from engine.queue.factory import make_enqueuer
from engine.settings import Settings
from engine.store import db
from engine.store.schema import messages
from engine.worker.members import Membership, assign, list_members
from engine.worker.processor import Outcome
from engine.worker.sources import run_rabbit
from tests.test_worker import FakeRecord, oru, processor


@given(st.sets(st.text(min_size=1, max_size=12), min_size=1, max_size=12), st.integers(1, 64))
def test_assign_gives_every_partition_to_one_member_evenly(members: set[str], partitions: int) -> None:
    out = assign(members, partitions)
    assert set(out) == members
    owned = sorted(p for ps in out.values() for p in ps)
    assert owned == list(range(partitions))  # each partition exactly once
    sizes = Counter(len(ps) for ps in out.values())
    low = partitions // len(members)
    assert set(sizes) <= {low, low + 1}
    assert sizes.get(low + 1, 0) == partitions % len(members)
    assert assign(sorted(members, reverse=True), partitions) == out  # the same on every member


def _moved(a: dict[str, list[int]], b: dict[str, list[int]]) -> int:
    owner_a = {p: m for m, ps in a.items() for p in ps}
    owner_b = {p: m for m, ps in b.items() for p in ps}
    return sum(1 for p in owner_a if owner_a[p] != owner_b[p])


def test_assign_moves_few_partitions_when_a_member_joins_or_leaves() -> None:
    """Against round robin over the sorted members (which moves most partitions on every change)."""
    def round_robin(members: list[str], partitions: int) -> dict[str, list[int]]:
        ids = sorted(members)
        return {m: [p for p in range(partitions) if p % len(ids) == i] for i, m in enumerate(ids)}

    ours = rr = 0
    for n in range(1, 8):
        members = [f"work-{chr(97 + i)}:{100 + i}:0" for i in range(n)]
        joined = [*members, f"work-z:{999}:0"]
        ours += _moved(assign(members, 32), assign(joined, 32))
        rr += _moved(round_robin(members, 32), round_robin(joined, 32))
        # a member that leaves: only its partitions move
        gone = members[0]
        before, after = assign(joined, 32), assign(joined[1:], 32)
        assert _moved(before, after) >= len(before[gone])
    assert ours * 2 < rr


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    u = f"sqlite:///{tmp_path / 'store.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    db.upgrade(u)
    return u


def test_members_share_partitions_and_rebalance_on_join_leave_and_silence(url: str) -> None:
    engine = db.make_engine(url)
    a = Membership(engine, 8)
    assert a.beat([]) == list(range(8))  # alone: everything
    b = Membership(engine, 8, lease=0.5)
    mine_b = b.beat([])
    mine_a = a.beat(list(range(8)))
    assert mine_a is not None and mine_b is not None
    assert len(mine_a) == len(mine_b) == 4 and sorted(mine_a + mine_b) == list(range(8))
    rows = {m.id: m for m in list_members(engine)}
    assert set(rows) == {a.id, b.id} and all(m.live for m in rows.values())
    assert rows[a.id].partitions == "0,1,2,3,4,5,6,7"  # what a consumed at its last heartbeat

    b.leave()  # a clean stop: a takes everything at its next heartbeat
    assert a.beat(mine_a) == list(range(8))

    c = Membership(engine, 8)
    c.beat([])
    assert len(a.beat(list(range(8))) or []) == 4
    time.sleep(0.7)  # c goes silent; a beats on
    assert len(a.beat(list(range(8))) or []) == 4  # within a's lease (6 s), c still counts
    b2 = Membership(engine, 8, lease=0.5)
    assert len(b2.beat([]) or []) == 4  # with a 0.5 s lease: a and b2 are live, c is not
    assert {m.id for m in list_members(engine)} == {a.id, b2.id, c.id}  # c's row stays until forgotten
    engine.dispose()


def test_heartbeat_failure_keeps_the_partitions_it_has(tmp_path: Path) -> None:
    good = tmp_path / "store.db"
    db.upgrade(f"sqlite:///{good}")
    m = Membership(db.make_engine(f"sqlite:///{good}"), 4)
    assert m.beat([]) == [0, 1, 2, 3]
    m.engine = create_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")  # cannot be opened
    assert m.beat([0, 1, 2, 3]) == [0, 1, 2, 3]


# -- two workers on the real broker and database ------------------------------------------------------


class SlowRecord(FakeRecord):
    """A record that takes a moment per message, so that queues hold a backlog while partitions move."""

    def apply(self, conn: Any, mapped: tuple[str, str, str], uid: str, received_at: Any) -> int:
        time.sleep(0.004)
        return super().apply(conn, mapped, uid, received_at)


def publish(settings: Settings, raws: list[bytes]) -> None:
    """Store and publish messages as the receiving path does (rows and RabbitMQ, before an ACK)."""
    assert settings.database_url is not None
    engine = db.make_engine(settings.database_url, writer=True)
    enqueuer = make_enqueuer(settings)
    w = BatchWriter(engine, enqueuer, partitions=settings.queue_partitions)
    jobs = []
    for i, raw in enumerate(raws):
        item = Item(new_uid(), "lab", time.time(), "127.0.0.1:1", raw, read_header(raw, "utf-8"), "queued", "AA",
                    b"ACK")
        job = WireJob.from_wire(Job([item], lambda j: None, time.time() + 30).wire(i))
        w.prepare(job)
        jobs.append(job)
    for start in range(0, len(jobs), 50):
        _, _, failed = w.write(jobs[start:start + 50])
        assert not failed
    w.close()
    enqueuer.close()
    engine.dispose()


class Worker:
    """One worker "host": its own processor, membership and consumer thread."""

    def __init__(self, url: str, settings: Settings, record: FakeRecord) -> None:
        self.processor = processor(url, record)
        self.members = Membership(self.processor.engine, settings.queue_partitions)
        self.done: Counter[str] = Counter()
        self.stop = threading.Event()

        def count(o: Outcome) -> None:
            self.done[o.status] += 1

        assert settings.broker_url is not None
        self.thread = threading.Thread(target=self._run, args=(settings, count), daemon=True)
        self.thread.start()

    def _run(self, settings: Settings, count: Any) -> None:
        assert settings.broker_url is not None
        try:
            run_rabbit(self.processor, self.processor.engine, settings.broker_url, settings.queue_name,
                       self.members.beat, self.stop, on_outcome=count,
                       declare=settings.queue_partitions)
        finally:
            self.members.leave()

    def consuming(self) -> set[int]:
        rows = {m.id: m for m in list_members(self.processor.engine)}
        shown = rows[self.members.id].partitions if self.members.id in rows else ""
        return {int(p) for p in shown.split(",") if p}

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.processor.engine.dispose()


def wait_for(check: Any, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {check}")


def test_a_worker_that_joins_takes_half_and_one_that_leaves_gives_back_in_order(
        postgres_url: str, rabbitmq_url: str, queue_name: str) -> None:
    settings = Settings(database_url=postgres_url, broker_url=rabbitmq_url, queue_name=queue_name,
                        queue_partitions=8)
    db.upgrade(postgres_url)
    engine = db.make_engine(postgres_url)
    record = SlowRecord()
    sent: dict[str, list[str]] = {}

    def send(prefix: str, n: int) -> None:
        raws = []
        for i in range(n):
            patient = f"P{i % 40}"
            cid = f"{prefix}{i:04d}"
            sent.setdefault(patient, []).append(cid)
            raws.append(oru(cid, patient))
        publish(settings, raws)

    def processed() -> int:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(messages)
                                .where(messages.c.status == "processed")).scalar_one()

    a = Worker(postgres_url, settings, record)
    b: Worker | None = None
    try:
        wait_for(lambda: a.consuming() == set(range(8)))
        send("A", 1000)  # a backlog: about 4 s of work for one worker
        b = Worker(postgres_url, settings, record)
        wait_for(lambda: b is not None and len(b.consuming()) == 4 and len(a.consuming()) == 4)
        assert a.consuming().isdisjoint(b.consuming())
        handed_over_at = processed()
        assert handed_over_at < 1000, "the hand-over should happen while a backlog is queued"
        send("B", 400)  # both at work
        wait_for(lambda: processed() == 1400, 60)
        assert b.done["processed"] > 0 and a.done["processed"] > 0

        send("C", 600)  # a backlog again, and b stops in the middle of it: its row goes, a takes
        left = 2000 - processed()  # its partitions back, with what b had been delivered and not processed
        b.close()
        assert left > 0
        b = None
        wait_for(lambda: a.consuming() == set(range(8)))
        wait_for(lambda: processed() == 2000, 60)
    finally:
        if b is not None:
            b.close()
        a.close()
    # every message applied once, each patient's in the order sent, across both hand-overs
    assert dict(record.applied) == sent
    assert list_members(engine) == []  # both left
    engine.dispose()


def test_workers_command_lists_members_and_their_partitions(url: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from typer.testing import CliRunner

    from engine.cli import app

    monkeypatch.setenv("HL7ENGINE_DATABASE_URL", url)
    runner = CliRunner()
    empty = runner.invoke(app, ["workers", "--config", str(tmp_path)])
    assert empty.exit_code == 0 and "no workers" in empty.output
    engine = db.make_engine(url)
    a, b = Membership(engine, 4), Membership(engine, 4)
    a.beat([])
    mine = b.beat([])
    assert mine is not None
    b.beat(mine)  # b now records what it consumes
    table = runner.invoke(app, ["workers", "--config", str(tmp_path)])
    assert table.exit_code == 0, table.output
    assert a.id[:44] in table.output and b.id[:44] in table.output
    assert "2 live of 2" in table.output and "partitions consumed: 2" in table.output
    rows = [json.loads(line) for line in runner.invoke(app, ["workers", "--json", "--config", str(tmp_path)])
            .output.splitlines()]
    assert {r["id"]: r["partitions"] for r in rows} == {a.id: "", b.id: ",".join(map(str, mine))}
    assert all(r["live"] for r in rows)
    engine.dispose()
