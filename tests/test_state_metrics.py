"""Gauges of the shared state on /metrics (engine.admin.state): queue depths, messages needing
attention, parked patients, owed deliveries; on SQLite and PostgreSQL, with the embedded queue and
with RabbitMQ, and what is reported when a source does not answer."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pika
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, insert, text

from engine.admin.http import create_app
from engine.admin.state import StateCollector, attention_query
from engine.mllp.client import MLLPClient
from engine.queue.rabbitmq import declare_topology, queue_depths
from engine.store import db
from engine.store.schema import messages, outbound, parked_patients, queue_entries
from engine.worker.members import Membership
from tests.conftest import Backend, free_port
from tests.test_e2e import lab

_ids = itertools.count(1)


def add_message(engine: Engine, channel: str, status: str) -> str:
    n = next(_ids)
    uid = f"u{n:031d}"
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(insert(messages).values(
            uid=uid, channel=channel, received_at=now, size=3, sha256=hashlib.sha256(uid.encode()).hexdigest(),
            accepted=status != "error", status=status, raw=b"MSH", control_id=f"C{n}"))
    return uid


def registry(engine: Engine, **kw: Any) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StateCollector(engine, **kw))
    return reg


def value(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def test_the_state_of_the_store(engine: Engine) -> None:
    for status in ("error", "error", "held", "queued", "processed", "filtered", "duplicate"):
        add_message(engine, "lab", status)
    add_message(engine, "adt", "replayed")
    old = datetime.now(UTC) - timedelta(minutes=10)
    waiting = [add_message(engine, "lab", "queued") for _ in range(3)]
    with engine.begin() as conn:
        conn.execute(insert(queue_entries), [
            {"message_uid": uid, "partition": p, "enqueued_at": old + timedelta(seconds=i),
             "available_at": old, "attempts": 0} for i, (uid, p) in enumerate(zip(waiting, (0, 0, 5), strict=True))])
        conn.execute(insert(parked_patients).values(patient_key="WLAB|77^BY", message_uid=waiting[0],
                                                    parked_at=old))
        due = datetime.now(UTC) - timedelta(minutes=30)
        conn.execute(insert(outbound), [
            {"message_id": 1, "kind": kind, "channel": "lab", "target": target, "destination": "h:1",
             "control_id": "X", "code": "", "payload": b"M", "status": status, "attempts": 0,
             "created_at": due, "due_at": due, "next_attempt_at": due}
            for kind, target, status in (("mllp", "lis", "pending"), ("mllp", "lis", "pending"),
                                         ("mllp", "lis", "expired"), ("file", "archive", "sent"),
                                         ("app_ack", "lab", "pending"))])
    reg = registry(engine)
    assert value(reg, "hl7engine_state_up", source="store") == 1
    assert value(reg, "hl7engine_state_up", source="broker") is None  # embedded queue: no broker
    assert value(reg, "hl7engine_live_workers") is None  # embedded workers do not register
    assert value(reg, "hl7engine_store_messages", channel="lab", status="error") == 2
    assert value(reg, "hl7engine_store_messages", channel="lab", status="held") == 1
    assert value(reg, "hl7engine_store_messages", channel="adt", status="replayed") == 1
    for status in ("queued", "processed", "filtered", "duplicate"):  # not counted: no index pays for them
        assert value(reg, "hl7engine_store_messages", channel="lab", status=status) is None
    assert value(reg, "hl7engine_queue_messages", queue="p0") == 2
    assert value(reg, "hl7engine_queue_messages", queue="p5") == 1
    assert 595 < (value(reg, "hl7engine_queue_oldest_seconds") or 0) < 700
    assert value(reg, "hl7engine_parked_patients") == 1
    assert 595 < (value(reg, "hl7engine_parked_oldest_seconds") or 0) < 700
    assert value(reg, "hl7engine_outbound_messages", kind="mllp", target="lis", status="pending") == 2
    assert value(reg, "hl7engine_outbound_messages", kind="mllp", target="lis", status="expired") == 1
    assert value(reg, "hl7engine_outbound_messages", kind="app_ack", target="lab", status="pending") == 1
    assert value(reg, "hl7engine_outbound_messages", kind="file", target="archive", status="sent") is None
    assert 1795 < (value(reg, "hl7engine_outbound_oldest_seconds", kind="mllp", target="lis") or 0) < 1900


def test_an_empty_store_reads_zero(engine: Engine) -> None:
    reg = registry(engine, partitions=4)
    assert value(reg, "hl7engine_parked_patients") == 0
    assert value(reg, "hl7engine_parked_oldest_seconds") == 0
    assert value(reg, "hl7engine_queue_oldest_seconds") == 0
    assert [value(reg, "hl7engine_queue_messages", queue=f"p{i}") for i in range(5)] == [0, 0, 0, 0, None]


def test_reads_are_cached_for_the_ttl(engine: Engine) -> None:
    collector = StateCollector(engine, ttl=60)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    add_message(engine, "lab", "error")
    assert value(reg, "hl7engine_store_messages", channel="lab", status="error") == 1
    add_message(engine, "lab", "error")
    assert value(reg, "hl7engine_store_messages", channel="lab", status="error") == 1, "a scrape within the ttl"
    collector.ttl = 0
    assert value(reg, "hl7engine_store_messages", channel="lab", status="error") == 2


def test_a_store_that_does_not_answer_is_reported_down() -> None:
    dead = db.make_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")  # nothing listens on port 1
    reg = registry(dead)
    assert value(reg, "hl7engine_state_up", source="store") == 0
    assert value(reg, "hl7engine_parked_patients") is None, "no number rather than a wrong one"
    dead.dispose()


def test_rabbitmq_queue_depths(engine: Engine, rabbitmq_url: str, queue_name: str) -> None:
    declare_topology(rabbitmq_url, queue_name, 3)
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    ch = conn.channel()
    for _ in range(4):
        ch.basic_publish(queue_name, "1", b"m")
    ch.basic_publish("", f"{queue_name}.dead", b"m")
    conn.close()
    assert queue_depths(rabbitmq_url, queue_name, 3) == [("p0", 0), ("p1", 4), ("p2", 0), ("dead", 1)]
    reg = registry(engine, broker_depths=lambda: queue_depths(rabbitmq_url, queue_name, 3))
    assert value(reg, "hl7engine_state_up", source="broker") == 1
    assert value(reg, "hl7engine_queue_messages", queue="p1") == 4
    assert value(reg, "hl7engine_queue_messages", queue="dead") == 1
    assert value(reg, "hl7engine_queue_oldest_seconds") is None, "RabbitMQ does not tell"


def test_a_broker_that_does_not_answer_is_reported_down(engine: Engine, queue_name: str) -> None:
    reg = registry(engine, broker_depths=lambda: queue_depths("amqp://guest:guest@127.0.0.1:1/", queue_name, 2))
    assert value(reg, "hl7engine_state_up", source="broker") == 0
    assert value(reg, "hl7engine_state_up", source="store") == 1
    assert value(reg, "hl7engine_queue_messages", queue="p0") is None
    assert value(reg, "hl7engine_parked_patients") == 0, "the store's gauges are still there"


def test_metrics_endpoint_serves_the_state(db_url: str, engine: Engine) -> None:
    add_message(engine, "lab", "error")
    with TestClient(create_app(db_url)) as client:
        body = client.get("/metrics").text
    assert 'hl7engine_state_up{source="store"} 1.0' in body
    assert 'hl7engine_store_messages{channel="lab",status="error"} 1.0' in body
    assert "# TYPE hl7engine_parked_patients gauge" in body


def test_a_running_engine_reports_its_queue(backend: Backend, engine_factory: Any) -> None:
    """Over real sockets, on both backends: messages received with no worker running wait in the
    queue, and the engine's /metrics says so."""
    http = free_port()
    eng = engine_factory(backend, HL7ENGINE_HTTP_PORT=str(http))
    with MLLPClient("127.0.0.1", eng.port, timeout=30) as client:
        for i in range(3):
            message = lab(f"ST{i}", "20261207080000", f"BY-{i}", "ROE^JANE", "F", "4.2")
            assert b"MSA|AA|" in client.send(message.encode())
    deadline = time.monotonic() + 30
    while True:
        body = httpx.get(f"http://127.0.0.1:{http}/metrics", timeout=10).text
        waiting = sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                      if line.startswith("hl7engine_queue_messages{") and 'queue="dead"' not in line)
        if waiting == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # a read is kept for up to 10 s
    assert waiting == 3, body
    assert 'hl7engine_state_up{source="store"} 1.0' in body
    if backend.services:
        assert 'hl7engine_state_up{source="broker"} 1.0' in body
        assert 'hl7engine_queue_messages{queue="dead"} 0.0' in body
        assert "hl7engine_live_workers 0.0" in body  # the engine runs no worker here (HL7ENGINE_WORKERS=0)
        partitions = int(eng.env.get("HL7ENGINE_QUEUE_PARTITIONS", "8"))
        assert f"hl7engine_partitions_unconsumed {float(partitions)}" in body
    else:
        assert "hl7engine_queue_oldest_seconds" in body


def test_the_messages_are_counted_from_the_partial_index(engine: Engine) -> None:
    """The count must not read the millions of queued and processed rows: the query carries the
    partial index's condition, without which SQLite scans the whole table."""
    sql = str(attention_query().compile(engine, compile_kwargs={"literal_binds": True}))
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            plan = " ".join(str(r[-1]) for r in conn.execute(text("EXPLAIN QUERY PLAN " + sql)))
        else:
            conn.execute(text("SET enable_seqscan = off"))
            plan = " ".join(str(r[0]) for r in conn.execute(text("EXPLAIN " + sql)))
    assert "ix_messages_status_attention" in plan, plan


# -- hl7engine status: the same state for an operator at a terminal ---------------------------------

def status(db_url: str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    from tests.test_cli import in_process

    return in_process("status", *args, "--config", str(tmp_path), env={"HL7ENGINE_DATABASE_URL": db_url, **env})


def test_status_of_a_healthy_store_exits_0(db_url: str, engine: Engine, tmp_path: Path) -> None:
    add_message(engine, "lab", "processed")
    done = status(db_url, tmp_path)
    assert done.returncode == 0, done
    assert "queue (embedded): 0 waiting" in done.stdout
    assert "parked patients: 0" in done.stdout and "deliveries owed: none" in done.stdout


def test_status_names_what_needs_attention_and_exits_1(db_url: str, engine: Engine, tmp_path: Path) -> None:
    uid = add_message(engine, "lab", "error")
    add_message(engine, "lab", "held")
    old = datetime.now(UTC) - timedelta(hours=2)
    with engine.begin() as conn:
        conn.execute(insert(queue_entries).values(message_uid=uid, partition=3, enqueued_at=old, available_at=old,
                                                  attempts=0))
        conn.execute(insert(parked_patients).values(patient_key="WLAB|77^BY", message_uid=uid, parked_at=old))
        conn.execute(insert(outbound).values(message_id=1, kind="mllp", channel="lab", target="lis", destination="h:1",
                                             control_id="X", code="", payload=b"M", status="expired", attempts=9,
                                             created_at=old, due_at=old, next_attempt_at=old))
    done = status(db_url, tmp_path)
    assert done.returncode == 1, done
    out = done.stdout
    assert "queue (embedded): 1 waiting, oldest waiting 2h 0m; p3 1" in out, out
    assert "  lab: " in out and "error 1" in out and "held 1" in out
    assert "parked patients: 1 (the longest for 2h 0m)" in out
    assert "  mllp lis: expired 1" in out
    as_json = json.loads(status(db_url, tmp_path, "--json").stdout)
    assert as_json["needs_attention"] is True and as_json["parked_patients"] == 1
    assert as_json["queue"] == {"kind": "embedded", "waiting": 1, "dead_lettered": None, "partitions": {"p3": 1},
                                "oldest_seconds": as_json["queue"]["oldest_seconds"], "error": None}
    assert 7190 < as_json["queue"]["oldest_seconds"] < 7300
    assert {"channel": "lab", "status": "error", "count": 1} in as_json["messages"]


def test_status_reads_rabbitmq_and_counts_dead_letters(postgres_url: str, rabbitmq_url: str, queue_name: str,
                                                       tmp_path: Path) -> None:
    db.upgrade(postgres_url)
    declare_topology(rabbitmq_url, queue_name, 2)
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    ch = conn.channel()
    ch.basic_publish(queue_name, "0", b"m")
    ch.basic_publish("", f"{queue_name}.dead", b"m")
    conn.close()
    env = {"HL7ENGINE_BROKER_URL": rabbitmq_url, "HL7ENGINE_QUEUE_NAME": queue_name, "HL7ENGINE_QUEUE_PARTITIONS": "2"}
    done = status(postgres_url, tmp_path, **env)
    assert done.returncode == 1, done  # a dead-lettered message needs someone, and no worker runs
    assert "queue (RabbitMQ): 1 waiting, 1 dead-lettered; p0 1, p1 0" in done.stdout
    assert "workers (RabbitMQ): 0 live; partitions nobody consumes: p0, p1" in done.stdout
    # a worker that consumes one of the two partitions: the other still waits
    engine = db.make_engine(postgres_url)
    worker = Membership(engine, 2)
    worker.beat([0])
    as_json = json.loads(status(postgres_url, tmp_path, "--json", **env).stdout)
    assert as_json["workers"] == {"live": 1, "partitions_unconsumed": [1]}
    reg = registry(engine, broker_depths=lambda: queue_depths(rabbitmq_url, queue_name, 2), partitions=2)
    assert value(reg, "hl7engine_live_workers") == 1
    assert value(reg, "hl7engine_partitions_unconsumed") == 1
    worker.beat([0, 1])
    assert json.loads(status(postgres_url, tmp_path, "--json", **env).stdout)["workers"]["partitions_unconsumed"] == []
    engine.dispose()
    down = status(postgres_url, tmp_path, **{**env, "HL7ENGINE_BROKER_URL": "amqp://guest:guest@127.0.0.1:1/"})
    assert down.returncode == 2 and "queue: RabbitMQ does not answer" in down.stdout


def test_status_when_the_store_does_not_answer(tmp_path: Path) -> None:
    done = status("postgresql+psycopg://postgres@127.0.0.1:1/none", tmp_path)
    assert done.returncode == 2 and "the message store does not answer" in done.stderr


def test_status_without_a_store_file(tmp_path: Path) -> None:
    done = status(f"sqlite:///{tmp_path / 'nothing.db'}", tmp_path)
    assert done.returncode == 2 and "no message store at" in done.stderr
