"""Workers without sockets: routing, per-patient order, parking, retries, idempotence, adoption.

The mapping and the record are replaced by small fakes here (they have their own tests); the queue,
the message store and the processor are the real ones, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, func, select

from engine.config.routes import RoutesConfig
from engine.errors import EngineError
from engine.hl7.header import read_header
from engine.hl7.message import Message
from engine.intake.item import Item, new_uid
from engine.intake.writer import BatchWriter, Job, WireJob
from engine.queue.dbqueue import DatabaseQueue
from engine.settings import Settings
from engine.store import db
from engine.store.schema import messages, parked_patients, queue_entries
from engine.worker.processor import Processor, RetryLater
from engine.worker.replay import release
from engine.worker.router import MessageKey, Router
from engine.worker.sources import run_db_queue

ROUTES = RoutesConfig.model_validate({
    "routes": [
        {"name": "lab", "match": {"channel": "lab", "type": ["ORU^R01", "OUL^*"]}, "mapping": "oru"},
        {"name": "adt", "match": {"type": "ADT^*", "facility": "HOSP*"}, "mapping": "adt"},
    ],
    "default": "filter",
})


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    u = f"sqlite:///{tmp_path / 'store.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    db.upgrade(u)
    return u


def oru(cid: str, patient: str, value: str = "5.0", facility: str = "WLAB", mtype: str = "ORU^R01") -> bytes:
    return (f"MSH|^~\\&|LIS|{facility}|HL7ENGINE|CENTRAL|20261122101500||{mtype}|{cid}|P|2.5.1\r"
            f"PID|1||{patient}^^^{facility}^MR||DOE^JOHN\r"
            f"OBR|1||ACC-{cid}|GLU^Glucose\r"
            f"OBX|1|NM|GLU^Glucose||{value}|mmol/L|||||F\r").encode()


def store(url: str, raws: list[bytes], channel: str = "lab", partitions: int = 8) -> list[str]:
    """Store and queue messages as the receiving path does."""
    engine = db.make_engine(url, writer=True)
    w = BatchWriter(engine, DatabaseQueue(), partitions=partitions)
    uids = []
    jobs = []
    for i, raw in enumerate(raws):
        item = Item(new_uid(), channel, time.time(), "127.0.0.1:1", raw, read_header(raw, "utf-8"), "queued", "AA",
                    b"ACK")
        uids.append(item.uid)
        job = WireJob.from_wire(Job([item], lambda j: None, time.time() + 30).wire(i))
        w.prepare(job)
        jobs.append(job)
    for start in range(0, len(jobs), 100):
        w.write(jobs[start:start + 100])
    w.close()
    engine.dispose()
    return uids


class FakeRecord:
    """Maps a message to (patient, control ID, value) and records the order facts were applied in."""

    def __init__(self) -> None:
        self.applied: dict[str, list[str]] = defaultdict(list)  # patient -> control IDs, in order
        self.lock = threading.Lock()
        self.fail_transient = 0
        self.allow_poison = False

    def map(self, name: str, msg: Message, ctx: dict[str, Any]) -> tuple[str, str, str]:
        value = msg.get("OBX-5") or ""
        if value == "POISON" and not self.allow_poison:
            raise EngineError("observations[0].value: OBX-5 is not a number (rule oru.yaml:12)")
        return msg.get("PID-3.1") or "", ctx["control_id"], value

    def apply(self, conn: Connection, mapped: tuple[str, str, str], uid: str, received_at: datetime) -> int:
        with self.lock:
            if self.fail_transient > 0:
                self.fail_transient -= 1
                raise RetryLater("database is locked")
            self.applied[mapped[0]].append(mapped[1])
        return 1


def processor(url: str, fake: FakeRecord, routes: RoutesConfig = ROUTES) -> Processor:
    engine = db.make_engine(url, pool_size=2, writer=db.is_sqlite(url))
    return Processor(engine, Router(routes), fake.map, fake.apply, {"lab": "UTC"})


def statuses(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return {r.control_id: r.status for r in conn.execute(select(messages.c.control_id, messages.c.status))}


def drain(p: Processor, *, index: int = 0, count: int = 1) -> None:
    """Run the embedded-queue consumer until the queue is empty."""
    stop = threading.Event()
    t = threading.Thread(target=run_db_queue, args=(p, p.engine, stop), kwargs={"index": index, "count": count})
    t.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        with p.engine.connect() as conn:
            q = select(func.count()).select_from(queue_entries)
            if count > 1:
                q = q.where((queue_entries.c.partition % count) == index)
            if conn.execute(q).scalar() == 0:
                break
        time.sleep(0.02)
    stop.set()
    t.join(10)


def test_router_rules_in_order() -> None:
    r = Router(ROUTES)
    assert r.route(MessageKey("lab", "ORU", "R01", "ORU_R01", "WLAB", "2.5.1")).name == "lab"  # type: ignore[union-attr]
    assert r.route(MessageKey("lab", "OUL", "R22", "", "WLAB", "2.5.1")).name == "lab"  # type: ignore[union-attr]
    assert r.route(MessageKey("lab", "ORU", "R30", "", "WLAB", "2.5.1")) is None
    assert r.route(MessageKey("x", "ADT", "A01", "", "HOSP1^1.2.3^ISO", "2.3")).name == "adt"  # type: ignore[union-attr]
    assert r.route(MessageKey("x", "ADT", "A01", "", "CLINIC", "2.3")) is None


def test_processed_filtered_and_idempotent(url: str) -> None:
    fake = FakeRecord()
    p = processor(url, fake)
    uids = store(url, [oru("C1", "P1"), oru("C2", "P1", mtype="ORM^O01")])
    drain(p)
    assert statuses(p.engine) == {"C1": "processed", "C2": "filtered"}
    assert fake.applied == {"P1": ["C1"]}
    # a redelivery (RabbitMQ) of a message already processed changes nothing
    assert p.process(uids[0]).status == "skipped"
    assert fake.applied == {"P1": ["C1"]}


def test_transient_failure_retries_without_marking(url: str) -> None:
    fake = FakeRecord()
    fake.fail_transient = 3
    p = processor(url, fake)
    store(url, [oru("T1", "P1"), oru("T2", "P1")])
    drain(p)
    assert statuses(p.engine) == {"T1": "processed", "T2": "processed"}
    assert fake.applied == {"P1": ["T1", "T2"]}, "retried in place: order kept"


def test_unrouted_is_an_error_when_default_is_error(url: str) -> None:
    fake = FakeRecord()
    p = processor(url, fake, RoutesConfig.model_validate({"routes": [], "default": "error"}))
    store(url, [oru("U1", "P1")])
    drain(p)
    with p.engine.connect() as conn:
        row = conn.execute(select(messages.c.status, messages.c.error_step, messages.c.error)).one()
    assert (row.status, row.error_step) == ("error", "route")
    assert "no route matches ORU^R01" in row.error


def test_poison_parks_only_its_patient(url: str) -> None:
    """200 patients, interleaved updates, two workers on split partitions: each patient's applied
    order equals its arrival order; one poisoned message parks its patient (later messages held),
    every other patient is complete."""
    rng = random.Random(7)
    raws, expected = [], defaultdict(list)
    order = [f"P{n}" for n in range(200) for _ in range(5)]
    rng.shuffle(order)
    poisoned = "P17"
    seen: dict[str, int] = defaultdict(int)
    for i, patient in enumerate(order):
        seen[patient] += 1
        value = "POISON" if patient == poisoned and seen[patient] == 3 else str(i)
        raws.append(oru(f"M{i}", patient, value))
        expected[patient].append(f"M{i}")
    store(url, raws)
    fake = FakeRecord()
    procs = [processor(url, fake), processor(url, fake)]
    threads = [threading.Thread(target=drain, args=(p,), kwargs={"index": i, "count": 2}) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    st = statuses(procs[0].engine)
    for patient, cids in expected.items():
        if patient == poisoned:
            assert fake.applied[patient] == cids[:2]
            assert [st[c] for c in cids] == ["processed", "processed", "error", "held", "held"]
        else:
            assert fake.applied[patient] == cids, patient
    with procs[0].engine.connect() as conn:
        parked = conn.execute(select(parked_patients.c.patient_key)).scalars().all()
        error = conn.execute(select(messages.c.error_step, messages.c.error).where(messages.c.status == "error")).one()
    assert parked == [f"WLAB|{poisoned}^WLAB"]
    assert error.error_step == "map" and "OBX-5 is not a number" in error.error
    assert "POISON" not in error.error

    # the mapping is fixed; replaying the failed message releases the patient, in order
    fake.allow_poison = True
    with procs[0].engine.connect() as conn:
        error_id = conn.execute(select(messages.c.id).where(messages.c.status == "error")).scalar_one()
    done = release(procs[0].engine, Settings(), error_id, skip=False)
    assert len(done.queued) == 3
    drain(procs[0])
    assert fake.applied[poisoned] == expected[poisoned]
    assert set(statuses(procs[0].engine).values()) == {"processed"}
    with procs[0].engine.connect() as conn:
        assert conn.execute(select(parked_patients.c.patient_key)).all() == []


def test_adopts_a_queued_message_without_a_row(url: str) -> None:
    from types import SimpleNamespace

    from engine.worker.sources import adopt

    fake = FakeRecord()
    p = processor(url, fake)
    raw = oru("AD1", "P9")
    uid = new_uid()
    props = SimpleNamespace(headers={"channel": "lab", "received_at": (datetime.now(UTC)).isoformat(), "partition": 1},
                            timestamp=int(time.time()), content_encoding="utf-8", message_id=uid)
    assert p.process(uid).status == "missing"
    with pytest.raises(RetryLater):  # too recent: the writer may still be committing it
        adopt(p.engine, uid, props, raw)
    props.headers["received_at"] = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    adopt(p.engine, uid, props, raw)
    assert p.process(uid).status == "processed"
    assert fake.applied == {"P9": ["AD1"]}
