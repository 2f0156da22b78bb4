"""Who may read the central record over HTTP: bearer tokens from a tokens file, loopback clients
while none is configured, 401 for the rest; the `token new` command; the API over TLS."""

from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from engine.admin.access import ApiTokens, is_loopback, new_token
from engine.admin.http import create_app
from engine.cli import app
from engine.errors import ConfigError
from tests.conftest import free_port
from tests.test_tls import HL7ENGINE, make_pki

LOOPBACK = ("127.0.0.1", 50000)
REMOTE = ("10.1.2.3", 50000)


def tokens_file(tmp_path: Path, *names: str) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "api-tokens"
    lines, tokens = ["# who may read the record"], {}
    for name in names:
        token, line = new_token(name)
        lines.append(line)
        tokens[name] = token
    path.write_text("\n".join(lines) + "\n")
    return path, tokens


def test_the_tokens_file_is_checked_line_by_line(tmp_path: Path) -> None:
    path, tokens = tokens_file(tmp_path, "portal", "lab-dashboard")
    loaded = ApiTokens.load(path)
    assert loaded.configured and loaded.identify(tokens["portal"]) == "portal"
    assert loaded.identify(tokens["lab-dashboard"]) == "lab-dashboard" and loaded.identify("guess") is None
    assert ApiTokens.load(None) == ApiTokens()
    bad = tmp_path / "bad"
    _, line = new_token("a")
    bad.write_text(f"{line}\nportal {tokens['portal']}\n\n{line.replace('a ', 'b ', 1)}\n")
    with pytest.raises(ConfigError) as err:
        ApiTokens.load(bad)
    problems = [str(p) for p in err.value.problems]
    assert problems[0].startswith(f"{bad}:2:1: expected `NAME sha256:")  # a token itself, not its hash
    assert problems[1] == f"{bad}:4:1: the same token as 'a'"
    assert tokens["portal"] not in " ".join(problems)
    with pytest.raises(ConfigError, match="cannot read the API tokens file"):
        ApiTokens.load(tmp_path / "missing")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("10.0.0.1")
    assert not is_loopback(None) and not is_loopback("testclient")


@pytest.fixture
def db(tmp_path: Path) -> str:
    from engine.store import db as store_db

    url = f"sqlite:///{tmp_path / 'record.db'}"
    store_db.upgrade(url)
    return url


def get(url: str, tokens: ApiTokens | None, client: tuple[str, int], path: str,
        token: str | None = None, scheme: str = "Bearer") -> Any:
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    with TestClient(create_app(url, tokens), client=client) as c:
        return c.get(path, headers=headers)


def test_without_a_tokens_file_only_loopback_clients_read(db: str) -> None:
    assert get(db, None, LOOPBACK, "/fhir/Patient").status_code == 200
    refused = get(db, None, REMOTE, "/fhir/Patient?identifier=urn:oid:1.2|12345")
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
    body = refused.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "login"
    assert "HL7ENGINE_API_TOKENS_FILE" in body["issue"][0]["diagnostics"]
    assert get(db, None, REMOTE, "/fhir/Patient/1").status_code == 401
    assert get(db, None, REMOTE, "/fhir").status_code == 401
    # what holds no patient data stays open
    assert get(db, None, REMOTE, "/fhir/metadata").status_code == 200
    assert get(db, None, REMOTE, "/healthz").status_code == 200
    assert get(db, None, REMOTE, "/metrics").status_code == 200


def test_with_a_tokens_file_every_client_needs_a_known_token(db: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path, tokens = tokens_file(tmp_path, "portal")
    access = ApiTokens.load(path)
    assert get(db, access, REMOTE, "/fhir/Patient", tokens["portal"]).status_code == 200
    assert get(db, access, LOOPBACK, "/fhir/Patient").status_code == 401  # loopback is no longer enough
    assert get(db, access, LOOPBACK, "/fhir/Patient", tokens["portal"]).status_code == 200
    assert get(db, access, REMOTE, "/fhir/Patient", "not-a-token").status_code == 401
    assert get(db, access, REMOTE, "/fhir/Patient", tokens["portal"], scheme="Basic").status_code == 401
    assert get(db, access, REMOTE, "/fhir/Patient", "").status_code == 401
    empty = tmp_path / "empty"
    empty.write_text("# nobody yet\n")
    assert get(db, ApiTokens.load(empty), LOOPBACK, "/fhir/Patient").status_code == 401
    # the access log names the client and the resource type, never the query or a token
    get(db, access, REMOTE, "/fhir/Patient?identifier=urn:oid:1.2|SECRET-ID-77", tokens["portal"])
    logged = capsys.readouterr()
    text = logged.out + logged.err
    assert "portal" in text and "SECRET-ID-77" not in text and tokens["portal"] not in text


def test_token_new_prints_a_token_and_appends_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "api-tokens"
    runner = CliRunner()
    first = runner.invoke(app, ["token", "new", "portal", "--file", str(path)])
    assert first.exit_code == 0, first.output
    token = first.stdout.strip().splitlines()[-1]
    assert token not in path.read_text() and ApiTokens.load(path).identify(token) == "portal"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = runner.invoke(app, ["token", "new", "portal", "--file", str(path)])
    assert again.exit_code == 1 and "already has a token named 'portal'" in again.stderr
    assert runner.invoke(app, ["token", "new", "bad name"]).exit_code == 1
    printed = runner.invoke(app, ["token", "new", "dash"])
    assert printed.exit_code == 0 and "tokens-file line: dash sha256:" in printed.stderr


@pytest.fixture
def tls_api(tmp_path: Path, db: str) -> Iterator[tuple[int, Path, dict[str, str]]]:
    pki = make_pki(tmp_path / "pki")
    path, tokens = tokens_file(tmp_path, "portal")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HL7ENGINE_")}
    env.update(HL7ENGINE_DATABASE_URL=db, HL7ENGINE_HTTP_PORT=str(port), HL7ENGINE_API_TOKENS_FILE=str(path),
               HL7ENGINE_HTTP_TLS_CERT=str(pki.server_cert), HL7ENGINE_HTTP_TLS_KEY=str(pki.server_key))
    proc = subprocess.Popen([*HL7ENGINE, "api", "--config", str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        yield port, pki.ca, tokens
    finally:
        proc.terminate()
        proc.wait(20)


def test_the_api_serves_tls_with_tokens(tls_api: tuple[int, Path, dict[str, str]]) -> None:
    port, ca, tokens = tls_api
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.time() + 30
    while True:
        try:
            with urllib.request.urlopen(f"https://localhost:{port}/fhir/metadata", context=ctx, timeout=5) as r:
                assert json.loads(r.read())["resourceType"] == "CapabilityStatement"
            break
        except (urllib.error.URLError, ConnectionError):
            if time.time() > deadline:
                raise
            time.sleep(0.3)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"https://localhost:{port}/fhir/Patient", context=ctx, timeout=5)
    assert refused.value.code == 401  # from this machine too: a tokens file is set
    refused.value.close()
    request = urllib.request.Request(f"https://localhost:{port}/fhir/Patient",
                                     headers={"Authorization": f"Bearer {tokens['portal']}"})
    with urllib.request.urlopen(request, context=ctx, timeout=5) as r:
        assert json.loads(r.read())["type"] == "searchset"
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP is not served
        urllib.request.urlopen(f"http://localhost:{port}/fhir/metadata", timeout=5)


def test_half_a_tls_setting_or_a_bad_tokens_file_stops_the_api(tmp_path: Path, db: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HL7ENGINE_")}
    env.update(HL7ENGINE_DATABASE_URL=db, HL7ENGINE_HTTP_PORT=str(free_port()),
               HL7ENGINE_HTTP_TLS_CERT=str(tmp_path / "cert.pem"))
    half = subprocess.run([*HL7ENGINE, "api", "--config", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert half.returncode == 1 and "HL7ENGINE_HTTP_TLS_CERT and HL7ENGINE_HTTP_TLS_KEY go together" in half.stderr
    bad = tmp_path / "tokens"
    bad.write_text("portal s3cr3t\n")
    env.pop("HL7ENGINE_HTTP_TLS_CERT")
    env["HL7ENGINE_API_TOKENS_FILE"] = str(bad)
    broken = subprocess.run([*HL7ENGINE, "api", "--config", str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=60)
    assert broken.returncode == 1 and f"{bad}:1:1: expected `NAME sha256:" in broken.stderr
    assert "s3cr3t" not in broken.stderr
