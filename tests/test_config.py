"""``hl7engine check``: every configuration problem reported at once as ``file:line:col: key.path: message``.

Checked both through ``engine.config.project.load_project`` and through the command line (in-process with
Typer's CliRunner, and once as a real ``hl7engine`` process). Paths are printed relative to the working
directory when the file is below it, so every test runs with the configuration directory as cwd.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.config.models import ChannelConfig
from engine.config.project import load_project
from engine.errors import ConfigError, Problem

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("hl7engine")
# the installed command; ``python -m engine.cli`` where it is not beside this interpreter
HL7ENGINE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "engine.cli"]

PROBLEM_LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<path>[^:]+): (?P<message>.+)$")


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty configuration directory, made the working directory."""
    (tmp_path / "channels").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(cfg: Path, name: str, text: str) -> Path:
    path = cfg / "channels" / name
    path.write_text(text, encoding="utf-8")
    return path


def check(cfg: Path) -> tuple[int, list[str]]:
    """Run ``hl7engine check --config cfg`` in-process; (exit code, output lines)."""
    result = CliRunner().invoke(app, ["check", "--config", str(cfg)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output.splitlines()


def problems_of(cfg: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_project(cfg)
    return info.value.problems


def only_problem(cfg: Path) -> Problem:
    problems = problems_of(cfg)
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def minimal(port: int = 2575, name: str = "x", host: str = "127.0.0.1") -> str:
    return f"name: {name}\nlisten:\n  host: {host}\n  port: {port}\n"


# -- a valid directory ------------------------------------------------------------------------------

def test_valid_directory_prints_one_ok_line(cfg: Path) -> None:
    write(cfg, "a.yaml", minimal(2601, "alpha"))
    write(cfg, "b.yaml", minimal(2602, "beta"))
    write(cfg, "c.yaml", minimal(2601, "gamma") + "enabled: false\n")  # disabled: its port may clash
    code, lines = check(cfg)
    assert code == 0, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("ok: ")
    assert "3 channel(s), 2 enabled" in lines[0]
    assert "alpha:2601" in lines[0] and "beta:2602" in lines[0]
    assert "gamma" not in lines[0]


def test_channel_name_defaults_to_the_file_name(cfg: Path) -> None:
    write(cfg, "radiology.yaml", "listen:\n  port: 2611\n")
    project = load_project(cfg)
    assert [c.name for c in project.channels] == ["radiology"]
    code, lines = check(cfg)
    assert (code, lines) == (0, ["ok: 1 channel(s), 1 enabled (radiology:2611); 0 route(s), default error; "
                                 "0 mapping(s)"])


def test_shipped_example_checks_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(ROOT / "channels", tmp_path / "channels")
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    shutil.copy(ROOT / "routes.yaml", tmp_path / "routes.yaml")
    monkeypatch.chdir(tmp_path)
    project = load_project(tmp_path)
    lab = project.channel("lab")
    assert lab.config.listen.port == 2575
    assert lab.config.listen.idle_timeout == 3600
    assert lab.config.max_message_size == 1024 * 1024
    code, lines = check(tmp_path)
    assert code == 0, lines
    assert len(lines) == 1 and lines[0].startswith("ok: 1 channel(s), 1 enabled (lab:2575); "), lines


def test_shipped_example_checks_clean_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code, lines = check(ROOT)
    assert code == 0, lines
    assert len(lines) == 1 and lines[0].startswith("ok: 1 channel(s), 1 enabled (lab:2575); "), lines


def test_check_as_a_real_command(tmp_path: Path) -> None:
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "x.yaml").write_text(minimal(2620) + "ack:\n  mode: fast\n", encoding="utf-8")
    bad = subprocess.run([*HL7ENGINE, "check", "--config", str(tmp_path)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1, bad
    assert "channels/x.yaml:6:9: ack.mode: expected one of original, enhanced, got 'fast'" in bad.stdout.splitlines()
    (tmp_path / "channels" / "x.yaml").write_text(minimal(2620), encoding="utf-8")
    good = subprocess.run([*HL7ENGINE, "check", "--config", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good
    assert good.stdout == "ok: 1 channel(s), 1 enabled (x:2620); 0 route(s), default error; 0 mapping(s)\n"


# -- every problem, located -------------------------------------------------------------------------

def test_three_mistakes_in_one_file_are_all_reported(cfg: Path) -> None:
    write(cfg, "x.yaml",
          "name: x\n"                 # 1
          "listen:\n"                 # 2
          "  host: 127.0.0.1\n"       # 3
          "  prot: 2575\n"            # 4  unknown key
          "charset: klingon\n"        # 5
          "ack:\n"                    # 6
          "  mode: fast\n")           # 7
    code, lines = check(cfg)
    assert code == 1
    expected = {
        "channels/x.yaml:4:3: listen.prot: unknown key; expected one of host, port, max_connections, "
        "idle_timeout, frame_timeout, allowed_senders, tls, max_pipelined",
        "channels/x.yaml:5:10: charset: unknown character set 'klingon'; try utf-8, latin-1 or windows-1251",
        "channels/x.yaml:7:9: ack.mode: expected one of original, enhanced, got 'fast'",
    }
    assert set(lines[:-1]) == expected, lines
    assert len(lines) == 4
    assert lines[-1] == "3 problem(s)"


def test_problems_in_several_files_are_all_reported(cfg: Path) -> None:
    write(cfg, "a.yaml", minimal(70000, "a"))
    write(cfg, "b.yaml", minimal(2631, "b") + "timezone: Mars/Base\n")
    write(cfg, "c.yaml", minimal(2632, "c"))
    code, lines = check(cfg)
    assert code == 1
    assert set(lines[:-1]) == {
        "channels/a.yaml:4:9: listen.port: expected a value <= 65535, got 70000",
        "channels/b.yaml:5:11: timezone: unknown timezone 'Mars/Base'; use an IANA name such as Europe/Minsk",
    }, lines
    assert lines[-1] == "2 problem(s)"


@pytest.mark.parametrize(
    ("text", "line", "col", "path", "message"),
    [
        pytest.param("ack:\n  mode: fast\n", 6, 9, "ack.mode",
                     "expected one of original, enhanced, got 'fast'", id="ack-mode"),
        pytest.param("ack:\n  after: never\n", 6, 10, "ack.after",
                     "expected one of stored, processed, got 'never'", id="ack-after"),
        pytest.param("charset: klingon\n", 5, 10, "charset",
                     "unknown character set 'klingon'; try utf-8, latin-1 or windows-1251", id="charset"),
        pytest.param("timezone: Mars/Base\n", 5, 11, "timezone",
                     "unknown timezone 'Mars/Base'; use an IANA name such as Europe/Minsk", id="timezone"),
        pytest.param("max_message_size: 1XB\n", 5, 19, "max_message_size",
                     "expected a size such as 1MiB or 65536, got '1XB'", id="size"),
        pytest.param("max_message_size: 0\n", 5, 19, "max_message_size",
                     "expected a value > 0, got 0", id="size-zero"),
        pytest.param("enabled: maybe\n", 5, 10, "enabled", "expected true or false, got 'maybe'", id="bool"),
        pytest.param("nmae: x\n", 5, 1, "nmae", "unknown key; expected one of name, description, enabled, listen, "
                     "max_message_size, charset, timezone, segment_separators, batches, accept, ack, validation",
                     id="top-level-unknown-key"),
        pytest.param("accept:\n  processing_ids: [P, X]\n", 6, 3, "accept.processing_ids",
                     "expected processing IDs from P, T, D, got 'X'", id="processing-id"),
        pytest.param("accept:\n  versions: ['2.5', '9.9']\n", 6, 3, "accept.versions", None, id="version"),
    ],
)
def test_top_level_mistake(cfg: Path, text: str, line: int, col: int, path: str, message: str | None) -> None:
    write(cfg, "x.yaml", minimal(2640) + text)
    p = only_problem(cfg)
    assert (p.file, p.line, p.column, p.path) == ("channels/x.yaml", line, col, path), str(p)
    if message is not None:
        assert p.message == message
    code, lines = check(cfg)
    assert code == 1
    assert lines == [str(p), "1 problem(s)"]
    m = PROBLEM_LINE.match(lines[0])
    assert m is not None and m["path"] == path


@pytest.mark.parametrize(
    ("listen", "line", "col", "path", "message"),
    [
        pytest.param("  port: 70000\n", 3, 9, "listen.port", "expected a value <= 65535, got 70000", id="port-range"),
        pytest.param("  port: 0\n", 3, 9, "listen.port", "expected a value >= 1, got 0", id="port-zero"),
        pytest.param("  port: abc\n", 3, 9, "listen.port", "expected a whole number, got 'abc'", id="port-abc"),
        pytest.param("  prot: 2575\n", 3, 3, "listen.prot",
                     "unknown key; expected one of host, port, max_connections, idle_timeout, frame_timeout, "
                     "allowed_senders, tls, max_pipelined", id="unknown-key"),
        pytest.param("  allowed_senders: [not-an-ip]\n", 3, 3, "listen.allowed_senders",
                     "expected an address or CIDR network such as 10.1.0.0/16, got 'not-an-ip'", id="allowed-senders"),
        pytest.param("  allowed_senders: [10.0.0.0/8, 192.168.1.300]\n", 3, 3, "listen.allowed_senders",
                     "expected an address or CIDR network such as 10.1.0.0/16, got '192.168.1.300'",
                     id="allowed-senders-second"),
        pytest.param("  idle_timeout: soon\n", 3, 17, "listen.idle_timeout",
                     "expected a duration such as 30s, 5m or 1h, got 'soon'", id="idle-timeout"),
        pytest.param("  frame_timeout: -5\n", 3, 18, "listen.frame_timeout", None, id="negative-duration"),
        pytest.param("  max_connections: 0\n", 3, 20, "listen.max_connections",
                     "expected a value >= 1, got 0", id="max-connections"),
        pytest.param("  tls:\n    cert_file: a.pem\n    key_file: a.key\n    min_version: '1.1'\n", 6, 18,
                     "listen.tls.min_version", "expected one of 1.2, 1.3, got '1.1'", id="tls-min-version"),
        pytest.param("  tls:\n    cert_file: a.pem\n    keyfile: a.key\n", 5, 5, "listen.tls.keyfile",
                     "unknown key; expected one of cert_file, key_file, client_ca_file, min_version",
                     id="tls-unknown-key"),
    ],
)
def test_listen_mistake(cfg: Path, listen: str, line: int, col: int, path: str, message: str | None) -> None:
    if "tls:" in listen:  # the TLS files exist: only the mistake itself is reported
        (cfg / "a.pem").write_text("x")
        (cfg / "a.key").write_text("x")
    write(cfg, "x.yaml", "name: x\nlisten:\n" + listen)
    problems = problems_of(cfg)
    located = [(p.file, p.line, p.column, p.path) for p in problems]
    assert ("channels/x.yaml", line, col, path) in located, [str(p) for p in problems]
    p = problems[located.index(("channels/x.yaml", line, col, path))]
    if message is not None:
        assert p.message == message
    code, lines = check(cfg)
    assert code == 1
    assert str(p) in lines


def test_missing_tls_key_file_is_a_missing_key(cfg: Path) -> None:
    (cfg / "a.pem").write_text("x")
    write(cfg, "x.yaml", "name: x\nlisten:\n  port: 2650\n  tls:\n    cert_file: a.pem\n")
    p = only_problem(cfg)
    assert (p.line, p.path, p.message) == (4, "listen.tls.key_file", "required key is missing"), str(p)


def test_invalid_yaml_is_reported_with_its_line(cfg: Path) -> None:
    write(cfg, "x.yaml", "name: x\nlisten:\n  host: 127.0.0.1\n  port: 2660\n bad: 1\n")
    write(cfg, "y.yaml", minimal(2661, "y") + "ack:\n  mode: fast\n")  # other files are still checked
    code, lines = check(cfg)
    assert code == 1
    assert len(lines) == 3, lines
    yaml_line = next(line for line in lines if line.startswith("channels/x.yaml:"))
    assert yaml_line.startswith("channels/x.yaml:5:2: invalid YAML: "), yaml_line
    assert "channels/y.yaml:6:9: ack.mode: expected one of original, enhanced, got 'fast'" in lines
    assert lines[-1] == "2 problem(s)"


def test_bad_channel_name(cfg: Path) -> None:
    write(cfg, "x.yaml", "name: bad name!\nlisten:\n  port: 2641\n")
    p = only_problem(cfg)
    assert (p.file, p.line, p.column, p.path) == ("channels/x.yaml", 1, 7, "name"), str(p)
    assert "'bad name!'" in p.message


def test_unclosed_bracket(cfg: Path) -> None:
    write(cfg, "x.yaml",
          "name: x\nlisten:\n  host: 127.0.0.1\n  allowed_senders: [10.0.0.0/8\nack:\n  mode: original\n")
    p = only_problem(cfg)
    assert p.file == "channels/x.yaml" and p.message.startswith("invalid YAML: ")
    assert p.line in (5, 6), str(p)  # where the parser noticed the bracket was never closed


def test_duplicate_yaml_key(cfg: Path) -> None:
    write(cfg, "x.yaml", "name: x\nlisten:\n  port: 2665\nname: y\n")
    p = only_problem(cfg)
    assert (p.line, p.column) == (4, 1), str(p)
    assert p.message.startswith("invalid YAML: ") and "duplicate" in p.message


def test_top_of_file_must_be_a_mapping(cfg: Path) -> None:
    write(cfg, "x.yaml", "- a\n- b\n")
    p = only_problem(cfg)
    assert str(p) == "channels/x.yaml:1:1: expected a mapping of keys at the top of the file"


def test_empty_file_is_a_channel_with_defaults(cfg: Path) -> None:
    write(cfg, "empty.yaml", "# nothing yet\n")
    project = load_project(cfg)
    ch = project.channel("empty")
    assert ch.config == ChannelConfig()
    assert ch.config.listen.port == 2575


def test_paths_outside_the_working_directory_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    (conf / "channels").mkdir(parents=True)
    (conf / "channels" / "x.yaml").write_text(minimal(2670) + "ack:\n  mode: fast\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    p = only_problem(conf)
    assert p.file == str(conf / "channels" / "x.yaml")
    monkeypatch.chdir(tmp_path)
    assert only_problem(conf).file == "conf/channels/x.yaml"


# -- durations and sizes ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("250ms", 0.25), ("2d", 172800.0), ("1.5h", 5400.0),
     ("90", 90.0), ("0", 0.0), ("'45'", 45.0), ("12.5", 12.5), (" 10 s", 10.0)],
)
def test_durations(cfg: Path, text: str, seconds: float) -> None:
    write(cfg, "x.yaml", f"name: x\nlisten:\n  idle_timeout: {text}\n  frame_timeout: {text}\nack:\n"
                         f"  timeout: {text if seconds else '1s'}\n")
    ch = load_project(cfg).channel("x").config
    assert ch.listen.idle_timeout == pytest.approx(seconds)
    assert ch.listen.frame_timeout == pytest.approx(seconds)
    assert ch.ack.timeout == pytest.approx(seconds if seconds else 1.0)


@pytest.mark.parametrize("text", ["soon", "5 minutes", "1w", "-5s", "5mm", "s", "1h30m"])
def test_bad_durations(cfg: Path, text: str) -> None:
    write(cfg, "x.yaml", f"name: x\nlisten:\n  idle_timeout: {text}\n")
    p = only_problem(cfg)
    assert (p.line, p.column, p.path) == (3, 17, "listen.idle_timeout"), str(p)
    assert p.message == f"expected a duration such as 30s, 5m or 1h, got {text!r}"


def test_ack_timeout_must_be_positive(cfg: Path) -> None:
    write(cfg, "x.yaml", "name: x\nack:\n  timeout: 0s\n")
    p = only_problem(cfg)
    assert (p.line, p.column, p.path) == (3, 12, "ack.timeout"), str(p)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1MiB", 1024**2), ("512KiB", 512 * 1024), ("2MB", 2_000_000), ("1GiB", 1024**3), ("64KB", 64_000),
     ("100B", 100), ("65536", 65536), ("'4096'", 4096), ("1mib", 1024**2), ("1.5MiB", 1536 * 1024),
     ("2 MiB", 2 * 1024**2)],
)
def test_sizes(cfg: Path, text: str, size: int) -> None:
    write(cfg, "x.yaml", f"name: x\nmax_message_size: {text}\n")
    assert load_project(cfg).channel("x").config.max_message_size == size


@pytest.mark.parametrize("text", ["1XB", "big", "1TB", "-1MiB", "MiB", "1 M"])
def test_bad_sizes(cfg: Path, text: str) -> None:
    write(cfg, "x.yaml", f"name: x\nmax_message_size: {text}\n")
    p = only_problem(cfg)
    assert (p.line, p.column, p.path) == (2, 19, "max_message_size"), str(p)
    assert p.message == f"expected a size such as 1MiB or 65536, got {text!r}"


# -- checks across files ----------------------------------------------------------------------------

def test_two_channels_with_the_same_name(cfg: Path) -> None:
    write(cfg, "a.yaml", minimal(2680, "lab"))
    write(cfg, "b.yaml", "description: second\n" + minimal(2681, "lab"))
    p = only_problem(cfg)
    assert str(p) == "channels/b.yaml:2:7: name: channel name 'lab' is also used by channels/a.yaml"
    code, lines = check(cfg)
    assert (code, lines) == (1, [str(p), "1 problem(s)"])


def test_name_from_file_clashes_with_explicit_name(cfg: Path) -> None:
    write(cfg, "lab.yaml", "listen:\n  port: 2682\n")  # named "lab" by its file
    write(cfg, "other.yaml", minimal(2683, "lab"))
    p = only_problem(cfg)
    assert (p.file, p.line, p.column, p.path) == ("channels/other.yaml", 1, 7, "name"), str(p)
    assert "channels/lab.yaml" in p.message


def test_two_enabled_channels_on_the_same_port(cfg: Path) -> None:
    write(cfg, "a.yaml", minimal(2690, "a", "0.0.0.0"))
    write(cfg, "b.yaml", "name: b\nlisten:\n  host: 127.0.0.1\n  port: 2690\n")
    p = only_problem(cfg)
    assert str(p) == "channels/b.yaml:4:9: listen.port: port 2690 is also used by channel 'a' (channels/a.yaml)"
    code, lines = check(cfg)
    assert (code, lines) == (1, [str(p), "1 problem(s)"])


def test_same_port_on_different_addresses_or_disabled_is_fine(cfg: Path) -> None:
    write(cfg, "a.yaml", minimal(2691, "a", "127.0.0.1"))
    write(cfg, "b.yaml", minimal(2691, "b", "127.0.0.2"))
    write(cfg, "c.yaml", minimal(2691, "c", "0.0.0.0") + "enabled: false\n")
    code, lines = check(cfg)
    assert code == 0, lines
    assert lines == ["ok: 3 channel(s), 2 enabled (a:2691, b:2691); 0 route(s), default error; 0 mapping(s)"]


def test_default_ports_clash(cfg: Path) -> None:
    write(cfg, "a.yaml", "name: a\n")
    write(cfg, "b.yaml", "name: b\n")
    p = only_problem(cfg)
    assert p.file == "channels/b.yaml" and p.path == "listen.port"
    assert "port 2575 is also used by channel 'a'" in p.message


def test_tls_files_that_do_not_exist(cfg: Path) -> None:
    (cfg / "server.key").write_text("x")
    write(cfg, "x.yaml",
          "name: x\n"
          "listen:\n"
          "  port: 2700\n"
          "  tls:\n"
          "    cert_file: missing/server.crt\n"
          "    key_file: server.key\n"
          "    client_ca_file: /nonexistent/ca.pem\n")
    code, lines = check(cfg)
    assert code == 1
    assert set(lines[:-1]) == {
        "channels/x.yaml:5:16: listen.tls.cert_file: file 'missing/server.crt' not found",
        "channels/x.yaml:7:21: listen.tls.client_ca_file: file '/nonexistent/ca.pem' not found",
    }, lines
    assert lines[-1] == "2 problem(s)"


def test_tls_relative_paths_are_relative_to_the_config_directory(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    (conf / "channels").mkdir(parents=True)
    (conf / "tls").mkdir()
    self_signed(conf / "tls" / "server.crt", conf / "tls" / "server.key")
    (conf / "channels" / "x.yaml").write_text(
        "name: x\nlisten:\n  port: 2701\n  tls:\n    cert_file: tls/server.crt\n    key_file: tls/server.key\n",
        encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # not the configuration directory
    tls = load_project(conf).channel("x").config.listen.tls
    assert tls is not None and tls.cert_file == conf / "tls" / "server.crt"


def self_signed(cert: Path, key: Path) -> None:
    import subprocess

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)


def test_tls_files_that_do_not_load(cfg: Path) -> None:
    (cfg / "junk.crt").write_text("not a certificate")
    (cfg / "junk.key").write_text("not a key")
    write(cfg, "x.yaml", minimal(2702, "x") + "  tls:\n    cert_file: junk.crt\n    key_file: junk.key\n")
    code, lines = check(cfg)
    assert code == 1
    assert any(":listen.tls.cert_file: cannot load certificate" in line.replace(": listen", ":listen")
               for line in lines), lines


def test_invalid_channel_does_not_hide_cross_file_problems(cfg: Path) -> None:
    write(cfg, "a.yaml", minimal(2710, "a"))
    write(cfg, "b.yaml", minimal(2710, "b"))
    write(cfg, "c.yaml", minimal(2711, "c") + "ack:\n  mode: fast\n")
    code, lines = check(cfg)
    assert code == 1
    assert len(lines) == 3, lines
    assert any(line.startswith("channels/b.yaml:4:9: listen.port: port 2710") for line in lines)
    assert any(line.startswith("channels/c.yaml:6:9: ack.mode:") for line in lines)


# -- behaviour that differs from what is promised ----------------------------------------------------

def test_empty_value_is_located_on_its_own_line(cfg: Path) -> None:
    write(cfg, "x.yaml", "name: x\nlisten:\n  port:\n  host: 127.0.0.1\n")
    p = only_problem(cfg)
    assert (p.path, p.line) == ("listen.port", 3), str(p)


def test_bad_tls_path_is_reported_in_words(cfg: Path) -> None:
    (cfg / "a.key").write_text("x")
    write(cfg, "x.yaml", "name: x\nlisten:\n  port: 2720\n  tls:\n    cert_file: [a.pem]\n    key_file: a.key\n")
    p = only_problem(cfg)
    assert (p.line, p.path) == (5, "listen.tls.cert_file"), str(p)
    assert "<class" not in p.message and "pathlib" not in p.message, p.message


def test_check_of_a_missing_directory_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, lines = check(tmp_path / "no-such-dir")
    assert code != 0, lines
    assert not any(line.startswith("ok:") for line in lines), lines


# -- routes.yaml ------------------------------------------------------------------------------------

def test_routes_problems_are_located(cfg: Path) -> None:
    write(cfg, "lab.yaml", minimal(2630, "lab"))
    (cfg / "routes.yaml").write_text(
        "routes:\n"
        "  - name: results\n"
        "    match:\n"
        "      channel: labb\n"
        "      type: ORU\n"
        "    mapping: oru_r01\n"
        "    destinaton: [record]\n"
        "default: drop\n", encoding="utf-8")
    code, lines = check(cfg)
    assert code == 1
    assert "routes.yaml:5:13: routes[0].match.type: expected type^event such as ORU^R01 or ADT^*, got 'ORU'" in lines
    assert any(line.startswith("routes.yaml:7:5: routes[0].destinaton:") for line in lines), lines
    assert any(line.startswith("routes.yaml:8:10: default:") and "filter" in line for line in lines), lines


def test_routes_name_channels_and_mappings_that_exist(cfg: Path) -> None:
    write(cfg, "lab.yaml", minimal(2631, "lab"))
    (cfg / "routes.yaml").write_text(
        "routes:\n"
        "  - name: results\n"
        "    match: {channel: labb, type: ORU^R01}\n"
        "    mapping: oru_r01\n", encoding="utf-8")
    code, lines = check(cfg)
    assert code == 1
    assert any(line.startswith("routes.yaml:3:22: routes[0].match.channel: no channel named 'labb'")
               for line in lines), lines
    assert any("routes[0].mapping: mapping 'oru_r01' named but there is no mappings/ directory" in line
               for line in lines), lines


def test_ack_after_processed_is_accepted_in_original_mode(cfg: Path) -> None:
    write(cfg, "lab.yaml", minimal(2632, "lab") + "ack:\n  after: processed\n  processing_timeout: 45s\n")
    code, lines = check(cfg)
    assert code == 0, lines


def test_ack_after_processed_needs_original_mode_and_a_longer_timeout(cfg: Path) -> None:
    write(cfg, "lab.yaml", minimal(2632, "lab")
          + "ack:\n  mode: enhanced\n  after: processed\n  timeout: 20s\n  processing_timeout: 5s\n")
    code, lines = check(cfg)
    assert code == 1
    assert any(line.startswith("channels/lab.yaml:7:10: ack.after:") and "needs mode: original" in line
               for line in lines), lines
    assert any(line.startswith("channels/lab.yaml:9:23: ack.processing_timeout:")
               and "must not be shorter than timeout (20s)" in line for line in lines), lines


def test_application_acks_need_enhanced_mode_and_a_host_and_port(cfg: Path) -> None:
    write(cfg, "lab.yaml", minimal(2633, "lab") + "ack:\n  application_acks:\n    to: lis.example.org:6661\n")
    write(cfg, "lab2.yaml", minimal(2637, "lab2") + "ack:\n  mode: enhanced\n  application_acks:\n"
          "    to: lis.example.org\n")
    code, lines = check(cfg)
    assert code == 1
    assert any(line.startswith("channels/lab.yaml:6:3: ack.application_acks:")
               and "need mode: enhanced" in line for line in lines), lines
    assert any(line.startswith("channels/lab2.yaml:8:9: ack.application_acks.to:")
               and "expected host:port" in line for line in lines), lines


def test_application_acks_tls_files_are_checked(cfg: Path) -> None:
    (cfg / "junk.crt").write_text("not a certificate")
    (cfg / "junk.key").write_text("not a key")
    write(cfg, "lab.yaml", minimal(2634, "lab") + "ack:\n  mode: enhanced\n  application_acks:\n"
          "    to: lis.example.org:6661\n    tls:\n      ca_file: missing/ca.pem\n")
    write(cfg, "lab2.yaml", minimal(2635, "lab2") + "ack:\n  mode: enhanced\n  application_acks:\n"
          "    to: lis.example.org:6661\n    tls:\n      cert_file: junk.crt\n      key_file: junk.key\n")
    code, lines = check(cfg)
    assert code == 1
    assert "channels/lab.yaml:10:16: ack.application_acks.tls.ca_file: file 'missing/ca.pem' not found" in lines, lines
    assert any(line.startswith("channels/lab2.yaml:10:18: ack.application_acks.tls.cert_file: cannot load certificate")
               for line in lines), lines


def test_application_acks_accepted(cfg: Path) -> None:
    write(cfg, "lab.yaml", minimal(2636, "lab") + "ack:\n  mode: enhanced\n  application_acks:\n"
          "    to: lis.example.org:6661\n    answer_timeout: 30s\n    give_up_after: 2d\n")
    code, lines = check(cfg)
    assert code == 0, lines
