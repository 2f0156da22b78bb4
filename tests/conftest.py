"""Shared fixtures: the corpus, the services (PostgreSQL, RabbitMQ) and a running engine.

Services: in CI (``CI=true``) a test that needs a service it cannot reach fails; elsewhere it is
skipped with the reason. The same integration tests run on the embedded defaults (SQLite store
and queue) and on PostgreSQL + RabbitMQ, through the ``backend`` fixture.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("HL7ENGINE_CORPUS", ROOT.parent / "shared" / "corpus"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get("HL7ENGINE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("HL7ENGINE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")


def unavailable(reason: str) -> None:
    """Fail in CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: services and the corpus must be present)")
    pytest.skip(reason)


# -- corpus ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CorpusFile:
    name: str
    path: Path
    license: str
    message_type: str
    version: str
    quirks: frozenset[str]

    @property
    def malformed(self) -> bool:
        return any(q.startswith("malformed") for q in self.quirks)

    def data(self) -> bytes:
        return self.path.read_bytes()


def load_manifest() -> list[CorpusFile]:
    rows = []
    manifest = CORPUS / "MANIFEST.tsv"
    lines = manifest.read_text(encoding="utf-8").splitlines()
    head = lines[0].split("\t")
    for line in lines[1:]:
        cols = dict(zip(head, line.split("\t"), strict=False))
        quirks = frozenset(q for q in cols.get("quirks", "").split(",") if q and q != "-")
        rows.append(CorpusFile(cols["file"], CORPUS / cols["file"], cols["license"], cols["message_type"],
                               cols["hl7_version"], quirks))
    return rows


@pytest.fixture(scope="session")
def corpus() -> list[CorpusFile]:
    if not (CORPUS / "MANIFEST.tsv").is_file():
        unavailable(f"corpus not found at {CORPUS}")
    return load_manifest()


# -- services -------------------------------------------------------------------------------------

def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def postgres_admin() -> str:
    if not _reachable("127.0.0.1", 5432):
        unavailable("PostgreSQL not reachable on 127.0.0.1:5432")
    return PG_ADMIN_URL


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    if not _reachable("127.0.0.1", 5672):
        unavailable("RabbitMQ not reachable on 127.0.0.1:5672")
    return AMQP_URL


@contextlib.contextmanager
def fresh_postgres(postgres_admin: str) -> Iterator[str]:
    """A fresh PostgreSQL database, dropped on exit."""
    import psycopg

    name = f"hl7t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = postgres_admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(postgres_admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(postgres_admin: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one test (dropped afterwards)."""
    with fresh_postgres(postgres_admin) as url:
        yield url


@pytest.fixture
def queue_name(rabbitmq_url: str) -> Iterator[str]:
    """A unique exchange/queue prefix for one test; its queues are deleted afterwards."""
    import pika

    name = f"hl7t.{uuid.uuid4().hex[:10]}"
    yield name
    with contextlib.suppress(Exception):
        conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
        ch = conn.channel()
        for i in range(64):
            ch.queue_delete(f"{name}.p{i}")
        ch.queue_delete(f"{name}.dead")
        ch.exchange_delete(name)
        ch.exchange_delete(f"{name}.dead")
        conn.close()


@dataclass
class Backend:
    """Where a test engine keeps messages: embedded (SQLite) or PostgreSQL + RabbitMQ."""

    name: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def services(self) -> bool:
        return self.name == "services"


@pytest.fixture(params=["embedded", "services"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "embedded":
        return Backend("embedded")
    db = request.getfixturevalue("postgres_url")
    amqp = request.getfixturevalue("rabbitmq_url")
    qname = request.getfixturevalue("queue_name")
    return Backend("services", {"HL7ENGINE_DATABASE_URL": db, "HL7ENGINE_BROKER_URL": amqp,
                                "HL7ENGINE_QUEUE_NAME": qname, "HL7ENGINE_QUEUE_PARTITIONS": "4"})


# -- a running engine -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_channel(config_dir: Path, name: str, port: int, extra: str = "", listen_extra: str = "") -> Path:
    """A test channel on 127.0.0.1:``port``; ``extra`` is appended at the top level, ``listen_extra``
    (e.g. ``{"idle_timeout": "2s"}`` as YAML lines) under ``listen:``."""
    (config_dir / "channels").mkdir(parents=True, exist_ok=True)
    path = config_dir / "channels" / f"{name}.yaml"
    listen = "".join(f"  {line}\n" for line in listen_extra.splitlines() if line.strip())
    path.write_text(
        f"name: {name}\n"
        f"listen:\n  host: 127.0.0.1\n  port: {port}\n{listen}"
        "accept:\n  processing_ids: [P, T, D]\n"
        + extra,
        encoding="utf-8",
    )
    return path


@dataclass
class RunningEngine:
    config_dir: Path
    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    writer_pids: list[int] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Signal the engine and wait for it and its store writer process to exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        wait_gone(self.writer_pids, 15)
        return self.proc.returncode


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def wait_gone(pids: list[int], timeout: float) -> None:
    """Wait for processes to exit (the store writer stops when its engine's socket closes)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
            if not Path(f"/proc/{pid}/cmdline").exists() or not Path(f"/proc/{pid}/cmdline").read_bytes():
                break
            time.sleep(0.05)
        if Path(f"/proc/{pid}/cmdline").exists() and Path(f"/proc/{pid}/cmdline").read_bytes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def engine_env(config_dir: Path, backend: Backend | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HL7ENGINE_")}
    # the receiving path's tests look at the queue as the listener left it: no workers unless asked
    env.update({"HL7ENGINE_HTTP_PORT": "0", "HL7ENGINE_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1",
                "HL7ENGINE_WORKERS": "0"})
    if backend is not None:
        env.update(backend.env)
    env.update(extra)
    return env


def start_engine(config_dir: Path, port: int, env: dict[str, str], timeout: float = 60) -> RunningEngine:
    log_path = config_dir / f"engine-{int(time.time() * 1000)}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", "--config", str(config_dir)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(config_dir))
    engine = RunningEngine(config_dir, port, env, proc, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"engine exited with {proc.returncode}:\n{engine.log()}")
        if "engine started" in engine.log():
            engine.writer_pids = children_of(proc.pid)
            return engine
        time.sleep(0.05)
    engine.stop(signal.SIGKILL)
    raise RuntimeError(f"engine did not start within {timeout}s:\n{engine.log()}")


@pytest.fixture
def engine_factory(tmp_path: Path) -> Iterator[object]:
    """Start engines in ``tmp_path``; they are stopped at the end of the test."""
    started: list[RunningEngine] = []

    def factory(backend: Backend | None = None, *, channel_extra: str = "", listen_extra: str = "",
                port: int | None = None, **env_extra: str) -> RunningEngine:
        p = port or free_port()
        if not (tmp_path / "channels" / "test.yaml").exists() or channel_extra or listen_extra:
            write_channel(tmp_path, "test", p, channel_extra, listen_extra)
        eng = start_engine(tmp_path, p, engine_env(tmp_path, backend, **env_extra))
        started.append(eng)
        return eng

    yield factory
    for eng in started:
        eng.stop()


def store_url(engine: RunningEngine) -> str:
    return engine.env.get("HL7ENGINE_DATABASE_URL") or f"sqlite:///{engine.config_dir / 'var' / 'hl7engine.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database (message store and central record), on each backend."""
    from engine.store import db

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'record.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    db.upgrade(url)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Any]:
    from engine.store import db

    eng = db.make_engine(db_url, writer=db.is_sqlite(db_url))
    yield eng
    eng.dispose()
