"""``hl7engine diff OLD NEW``: every change of a configuration, one line per key, in-process."""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from engine.cli import app
from tests.test_e2e import ROOT


def copy(to: Path) -> Path:
    to.mkdir()
    shutil.copytree(ROOT / "channels", to / "channels")
    shutil.copytree(ROOT / "mappings", to / "mappings")
    shutil.copy(ROOT / "routes.yaml", to / "routes.yaml")
    return to


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def diff(a: Path, b: Path) -> tuple[int, list[str], str]:
    result = CliRunner().invoke(app, ["diff", str(a), str(b)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout.splitlines(), result.stderr


def test_no_difference_exits_0(tmp_path: Path) -> None:
    a, b = copy(tmp_path / "a"), copy(tmp_path / "b")
    assert diff(a, b) == (0, [], "no differences\n")


def test_every_kind_of_change_is_one_line(tmp_path: Path) -> None:
    a, b = copy(tmp_path / "a"), copy(tmp_path / "b")
    edit(b / "channels" / "lab.yaml", "port: 2575", "port: 2576")
    (b / "channels" / "radiology.yaml").write_text("name: radiology\nlisten:\n  port: 2580\n", encoding="utf-8")
    edit(b / "routes.yaml", "    destinations: [record]\n",
         "    destinations: [record, {type: mllp, name: lis, to: 'lis.example.org:2575'}]\n")
    edit(b / "routes.yaml", "default: filter", "default: error")
    edit(b / "mappings" / "tables" / "units.yaml", "  mg/dl: mg/dL\n", "  mg/dl: mg/dL\n  mkmol/l: umol/L\n")
    edit(b / "mappings" / "oru_r01.yaml", "birth_date: PID-7", "birth_date: PID-7.1")
    fixture = next((b / "mappings" / "tests").rglob("*.hl7"))
    fixture.write_bytes(fixture.read_bytes() + b"NTE|1||changed\r")
    code, lines, err = diff(a, b)
    assert code == 1 and err == f"{len(lines)} difference(s)\n", (lines, err)
    assert lines == [
        "channels/lab.yaml: listen.port: 2575 -> 2576",
        'channels/radiology.yaml: added {"channel": "radiology", "port": 2580, "enabled": true}',
        'routes.yaml: routes[lab-results].destinations[lis]: added {"to": "lis.example.org:2575", "tls": null, '
        '"connect_timeout": 5.0, "answer_timeout": 10.0, "give_up_after": 86400.0, "type": "mllp", "name": "lis", '
        '"wait_for_ack": true}',
        "routes.yaml: default: 'filter' -> 'error'",
        "mappings/oru_r01.yaml: rules[patient].fields.birth_date: 'PID-7' -> 'PID-7.1'",
        "mappings/tables/units.yaml: values.mkmol/l: added 'umol/L'",
        f"{fixture.relative_to(b).as_posix()}: changed",
    ], lines


def test_removed_things_and_the_order_of_routes(tmp_path: Path) -> None:
    a, b = copy(tmp_path / "a"), copy(tmp_path / "b")
    text = (b / "routes.yaml").read_text(encoding="utf-8")
    first = text.index("  - name: lab-results\n")
    second = text.index("  - name: lab-results-specimen-oriented\n")
    (b / "routes.yaml").write_text(text[:first] + text[second:text.index("  - name: patient-merge")]
                                   + text[first:second] + text[text.index("  - name: patient-merge"):],
                                   encoding="utf-8")
    shutil.rmtree(b / "mappings" / "tests")
    edit(b / "channels" / "lab.yaml", "  mode: original          # original: AA/AE/AR; enhanced: CA/CE/CR per MSH-15\n",
         "")  # the default is the same: no change
    code, lines, _ = diff(a, b)
    assert code == 1
    assert lines[0] == ("routes.yaml: routes (order): [\"lab-results\", \"lab-results-specimen-oriented\", "
                        "\"patient-merge\", \"patient-administration\", \"immunizations\"] -> "
                        "[\"lab-results-specimen-oriented\", \"lab-results\", \"patient-merge\", "
                        "\"patient-administration\", \"immunizations\"]"), lines
    assert len(lines) > 10 and all(line.startswith("mappings/tests/") and line.endswith(": removed")
                                   for line in lines[1:]), lines
    assert not any("channels/lab.yaml" in line for line in lines)  # the default is what it was


def test_a_directory_with_problems_exits_2(tmp_path: Path) -> None:
    a, b = copy(tmp_path / "a"), copy(tmp_path / "b")
    edit(b / "channels" / "lab.yaml", "port: 2575", "port: lots")
    code, lines, err = diff(a, b)
    assert code == 2 and lines == []
    assert "channels/lab.yaml:" in err and "listen.port: expected a whole number, got 'lots'" in err
    assert f"{b}: 1 problem(s); fix them first" in err
