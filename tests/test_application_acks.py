"""Enhanced-mode application ACKs through the running engine, over real sockets, on both backends:
the sender gets its commit ACK (CA) on its connection, then, once a worker has decided the outcome,
an application ACK (AA, or AE with the step and reason) at its own listener, as its MSH-16 asks;
the engine keeps trying while that listener is down."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select

from engine.mllp.client import MLLPClient
from engine.store.schema import messages, outbound
from tests.conftest import Backend, free_port, store_url
from tests.peer import Peer
from tests.test_ack_processed import msa
from tests.test_appack import fields
from tests.test_e2e import lab, project


def enhanced(port: int) -> str:
    return (f"ack:\n  mode: enhanced\n  application_acks:\n    to: 127.0.0.1:{port}\n"
            "    answer_timeout: 5s\n    connect_timeout: 2s\n")


def asking(text: str, msh16: str = "AL") -> bytes:
    """``text`` (from ``lab``) in enhanced mode: MSH-15 AL, MSH-16 as given."""
    assert "|2.5.1|||||BY|" in text
    return text.replace("|2.5.1|||||BY|", f"|2.5.1|||AL|{msh16}|BY|", 1).encode()


def rows(url: str, control_id: str, timeout: float = 60) -> tuple[Any, list[Any]]:
    """The message ``control_id`` once it has an outcome, and its outbound rows."""
    engine = create_engine(url)
    try:
        deadline = time.time() + timeout
        while True:
            with engine.connect() as conn:
                m = conn.execute(select(messages.c.id, messages.c.status).where(messages.c.control_id == control_id)
                                 ).one()
                out = conn.execute(select(outbound).where(outbound.c.message_id == m.id).order_by(outbound.c.id)).all()
            if m.status in ("processed", "filtered", "error", "held") or time.time() > deadline:
                return m, out
            time.sleep(0.1)
    finally:
        engine.dispose()


def by_msa2(peer: Peer, control_id: str) -> bytes:
    return next(p for p in peer.received if fields(p, "MSA", "utf-8")[2] == control_id)


def test_commit_ack_then_application_ack_at_the_senders_listener(backend: Backend, engine_factory: Any,
                                                                 tmp_path: Path) -> None:
    project(tmp_path)
    peer = Peer()
    try:
        eng = engine_factory(backend, channel_extra=enhanced(peer.port), HL7ENGINE_WORKERS="1")
        url = store_url(eng)
        poisoned = lab("EA2", "20261122081000", "BY-9", "DOE^JOHN", "F", "5.5").replace(
            "PID|1||BY-9", "PID|1||BY-9^^^MINSKLAB^MR||DOE^JOHN\rPID|2||BY-10", 1)
        with MLLPClient("127.0.0.1", eng.port, timeout=30) as client:
            sent = [("EA1", asking(lab("EA1", "20261122080000", "BY-8", "ROE^JANE", "F", "4.25"))),
                    ("EA2", asking(poisoned)),
                    ("EA3", asking(lab("EA3", "20261122082000", "BY-7", "POE^ANN", "F", "4.5"), "ER")),
                    ("EA4", asking(lab("EA4", "20261122083000", "BY-6", "LOE^EVA", "F", "4.6"), "SU"))]
            for cid, data in sent:
                assert msa(client.send(data))[1:3] == ["CA", cid]  # the commit ACK: stored
        got = peer.wait(3)
        assert sorted(fields(p, "MSA", "utf-8")[2] for p in got) == ["EA1", "EA2", "EA4"]

        aa = by_msa2(peer, "EA1")
        msh = fields(aa, "MSH", "utf-8")
        assert msh[2:6] == ["HL7ENGINE", "CENTRAL", "LIS", "MINSKLAB"] and msh[8] == "ACK^R01^ACK"
        assert msh[14:16] == ["AL", "NE"]
        assert fields(aa, "MSA", "utf-8")[1] == "AA"
        ae = by_msa2(peer, "EA2")
        assert fields(ae, "MSA", "utf-8")[1] == "AE"
        assert "message stored but not processed (map: " in fields(ae, "MSA", "utf-8")[3]
        assert fields(ae, "ERR", "utf-8")[5].startswith("PROCESSING_MAP")
        assert fields(by_msa2(peer, "EA4"), "MSA", "utf-8")[1] == "AA"

        for cid, status, codes in [("EA1", "processed", ["AA"]), ("EA2", "error", ["AE"]),
                                   ("EA3", "processed", []),  # MSH-16 ER: nothing owed for a success
                                   ("EA4", "processed", ["AA"])]:
            m, out = rows(url, cid)
            assert m.status == status
            deadline = time.time() + 30
            while any(o.status == "pending" for o in out) and time.time() < deadline:
                time.sleep(0.1)
                m, out = rows(url, cid)
            assert [(o.code, o.status, o.answer) for o in out] == [(c, "sent", "CA peer says CA") for c in codes]

        # the message's history shows it
        show = subprocess.run([sys.executable, "-m", "engine.cli", "messages", "show", str(rows(url, "EA2")[0].id),
                               "--json", "--config", str(tmp_path)], env=eng.env, capture_output=True, text=True,
                              timeout=60, check=True)
        shown = json.loads(show.stdout)
        assert [a["code"] for a in shown["application_acks"]] == ["AE"]
        assert any(e["status"] == "app_ack" and "sent at" in e["detail"] for e in shown["history"])
    finally:
        peer.close()


def test_the_engine_keeps_trying_until_the_senders_listener_is_up(backend: Backend, engine_factory: Any,
                                                                  tmp_path: Path) -> None:
    project(tmp_path)
    port = free_port()
    eng = engine_factory(backend, channel_extra=enhanced(port), HL7ENGINE_WORKERS="1")
    url = store_url(eng)
    with MLLPClient("127.0.0.1", eng.port, timeout=30) as client:
        assert msa(client.send(asking(lab("EB1", "20261122080000", "BY-5", "ROE^JANE", "F", "4.25"))))[1] == "CA"
    deadline = time.time() + 60
    while True:
        _, out = rows(url, "EB1")
        if (out and out[0].attempts >= 1) or time.time() > deadline:
            break
        time.sleep(0.1)
    assert out[0].status == "pending" and "ConnectionRefusedError" in out[0].last_error
    peer = Peer(port)  # the sender's listener comes up
    try:
        got = peer.wait(1, timeout=60)
        assert [fields(p, "MSA", "utf-8")[1:3] for p in got] == [["AA", "EB1"]]
        deadline = time.time() + 30
        while rows(url, "EB1")[1][0].status != "sent" and time.time() < deadline:
            time.sleep(0.1)
        o = rows(url, "EB1")[1][0]
        assert o.status == "sent" and o.attempts >= 2
    finally:
        peer.close()
