"""SIGTERM: stop accepting, answer every message already read, then close and exit 0. Every message
answered AA is stored; none is left without its answer recorded."""

from __future__ import annotations

import signal
import socket
import time

from engine.mllp.client import read_acks
from engine.mllp.framing import FrameDecoder, frame
from tests.conftest import store_url
from tests.support import store_rows


def msg(cid: str) -> bytes:
    return (f"MSH|^~\\&|LIS|STOPLAB|HL7ENGINE|CENTRAL|20261122101500||ORU^R01^ORU_R01|{cid}|P|2.5.1\r"
            "PID|1||42^^^STOPLAB^MR||DOE^JANE\r").encode()


def test_sigterm_answers_in_flight_then_exits(engine_factory) -> None:
    engine = engine_factory()
    cids = [f"STOP-{i}" for i in range(300)]
    with socket.create_connection(engine.address) as s:
        s.sendall(b"".join(frame(msg(c)) for c in cids))
        time.sleep(0.05)
        engine.proc.send_signal(signal.SIGTERM)
        s.settimeout(20)
        dec = FrameDecoder(1 << 20)
        answers = []
        while True:
            data = s.recv(65536)
            if not data:
                break  # the engine closed the connection after answering what it had read
            answers += [ev.payload for ev in dec.feed(data) if hasattr(ev, "payload")]
    assert engine.proc.wait(30) == 0, engine.log()
    assert answers, "messages read before the stop are answered"
    acks = [read_acks(a)[0] for a in answers]
    assert [a.control_id for a in acks] == cids[:len(acks)], "in order, none skipped"
    assert all(a.code == "AA" for a in acks)
    stored = {r["control_id"]: r for r in store_rows(store_url(engine))}
    for a in acks:
        assert stored[a.control_id]["status"] == "queued" and stored[a.control_id]["ack_code"] == "AA"
    assert "stopping: no new connections" in engine.log() and "engine stopped" in engine.log()


def test_no_new_connections_after_sigterm(engine_factory) -> None:
    engine = engine_factory()
    held = socket.create_connection(engine.address)  # an idle connection keeps nothing alive
    engine.proc.send_signal(signal.SIGTERM)
    assert engine.proc.wait(30) == 0
    held.settimeout(5)
    assert held.recv(100) == b""
    held.close()
    try:
        socket.create_connection(engine.address, timeout=2).close()
        refused = False
    except OSError:
        refused = True
    assert refused
