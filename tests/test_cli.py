"""The ``hl7engine`` command against a real engine (embedded SQLite store and queue): ``send`` with the
file layouts senders use, ``messages`` (list, filters, JSON), ``messages show`` and ``db``.

``send``, ``db`` and some ``messages`` calls run as their own process, the way an operator runs them; the
other read-only ``messages`` calls run in-process through Typer's CliRunner (a process costs 0.6 s each).
The read-only ``messages`` tests share one engine, started once for the module.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from engine.cli import app
from tests.conftest import RunningEngine, engine_env, free_port, start_engine, store_url, write_channel
from tests.support import store_rows

_SCRIPT = Path(sys.executable).with_name("hl7engine")
# the installed command; ``python -m engine.cli`` where it is not beside this interpreter
HL7ENGINE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "engine.cli"]
LIST_KEYS = {"id", "channel", "received_at", "type", "control_id", "sending_facility", "status", "ack_code", "error"}


def msg(control_id: str, *, processing_id: str = "P", sep: str = "\r", facility: str = "LAB") -> bytes:
    segments = [
        f"MSH|^~\\&|LIS|{facility}|HL7ENGINE|CENTRAL|20260101120000||ORU^R01^ORU_R01|{control_id}|{processing_id}"
        "|2.5.1",
        "PID|1||123^^^LAB^MR||DOE^JANE",
        "OBR|1||ORD1|GLU^Glucose",
        "OBX|1|NM|GLU^Glucose||5.4|mmol/L|||||F",
    ]
    return (sep.join(segments) + sep).encode()


def uid(prefix: str) -> str:
    """A control ID unique to this run."""
    return f"{prefix}{uuid.uuid4().hex[:8].upper()}"


def hl7engine(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HL7ENGINE, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def send(eng: RunningEngine, *files: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return hl7engine("send", *extra, f"127.0.0.1:{eng.port}", *(str(f) for f in files), env=eng.env)


def wait_rows(eng: RunningEngine, count: int, timeout: float = 15) -> list[dict[str, Any]]:
    """The store's rows once there are at least ``count`` (refused messages are recorded after their AR)."""
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            rows = store_rows(store_url(eng))
        if len(rows) >= count:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"expected {count} stored messages, found {len(rows)}")


@pytest.fixture
def msgdir(tmp_path: Path) -> Path:
    d = tmp_path / "msgs"
    d.mkdir()
    return d


# -- send -------------------------------------------------------------------------------------------

def test_send_file_layouts(engine_factory: Any, msgdir: Path) -> None:
    eng: RunningEngine = engine_factory()
    lf = [uid("LF"), uid("LF"), uid("LF")]
    crlf = [uid("CRLF"), uid("CRLF")]
    framed = [uid("MLLP"), uid("MLLP")]
    batched = [uid("BAT"), uid("BAT")]
    (msgdir / "lf.hl7").write_bytes(b"".join(msg(c, sep="\n") for c in lf))
    (msgdir / "crlf.hl7").write_bytes(b"".join(msg(c, sep="\r\n") for c in crlf))
    (msgdir / "framed.hl7").write_bytes(b"".join(b"\x0b" + msg(c) + b"\x1c\r" for c in framed))
    (msgdir / "batch.hl7").write_bytes(
        b"BHS|^~\\&|LIS|LAB|HL7ENGINE|CENTRAL|20260101120000||||" + batched[0].encode() + b"B\r"
        + msg(batched[0]) + msg(batched[1]) + b"BTS|2\r")
    (msgdir / "single.hl7").write_bytes(msg(single := uid("ONE")))
    spaced = [uid("GAP"), uid("GAP")]  # blank lines between messages, as in many sample files
    (msgdir / "spaced.hl7").write_bytes(b"\n" + msg(spaced[0], sep="\n") + b"\n\n" + msg(spaced[1], sep="\n"))

    names = ("lf.hl7", "crlf.hl7", "framed.hl7", "batch.hl7", "single.hl7", "spaced.hl7")
    result = send(eng, *(msgdir / n for n in names))
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == [
        f"lf.hl7#1: AA {lf[0]}", f"lf.hl7#2: AA {lf[1]}", f"lf.hl7#3: AA {lf[2]}",
        f"crlf.hl7#1: AA {crlf[0]}", f"crlf.hl7#2: AA {crlf[1]}",
        f"framed.hl7#1: AA {framed[0]}", f"framed.hl7#2: AA {framed[1]}",
        "batch.hl7: batch answered, 0 message(s) not accepted",
        f"single.hl7: AA {single}",
        f"spaced.hl7#1: AA {spaced[0]}", f"spaced.hl7#2: AA {spaced[1]}",
    ]
    assert result.stderr == ""

    rows = {r["control_id"]: r for r in wait_rows(eng, 12)}
    assert set(rows) == {*lf, *crlf, *framed, *batched, single, *spaced}
    assert all(r["status"] == "queued" and r["ack_code"] == "AA" for r in rows.values())
    # what was sent is stored as sent: segment ends untouched, MLLP framing removed
    assert bytes(rows[lf[1]]["raw"]) == msg(lf[1], sep="\n")
    assert bytes(rows[crlf[0]]["raw"]) == msg(crlf[0], sep="\r\n")
    assert bytes(rows[framed[1]]["raw"]) == msg(framed[1])
    assert rows[batched[0]]["batch_uid"] and rows[batched[0]]["batch_uid"] == rows[batched[1]]["batch_uid"]


def test_send_cr_option_turns_line_feeds_into_cr(engine_factory: Any, msgdir: Path) -> None:
    eng: RunningEngine = engine_factory()
    ids = [uid("CR"), uid("CR")]
    (msgdir / "lf.hl7").write_bytes(msg(ids[0], sep="\n") + msg(ids[1], sep="\r\n"))
    result = send(eng, msgdir / "lf.hl7", extra=("--cr",))
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == [f"lf.hl7#1: AA {ids[0]}", f"lf.hl7#2: AA {ids[1]}"]
    rows = {r["control_id"]: r for r in wait_rows(eng, 2)}
    assert bytes(rows[ids[0]]["raw"]) == msg(ids[0])
    assert bytes(rows[ids[1]]["raw"]) == msg(ids[1])


def test_send_exits_1_when_one_is_refused(engine_factory: Any, msgdir: Path) -> None:
    eng: RunningEngine = engine_factory()
    ok, refused = uid("OK"), uid("BADPID")
    (msgdir / "mixed.hl7").write_bytes(msg(ok) + msg(refused, processing_id="X") + msg(""))
    result = send(eng, msgdir / "mixed.hl7")
    assert result.returncode == 1, result
    lines = result.stdout.splitlines()
    assert len(lines) == 3, lines
    assert lines[0] == f"mixed.hl7#1: AA {ok}"
    assert lines[1].startswith(f"mixed.hl7#2: AR {refused} ")
    assert "processing ID 'X'" in lines[1]
    assert lines[2].startswith("mixed.hl7#3: AR ")
    assert "MSH-10" in lines[2]
    assert "2 of 3 not accepted" in result.stderr


def test_send_exits_1_for_a_refused_batch_message(engine_factory: Any, msgdir: Path) -> None:
    eng: RunningEngine = engine_factory()
    good, bad = uid("BOK"), uid("BBAD")
    (msgdir / "batch.hl7").write_bytes(b"BHS|^~\\&|LIS|LAB|||20260101120000||||BATCHX\r" + msg(good)
                                       + msg(bad, processing_id="X") + b"BTS|2\r")
    result = send(eng, msgdir / "batch.hl7")
    assert result.returncode == 1, result
    lines = result.stdout.splitlines()
    assert lines[0] == "batch.hl7: batch answered, 1 message(s) not accepted"
    assert len(lines) == 2 and lines[1].startswith(f"batch.hl7: AR {bad}"), lines


@pytest.mark.parametrize("address", ["nowhere", "127.0.0.1", "127.0.0.1:port", ":2575"])
def test_send_bad_address_exits_2(msgdir: Path, address: str) -> None:
    (msgdir / "one.hl7").write_bytes(msg(uid("ADDR")))
    result = hl7engine("send", address, str(msgdir / "one.hl7"))
    assert result.returncode == 2, result
    assert f"expected HOST:PORT with a port from 1 to 65535, got {address!r}" in result.stderr
    assert result.stdout == ""


def test_send_to_a_closed_port_exits_2(msgdir: Path) -> None:
    (msgdir / "one.hl7").write_bytes(msg(uid("CLOSED")))
    port = free_port()
    result = hl7engine("send", f"127.0.0.1:{port}", str(msgdir / "one.hl7"))
    assert result.returncode == 2, result
    assert f"cannot send to 127.0.0.1:{port}" in result.stderr


def test_send_missing_file_exits_2(msgdir: Path) -> None:
    result = hl7engine("send", f"127.0.0.1:{free_port()}", str(msgdir / "nope.hl7"))
    assert result.returncode == 2, result
    assert "nope.hl7" in result.stderr


def test_send_port_out_of_range_is_a_bad_address(msgdir: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    port = int(listener.getsockname()[1])
    (msgdir / "one.hl7").write_bytes(msg(uid("WRAP")))
    try:
        result = hl7engine("send", "--timeout", "1", f"127.0.0.1:{port + 65536}", str(msgdir / "one.hl7"))
        reached = True
        try:
            conn, _ = listener.accept()
            conn.close()
        except TimeoutError:
            reached = False
    finally:
        listener.close()
    assert not reached, f"the message was sent to port {port}"
    assert result.returncode == 2, result
    assert str(port + 65536) in result.stderr


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP listener that reads everything and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = srv.accept()
                conns.append(conn)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield int(srv.getsockname()[1])
    stop.set()
    t.join(5)
    for c in conns:
        c.close()
    srv.close()


def test_send_without_answer_exits_1(silent_server: int, msgdir: Path) -> None:
    ctrl = uid("SILENT")
    (msgdir / "one.hl7").write_bytes(msg(ctrl))
    result = hl7engine("send", "--timeout", "0.5", f"127.0.0.1:{silent_server}", str(msgdir / "one.hl7"))
    assert result.returncode == 1, result
    assert result.stdout.splitlines() == ["one.hl7: no ACK within 0.5s"]


# -- messages ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningEngine, dict[str, str]]]:
    """One engine for the read-only ``messages`` tests (started once: they only read its store), with two
    channels, ``test`` and ``other``, and five stored messages, one of them refused."""
    config = tmp_path_factory.mktemp("populated")
    msgdir = config / "msgs"
    msgdir.mkdir()
    port, other_port = free_port(), free_port()
    write_channel(config, "test", port)
    write_channel(config, "other", other_port)
    eng = start_engine(config, port, engine_env(config, None))
    try:
        ids = {"a": uid("LA"), "b": uid("LB"), "c": uid("OC"), "bad": uid("RX"), "d": uid("LD")}
        (msgdir / "ab.hl7").write_bytes(msg(ids["a"]) + msg(ids["b"], facility="WARD"))
        (msgdir / "c.hl7").write_bytes(msg(ids["c"], facility="CLINIC"))
        (msgdir / "bad.hl7").write_bytes(msg(ids["bad"], processing_id="X"))
        (msgdir / "d.hl7").write_bytes(msg(ids["d"]))
        assert send(eng, msgdir / "ab.hl7").returncode == 0
        assert hl7engine("send", f"127.0.0.1:{other_port}", str(msgdir / "c.hl7")).returncode == 0
        assert send(eng, msgdir / "bad.hl7").returncode == 1
        wait_rows(eng, 4)  # the refused one is recorded after its AR: wait, so that IDs follow sending order
        assert send(eng, msgdir / "d.hl7").returncode == 0
        wait_rows(eng, 5)
        yield eng, ids
    finally:
        eng.stop()


def in_process(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the command in this process (the store commands are read-only and a process costs 0.6 s each),
    with the engine's HL7ENGINE_* settings and no others."""
    overrides: dict[str, str | None] = {k: None for k in os.environ if k.startswith("HL7ENGINE_")}
    overrides.update({k: v for k, v in env.items() if k.startswith("HL7ENGINE_")})
    result = CliRunner().invoke(app, list(args), env=overrides)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def messages(eng: RunningEngine, *args: str) -> subprocess.CompletedProcess[str]:
    return in_process("messages", *args, "--config", str(eng.config_dir), env=eng.env)


def json_rows(eng: RunningEngine, *args: str) -> list[dict[str, Any]]:
    result = messages(eng, *args, "--json")
    assert result.returncode == 0, result
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_messages_lists_newest_first(populated: tuple[RunningEngine, dict[str, str]]) -> None:
    eng, ids = populated
    result = messages(eng)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "RECEIVED", "CHANNEL"]
    assert "CONTROL ID" in lines[0] and "STATUS" in lines[0]
    body = lines[1:]
    assert len(body) == 5, lines
    order = [ids[k] for k in ("d", "bad", "c", "b", "a")]
    for line, ctrl in zip(body, order, strict=True):
        assert ctrl in line, (ctrl, line)
    listed_ids = [int(line.split()[0]) for line in body]
    assert listed_ids == sorted(listed_ids, reverse=True)
    bad_line = body[1]
    assert "error" in bad_line and "AR" in bad_line and "processing ID 'X'" in bad_line
    assert " other " in body[2] and " test " in body[0]
    assert "queued" in body[0] and "AA" in body[0]


def test_messages_filters(populated: tuple[RunningEngine, dict[str, str]]) -> None:
    eng, ids = populated
    errors = json_rows(eng, "--status", "error")
    assert [r["control_id"] for r in errors] == [ids["bad"]]
    assert errors[0]["ack_code"] == "AR" and errors[0]["status"] == "error"
    assert errors[0]["error"].startswith("receive: ") and "processing ID 'X'" in errors[0]["error"]

    assert [r["control_id"] for r in json_rows(eng, "--status", "queued")] == [ids[k] for k in ("d", "c", "b", "a")]
    assert json_rows(eng, "--status", "processed") == []
    assert [r["control_id"] for r in json_rows(eng, "--channel", "other")] == [ids["c"]]
    assert [r["control_id"] for r in json_rows(eng, "--channel", "test")] == [ids[k] for k in ("d", "bad", "b", "a")]
    assert [r["control_id"] for r in json_rows(eng, "--control-id", ids["b"])] == [ids["b"]]
    assert json_rows(eng, "--control-id", "NO-SUCH-ID") == []
    assert [r["control_id"] for r in json_rows(eng, "--channel", "test", "--status", "queued", "--limit", "2")] == [
        ids["d"], ids["b"]]
    assert [r["control_id"] for r in json_rows(eng, "--limit", "1")] == [ids["d"]]

    text = messages(eng, "--control-id", ids["c"])
    assert text.returncode == 0
    assert len(text.stdout.splitlines()) == 2 and ids["c"] in text.stdout.splitlines()[1]
    nothing = messages(eng, "--channel", "nosuchchannel")
    assert nothing.returncode == 0
    assert nothing.stdout.strip() == "no messages"


def test_messages_json_lines(populated: tuple[RunningEngine, dict[str, str]]) -> None:
    eng, ids = populated
    rows = json_rows(eng)
    assert len(rows) == 5
    for r in rows:
        assert set(r) >= LIST_KEYS, r
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
    by_ctrl = {r["control_id"]: r for r in rows}
    a = by_ctrl[ids["a"]]
    assert a["channel"] == "test" and a["type"] == "ORU^R01" and a["sending_facility"] == "LAB"
    assert a["status"] == "queued" and a["ack_code"] == "AA" and a["error"] is None
    assert by_ctrl[ids["b"]]["sending_facility"] == "WARD"
    assert by_ctrl[ids["c"]]["channel"] == "other" and by_ctrl[ids["c"]]["sending_facility"] == "CLINIC"
    assert a["received_at"][:4].isdigit() and "T" in a["received_at"]
    stored = {r["control_id"]: r["id"] for r in store_rows(store_url(eng))}
    assert {c: r["id"] for c, r in by_ctrl.items()} == stored


def test_messages_bad_status_exits_2(populated: tuple[RunningEngine, dict[str, str]]) -> None:
    eng, _ = populated
    result = messages(eng, "--status", "lost")
    assert result.returncode == 2, result
    assert "unknown status 'lost'" in result.stderr


def test_messages_without_a_store(tmp_path: Path) -> None:
    (tmp_path / "channels").mkdir()
    result = hl7engine("messages", "--config", str(tmp_path), env=engine_env(tmp_path, None))
    assert result.returncode == 1, result
    assert "no message store" in result.stderr


def test_messages_show(populated: tuple[RunningEngine, dict[str, str]]) -> None:
    eng, ids = populated
    (row,) = json_rows(eng, "--control-id", ids["b"])
    result = hl7engine("messages", "show", str(row["id"]), "--config", str(eng.config_dir), env=eng.env)
    assert result.returncode == 0, result
    out = result.stdout
    lines = out.splitlines()
    assert f"id:{' ' * 19}{row['id']}" in lines
    meta = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines[:lines.index("--- message ---")]
            if ":" in line}
    assert meta["control_id"] == ids["b"]
    assert meta["channel"] == "test" and meta["status"] == "queued" and meta["ack_code"] == "AA"
    assert meta["type"] == "ORU^R01" and meta["sending_facility"] == "WARD" and meta["version"] == "2.5.1"
    start = lines.index("--- message ---") + 1
    end = lines.index("--- ACK sent ---")
    segments = [s for s in lines[start:end] if s]
    assert segments == msg(ids["b"], facility="WARD").decode().rstrip("\r").split("\r")
    ack = [s for s in lines[end + 1:] if s]
    assert ack[0].startswith("MSH|^~\\&|HL7ENGINE|CENTRAL|LIS|WARD|")
    assert ack[1] == f"MSA|AA|{ids['b']}"

    # --config given to ``messages`` itself works for ``show`` too
    again = hl7engine("messages", "--config", str(eng.config_dir), "show", str(row["id"]), env=eng.env)
    assert again.returncode == 0, again
    assert again.stdout == out


def test_messages_show_refused(populated: tuple[RunningEngine, dict[str, str]]) -> None:
    eng, ids = populated
    (row,) = json_rows(eng, "--control-id", ids["bad"])
    result = messages(eng, "show", str(row["id"]))
    assert result.returncode == 0, result
    assert "status:               error" in result.stdout.splitlines()
    assert "processing ID 'X'" in result.stdout
    ack = result.stdout.split("--- ACK sent ---", 1)[1].splitlines()
    assert any(s.startswith(f"MSA|AR|{ids['bad']}|") for s in ack), ack
    assert any(s.startswith("ERR|") for s in ack)


def test_messages_show_json(populated: tuple[RunningEngine, dict[str, str]]) -> None:
    eng, ids = populated
    (row,) = json_rows(eng, "--control-id", ids["a"])
    result = messages(eng, "show", str(row["id"]), "--json")
    assert result.returncode == 0, result
    assert len(result.stdout.splitlines()) == 1
    doc = json.loads(result.stdout)
    assert set(doc) >= LIST_KEYS | {"raw", "ack", "uid", "peer", "version", "charset", "sha256"}
    assert doc["id"] == row["id"] and doc["control_id"] == ids["a"]
    assert doc["raw"] == msg(ids["a"]).decode()
    assert doc["ack"].startswith("MSH|") and f"\rMSA|AA|{ids['a']}\r" in doc["ack"]
    assert doc["peer"].startswith("127.0.0.1:")
    assert doc["charset"] == "utf-8" and doc["version"] == "2.5.1"


def test_messages_show_missing_id(populated: tuple[RunningEngine, dict[str, str]]) -> None:
    eng, _ = populated
    top = max(r["id"] for r in json_rows(eng))
    for args in (["show", str(top + 1000)], ["show", str(top + 1000), "--json"]):
        result = messages(eng, *args)
        assert result.returncode != 0, result
        assert f"no message with ID {top + 1000}" in result.stderr
        assert result.stdout == ""
    bad = messages(eng, "show", "abc")
    assert bad.returncode != 0


# -- db ---------------------------------------------------------------------------------------------

def test_db_upgrade_then_current(tmp_path: Path) -> None:
    (tmp_path / "channels").mkdir()
    env = engine_env(tmp_path, None)
    up = hl7engine("db", "upgrade", "--config", str(tmp_path), env=env)
    assert up.returncode == 0, up
    assert up.stdout.startswith("database at revision ")
    revision = up.stdout.strip().rsplit(" ", 1)[1]
    assert revision and revision != "None"
    assert (tmp_path / "var" / "hl7engine.db").is_file()
    current = hl7engine("db", "current", "--config", str(tmp_path), env=env)
    assert current.returncode == 0, current
    assert current.stdout.strip() == revision
    again = hl7engine("db", "upgrade", "--config", str(tmp_path), env=env)  # idempotent
    assert again.returncode == 0 and again.stdout == up.stdout
    # and the store is usable by ``messages``
    empty = hl7engine("messages", "--config", str(tmp_path), env=env)
    assert empty.returncode == 0, empty
    assert empty.stdout.strip() == "no messages"


def test_db_current_matches_a_running_engine(populated: tuple[RunningEngine, dict[str, str]]) -> None:
    eng, _ = populated
    current = hl7engine("db", "current", "--config", str(eng.config_dir), env=eng.env)
    assert current.returncode == 0, current
    up = hl7engine("db", "upgrade", "--config", str(eng.config_dir), env=eng.env)
    assert up.returncode == 0, up
    assert up.stdout.strip() == f"database at revision {current.stdout.strip()}"


def test_messages_after_db_current_on_a_fresh_directory(tmp_path: Path) -> None:
    (tmp_path / "channels").mkdir()
    env = engine_env(tmp_path, None)
    current = hl7engine("db", "current", "--config", str(tmp_path), env=env)
    assert current.returncode == 0, current
    assert current.stdout.strip() == "no message store yet"
    assert not (tmp_path / "var" / "hl7engine.db").exists(), "asking does not create a store"
    result = hl7engine("messages", "--config", str(tmp_path), env=env)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr and "OperationalError" not in result.stderr, result.stderr


def test_messages_requeue_counts_and_checks_its_option(populated: tuple[RunningEngine, dict[str, str]]) -> None:
    eng, _ = populated
    result = messages(eng, "requeue", "--older-than", "0s", "--dry-run")
    assert result.returncode == 0, result
    # embedded: every queued message still has its queue entry; RabbitMQ: every queued one is counted
    expected = 0 if "HL7ENGINE_BROKER_URL" not in eng.env else len(json_rows(eng, "--status", "queued"))
    assert result.stdout.startswith(f"would queue again {expected} message(s) waiting for more than 0s"), result
    bad = messages(eng, "requeue", "--older-than", "soon")
    assert bad.returncode == 1 and "--older-than: expected a duration" in bad.stderr
