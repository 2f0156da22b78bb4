"""Replaying failed messages from the command line, on both backends: one by ID, or every failed
message a filter selects (after fixing the configuration); never a message the sender was told was
refused or not stored."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from engine.mllp.client import MLLPClient
from tests.conftest import Backend, store_url
from tests.test_cli import in_process
from tests.test_e2e import lab, project, wait_processed


def orm(cid: str, patient: str) -> str:
    return (f"MSH|^~\\&|CIS|MINSKLAB|HL7ENGINE|CENTRAL|20261122090000||ORM^O01|{cid}|P|2.5.1\r"
            f"PID|1||{patient}^^^MINSKLAB^MR||DOE^JOHN\rORC|NW|ORD-{cid}\r")


def test_bulk_replay_after_fixing_the_routes(backend: Backend, engine_factory: Any, tmp_path: Path) -> None:
    project(tmp_path)
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes.read_text().replace("default: filter", "default: error"))
    eng = engine_factory(backend, HL7ENGINE_WORKERS="1")
    with MLLPClient("127.0.0.1", eng.port, timeout=30) as client:
        for raw in (orm("RP1", "BY-1"), lab("RP2", "20261122091000", "BY-1", "DOE^JOHN", "F", "5.0"),
                    lab("RP3", "20261122092000", "BY-2", "ROE^ANN", "F", "6.0"), orm("RP4", "BY-3")):
            answer = client.send(raw.encode())
            assert answer is not None and b"MSA|AA|" in answer
        refused = client.send(orm("RP5", "BY-4").replace("|P|2.5.1", "|X|2.5.1").encode())
        assert refused is not None and b"MSA|AR|" in refused
    url = store_url(eng)
    rows = {r.control_id: r for r in wait_processed(url)}
    assert {c: r.status for c, r in rows.items()} == {"RP1": "error", "RP2": "held", "RP3": "processed",
                                                       "RP4": "error", "RP5": "error"}

    def cli(*args: str) -> Any:
        return in_process("messages", *args, "--config", str(eng.config_dir), env=eng.env)

    def ids_of(*args: str) -> dict[str, int]:
        out = cli(*args, "--json", "--limit", "100")
        return {r["control_id"]: r["id"] for r in map(json.loads, out.stdout.splitlines())}

    ids = ids_of()
    assert cli("replay").returncode == 2, "no ID and no filter: refused"
    assert cli("replay", str(ids["RP1"]), "--all").returncode == 2
    dry = cli("replay", "--step", "route", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.strip() == f"would replay 2 failed message(s): {ids['RP1']}, {ids['RP4']}"
    assert ids_of("--status", "error", "--step", "route") == {"RP1": ids["RP1"], "RP4": ids["RP4"]}
    assert ids_of("--status", "error", "--step", "receive") == {"RP5": ids["RP5"]}

    # the refused message is not replayable, by ID or by filter
    by_id = cli("replay", str(ids["RP5"]))
    assert by_id.returncode == 1 and "was never accepted" in by_id.stdout + by_id.stderr
    assert cli("replay", "--step", "receive").stdout.strip() == "replayed 0 failed message(s)"

    # fix the routes, restart, replay what failed at routing: the held message follows its patient's
    eng.stop()
    routes.write_text(routes.read_text().replace("default: error", "default: filter"))
    eng = engine_factory(backend, port=eng.port, HL7ENGINE_WORKERS="1")
    done = cli("replay", "--step", "route")
    assert done.returncode == 0, done
    assert re.search(r"^replayed 2 failed message\(s\); 3 message\(s\) queued again", done.stdout, re.M), done.stdout
    rows = {r.control_id: r for r in wait_processed(url)}
    assert {c: r.status for c, r in rows.items()} == {"RP1": "filtered", "RP2": "processed", "RP3": "processed",
                                                       "RP4": "filtered", "RP5": "error"}
    assert cli("replay", "--all").stdout.strip() == "replayed 0 failed message(s)"

    # the message's history tells the story, oldest first
    shown = cli("show", str(ids["RP1"]), "--json")
    history = [(e["status"], e["step"]) for e in json.loads(shown.stdout.splitlines()[-1])["history"]]
    assert history == [("received", "receive"), ("error", "route"), ("replayed", "operator"),
                       ("filtered", "route")], history
    text = cli("show", str(ids["RP1"])).stdout
    lines = text[text.index("--- history ---"):text.index("--- message ---")].splitlines()
    assert "received   receive   answered AA" in lines[1]
    assert "error      route     no route matches ORM^O01" in lines[2], lines
