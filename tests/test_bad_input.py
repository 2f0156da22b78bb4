"""Bad input gets a clear answer or a clean close; memory stays bounded; other senders are served
throughout (design-notes guarantee 5)."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from engine.mllp.client import MLLPClient, read_acks
from engine.mllp.framing import FrameDecoder, frame
from tests.conftest import store_url
from tests.support import store_rows


def msg(cid: str, msh9: str = "ORU^R01^ORU_R01", version: str = "2.5.1", pid: str = "P", extra: str = "") -> bytes:
    return (f"MSH|^~\\&|LIS|BADLAB|HL7ENGINE|CENTRAL|20261122101500||{msh9}|{cid}|{pid}|{version}{extra}\r"
            "PID|1||12345^^^BADLAB^MR||DOE^JANE\r").encode()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def engine_rss(engine) -> int:  # type: ignore[no-untyped-def]
    return rss_kib(engine.proc.pid) + sum(rss_kib(p) for p in engine.writer_pids if Path(f"/proc/{p}").exists())


def answer_of(sock: socket.socket, timeout: float = 10) -> bytes | None:
    """Read one MLLP answer; None if the connection closed first."""
    sock.settimeout(timeout)
    dec = FrameDecoder(1 << 20)
    while True:
        data = sock.recv(65536)
        if not data:
            return None
        for ev in dec.feed(data):
            if hasattr(ev, "payload"):
                return ev.payload  # type: ignore[no-any-return]


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the peer closes the connection (recv returns b'' or reset) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def assert_served(address: tuple[str, int], cid: str) -> None:
    with MLLPClient(*address, timeout=10) as client:
        answer = client.send(msg(cid))
    assert answer is not None and f"MSA|AA|{cid}\r".encode() in answer, answer


def err3(answer: bytes) -> list[str]:
    return [seg.split("|")[3].split("^")[0] for seg in answer.decode().split("\r") if seg.startswith("ERR")]


def test_garbage_outside_frames_is_dropped_and_the_connection_still_works(engine_factory) -> None:
    engine = engine_factory()
    with socket.create_connection(engine.address) as s:
        junk = bytes(random.Random(1).randrange(32, 127) for _ in range(5000))
        s.sendall(junk + b"\r\n" + frame(msg("AFTER-GARBAGE")))
        answer = answer_of(s)
    assert answer is not None and b"MSA|AA|AFTER-GARBAGE" in answer
    assert "bytes discarded" in engine.log()


def test_a_flood_of_non_mllp_bytes_closes_the_connection(engine_factory) -> None:
    engine = engine_factory(channel_extra="max_message_size: 64KiB\n")
    with socket.create_connection(engine.address) as s:
        try:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 5000)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert closed_within(s, 10)
    assert_served(engine.address, "AFTER-FLOOD")


def test_garbage_inside_a_frame_gets_a_reject(engine_factory) -> None:
    engine = engine_factory()
    with socket.create_connection(engine.address) as s:
        s.sendall(frame(os.urandom(3000).replace(b"\x0b", b"").replace(b"\x1c", b"")))
        answer = answer_of(s)
    assert answer is not None
    acks = read_acks(answer)
    assert acks[0].code == "AR" and err3(answer) == ["100"]


@pytest.mark.slow
def test_50_mib_frame_is_refused_without_being_buffered(engine_factory) -> None:
    engine = engine_factory()
    before = engine_rss(engine)
    head = msg("HUGE-1")
    with socket.create_connection(engine.address) as s:
        s.sendall(b"\x0b" + head)
        chunk = b"OBX|1|TX|X||" + b"A" * (1 << 20) + b"\r"
        peak = before
        for i in range(50):
            s.sendall(chunk)
            if i % 10 == 0:
                peak = max(peak, engine_rss(engine))
        s.sendall(b"\x1c\x0d")
        answer = answer_of(s, 30)
        assert answer is not None
        acks = read_acks(answer)
        assert acks[0].code == "AR" and acks[0].control_id == "HUGE-1"
        assert err3(answer) == ["104"] and b"exceeds this channel's limit" in answer
        # the same connection goes on working
        s.sendall(frame(msg("AFTER-HUGE")))
        after = answer_of(s)
        assert after is not None and b"MSA|AA|AFTER-HUGE" in after
    peak = max(peak, engine_rss(engine))
    assert peak - before < 48 * 1024, f"memory grew by {(peak - before) // 1024} MiB while a 50 MiB frame arrived"
    rows = [r for r in store_rows(store_url(engine)) if r["control_id"] == "HUGE-1"]
    assert len(rows) == 1 and rows[0]["status"] == "error" and rows[0]["size"] > 50 * (1 << 20)
    assert len(rows[0]["raw"]) <= 65536, "only the head of an oversize message is kept"


def test_frame_that_never_ends_is_closed_after_the_frame_timeout(engine_factory) -> None:
    engine = engine_factory(listen_extra="frame_timeout: 1s")
    with socket.create_connection(engine.address) as s:
        s.sendall(b"\x0b" + msg("NEVER-ENDS"))
        started = time.monotonic()
        assert closed_within(s, 10)
        assert time.monotonic() - started < 5
    assert "frame not completed within 1s" in engine.log()
    assert_served(engine.address, "AFTER-NEVER-ENDS")


def test_missing_msh9_and_msh10_get_reject_with_location(engine_factory) -> None:
    engine = engine_factory()
    with MLLPClient(*engine.address) as client:
        a9 = client.send(msg("NO-MSH9", msh9=""))
        a10 = client.send(b"MSH|^~\\&|LIS|BADLAB|HL7ENGINE|CENTRAL|20261122101500||ORU^R01||P|2.5.1\rPID|1\r")
    assert a9 is not None and a10 is not None
    assert read_acks(a9)[0].code == "AR" and b"ERR||MSH^1^9|101^Required field missing^HL70357" in a9
    assert read_acks(a10)[0].code == "AR" and b"MSH^1^10|101^" in a10
    assert read_acks(a10)[0].control_id == ""


def test_unsupported_version_and_processing_id(engine_factory) -> None:
    engine = engine_factory()
    with MLLPClient(*engine.address) as client:
        av = client.send(msg("V999", version="9.9"))
        ap = client.send(msg("PX", pid="X"))
    assert av is not None and err3(av) == ["203"] and read_acks(av)[0].control_id == "V999"
    assert ap is not None and err3(ap) == ["202"]


def test_slow_sender_does_not_hold_up_others(engine_factory) -> None:
    engine = engine_factory(listen_extra="frame_timeout: 3s")
    slow = socket.create_connection(engine.address)
    payload = b"\x0b" + msg("SLOW-1") + b"\x1c\r"
    stop = threading.Event()
    closed = threading.Event()

    def trickle() -> None:
        try:
            for b in payload:
                if stop.is_set():
                    return
                slow.sendall(bytes([b]))
                time.sleep(0.25)  # ~4 bytes a second: this frame would need minutes
        except OSError:
            closed.set()

    t = threading.Thread(target=trickle)
    t.start()
    try:
        served = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:  # others are served while the slow one trickles
            assert_served(engine.address, f"FAST-{served}")
            served += 1
        assert served > 10
        assert closed_within(slow, 10), "the slow frame is dropped at the frame timeout"
    finally:
        stop.set()
        t.join(10)
        slow.close()


def test_slow_but_complete_sender_is_answered(engine_factory) -> None:
    engine = engine_factory()
    with socket.create_connection(engine.address) as s:
        data = frame(msg("TRICKLE-OK"))
        for i in range(0, len(data), 7):
            s.sendall(data[i:i + 7])
            time.sleep(0.002)
        answer = answer_of(s)
    assert answer is not None and b"MSA|AA|TRICKLE-OK" in answer


@pytest.mark.slow
def test_500_idle_connections(engine_factory) -> None:
    engine = engine_factory(listen_extra="idle_timeout: 3s")
    before = engine_rss(engine)
    idle = [socket.create_connection(engine.address) for _ in range(500)]
    try:
        time.sleep(0.5)
        assert_served(engine.address, "WHILE-IDLE")  # others are served while 500 sit idle
        grown = engine_rss(engine) - before
        assert grown < 40 * 1024, f"500 idle connections cost {grown // 1024} MiB"
        deadline = time.monotonic() + 15
        closed = 0
        for s in idle:
            if closed_within(s, max(0.1, deadline - time.monotonic())):
                closed += 1
        assert closed == 500, "idle connections are closed cleanly at the idle timeout"
    finally:
        for s in idle:
            s.close()
    assert_served(engine.address, "AFTER-IDLE")


def test_max_connections(engine_factory) -> None:
    engine = engine_factory(listen_extra="max_connections: 3")
    held = [socket.create_connection(engine.address) for _ in range(3)]
    time.sleep(0.3)
    try:
        extra = socket.create_connection(engine.address)
        assert closed_within(extra, 5), "the connection over the limit is closed at once"
        extra.close()
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    assert_served(engine.address, "AFTER-LIMIT")
    assert "max_connections reached" in engine.log()


def test_sender_not_allowed_gets_reject_and_nothing_is_stored(engine_factory) -> None:
    engine = engine_factory(listen_extra="allowed_senders: [10.0.0.0/8]")
    with MLLPClient(*engine.address) as client:
        answer = client.send(msg("NOT-ALLOWED"))
    assert answer is not None and read_acks(answer)[0].code == "AR"
    assert b"SENDER_NOT_ALLOWED" in answer and b"127.0.0.1 is not allowed" in answer
    assert not [r for r in store_rows(store_url(engine)) if r["control_id"] == "NOT-ALLOWED"]


def test_pipelined_messages_get_their_acks_in_order(engine_factory) -> None:
    engine = engine_factory()
    cids = [f"PIPE-{i}" for i in range(200)]
    # a refused one in the middle: answered immediately, but still in its place
    blob = b"".join(frame(msg(c) if i != 57 else msg(c, version="9.9")) for i, c in enumerate(cids))
    with socket.create_connection(engine.address) as s:
        s.sendall(blob)
        s.settimeout(30)
        dec = FrameDecoder(1 << 20)
        answers: list[bytes] = []
        while len(answers) < len(cids):
            data = s.recv(65536)
            assert data
            answers += [ev.payload for ev in dec.feed(data) if hasattr(ev, "payload")]
    got = [read_acks(a)[0] for a in answers]
    assert [a.control_id for a in got] == cids
    assert [a.code for a in got] == ["AA" if i != 57 else "AR" for i in range(len(cids))]


def test_lf_segments_are_accepted_by_default_and_refused_when_strict(engine_factory) -> None:
    lf = msg("LF-1").replace(b"\r", b"\n")
    engine = engine_factory()
    with MLLPClient(*engine.address) as client:
        answer = client.send(lf)
    assert answer is not None and read_acks(answer)[0].code == "AA"
    rows = [r for r in store_rows(store_url(engine)) if r["control_id"] == "LF-1"]
    assert bytes(rows[0]["raw"]) == lf, "original bytes are kept"
    engine.stop()
    path = engine.config_dir / "channels" / "test.yaml"
    path.write_text(path.read_text() + "segment_separators: strict\n")
    engine = engine_factory(port=engine.port)
    with MLLPClient(*engine.address) as client:
        answer = client.send(msg("LF-2").replace(b"\r", b"\n"))
    assert answer is not None and read_acks(answer)[0].code == "AR" and b"LF_SEGMENTS" in answer


def test_enhanced_mode_follows_msh15(engine_factory) -> None:
    engine = engine_factory(channel_extra="ack:\n  mode: enhanced\n")
    with MLLPClient(*engine.address, timeout=10) as client:
        al = client.send(msg("ENH-AL", extra="|||AL|NE"))
        ne = client.send(msg("ENH-NE", extra="|||NE|NE"), timeout=1.5)
        er_ok = client.send(msg("ENH-ER", extra="|||ER|NE"), timeout=1.5)
        er_bad = client.send(msg("ENH-ER-BAD", version="9.9", extra="|||ER|NE"))
        original = client.send(msg("ENH-NONE"))  # MSH-15/16 empty: original mode
    assert al is not None and read_acks(al)[0].code == "CA"
    assert ne is None, "MSH-15 NE: no commit ACK"
    assert er_ok is None, "MSH-15 ER: no ACK when accepted"
    assert er_bad is not None and read_acks(er_bad)[0].code == "CR"
    assert original is not None and read_acks(original)[0].code == "AA"
    stored = {r["control_id"]: r for r in store_rows(store_url(engine))}
    assert stored["ENH-NE"]["status"] == "queued" and stored["ENH-NE"]["ack_code"] == "CA"
