"""Route destinations beyond the record: a processed message forwarded, as received, to a downstream
MLLP listener (``type: mllp``) or written to a file of its own (``type: file``).

Config (``check`` with file:line:col), file names, delivery from ``outbound`` on both store backends
(order per destination, refusal, retry, files written whole), and through the running engine over
real sockets on both backends: what was processed is forwarded byte for byte, what failed is not, a
route without the record forwards unmapped, and a replay forwards again."""

from __future__ import annotations

import json
import os
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Engine, create_engine, insert, select

from engine.config.routes import FileDestination, MLLPDestination, RoutesConfig, filename_fields
from engine.mllp.client import MLLPClient
from engine.outbound.deliver import Deliverer, write_file
from engine.outbound.forward import Forwards, filename, safe
from engine.store.schema import messages, outbound
from tests.conftest import Backend, store_url
from tests.peer import Peer, tls_server
from tests.test_ack_processed import msa
from tests.test_appack import Clock
from tests.test_cli import in_process
from tests.test_config import cfg, check, minimal, write
from tests.test_e2e import lab

__all__ = ["cfg"]  # the configuration-directory fixture of test_config

# -- configuration ---------------------------------------------------------------------------------


def routes(cfg: Path, text: str) -> None:
    write(cfg, "lab.yaml", minimal(2640, "lab"))
    (cfg / "routes.yaml").write_text(text, encoding="utf-8")


def test_destinations_problems_are_located(cfg: Path) -> None:
    routes(cfg,
           "routes:\n"
           "  - name: results\n"
           "    destinations:\n"
           "      - record\n"
           "      - type: mllp\n"
           "        name: lis\n"
           "        to: lis.example.org\n"
           "        anser_timeout: 5s\n"
           "      - type: fax\n"
           "      - type: file\n"
           "        name: drop\n"
           "        directory: out\n"
           "        filename: ../{control_id}.hl7\n"
           "  - name: adt\n"
           "    mapping: adt\n"
           "    destinations:\n"
           "      - {type: file, name: drop2, directory: out, filename: '{patient}.hl7'}\n")
    code, lines = check(cfg)
    assert code == 1
    assert "routes.yaml:7:13: routes[0].destinations[1].to: expected host:port, e.g. lis.example.org:6661, " \
           "got 'lis.example.org'" in lines, lines
    assert any(line.startswith("routes.yaml:8:9: routes[0].destinations[1].anser_timeout: unknown key; expected one "
                               "of to, tls, connect_timeout, answer_timeout") for line in lines), lines
    assert "routes.yaml:9:9: routes[0].destinations[2]: unknown type 'fax'; expected one of record, mllp, file" in lines
    assert any(line.startswith("routes.yaml:13:19: routes[0].destinations[3].filename: '../{control_id}.hl7': "
                               "expected a relative file name") for line in lines), lines
    assert any(line.startswith("routes.yaml:17:61: routes[1].destinations[0].filename: unknown field {patient}")
               for line in lines), lines


def test_the_record_needs_a_mapping_and_only_the_record_uses_one(cfg: Path) -> None:
    routes(cfg,
           "routes:\n"
           "  - name: results\n"
           "    destinations: [record]\n"
           "  - name: adt\n"
           "    mapping: adt\n"
           "    destinations:\n"
           "      - {type: mllp, name: lis, to: 'lis:2575'}\n")
    code, lines = check(cfg)
    assert code == 1
    assert any(line.startswith("routes.yaml:2:5: routes[0]: the record destination needs a mapping") for line in lines)
    assert any(line.startswith("routes.yaml:4:5: routes[1]: mapping 'adt' is used only by the record destination")
               for line in lines), lines


def test_a_destination_shared_by_routes_is_defined_once(cfg: Path, tmp_path: Path) -> None:
    routes(cfg,
           "routes:\n"
           "  - name: a\n"
           "    destinations: [{type: mllp, name: lis, to: 'lis:2575'}]\n"
           "  - name: b\n"
           "    destinations: [{type: mllp, name: lis, to: 'lis:2575'}]\n"
           "  - name: c\n"
           "    destinations: [{type: mllp, name: lis, to: 'lis:2576'}]\n"
           "  - name: d\n"
           "    destinations:\n"
           "      - type: mllp\n"
           "        name: secure\n"
           "        to: 'lis:6661'\n"
           "        tls: {ca_file: certs/ca.pem}\n"
           "  - name: e\n"
           "    destinations: [{type: file, name: drop, directory: routes.yaml}]\n")
    code, lines = check(cfg)
    assert code == 1
    assert any(line.startswith("routes.yaml:7:39: routes[2].destinations[0].name: destination 'lis' is defined "
                               "differently in routes[0] (a)") for line in lines), lines
    assert not any("routes[1]" in line for line in lines), lines  # the same definition: one stream
    assert "routes.yaml:13:24: routes[3].destinations[0].tls.ca_file: file 'certs/ca.pem' not found" in lines, lines
    assert "routes.yaml:15:56: routes[4].destinations[0].directory: 'routes.yaml' is a file, not a directory" in lines
    # a CA file that exists but is no certificate
    (cfg / "certs").mkdir()
    (cfg / "certs" / "ca.pem").write_text("not a certificate")
    _, lines = check(cfg)
    assert any(line.startswith("routes.yaml:13:24: routes[3].destinations[0].tls.ca_file: cannot load CA "
                               "certificates") for line in lines), lines


def test_a_forwarding_project_checks_clean_and_paths_are_relative_to_it(cfg: Path) -> None:
    from engine.config.project import load_project

    routes(cfg,
           "routes:\n"
           "  - name: results\n"
           "    mapping: oru_r01\n"
           "    destinations:\n"
           "      - record\n"
           "      - {type: mllp, name: lis, to: 'lis.example.org:2575', wait_for_ack: false}\n"
           "      - {type: file, name: drop, directory: spool/out}\n"
           "  - name: adt\n"
           "    match: {type: 'ADT^*'}\n"
           "    destinations: [{type: mllp, name: lis, to: 'lis.example.org:2575', wait_for_ack: false}]\n")
    import shutil

    from tests.test_e2e import ROOT
    shutil.copytree(ROOT / "mappings", cfg / "mappings")
    code, lines = check(cfg)
    assert code == 0, lines
    assert lines[-1].startswith("ok: 1 channel(s), 1 enabled (lab:2640); 2 route(s), default error, "
                                "2 forward destination(s); "), lines
    project = load_project(cfg)
    forwards = project.routes.forwards()
    assert sorted(forwards) == ["drop", "lis"]
    drop = forwards["drop"]
    assert isinstance(drop, FileDestination) and drop.directory == cfg / "spool" / "out"
    assert not project.routes.routes[1].record and project.routes.routes[1].mapping is None


# -- file names ------------------------------------------------------------------------------------

def test_file_names_hold_only_safe_characters() -> None:
    at = datetime(2026, 12, 7, 8, 30, 5, tzinfo=UTC)
    fields = {"channel": "lab", "message_id": 42, "uid": "u1", "control_id": "../../etc/passwd", "type": "ORU",
              "event": "R01", "facility": "ГОРЛАБ", "received": at}
    assert filename("{channel}/{received:%Y-%m-%d}/{message_id}-{control_id}.hl7", fields) == \
        "lab/2026-12-07/42-_._.._etc_passwd.hl7"
    assert filename("{facility}_{type}_{event}_{received}_{message_id}.hl7", fields) == \
        "_______ORU_R01_20261207T083005_42.hl7"
    assert safe("..") == "_." and safe("") == "_" and safe(".hidden") == "_hidden" and len(safe("x" * 500)) == 64
    # a time with an offset is written in UTC; one without is taken as UTC
    minsk = datetime(2026, 12, 7, 11, 30, 5).astimezone(UTC).replace(tzinfo=None)
    assert filename("{received:%H%M}-{uid}", {"received": minsk, "uid": "u"}) == minsk.strftime("%H%M") + "-u"


def test_file_name_templates_are_checked() -> None:
    import pytest

    for template, problem in [
        ("out.hl7", "every message would be written to the same file; include {message_id}"),
        ("{received}.hl7", "every message would be written to the same file"),
        ("/spool/{uid}", "expected a relative file name"), ("a/../{uid}", "expected a relative file name"),
        ("{uid}/", "expected a relative file name"), ("a\\{uid}", "expected a relative file name"),
        ("{patient}", "unknown field {patient}"), ("{uid!r}", "conversions are not supported"),
        ("{uid:>9}", "only {received} takes a format"), ("{received:YYYY}-{uid}", "expected a strftime format"),
        ("{uid", "expected '}'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(problem)):
            filename_fields(template)
    assert [f for _, f, _ in filename_fields("{channel}/{received:%Y}/{message_id}.hl7") if f] == [
        "channel", "received", "message_id"]


def test_write_file_replaces_whole_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "m.hl7"
    write_file(target, b"MSH|first\r")
    write_file(target, b"MSH|second\r")
    assert target.read_bytes() == b"MSH|second\r"
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.hl7"]
    assert target.stat().st_mode & 0o077 & ~0o040 == 0  # patient data: no one but owner and group
    assert target.parent.stat().st_mode & 0o007 == 0


def test_forward_rows_are_written_per_destination() -> None:
    cfg = RoutesConfig.model_validate({"routes": [
        {"name": "results", "mapping": "oru_r01", "destinations": [
            "record", {"type": "mllp", "name": "lis", "to": "lis:2575"},
            {"type": "file", "name": "drop", "directory": "/spool", "filename": "{type}{event}/{control_id}.hl7"}]},
        {"name": "other", "mapping": "adt"}]})
    f = Forwards(cfg)
    row = SimpleNamespace(id=7, uid="u7", channel="lab", control_id="C7", message_type="ORU", trigger_event="R01",
                          sending_facility="MINSKLAB^1.2^ISO", received_at=datetime.now(UTC), raw=b"MSH|...")
    now = datetime.now(UTC)
    rows = f.rows("results", row, now)
    assert [(r["kind"], r["target"], r["destination"], r["control_id"], r["payload"]) for r in rows] == [
        ("mllp", "lis", "lis:2575", "C7", b"MSH|..."), ("file", "drop", "ORUR01/C7.hl7", "C7", b"MSH|...")]
    assert f.rows("other", row, now) == [] and f.rows("unknown", row, now) == []


# -- delivery from outbound ------------------------------------------------------------------------

def add(engine: Engine, kind: str, target: str, payloads: list[bytes], destination: str = "x") -> list[int]:
    at = datetime.now(UTC) - timedelta(seconds=1)
    rows = [{"message_id": 200 + i, "kind": kind, "channel": "lab", "target": target,
             "destination": destination.format(i=i), "control_id": f"F{i}", "code": "", "payload": p,
             "status": "pending", "attempts": 0, "created_at": at, "due_at": at, "next_attempt_at": at}
            for i, p in enumerate(payloads)]
    with engine.begin() as conn:
        conn.execute(insert(outbound), rows)
        return [r.id for r in conn.execute(select(outbound.c.id).order_by(outbound.c.id)).all()][-len(rows):]


def oru(cid: str) -> bytes:
    return lab(cid, "20261207080000", "BY-1", "ROE^JANE", "F", "4.2").encode()


def state(engine: Engine, target: str) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(select(outbound).where(outbound.c.target == target).order_by(outbound.c.id)).all()


def mllp_dest(port: int, name: str = "lis") -> MLLPDestination:
    return MLLPDestination(type="mllp", name=name, to=f"127.0.0.1:{port}", answer_timeout=2.0, connect_timeout=2.0)


def test_forwards_go_in_order_and_a_failing_destination_holds_only_its_own(db_url: str, engine: Engine,
                                                                          tmp_path: Path) -> None:
    good, bad = Peer(answer="AA"), Peer(answer="AE")
    clock = Clock()
    d = Deliverer(db_url, [], [mllp_dest(good.port), mllp_dest(bad.port, "billing"),
                               FileDestination(type="file", name="drop", directory=tmp_path / "out")], now=clock)
    try:
        add(engine, "mllp", "lis", [oru(f"F{i}") for i in range(3)], destination=f"127.0.0.1:{good.port}")
        add(engine, "mllp", "billing", [oru(f"F{i}") for i in range(2)], destination=f"127.0.0.1:{bad.port}")
        add(engine, "file", "drop", [oru(f"F{i}") for i in range(2)], destination="lab/{i}.hl7")
        assert d.run_once() == 7
        assert good.received == [oru(f"F{i}") for i in range(3)]  # the very bytes, in order
        assert [(r.status, r.answer) for r in state(engine, "lis")] == [("sent", "AA peer says AA")] * 3
        # AE: tried again later, the destination's next message waiting behind it; the others flow
        billing = state(engine, "billing")
        assert [(r.status, r.attempts) for r in billing] == [("pending", 1), ("pending", 0)]
        assert billing[0].last_error == "the peer answered AE peer says AE"
        assert bad.received == [oru("F0")]
        assert [(r.status, r.answer) for r in state(engine, "drop")] == [("sent", "written lab/0.hl7"),
                                                                         ("sent", "written lab/1.hl7")]
        assert (tmp_path / "out" / "lab" / "1.hl7").read_bytes() == oru("F1")
        assert d.run_once() == 0  # billing's retry is not due yet
        bad.answer = "AR"
        clock.at = billing[0].next_attempt_at
        assert d.run_once() == 2
        assert [(r.status, r.attempts, r.last_error) for r in state(engine, "billing")] == [
            ("refused", 2, "AR peer says AR"), ("refused", 1, "AR peer says AR")]
    finally:
        d.close()
        good.close()
        bad.close()


def test_operators_cancel_what_a_retired_destination_still_owes(db_url: str, engine: Engine,
                                                               tmp_path: Path) -> None:
    env = {"HL7ENGINE_DATABASE_URL": db_url}

    def cli(*args: str) -> Any:
        return in_process("outbound", *args, "--config", str(tmp_path), env=env)

    old = add(engine, "mllp", "retired", [oru(f"F{i}") for i in range(3)])
    kept = add(engine, "mllp", "lis", [oru("F9")])
    assert cli("cancel").returncode == 2  # neither ids nor a destination
    out = cli("cancel", "--destination", "retired", "--dry-run")
    assert out.returncode == 0 and f"would cancel 3 outbound message(s) (ids {old[0]}..{old[-1]})" in out.stdout
    assert {r.status for r in state(engine, "retired")} == {"pending"}
    assert "cancelled 3 outbound message(s)" in cli("cancel", "--destination", "retired").stdout
    rows = state(engine, "retired")
    assert {(r.status, r.last_error) for r in rows} == {("cancelled", "cancelled by an operator")}
    assert [r.status for r in state(engine, "lis")] == ["pending"]
    assert cli("cancel", str(old[0])).returncode == 2  # already cancelled: nothing undelivered with that id
    listed = [json.loads(line) for line in cli("--status", "cancelled", "--json").stdout.splitlines()]
    assert sorted(r["id"] for r in listed) == old
    # resend revives one
    assert "will deliver again 1 outbound message(s)" in cli("resend", str(old[1])).stdout
    assert [r.status for r in state(engine, "retired")] == ["cancelled", "pending", "cancelled"]

    # cancelled while being delivered: the delivery's outcome does not undo the cancel
    peer = Peer(answer="AE", delay=1.0)
    d = Deliverer(db_url, [], [mllp_dest(peer.port)], now=Clock())
    try:
        import threading

        t = threading.Thread(target=d.run_once)
        t.start()
        deadline = time.time() + 10
        while not peer.received and time.time() < deadline:
            time.sleep(0.02)
        assert "cancelled 1 outbound message(s)" in cli("cancel", str(kept[0])).stdout
        t.join(20)
        assert [(r.status, r.attempts) for r in state(engine, "lis")] == [("cancelled", 0)]
    finally:
        d.close()
        peer.close()


def test_a_file_that_cannot_be_written_is_retried_then_expires(db_url: str, engine: Engine, tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the directory should be")
    clock = Clock()
    d = Deliverer(db_url, [], [FileDestination(type="file", name="drop", directory=blocked, give_up_after=3.0)],
                  now=clock)
    try:
        add(engine, "file", "drop", [oru("F0")], destination="m.hl7")
        d.run_once()
        row = state(engine, "drop")[0]
        assert row.status == "pending" and row.attempts == 1 and row.last_error == "FileExistsError: File exists"
        clock.at += timedelta(seconds=4)
        d.run_once()
        assert state(engine, "drop")[0].status == "expired"
    finally:
        d.close()


def test_a_peer_that_never_answers_counts_written_as_delivered(db_url: str, engine: Engine) -> None:
    peer = Peer(answer="")
    dest = MLLPDestination(type="mllp", name="lis", to=f"127.0.0.1:{peer.port}", wait_for_ack=False)
    d = Deliverer(db_url, [], [dest], now=Clock())
    try:
        add(engine, "mllp", "lis", [oru("F0"), oru("F1")])
        assert d.run_once() == 2
        assert [(r.status, r.answer) for r in state(engine, "lis")] == [("sent", "written (no ACK awaited)")] * 2
        assert peer.wait(2, timeout=10) == [oru("F0"), oru("F1")]
    finally:
        d.close()
        peer.close()


def test_forwards_over_tls(db_url: str, engine: Engine, tmp_path: Path) -> None:
    server, cert = tls_server(tmp_path)
    peer = Peer(tls=server, answer="CA")
    dest = MLLPDestination.model_validate({"type": "mllp", "name": "lis", "to": f"127.0.0.1:{peer.port}",
                                           "tls": {"ca_file": str(cert), "server_name": "localhost"}})
    d = Deliverer(db_url, [], [dest], now=Clock())
    try:
        add(engine, "mllp", "lis", [oru("F0")])
        assert d.run_once() == 1
        assert [(r.status, r.answer) for r in state(engine, "lis")] == [("sent", "CA peer says CA")]
        assert peer.received == [oru("F0")]
    finally:
        d.close()
        peer.close()


# -- through the engine ----------------------------------------------------------------------------

def forwarding_project(cfg: Path, port: int) -> None:
    import shutil

    from tests.test_e2e import ROOT
    shutil.copytree(ROOT / "mappings", cfg / "mappings")
    lis = f"{{type: mllp, name: lis-copy, to: '127.0.0.1:{port}', answer_timeout: 5s, connect_timeout: 2s}}"
    (cfg / "routes.yaml").write_text(
        "routes:\n"
        "  - name: lab\n"
        "    match: {type: ORU^R01}\n"
        "    mapping: oru_r01\n"
        "    destinations:\n"
        "      - record\n"
        f"      - {lis}\n"
        "      - {type: file, name: archive, directory: out, filename: '{channel}/{message_id}-{control_id}.hl7'}\n"
        "  - name: adt-passthrough\n"
        "    match: {type: 'ADT^*'}\n"
        f"    destinations: [{lis}]\n"
        "default: filter\n", encoding="utf-8")


ADT = ("MSH|^~\\&|HIS|CITYHOSP|HL7ENGINE|CENTRAL|20261207090000||ADT^A01^ADT_A01|FA1|P|2.5.1\r"
       "EVN|A01|20261207090000\rPID|1||BY-2^^^CITYHOSP^MR||ДОЕ^ЯНА||19800101|F\rPV1|1|I\r").encode()


def statuses(url: str, n: int, timeout: float = 90) -> dict[str, Any]:
    engine = create_engine(url)
    try:
        deadline = time.time() + timeout
        while True:
            with engine.connect() as conn:
                rows = {r.control_id: r for r in conn.execute(select(messages.c.id, messages.c.control_id,
                                                                     messages.c.status))}
                out = conn.execute(select(outbound.c.status)).all()
            if (len(rows) >= n and all(r.status not in ("queued", "replayed") for r in rows.values())
                    and all(o.status != "pending" for o in out)) or time.time() > deadline:
                return rows
            time.sleep(0.1)
    finally:
        engine.dispose()


def test_processed_messages_are_forwarded_as_received(backend: Backend, engine_factory: Any, tmp_path: Path) -> None:
    peer = Peer()
    try:
        forwarding_project(tmp_path, peer.port)
        eng = engine_factory(backend, HL7ENGINE_WORKERS="1")
        url = store_url(eng)
        ok = oru("FO1").replace(b"\r", b"\r\n")  # CRLF segments: forwarded as they came
        poisoned = lab("FO2", "20261207081000", "BY-9", "DOE^JOHN", "F", "5.5").replace(
            "PID|1||BY-9", "PID|1||BY-9^^^MINSKLAB^MR||DOE^JOHN\rPID|2||BY-10", 1).encode()
        with MLLPClient("127.0.0.1", eng.port, timeout=30) as client:
            for data, cid in [(ok, "FO1"), (poisoned, "FO2"), (ADT, "FA1")]:
                assert msa(client.send(data))[1:3] == ["AA", cid]
        rows = statuses(url, 3)
        assert {c: r.status for c, r in rows.items()} == {"FO1": "processed", "FO2": "error", "FA1": "processed"}
        assert sorted(peer.wait(2)) == sorted([ok, ADT])  # the failed one is not forwarded
        archived = tmp_path / "out" / "test" / f"{rows['FO1'].id}-FO1.hl7"
        assert archived.read_bytes() == ok
        assert [p.name for p in (tmp_path / "out" / "test").iterdir()] == [archived.name]

        def cli(*args: str) -> Any:
            return in_process(*args, "--config", str(tmp_path), env=eng.env)

        listed = [json.loads(line) for line in cli("outbound", "--json").stdout.splitlines()]
        assert sorted((r["destination_name"], r["kind"], r["control_id"], r["status"]) for r in listed) == [
            ("archive", "file", "FO1", "sent"), ("lis-copy", "mllp", "FA1", "sent"),
            ("lis-copy", "mllp", "FO1", "sent")]
        assert len(cli("outbound", "--destination", "archive", "--json").stdout.splitlines()) == 1
        assert cli("app-acks").stdout.strip() == "no application ACKs"
        shown = json.loads(cli("messages", "show", str(rows["FO1"].id), "--json").stdout)
        assert sorted(f["destination_name"] for f in shown["forwards"]) == ["archive", "lis-copy"]
        assert sum(e["status"] == "forward" and "sent at" in e["detail"] for e in shown["history"]) == 2

        # an operator sends one again (the peer can tell by MSH-10); the file is written again, whole
        os.utime(archived, (0, 0))
        ids = [str(r["id"]) for r in listed if r["control_id"] == "FO1"]
        out = cli("outbound", "resend", *ids)
        assert out.returncode == 0 and "will deliver again 2 outbound message(s)" in out.stdout, out
        deadline = time.time() + 60
        while len(peer.received) < 3 and time.time() < deadline:
            time.sleep(0.1)
        assert peer.received.count(ok) == 2
        statuses(url, 3)
        assert archived.stat().st_mtime > 0 and archived.read_bytes() == ok
        assert [p.name for p in (tmp_path / "out" / "test").iterdir()] == [archived.name]
        # the failed one, replayed and failing again, is still not forwarded
        assert cli("messages", "replay", str(rows["FO2"].id)).returncode == 0
        assert statuses(url, 3)["FO2"].status == "error"
        assert poisoned not in peer.received
    finally:
        peer.close()


def test_the_record_is_not_written_by_a_route_that_only_forwards(backend: Backend, engine_factory: Any,
                                                                  tmp_path: Path) -> None:
    from engine.record.models import rec_patients

    peer = Peer()
    try:
        forwarding_project(tmp_path, peer.port)
        eng = engine_factory(backend, HL7ENGINE_WORKERS="1")
        url = store_url(eng)
        with MLLPClient("127.0.0.1", eng.port, timeout=30) as client:
            assert msa(client.send(ADT))[1] == "AA"
        assert statuses(url, 1)["FA1"].status == "processed"
        assert peer.wait(1) == [ADT]
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.execute(select(rec_patients)).all() == []
        finally:
            engine.dispose()
    finally:
        peer.close()


def test_every_corpus_message_is_forwarded_byte_for_byte(engine_factory: Any, corpus: list[Any],
                                                          tmp_path: Path) -> None:
    """A route without the record forwards everything: each stored message of the corpus (unedited;
    batches split, windows-1251 without MSH-18, LF separators, a byte-order mark...) reaches the
    peer with its bytes as stored, and is archived to a file with them too."""
    from tests.test_e2e import send

    peer = Peer()
    try:
        lis = f"{{type: mllp, name: lis, to: '127.0.0.1:{peer.port}'}}"
        (tmp_path / "mappings").mkdir()
        (tmp_path / "routes.yaml").write_text(
            "routes:\n"
            "  - name: everything\n"
            f"    destinations: [{lis}, {{type: file, name: copy, directory: out, filename: '{{message_id}}.hl7'}}]\n",
            encoding="utf-8")
        eng = engine_factory(None, HL7ENGINE_WORKERS="1")
        files = [f for f in corpus if not f.malformed]
        send(files, eng.port)
        url = store_url(eng)
        rows = statuses(url, 1, timeout=120)
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                stored = conn.execute(select(messages.c.id, messages.c.raw, messages.c.status)
                                      .order_by(messages.c.id)).all()
        finally:
            engine.dispose()
        processed = [m for m in stored if m.status == "processed"]
        assert len(processed) >= len(files) // 2 and rows
        assert all(m.status in ("processed", "error", "duplicate") for m in stored)
        got = peer.wait(len(processed), timeout=120)
        assert sorted(got) == sorted(bytes(m.raw) for m in processed)
        for m in processed:
            assert (tmp_path / "out" / f"{m.id}.hl7").read_bytes() == bytes(m.raw)
    finally:
        peer.close()
