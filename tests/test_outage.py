"""Broker or database unreachable: no AA; the sender gets AE quickly (within the ACK timeout), the
engine reconnects by itself and resumes without a restart. A crashed store writer is restarted."""

from __future__ import annotations

import os
import signal
import time

import pytest

from engine.mllp.client import MLLPClient, read_acks
from tests.conftest import Backend, children_of, store_url
from tests.support import TcpProxy, store_rows

ACK_TIMEOUT = 3.0


def msg(cid: str) -> bytes:
    return (f"MSH|^~\\&|LIS|OUTLAB|HL7ENGINE|CENTRAL|20261122101500||ORU^R01^ORU_R01|{cid}|P|2.5.1\r"
            "PID|1||555^^^OUTLAB^MR||DOE^JOHN\r").encode()


def send(address: tuple[str, int], cid: str) -> tuple[str, str, float]:
    t0 = time.monotonic()
    with MLLPClient(*address, timeout=ACK_TIMEOUT + 10) as client:
        answer = client.send(msg(cid))
    assert answer is not None
    ack = read_acks(answer)[0]
    assert ack.control_id == cid
    return ack.code, ack.text, time.monotonic() - t0


def wait_for_aa(address: tuple[str, int], prefix: str, within: float) -> int:
    deadline = time.monotonic() + within
    n = 0
    while time.monotonic() < deadline:
        code, _, _ = send(address, f"{prefix}-{n}")
        if code == "AA":
            return n
        n += 1
        time.sleep(0.3)
    raise AssertionError(f"no AA within {within}s after the outage ended")


@pytest.mark.slow
@pytest.mark.parametrize("service", ["broker", "database"])
def test_outage_answers_ae_then_recovers(service: str, postgres_url: str, rabbitmq_url: str, queue_name: str,
                                         engine_factory) -> None:
    if service == "broker":
        proxy = TcpProxy(("127.0.0.1", 5672))
        broker = rabbitmq_url.replace("127.0.0.1:5672", f"127.0.0.1:{proxy.port}")
        env = {"HL7ENGINE_DATABASE_URL": postgres_url, "HL7ENGINE_BROKER_URL": broker}
    else:
        proxy = TcpProxy(("127.0.0.1", 5432))
        db = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        env = {"HL7ENGINE_DATABASE_URL": db, "HL7ENGINE_BROKER_URL": rabbitmq_url}
    env.update({"HL7ENGINE_QUEUE_NAME": queue_name, "HL7ENGINE_QUEUE_PARTITIONS": "4"})
    try:
        engine = engine_factory(Backend("services", env), channel_extra=f"ack:\n  timeout: {ACK_TIMEOUT}s\n")
        pid = engine.proc.pid
        assert send(engine.address, "BEFORE")[0] == "AA"

        proxy.cut()
        time.sleep(0.5)
        for i in range(3):
            code, text, took = send(engine.address, f"DURING-{i}")
            assert code == "AE", f"{service} unreachable: no AA ({code} {text})"
            assert took < ACK_TIMEOUT + 1.0, f"AE took {took:.1f}s"
            assert "send it again" in text

        proxy.restore()
        wait_for_aa(engine.address, "AFTER", within=40)
        assert engine.proc.pid == pid and engine.proc.poll() is None, "recovered without a restart"
        assert f"{'broker' if service == 'broker' else 'store'}" in engine.log()
    finally:
        proxy.close()
    rows = {r["control_id"]: r for r in store_rows(postgres_url)}
    assert rows["BEFORE"]["status"] == "queued"
    assert "AFTER-0" in rows or any(k.startswith("AFTER-") for k in rows)
    if service == "broker":  # the database was up: the refused attempts are on record
        for i in range(3):
            r = rows[f"DURING-{i}"]
            assert r["status"] == "error" and r["error_step"] == "enqueue" and r["ack_code"] == "AE"
            assert not r["accepted"]


def test_store_writer_crash_is_survived(engine_factory) -> None:
    engine = engine_factory()
    assert send(engine.address, "BEFORE-CRASH")[0] == "AA"
    writers = children_of(engine.proc.pid)
    assert writers, "the store writer runs as a child process"
    for pid in writers:
        os.kill(pid, signal.SIGKILL)
    wait_for_aa(engine.address, "AFTER-CRASH", within=30)
    assert "store writer process stopped; restarting" in engine.log()
    engine.writer_pids = children_of(engine.proc.pid)
    rows = {r["control_id"]: r for r in store_rows(store_url(engine))}
    assert rows["BEFORE-CRASH"]["status"] == "queued"


def test_the_frames_of_a_batch_reach_the_socket_in_one_write() -> None:
    """pika writes each frame (three per message) on its own; the publisher hands a batch's frames
    to the transport as one buffer. This also guards the pika internal it relies on."""
    from engine.queue.rabbitmq import _CoalescingConnection

    class Transport:
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.writes.append(data)

    conn = object.__new__(_CoalescingConnection)
    conn._transport = Transport()
    conn.hold()
    for frame in (b"method", b"header", b"body"):
        conn._adapter_emit_data(frame)
    assert conn._transport.writes == []
    conn.release()
    conn._adapter_emit_data(b"heartbeat")  # outside a batch: as pika does
    assert conn._transport.writes == [b"methodheaderbody", b"heartbeat"]
