"""Enhanced-mode application ACKs without the engine: which outcome earns one (MSH-16), its bytes,
the channel settings, and delivery to a peer's listener (sent, refused, retried, expired) on both
store backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, insert, select

from engine.config.models import ChannelConfig
from engine.hl7.ack import application_ack_due
from engine.outbound.appack import AppAcks, control_id
from engine.outbound.deliver import Deliverer
from engine.store.schema import outbound
from tests.conftest import free_port
from tests.peer import Peer, tls_server


def channel(to: str = "127.0.0.1:6661", **ack: Any) -> ChannelConfig:
    return ChannelConfig.model_validate({"timezone": "Europe/Minsk", "charset": "windows-1251",
                                         "ack": {"mode": "enhanced", "application": "CENTRAL", "facility": "MOH",
                                                 "application_acks": {"to": to, **ack}}})


def message(msh15: str = "AL", msh16: str = "AL", msh18: str = "") -> bytes:
    text = (f"MSH|^~\\&|LIS|MINSKLAB|HL7ENGINE|CENTRAL|20261122080000||ORU^R01^ORU_R01|C42|P|2.5.1|||{msh15}|{msh16}"
            f"|BY|{msh18}\rPID|1||BY-1^^^MINSKLAB^MR||Иванова^Анна\r")
    return text.encode("utf-8" if msh18 == "UNICODE UTF-8" else "cp1251")


def fields(payload: bytes, segment: str, codec: str = "cp1251") -> list[str]:
    line = next(s for s in payload.decode(codec).split("\r") if s.startswith(segment + "|"))
    return line.split("|")


@pytest.mark.parametrize(("msh16", "code", "due"), [
    ("AL", "AA", True), ("AL", "AE", True), ("", "AA", True), ("", "AE", True),
    ("NE", "AA", False), ("NE", "AE", False),
    ("ER", "AA", False), ("ER", "AE", True), ("ER", "AR", True),
    ("SU", "AA", True), ("SU", "AE", False),
    ("XX", "AA", True),
])
def test_msh16_decides_which_outcomes_are_acknowledged(msh16: str, code: str, due: bool) -> None:
    assert application_ack_due(msh16, code) is due


def test_a_processed_message_gets_aa_asking_for_a_commit_ack() -> None:
    acks = AppAcks([("lab", channel())])
    built = acks.build("lab", message(), "processed", None, None)
    assert built is not None
    code, payload = built
    assert code == "AA"
    msh = fields(payload, "MSH")
    # sender and receiver swapped; MSH-9 ACK^R01^ACK; MSH-15 AL (answer with a commit ACK), MSH-16 NE
    assert msh[2:6] == ["HL7ENGINE", "CENTRAL", "LIS", "MINSKLAB"]
    assert msh[8] == "ACK^R01^ACK" and msh[10:12] == ["P", "2.5.1"]
    assert msh[14:16] == ["AL", "NE"] and len(msh) == 16
    assert msh[9] == control_id(payload) and msh[9].startswith("P")
    assert fields(payload, "MSA")[1:3] == ["AA", "C42"]
    assert b"ERR|" not in payload
    assert acks.build("lab", message(), "filtered", "route", "no route matched")[0] == "AA"  # type: ignore[index]


@pytest.mark.parametrize(("status", "step", "err3", "err5"), [
    ("error", "map", "207", "PROCESSING_MAP"),
    ("error", "route", "200", "PROCESSING_ROUTE"),
    ("held", "order", "206", "PROCESSING_ORDER"),
])
def test_a_failed_message_gets_ae_with_the_step_and_reason(status: str, step: str, err3: str, err5: str) -> None:
    built = AppAcks([("lab", channel())]).build("lab", message(), status, step, "two PID|segments")
    assert built is not None
    code, payload = built
    assert code == "AE"
    msa = fields(payload, "MSA")
    assert msa[1:3] == ["AE", "C42"]
    assert msa[3] == f"message stored but not processed ({step}: two PID\\F\\segments)"
    err = fields(payload, "ERR")
    assert err[3].split("^")[0] == err3 and err[5].split("^")[0] == err5


@pytest.mark.parametrize(("msh15", "msh16", "status", "sent"), [
    ("", "", "processed", False),  # original mode: the one ACK went on the sender's connection
    ("AL", "NE", "processed", False), ("AL", "NE", "error", False),
    ("NE", "ER", "processed", False), ("NE", "ER", "error", True),
    ("AL", "SU", "processed", True), ("AL", "SU", "held", False),
    ("NE", "", "processed", True),
])
def test_only_what_msh16_asks_for_is_built(msh15: str, msh16: str, status: str, sent: bool) -> None:
    built = AppAcks([("lab", channel())]).build("lab", message(msh15, msh16), status, "map", "bad")
    assert (built is not None) is sent


def test_no_ack_for_other_channels_or_unfinished_outcomes() -> None:
    acks = AppAcks([("lab", channel()), ("plain", ChannelConfig())])
    assert acks.build("plain", message(), "processed", None, None) is None
    assert acks.build("lab", message(), "queued", None, None) is None
    assert acks.build("lab", message(), "duplicate", None, None) is None
    assert not AppAcks([("plain", ChannelConfig())])


def test_the_ack_is_in_the_senders_character_set() -> None:
    acks = AppAcks([("lab", channel())])
    _, cp1251 = acks.build("lab", message(), "error", "map", "нет пациента")  # type: ignore[misc]
    assert "нет пациента" in fields(cp1251, "MSA")[3]
    _, utf8 = acks.build("lab", message(msh18="UNICODE UTF-8"), "error", "map",  # type: ignore[misc]
                         "нет пациента")
    msh = fields(utf8, "MSH", "utf-8")
    assert msh[14:16] == ["AL", "NE"] and msh[17] == "UNICODE UTF-8" and len(msh) == 18
    assert "нет пациента" in fields(utf8, "MSA", "utf-8")[3]


def test_rows_for_a_batch_of_outcomes() -> None:
    acks = AppAcks([("lab", channel("peer.example:7001"))])
    now = datetime(2026, 12, 6, tzinfo=UTC)
    row = SimpleNamespace(id=7, channel="lab", raw=message())
    rows = acks.rows([(row, "processed", None, None), (SimpleNamespace(id=8, channel="lab", raw=message("AL", "ER")),
                                                        "processed", None, None)], now)
    assert len(rows) == 1
    r = rows[0]
    assert (r["message_id"], r["kind"], r["destination"], r["code"], r["status"], r["attempts"]) == (
        7, "app_ack", "peer.example:7001", "AA", "pending", 0)
    assert r["control_id"] == control_id(r["payload"]) and r["next_attempt_at"] == now


def test_channel_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="application ACKs need mode: enhanced"):
        ChannelConfig.model_validate({"ack": {"application_acks": {"to": "lis:6661"}}})
    with pytest.raises(ValidationError, match="expected host:port"):
        channel("lis")
    with pytest.raises(ValidationError, match="expected host:port"):
        channel("lis:70000")
    with pytest.raises(ValidationError, match="cert_file and key_file go together"):
        channel(tls={"cert_file": "/etc/a.crt"})
    cfg = channel("[::1]:6661").ack.application_acks
    assert cfg is not None and (cfg.host, cfg.port) == ("::1", 6661)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ChannelConfig.model_validate({"ack": {"mode": "enhanced", "application_acks": {"to": "a:1", "retry": 3}}})


# -- delivery -------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.at = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.at


def add(engine: Engine, n: int, *, channel_name: str = "lab", created: datetime | None = None) -> list[int]:
    acks = AppAcks([(channel_name, channel())])
    at = created or datetime.now(UTC) - timedelta(seconds=1)
    rows = []
    for i in range(n):
        raw = message().replace(b"|C42|", f"|C{i}|".encode())
        rows += acks.rows([(SimpleNamespace(id=100 + i, channel=channel_name, raw=raw), "processed", None, None)], at)
    with engine.begin() as conn:
        conn.execute(insert(outbound), rows)
        return [r.id for r in conn.execute(select(outbound.c.id).order_by(outbound.c.id)).all()][-n:]


def state(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(select(outbound).order_by(outbound.c.id)).all()


def deliverer(db_url: str, port: int, clock: Clock, **ack: Any) -> Deliverer:
    return Deliverer(db_url, [("lab", channel(f"127.0.0.1:{port}", answer_timeout="2s", connect_timeout="2s", **ack))],
                     now=clock)


def test_delivered_in_order_and_marked_sent(db_url: str, engine: Engine) -> None:
    peer = Peer()
    clock = Clock()
    d = deliverer(db_url, peer.port, clock)
    try:
        add(engine, 3)
        assert d.run_once() == 3
        assert [control_id(p) for p in peer.received] == [control_id(r.payload) for r in state(engine)]
        assert [fields(p, "MSA")[2] for p in peer.received] == ["C0", "C1", "C2"]
        rows = state(engine)
        assert {(r.status, r.attempts, r.answer) for r in rows} == {("sent", 1, "CA peer says CA")}
        assert all(r.sent_at is not None and r.destination == f"127.0.0.1:{peer.port}" for r in rows)
        assert d.run_once() == 0  # nothing due any more
        assert len(peer.received) == 3
    finally:
        d.close()
        peer.close()


def test_a_refusal_is_final(db_url: str, engine: Engine) -> None:
    peer = Peer(answer="CR")
    clock = Clock()
    d = deliverer(db_url, peer.port, clock)
    try:
        add(engine, 2)
        d.run_once()
        assert [(r.status, r.last_error) for r in state(engine)] == [("refused", "CR peer says CR")] * 2
        clock.at += timedelta(days=1)
        assert d.run_once() == 0
    finally:
        d.close()
        peer.close()


@pytest.mark.parametrize(("answer", "error"), [
    ("CE", "the peer answered CE peer says CE"),
    ("", "no answer within 2s"),
    ("wrong", "the answer is for another message (MSA-2 'OTHER')"),
])
def test_a_failed_attempt_is_retried_after_a_backoff_the_rest_waiting(db_url: str, engine: Engine,
                                                                      answer: str, error: str) -> None:
    peer = Peer(answer=answer)
    clock = Clock()
    d = deliverer(db_url, peer.port, clock)
    try:
        add(engine, 3)
        d.run_once()
        first, *rest = state(engine)
        assert (first.status, first.attempts, first.last_error) == ("pending", 1, error)
        assert first.next_attempt_at == clock.at + timedelta(seconds=1)
        assert [(r.status, r.attempts, r.next_attempt_at) for r in rest] == [("pending", 0, first.next_attempt_at)] * 2
        assert len(peer.received) == 1  # the later ones waited behind the first
        assert d.run_once() == 0  # not due yet
        add(engine, 1, created=clock.at)  # a new one, due at once, still waits behind the first
        assert d.run_once() == 0
        peer.answer = "CA"
        clock.at += timedelta(seconds=1)
        assert d.run_once() == 4
        assert [(r.status, r.attempts) for r in state(engine)] == [("sent", 2), ("sent", 1), ("sent", 1), ("sent", 1)]
        assert [control_id(p) for p in peer.received[1:]] == [control_id(r.payload) for r in state(engine)]
    finally:
        d.close()
        peer.close()


def test_no_listener_backs_off_then_gives_up(db_url: str, engine: Engine) -> None:
    clock = Clock()
    d = deliverer(db_url, free_port(), clock, give_up_after="1h")
    try:
        add(engine, 1, created=clock.at)
        delays = []
        for _ in range(4):
            d.run_once()
            row = state(engine)[0]
            assert row.status == "pending" and "ConnectionRefusedError" in (row.last_error or "")
            delays.append((row.next_attempt_at - clock.at).total_seconds())
            clock.at = row.next_attempt_at
        assert delays == [1, 2, 4, 8]
        clock.at += timedelta(hours=1)
        d.run_once()
        assert [(r.status, r.attempts) for r in state(engine)] == [("expired", 5)]
        assert d.run_once() == 0
        # an operator sends it again: give_up_after counts from then, so one more failure is a retry
        from engine.outbound.query import resend

        assert resend(engine, [], status="expired") == [state(engine)[0].id]
        clock.at = datetime.now(UTC) + timedelta(seconds=1)
        d.run_once()
        assert [(r.status, r.attempts) for r in state(engine)] == [("pending", 6)]
    finally:
        d.close()


def test_rows_of_channels_not_configured_here_are_left_alone(db_url: str, engine: Engine, tmp_path: Path) -> None:
    peer = Peer()
    d = deliverer(db_url, peer.port, Clock())
    try:
        add(engine, 1, channel_name="elsewhere")
        assert d.run_once() == 0
        assert [r.status for r in state(engine)] == ["pending"]
    finally:
        d.close()
        peer.close()


def test_delivered_over_tls_verifying_the_peer(db_url: str, engine: Engine, tmp_path: Path) -> None:
    server, cert = tls_server(tmp_path)
    peer = Peer(tls=server)
    clock = Clock()
    trusting = deliverer(db_url, peer.port, clock, tls={"ca_file": str(cert), "server_name": "localhost"})
    untrusting = deliverer(db_url, peer.port, clock, tls={"server_name": "localhost"})  # system CAs only
    try:
        add(engine, 1)
        untrusting.run_once()
        row = state(engine)[0]
        assert row.status == "pending" and "CERTIFICATE_VERIFY_FAILED" in (row.last_error or "")
        assert peer.received == []
        clock.at = row.next_attempt_at
        assert trusting.run_once() == 1
        assert [(r.status, r.answer) for r in state(engine)] == [("sent", "CA peer says CA")]
        assert len(peer.received) == 1
    finally:
        trusting.close()
        untrusting.close()
        peer.close()


def test_operators_list_and_resend_them(db_url: str, engine: Engine, tmp_path: Path) -> None:
    import json

    from tests.test_cli import in_process

    peer = Peer(answer="CR")
    clock = Clock()
    d = deliverer(db_url, peer.port, clock, give_up_after="1s")
    env = {"HL7ENGINE_DATABASE_URL": db_url}

    def cli(*args: str) -> Any:
        return in_process("app-acks", *args, "--config", str(tmp_path), env=env)

    try:
        first, second = add(engine, 2)
        d.run_once()  # both refused
        listed = [json.loads(line) for line in cli("--json").stdout.splitlines()]
        assert [(r["id"], r["status"], r["code"], r["last_error"]) for r in listed] == [
            (second, "refused", "AA", "CR peer says CR"), (first, "refused", "AA", "CR peer says CR")]
        text = cli("--status", "refused").stdout
        assert "refused" in text and "CR peer says CR" in text and str(first) in text
        assert cli("--status", "sent").stdout.strip() == "no application ACKs"
        bad = cli("--status", "lost")
        assert bad.returncode == 2 and "expected one of pending, sent, refused, expired" in bad.stderr

        assert "would send again 2 application ACK(s)" in cli("resend", "--status", "refused", "--dry-run").stdout
        assert [r.status for r in state(engine)] == ["refused"] * 2
        out = cli("resend", str(first))
        assert out.returncode == 0 and "will send again 1 application ACK(s)" in out.stdout, out
        assert [r.status for r in state(engine)] == ["pending", "refused"]
        peer.answer = "CA"
        clock.at = datetime.now(UTC) + timedelta(seconds=1)
        assert d.run_once() == 1
        assert [r.status for r in state(engine)] == ["sent", "refused"]
        assert cli("resend", "999999").returncode == 2
        assert cli("resend").returncode == 2  # neither ids nor a status
        assert [json.loads(line)["id"] for line in cli("--message", "101", "--json").stdout.splitlines()] == [second]
    finally:
        d.close()
        peer.close()


def test_two_listeners_never_send_one_twice_and_keep_the_order(db_url: str, engine: Engine) -> None:
    import threading

    peer = Peer()
    clock = Clock()
    a, b = deliverer(db_url, peer.port, clock), deliverer(db_url, peer.port, clock)
    try:
        add(engine, 30)
        sent = []
        go = threading.Barrier(2)

        def run(d: Deliverer) -> None:
            go.wait()
            sent.append(d.run_once())

        threads = [threading.Thread(target=run, args=(d,)) for d in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # one claimed all 30; the other found them claimed (or waiting behind the claimed ones)
        assert sorted(sent) == [0, 30]
        rows = state(engine)
        assert [r.status for r in rows] == ["sent"] * 30
        assert [control_id(p) for p in peer.received] == [control_id(r.payload) for r in rows]
    finally:
        a.close()
        b.close()
        peer.close()


def test_an_unreachable_store_is_retried_and_stop_is_prompt(tmp_path: Path) -> None:
    import time

    d = Deliverer(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none",
                  [("lab", channel())], interval=0.01)
    d.start()
    time.sleep(0.3)
    assert d._thread is not None and d._thread.is_alive() and d._failing  # still trying, said so once
    started = time.monotonic()
    d.close()
    assert not d._thread.is_alive() and time.monotonic() - started < 6


def test_a_slow_peer_never_outlasts_the_lease(db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A round stops sending at half the lease and gives the rest back, due at once, so another
    listener can never take rows whose lease ran out while they are still being sent."""
    from engine.outbound import deliver as module

    monkeypatch.setattr(module, "LEASE", 0.5)
    peer = Peer(delay=0.1)
    clock = Clock()
    d = deliverer(db_url, peer.port, clock)
    try:
        add(engine, 8)
        assert d.run_once() == 8  # claimed all, sent what fits in 0.25 s
        first = [r.status for r in state(engine)]
        assert 1 <= first.count("sent") <= 4 and first.count("pending") >= 4, first
        assert all(r.next_attempt_at <= clock.at for r in state(engine) if r.status == "pending")
        for _ in range(10):
            if all(r.status == "sent" for r in state(engine)):
                break
            d.run_once()
        rows = state(engine)
        assert [r.status for r in rows] == ["sent"] * 8
        assert [control_id(p) for p in peer.received] == [control_id(r.payload) for r in rows]  # in order, once
    finally:
        d.close()
        peer.close()


def test_without_commit_acks_written_is_delivered(db_url: str, engine: Engine) -> None:
    """For senders whose listener never answers an ACK: MSH-15 NE in the application ACK, marked sent
    once written; a connection the sender closed is noticed before writing and opened again."""
    cfg = channel(commit_ack=False)
    built = AppAcks([("lab", cfg)]).build("lab", message(), "processed", None, None)
    assert built is not None and fields(built[1], "MSH")[14:16] == ["NE", "NE"]

    peer = Peer(answer="")  # reads, never answers
    clock = Clock()
    d = Deliverer(db_url, [("lab", channel(f"127.0.0.1:{peer.port}", commit_ack=False))], now=clock)
    try:
        add(engine, 2)
        assert d.run_once() == 2
        assert [(r.status, r.answer) for r in state(engine)] == [("sent", "written (no commit ACK asked)")] * 2
        assert len(peer.wait(2, timeout=10)) == 2
        # the sender drops the connection: the next one is sent on a new connection, not lost in a dead one
        peer.close()
        peer2 = Peer(peer.port, answer="")
        try:
            import time

            time.sleep(0.2)
            add(engine, 1)
            clock.at = datetime.now(UTC)
            d.run_once()
            for _ in range(20):
                if state(engine)[-1].status == "sent":
                    break
                clock.at = state(engine)[-1].next_attempt_at
                d.run_once()
            assert (state(engine)[-1].status, state(engine)[-1].attempts) == ("sent", 1)  # the dead one noticed
            assert len(peer2.wait(1, timeout=10)) == 1
        finally:
            peer2.close()
    finally:
        d.close()
        peer.close()


def test_every_corpus_message_gets_a_well_formed_application_ack(corpus: list[Any]) -> None:
    """Every message of ../shared/corpus that the listener accepts, as if it arrived on an enhanced
    channel asking for application ACKs: its AA and AE read back with python-hl7 (an independent
    parser) in the sender's character set, answer its MSH-10, swap sender and receiver, and echo
    MSH-11, MSH-12 and MSH-18."""
    from engine.hl7.header import read_header
    from engine.mllp.client import split_messages
    from tests.support import msh_field, parse, python_codec, read_ack

    acks = AppAcks([("lab", channel())])
    checked = 0
    for f in corpus:
        if f.malformed:
            continue
        for piece in split_messages(f.data()):
            if piece.lstrip(b"\xef\xbb\xbf\r\n ").startswith((b"FHS", b"BHS")):
                continue
            header = read_header(piece, "cp1251")
            if header.problems:
                continue
            # as if the sender asked for both ACKs: MSH-15 and MSH-16 AL
            d = header.delimiters.field.encode()
            msh_end = min((i for i in (piece.find(b"\r"), piece.find(b"\n")) if i >= 0), default=len(piece))
            parts = piece[:msh_end].split(d)
            parts += [b""] * max(0, 16 - len(parts))  # parts[n] is MSH-(n+1)
            parts[14], parts[15] = b"AL", b"AL"
            raw = d.join(parts) + piece[msh_end:]
            original = parse(raw, python_codec(raw, "cp1251"))
            for status, code in (("processed", "AA"), ("error", "AE")):
                built = acks.build("lab", raw, status, "map", "observations[0].value: OBX-5 is not a number")
                assert built is not None and built[0] == code, f.name
                codec = python_codec(built[1], "cp1251")
                ack = read_ack(built[1], codec)
                assert (ack.code, ack.control_id) == (code, msh_field(original, 10)), f.name
                # when the sender left MSH-5/6 empty: the channel's ack.application and ack.facility
                ours = [msh_field(original, 5) or "CENTRAL", msh_field(original, 6) or "MOH"]
                assert ack.msh[3:7] == [*ours, msh_field(original, 3), msh_field(original, 4)], f.name
                assert ack.msh[11] == msh_field(original, 11) or (not msh_field(original, 11) and ack.msh[11] == "P")
                assert ack.msh[12] == msh_field(original, 12), f.name
                assert ack.msh[15:17] == ["AL", "NE"], f.name
                assert ack.msh[18] == msh_field(original, 18), f.name
                assert (ack.err_codes == ["207"]) if code == "AE" else not ack.err_codes, f.name
                checked += 1
    assert checked >= 300, checked  # 2 per message; the corpus has ~170 accepted ones


def test_a_connection_the_sender_dropped_is_opened_again_before_sending(db_url: str, engine: Engine) -> None:
    """A sender's listener that closes idle connections costs no failed attempt: the next
    application ACK goes out on a new connection at once."""
    peer = Peer()
    clock = Clock()
    d = deliverer(db_url, peer.port, clock)
    try:
        add(engine, 1)
        assert d.run_once() == 1
        for conn in list(peer.conns):  # the sender drops the idle connection
            conn.shutdown(__import__("socket").SHUT_RDWR)
        import time

        time.sleep(0.2)
        add(engine, 1, created=clock.at)
        assert d.run_once() == 1
        assert [(r.status, r.attempts) for r in state(engine)] == [("sent", 1), ("sent", 1)]
        assert len(peer.received) == 2
    finally:
        d.close()
        peer.close()
