"""Reproducible benchmark: the engine against two peer baselines, in one run, on this machine.

    .venv/bin/python bench/run.py                      # everything, ~40,000 messages per measurement
    .venv/bin/python bench/run.py --only a,d --repeat 3
    .venv/bin/python bench/run.py --messages 10000 --json /tmp/b.json --markdown /tmp/b.md

Servers (each in its own subprocess, all on uvloop; the load generator runs in this process):

  a  the engine, embedded mode (SQLite message store and queue under a temporary directory)
  b  the engine, RabbitMQ + PostgreSQL mode (a fresh database and unique queue names, removed after)
  c  python-hl7's asyncio MLLP server: parse each message, answer ``create_ack()``, store nothing
  d  the floor: a bare asyncio Protocol answering every frame with a fixed ACK

For each server: peak throughput with --connections connections in a closed loop (each sends one
ORU^R01 with 10 OBX and waits for its ACK), then ACK latency at half of that peak (paced). Once, for
the embedded engine: a single sequential sender. See bench/README.md for how to read the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop
from loadgen import Result, run_load

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
HOST = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
PARTITIONS = 8  # the engine's default HL7ENGINE_QUEUE_PARTITIONS
HALF_PEAK_TOLERANCE = 0.05  # the achieved paced rate must be within 5 % of the target

NAMES = {
    "a": "a. engine, embedded (SQLite)",
    "b": "b. engine, RabbitMQ + PostgreSQL",
    "c": "c. python-hl7 (parse + ACK)",
    "d": "d. floor (fixed ACK)",
}
ENGINE_KEYS = ("a", "b")

# Targets (reported as PASS/FAIL, never asserted).
TARGET_EMBEDDED_RATE = 10_000.0
TARGET_EMBEDDED_FLOOR_PCT = 40.0
TARGET_SERVICES_RATE = 5_000.0
TARGET_HALF_PEAK_P99_MS = 20.0

T0 = time.monotonic()


class BenchError(Exception):
    """A server could not be started, measured or cleaned up; the message says why."""


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {text}", file=sys.stderr, flush=True)


# -- processes ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


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


def alive(pid: int, marker: str) -> bool:
    """The process exists, is not a zombie and is still the one we started (its command line)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return state != "Z" and marker.encode() in cmdline


CLK_TCK = os.sysconf("SC_CLK_TCK")
NOISE_CORES = 0.15  # other processes using more than this much CPU during a measurement are reported
SERVICE_PROCESSES = frozenset({"postgres", "beam.smp", "erl_child_setup", "epmd", "inet_gethost"})


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by ``pid``; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> tuple[float, float, float]:
    """(busy in processes, in interrupts, stolen) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system) / CLK_TCK, (irq + softirq) / CLK_TCK, steal / CLK_TCK


def all_processes_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (name, CPU seconds) for every process (kernel threads included)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            name = text[text.find("(") + 1:text.rfind(")")]
            fields = text.rsplit(")", 1)[1].split()
            out[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


@dataclass
class CpuSnapshot:
    wall: float
    machine: float
    irq: float
    steal: float
    server: float
    loadgen: float
    processes: dict[int, tuple[str, float]]

    @classmethod
    def take(cls, server_pids: list[int]) -> CpuSnapshot:
        t = os.times()
        busy, irq, steal = machine_cpu()
        return cls(time.perf_counter(), busy, irq, steal, sum(process_cpu(p) for p in server_pids), t.user + t.system,
                   all_processes_cpu())

    def cores_since(self, before: CpuSnapshot, server_pids: list[int], services: bool) -> dict[str, Any]:
        """Average cores used between two snapshots: by the server, the load generator, the services the
        server uses (PostgreSQL, RabbitMQ; only when ``services``) and everything else, the busiest of
        which are named (to tell other people's work from kernel work the server causes)."""
        wall = max(self.wall - before.wall, 1e-9)
        server = (self.server - before.server) / wall
        loadgen = (self.loadgen - before.loadgen) / wall
        machine = (self.machine - before.machine) / wall
        ours = {os.getpid(), *server_pids}
        service_cores = 0.0
        others = []
        for pid, (name, cpu) in self.processes.items():
            if pid in ours:
                continue
            used = (cpu - before.processes.get(pid, (name, 0.0))[1]) / wall
            if services and name in SERVICE_PROCESSES:
                service_cores += used
            elif used >= 0.02:
                others.append((round(used, 2), describe(pid, name)))
        others.sort(reverse=True)
        per_process = {}
        for i, pid in enumerate(server_pids):
            name, cpu = self.processes.get(pid, ("?", 0.0))
            prev = before.processes.get(pid, (name, cpu))[1]
            per_process[f"{'main' if i == 0 else 'child'} {name}[{pid}]"] = round((cpu - prev) / wall, 2)
        return {"server": round(server, 2), "server_processes": per_process, "loadgen": round(loadgen, 2),
                "services": round(service_cores, 2) if services else None,
                "other": round(max(0.0, machine - server - loadgen - service_cores), 2),
                "interrupts": round((self.irq - before.irq) / wall, 2),  # mostly loopback networking (softirq)
                "steal": round((self.steal - before.steal) / wall, 2),
                "busiest_others": [f"{name} {used:.2f}" for used, name in others[:4]]}


def describe(pid: int, name: str) -> str:
    """A process as ``[pid] command line`` (shortened), or its name for kernel threads."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    return f"[{pid}] {cmd[:80] or name}"


class ServerProcess:
    """One server under test: started, awaited until it listens, stopped with SIGTERM."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, log_path: Path,
                 ready_text: str, child_marker: str = "") -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.port = port
        self.log_path = log_path
        self.ready_text = ready_text
        self.child_marker = child_marker  # children we wait for at stop (the engine's store writer)
        self.proc: subprocess.Popen[bytes] | None = None
        self.children: set[int] = set()
        self.startup_seconds = float("nan")

    @property
    def pids(self) -> list[int]:
        return ([self.proc.pid] if self.proc is not None else []) + sorted(self.children)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        tail = text.strip().splitlines()[-lines:]
        return "\n".join("    " + line for line in tail) if tail else "    (log is empty)"

    def log_problems(self) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line.strip() for line in text.splitlines()
                if "[warning" in line or "[error" in line or "[critical" in line or "Traceback" in line]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=str(ROOT))
        deadline = started + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise BenchError(f"{self.name} exited with code {code} before listening on {HOST}:{self.port}; "
                                 f"its log ends with:\n{self.log_tail()}")
            # The engine logs "engine started" only at info level; at warning level the port tells.
            if self.ready_text in self.log_path.read_text(errors="replace") or port_open(self.port):
                self.startup_seconds = round(time.monotonic() - started, 2)
                if self.child_marker:
                    self.children.update(children_of(self.proc.pid))
                return
            time.sleep(0.1)
        raise BenchError(f"{self.name} did not start within {timeout:g} s (nothing listening on "
                         f"{HOST}:{self.port}); its log ends with:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, wait; then wait for its store writer child to exit by itself (kill it if it does not)."""
        proc = self.proc
        if proc is None:
            return
        if self.child_marker and proc.poll() is None:
            self.children.update(children_of(proc.pid))
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                say(f"{self.name} did not stop within {STOP_TIMEOUT:g} s of SIGTERM; killing it")
                proc.kill()
                proc.wait(10)
        deadline = time.monotonic() + 15
        for pid in sorted(self.children):
            while time.monotonic() < deadline and alive(pid, self.child_marker):
                time.sleep(0.05)
            if alive(pid, self.child_marker):
                say(f"{self.name}: child process {pid} still running 15 s after the engine stopped; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc = None


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HL7ENGINE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def engine_process(name: str, workdir: Path, extra_env: dict[str, str]) -> ServerProcess:
    port = free_port()
    (workdir / "channels").mkdir(parents=True)
    (workdir / "channels" / "bench.yaml").write_text(
        f"name: bench\nlisten: {{host: {HOST}, port: {port}}}\naccept: {{processing_ids: [P, T, D]}}\n",
        encoding="utf-8")
    env = clean_env({"HL7ENGINE_HTTP_PORT": "0", "HL7ENGINE_LOG_LEVEL": "warning", "HL7ENGINE_LOOP": "uvloop",
                     **extra_env})
    argv = [sys.executable, "-m", "engine.cli", "listen", "--config", str(workdir)]  # the receiving path alone
    return ServerProcess(name, argv, env, port, workdir / "engine.log", "engine started",
                         child_marker="engine.intake.writerproc")


def baseline_process(name: str, kind: str, workdir: Path) -> ServerProcess:
    port = free_port()
    workdir.mkdir(parents=True)
    argv = [sys.executable, str(BENCH / "servers.py"), kind, "--host", HOST, "--port", str(port)]
    return ServerProcess(name, argv, clean_env({}), port, workdir / "server.log", "listening on")


# -- PostgreSQL and RabbitMQ ----------------------------------------------------------------------

def services_problem(pg_admin_url: str, amqp_url: str) -> str | None:
    """Why the RabbitMQ+PostgreSQL measurement cannot run, or None when both answer."""
    try:
        import psycopg

        with psycopg.connect(pg_admin_url, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL unreachable at {pg_admin_url}: {str(exc).strip().splitlines()[0][:200]}"
    try:
        import pika

        conn = pika.BlockingConnection(amqp_params(amqp_url))
        conn.close()
    except Exception as exc:
        return f"RabbitMQ unreachable at {amqp_url}: {type(exc).__name__} {str(exc)[:200]}"
    return None


def amqp_params(url: str) -> Any:
    import pika

    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = 3
    params.blocked_connection_timeout = 10
    return params


def create_database(pg_admin_url: str) -> tuple[str, str]:
    import psycopg

    name = f"hl7bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, connect_timeout=5, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = pg_admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return name, f"{base}/{name}"


def drop_database(pg_admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(pg_admin_url, connect_timeout=5, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    say(f"dropped PostgreSQL database {name}")


def count_pg_messages(pg_admin_url: str, name: str) -> int:
    import psycopg

    url = f"{pg_admin_url.rsplit('/', 1)[0]}/{name}"
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*) FROM messages").fetchone()
    return int(row[0]) if row else 0


def count_rabbit_messages(amqp_url: str, name: str) -> int:
    import pika
    from pika.exceptions import ChannelClosedByBroker

    total = 0
    conn = pika.BlockingConnection(amqp_params(amqp_url))
    try:
        ch = conn.channel()
        for i in range(PARTITIONS):
            try:
                total += ch.queue_declare(f"{name}.p{i}", passive=True).method.message_count
            except ChannelClosedByBroker:
                ch = conn.channel()
    finally:
        conn.close()
    return total


def delete_rabbit_topology(amqp_url: str, name: str) -> None:
    import pika
    from pika.exceptions import ChannelClosedByBroker

    conn = pika.BlockingConnection(amqp_params(amqp_url))
    try:
        ch = conn.channel()
        for queue in [f"{name}.p{i}" for i in range(PARTITIONS)] + [f"{name}.dead"]:
            try:
                ch.queue_delete(queue)
            except ChannelClosedByBroker:
                ch = conn.channel()
        for exchange in (name, f"{name}.dead"):
            try:
                ch.exchange_delete(exchange)
            except ChannelClosedByBroker:
                ch = conn.channel()
    finally:
        conn.close()
    say(f"deleted RabbitMQ queues {name}.p0..p{PARTITIONS - 1}, {name}.dead and exchanges {name}, {name}.dead")


def count_sqlite(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    try:
        messages = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        queued = conn.execute("SELECT count(*) FROM queue_entries").fetchone()[0]
    finally:
        conn.close()
    return int(messages), int(queued)


# -- measuring ------------------------------------------------------------------------------------

@dataclass
class Measured:
    """Everything measured for one server."""

    key: str
    name: str
    skipped: str = ""
    failed: str = ""
    startup_seconds: float = float("nan")
    peak_runs: list[Result] = field(default_factory=list)
    peak: Result | None = None
    half_target: float = 0.0
    half: Result | None = None
    half_achieved_ratio: float = float("nan")
    sequential: Result | None = None
    pct_of_floor: float | None = None
    sent: int = 0  # every message sent, warm-ups included
    acked_aa: int = 0  # measured messages answered AA (warm-ups not counted)
    stored: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, dict[str, Any]] = field(default_factory=dict)  # cores used during each measurement
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return no_nan(asdict(self))  # type: ignore[no-any-return]


def no_nan(value: Any) -> Any:
    """JSON has no NaN: an unmeasured number becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_nan(v) for v in value]
    return value


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def load(self, m: Measured, server: ServerProcess, label: str, *, connections: int, messages: int,
             rate: float = 0.0, warmup: int | None = None) -> Result:
        warm = self.args.warmup if warmup is None else warmup
        self.wait_for_quiet(m, server)
        holder: dict[str, CpuSnapshot] = {}

        def snapshot() -> None:  # called by run_load after the warm-up, as the measured phase starts
            holder["before"] = CpuSnapshot.take(server.pids)

        res: Result = run_async(run_load(HOST, server.port, connections=connections, messages=messages, rate=rate,
                                         label=label, warmup=warm, ack_timeout=self.args.ack_timeout,
                                         on_measure=snapshot))
        cores = CpuSnapshot.take(server.pids).cores_since(holder["before"], server.pids, services=m.key == "b")
        m.cpu[label] = cores
        m.sent += res.messages + res.errors + max(1, warm // connections) * connections
        m.acked_aa += res.messages - res.not_aa
        paced = f" (target {rate:,.0f})" if rate else ""
        say(f"  {label}: {res.messages:,} msgs in {res.seconds:.2f} s = {res.rate:,.0f} msgs/s{paced}; "
            f"p50 {res.p50_ms:.2f} ms, p99 {res.p99_ms:.2f} ms, max {res.max_ms:.2f} ms; "
            f"errors {res.errors}, non-AA {res.not_aa}; CPU cores: server {cores['server']:.2f} "
            f"({' + '.join(f'{v:.2f}' for v in cores['server_processes'].values())}), "
            f"load generator {cores['loadgen']:.2f}, "
            + (f"PostgreSQL+RabbitMQ {cores['services']:.2f}, " if cores["services"] is not None else "")
            + f"other processes {cores['other']:.2f}")
        if res.errors or res.not_aa:
            m.notes.append(f"{label}: {res.errors} connection errors/timeouts, {res.not_aa} answers other than AA")
        if cores["other"] > NOISE_CORES or cores["steal"] > NOISE_CORES:
            busiest = ", ".join(cores["busiest_others"]) or "none above 0.02 cores: short-lived processes?"
            m.notes.append(f"{label}: other processes used {cores['other']:.2f} cores (steal {cores['steal']:.2f}) "
                           f"during this measurement; its numbers may be understated (busiest: {busiest})")
        return res

    def wait_for_quiet(self, m: Measured, server: ServerProcess) -> None:
        """On a shared machine, wait (up to --quiet-wait seconds) until other processes leave the CPU alone."""
        limit = self.args.quiet_wait
        if limit <= 0:
            return
        deadline = time.monotonic() + limit
        started = time.monotonic()
        announced = False
        while True:
            before = CpuSnapshot.take(server.pids)
            time.sleep(1.0)
            cores = CpuSnapshot.take(server.pids).cores_since(before, server.pids, services=m.key == "b")
            if cores["other"] < NOISE_CORES:
                if announced:
                    say(f"  quiet after {time.monotonic() - started:.0f} s")
                return
            busiest = ", ".join(cores["busiest_others"]) or "short-lived processes"
            if time.monotonic() >= deadline:
                say(f"  other processes still use {cores['other']:.2f} cores after {limit:g} s; measuring anyway")
                return
            if not announced:
                say(f"  other processes use {cores['other']:.2f} cores ({busiest}); waiting up to {limit:g} s "
                    "for them to finish")
                announced = True

    def measure(self, m: Measured, server: ServerProcess, *, sequential: bool = False) -> None:
        a = self.args
        say(f"{m.name}: starting")
        server.start()
        m.startup_seconds = server.startup_seconds
        say(f"{m.name}: listening on {HOST}:{server.port} after {server.startup_seconds:.1f} s")
        for i in range(a.repeat):
            m.peak_runs.append(self.load(m, server, f"peak {i + 1}/{a.repeat}", connections=a.connections,
                                         messages=a.messages))
        ordered = sorted(m.peak_runs, key=lambda r: r.rate)
        m.peak = ordered[(len(ordered) - 1) // 2]  # the median run (lower median when --repeat is even)
        if m.peak.rate <= 0 or not m.peak.messages:
            raise BenchError(f"{m.name}: no message was answered at peak load")
        m.half_target = round(m.peak.rate / 2, 1)
        n_half = min(a.messages, max(a.connections * 20, int(m.half_target * a.half_max_seconds)))
        m.half = self.load(m, server, "half peak", connections=a.connections, messages=n_half,
                           rate=m.half_target)
        m.half_achieved_ratio = round(m.half.rate / m.half_target, 3)
        if abs(m.half_achieved_ratio - 1) > HALF_PEAK_TOLERANCE:
            m.notes.append(f"half-peak run achieved {m.half.rate:,.0f} msgs/s, {m.half_achieved_ratio:.0%} of the "
                           f"{m.half_target:,.0f} msgs/s target: its latency is not latency at half peak")
        if sequential:
            m.sequential = self.load(m, server, "sequential sender", connections=1,
                                     messages=a.sequential_messages, warmup=min(a.warmup, 500))

    # -- one server each --------------------------------------------------------------------------

    def run_embedded(self, m: Measured, tmp: Path) -> None:
        workdir = tmp / "engine-embedded"
        server = engine_process(m.name, workdir, {})
        try:
            self.measure(m, server, sequential=True)
        finally:
            server.stop()
            m.notes.extend(f"engine log: {line[:300]}" for line in server.log_problems()[:5])
        db = workdir / "var" / "hl7engine.db"
        if db.exists():
            rows, queued = count_sqlite(db)
            m.stored = {"messages": rows, "queue_entries": queued}
            self.check_stored(m, rows, "SQLite messages rows")
            self.check_stored(m, queued, "SQLite queue_entries rows")

    def run_services(self, m: Measured, tmp: Path, stack: contextlib.ExitStack) -> None:
        a = self.args
        problem = services_problem(a.pg_url, a.amqp_url)
        if problem:
            m.skipped = f"skipped: {problem}"
            say(f"{m.name}: {m.skipped}")
            return
        db_name, db_url = create_database(a.pg_url)
        say(f"created PostgreSQL database {db_name}")
        stack.callback(_quietly, "dropping the PostgreSQL database", drop_database, a.pg_url, db_name)
        queue = f"hl7bench.{uuid.uuid4().hex[:10]}"
        stack.callback(_quietly, "deleting the RabbitMQ queues", delete_rabbit_topology, a.amqp_url, queue)
        server = engine_process(m.name, tmp / "engine-services", {
            "HL7ENGINE_DATABASE_URL": db_url,
            "HL7ENGINE_BROKER_URL": a.amqp_url,
            "HL7ENGINE_QUEUE_NAME": queue,
        })
        try:
            self.measure(m, server)
        finally:
            server.stop()
            m.notes.extend(f"engine log: {line[:300]}" for line in server.log_problems()[:5])
        with contextlib.suppress(Exception):
            rows = count_pg_messages(a.pg_url, db_name)
            m.stored["messages"] = rows
            self.check_stored(m, rows, "PostgreSQL messages rows")
        with contextlib.suppress(Exception):
            queued = count_rabbit_messages(a.amqp_url, queue)
            m.stored["rabbitmq_messages"] = queued
            self.check_stored(m, queued, "messages in the RabbitMQ partition queues")

    def run_baseline(self, m: Measured, tmp: Path, kind: str) -> None:
        server = baseline_process(m.name, kind, tmp / kind)
        try:
            self.measure(m, server)
        finally:
            server.stop()
            m.notes.extend(f"server log: {line[:300]}" for line in server.log_problems()[:5])

    @staticmethod
    def check_stored(m: Measured, count: int, what: str) -> None:
        """Every AA must stand for a stored message; nothing beyond what was sent may be stored."""
        if count < m.acked_aa:
            m.notes.append(f"{what}: {count:,}, fewer than the {m.acked_aa:,} messages answered AA")
        elif count > m.sent:
            m.notes.append(f"{what}: {count:,}, more than the {m.sent:,} messages sent")


def _quietly(what: str, fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:
        say(f"cleanup: {what} failed: {type(exc).__name__}: {exc}")


# -- report ---------------------------------------------------------------------------------------

def git(*argv: str) -> str:
    try:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def filesystem_of(path: Path) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) >= len(best):
                best, kind = parts[1], parts[2]
    return kind


def machine_info(tmp_root: Path) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for pkg in ("uvloop", "hl7", "SQLAlchemy", "psycopg", "pika"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "engine_modified_since_commit": bool(git("status", "--porcelain", "--", "engine")),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "engine_build": engine_build(),
        "temp_dir": str(tmp_root),
        "temp_dir_filesystem": filesystem_of(tmp_root),
    }


def engine_build() -> str:
    """What the engine's processes import: compiled (mypyc) or pure Python, asked the way they start."""
    try:
        done = subprocess.run([sys.executable, "-c", "from engine import accel; print(accel.describe())"],
                              capture_output=True, text=True, timeout=60, cwd=tempfile.gettempdir(), check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:,.{digits}f}"


def targets(results: dict[str, Measured]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(text: str, value: float | None, ok: bool | None, unit: str) -> None:
        out.append({"target": text, "measured": value, "unit": unit,
                    "result": "n/a" if ok is None else ("PASS" if ok else "FAIL")})

    a, b = results.get("a"), results.get("b")
    if a is not None:
        rate = a.peak.rate if a.peak else None
        add(f"embedded >= {TARGET_EMBEDDED_RATE:,.0f} msgs/s", rate,
            None if rate is None else rate >= TARGET_EMBEDDED_RATE, "msgs/s")
        pct = a.pct_of_floor
        add(f"embedded >= {TARGET_EMBEDDED_FLOOR_PCT:.0f}% of floor", pct,
            None if pct is None else pct >= TARGET_EMBEDDED_FLOOR_PCT, "%")
    if b is not None:
        rate = b.peak.rate if b.peak else None
        add(f"RabbitMQ+PG >= {TARGET_SERVICES_RATE:,.0f} msgs/s", rate,
            None if rate is None else rate >= TARGET_SERVICES_RATE, "msgs/s")
    for key, label in (("a", "embedded"), ("b", "RabbitMQ+PG")):
        m = results.get(key)
        if m is None:
            continue
        p99 = m.half.p99_ms if m.half else None
        on_target = m.half is not None and abs(m.half_achieved_ratio - 1) <= HALF_PEAK_TOLERANCE
        add(f"{label}: p99 ACK latency < {TARGET_HALF_PEAK_P99_MS:.0f} ms at half peak", p99,
            None if p99 is None or not on_target else p99 < TARGET_HALF_PEAK_P99_MS, "ms")
    return out


def markdown(info: dict[str, Any], settings: dict[str, Any], results: dict[str, Measured],
             goals: list[dict[str, Any]], notes: list[str]) -> str:
    lines = [
        f"# HL7 engine benchmark, {info['date']}",
        "",
        f"- commit `{info['git_commit']}`"
        + (" (engine/ has uncommitted changes)" if info["engine_modified_since_commit"] else ""),
        f"- {info['cpu_count']} CPUs ({info['cpu_model'] or 'unknown model'}), load average at start "
        f"{', '.join(str(x) for x in info['load_average_at_start'])}",
        f"- Python {info['python']} on {info['platform']}; "
        + ", ".join(f"{k} {v}" for k, v in info["packages"].items()),
        f"- engine build: {info.get('engine_build', 'unknown')} (engine/accel.py)",
        f"- temporary files on {info['temp_dir_filesystem']} ({info['temp_dir']})",
        f"- {settings['connections']} connections, {settings['messages']:,} messages per peak measurement "
        f"(after {settings['warmup']:,} warm-up), median of {settings['repeat']} peak run(s); "
        f"ORU^R01 with 10 OBX ({settings['message_bytes']:,} bytes); every server on uvloop in its own process",
        "",
        f"## Peak ({settings['connections']} connections, closed loop) and latency at half peak (paced)",
        "",
        "| server | msgs/s | % of floor | p50 ms | p90 ms | p99 ms | max ms | errors | non-AA "
        "| half peak: msgs/s (target) | p50 at half peak | p99 at half peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in sorted(results):
        m = results[key]
        if m.peak is None:
            why = "skipped (see notes)" if m.skipped else "FAILED (see notes)" if m.failed else "not measured"
            lines.append(f"| {m.name} | {why} | | | | | | | | | | |")
            continue
        p = m.peak
        pct = "—" if m.pct_of_floor is None else f"{m.pct_of_floor:.0f}%"
        half = (f"{m.half.rate:,.0f} ({m.half_target:,.0f})" if m.half else "—")
        lines.append(
            f"| {m.name} | {p.rate:,.0f} | {pct} | {fmt(p.p50_ms)} | {fmt(p.p90_ms)} | {fmt(p.p99_ms)} | "
            f"{fmt(p.max_ms)} | {p.errors} | {p.not_aa} | {half} | {fmt(m.half.p50_ms if m.half else None)} | "
            f"{fmt(m.half.p99_ms if m.half else None)} |")
    measured = [m for k, m in sorted(results.items()) if m.peak is not None]
    if measured:
        lines += [
            "",
            "CPU used during each server's (median) peak run, in cores (this machine has "
            f"{info['cpu_count']}): the server (engine: listener + store writer process), the load generator, "
            "PostgreSQL + RabbitMQ (b only), the kernel's interrupt work (mostly loopback networking), and "
            "everything else on the machine (should be near 0; if not, the run was disturbed: see the notes).",
            "",
            "| server | server cores | load generator cores | PostgreSQL + RabbitMQ cores | interrupts cores "
            "| other processes cores | half peak: server cores |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for m in measured:
            assert m.peak is not None
            c = m.cpu.get(m.peak.label, {})
            h = m.cpu.get("half peak", {})
            split = " + ".join(f"{v:.2f}" for v in c.get("server_processes", {}).values())
            server_cores = fmt(c.get("server")) + (f" ({split})" if len(c.get("server_processes", {})) > 1 else "")
            lines.append(f"| {m.name} | {server_cores} | {fmt(c.get('loadgen'))} | {fmt(c.get('services'))} | "
                         f"{fmt(c.get('interrupts'))} | {fmt(c.get('other'))} | {fmt(h.get('server'))} |")
    seq = results["a"].sequential if "a" in results else None
    if seq is not None:
        lines += [
            "",
            "## Single sequential sender (1 connection), engine embedded",
            "",
            "| messages | msgs/s | p50 ms | p90 ms | p99 ms | max ms | errors | non-AA |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {seq.messages:,} | {seq.rate:,.0f} | {fmt(seq.p50_ms)} | {fmt(seq.p90_ms)} | {fmt(seq.p99_ms)} | "
            f"{fmt(seq.max_ms)} | {seq.errors} | {seq.not_aa} |",
        ]
    if goals:
        lines += ["", "## Engine targets (reported, not asserted)", "", "| target | measured | result |",
                  "|---|---:|---|"]
        for g in goals:
            unit = {"msgs/s": " msgs/s", "%": "%", "ms": " ms"}[g["unit"]]
            value = "—" if g["measured"] is None else f"{g['measured']:,.{0 if g['unit'] != 'ms' else 2}f}{unit}"
            lines.append(f"| {g['target']} | {value} | {g['result']} |")
    runs = [(m.name, m.peak_runs) for m in results.values() if len(m.peak_runs) > 1]
    if runs:
        lines += ["", "Peak runs (msgs/s): " + "; ".join(
            f"{name.split(' ', 1)[0]} " + ", ".join(f"{r.rate:,.0f}" for r in rs) for name, rs in runs)]
    all_notes = list(notes)
    for m in results.values():
        all_notes += [f"{m.name.split(' ', 1)[0]} {n}" for n in m.notes]
        if m.failed:
            all_notes.append(f"{m.name}: FAILED: {m.failed}")
        if m.skipped:
            all_notes.append(f"{m.name}: {m.skipped}")
        if m.stored:
            all_notes.append(f"{m.name}: stored {', '.join(f'{k} {v:,}' for k, v in m.stored.items())}; "
                             f"{m.sent:,} sent (warm-ups included), {m.acked_aa:,} measured AA")
    if all_notes:
        lines += ["", "## Notes", ""] + [f"- {n.splitlines()[0]}" for n in all_notes]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# -- stopping on SIGTERM --------------------------------------------------------------------------
#
# Outside the event loop, SIGTERM raises SystemExit, so every ``finally`` runs: servers stopped,
# database and queues removed, temporary files deleted. Inside it, an exception raised by a signal
# handler would land in whatever callback was running (uvloop reports it and carries on), so there
# SIGTERM cancels the load instead and SystemExit is raised once the loop is done. A second SIGTERM
# during the cleanup is ignored.

_terminating = False


def on_sigterm(signum: int, _frame: Any) -> None:
    global _terminating
    _terminating = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def run_async(coro: Coroutine[Any, Any, Result]) -> Result:
    async def guarded() -> Result:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def terminate() -> None:
            global _terminating
            _terminating = True
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, terminate)
        try:
            return await coro
        finally:
            loop.remove_signal_handler(signal.SIGTERM)  # resets SIGTERM to the default action ...
            signal.signal(signal.SIGTERM, signal.SIG_IGN if _terminating else on_sigterm)  # ... so set it again

    try:
        return uvloop.run(guarded())
    except asyncio.CancelledError:
        if _terminating:
            raise SystemExit(128 + signal.SIGTERM) from None
        raise


# -- main -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=40_000, help="messages per peak measurement (default 40000)")
    ap.add_argument("--connections", type=int, default=32, help="concurrent connections (default 32)")
    ap.add_argument("--only", default="a,b,c,d", help="servers to measure, e.g. a,d (default a,b,c,d)")
    ap.add_argument("--repeat", type=int, default=1, help="peak runs per server; the median is reported")
    ap.add_argument("--json", type=Path, help="write JSON here (default bench/results/latest.json)")
    ap.add_argument("--markdown", type=Path, help="write the report here (default bench/results/latest.md)")
    ap.add_argument("--warmup", type=int, default=2000, help="messages sent before each measurement, not counted")
    ap.add_argument("--half-max-seconds", type=float, default=15.0,
                    help="the half-peak run sends at most this many seconds' worth of messages (default 15)")
    ap.add_argument("--sequential-messages", type=int, default=10_000,
                    help="messages for the single sequential sender (default 10000)")
    ap.add_argument("--ack-timeout", type=float, default=30.0, help="seconds to wait for one ACK (default 30)")
    ap.add_argument("--quiet-wait", type=float, default=20.0,
                    help="before each measurement, wait up to this many seconds for other processes to stop using "
                         f"the CPU (more than {NOISE_CORES} cores); 0 = do not wait (default 20)")
    ap.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test",
                    help="PostgreSQL database to connect to for creating and dropping the benchmark database")
    ap.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    args = ap.parse_args(argv)
    keys = [k.strip().lower() for k in args.only.split(",") if k.strip()]
    bad = [k for k in keys if k not in NAMES]
    if bad or not keys:
        ap.error(f"--only takes letters from a,b,c,d; got {args.only!r}")
    args.keys = sorted(set(keys))
    if args.messages < args.connections or args.connections < 1 or args.repeat < 1:
        ap.error("need --connections >= 1, --messages >= --connections and --repeat >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    from loadgen import SAMPLE

    settings = {"messages": args.messages, "connections": args.connections, "repeat": args.repeat,
                "warmup": args.warmup, "half_max_seconds": args.half_max_seconds, "quiet_wait": args.quiet_wait,
                "sequential_messages": args.sequential_messages, "only": ",".join(args.keys),
                "message_bytes": len(SAMPLE.format(cid="B0000000000", pid="P0").encode()) + 3}
    results = {k: Measured(k, NAMES[k]) for k in args.keys}
    runner = Runner(args)
    notes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="hl7bench-"))
    info = machine_info(tmp)
    if info["engine_modified_since_commit"]:
        notes.append("engine/ has uncommitted changes: the commit hash alone does not identify the code measured")
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(shutil.rmtree, tmp, True)
            for key in args.keys:
                m = results[key]
                try:
                    with contextlib.ExitStack() as per_server:
                        if key == "a":
                            runner.run_embedded(m, tmp)
                        elif key == "b":
                            runner.run_services(m, tmp, per_server)
                        elif key == "c":
                            runner.run_baseline(m, tmp, "python-hl7")
                        else:
                            runner.run_baseline(m, tmp, "floor")
                except BenchError as exc:
                    m.failed = str(exc)
                    say(f"{m.name}: FAILED: {exc}")
                except (OSError, ConnectionError) as exc:
                    m.failed = f"{type(exc).__name__}: {exc}"
                    say(f"{m.name}: FAILED: {m.failed}")
    except KeyboardInterrupt:
        say("interrupted; servers stopped and temporary data removed")
        return 130
    except SystemExit:
        if _terminating:
            say("terminated (SIGTERM); servers stopped and temporary data removed")
        raise

    floor = results.get("d")
    floor_rate = floor.peak.rate if floor is not None and floor.peak is not None else None
    for m in results.values():
        if m.peak is not None and floor_rate:
            m.pct_of_floor = round(100 * m.peak.rate / floor_rate, 1)
    if not floor_rate and any(k in results for k in ENGINE_KEYS):
        notes.append("floor (d) not measured in this run: no % of floor")
    goals = targets(results)
    report = markdown(info, settings, results, goals, notes)
    data = {"machine": info, "settings": settings, "results": {k: m.to_json() for k, m in results.items()},
            "targets": goals, "notes": notes, "wall_seconds": round(time.monotonic() - T0, 1)}
    json_path = args.json or RESULTS / "latest.json"
    md_path = args.markdown or RESULTS / "latest.md"
    write_atomic(json_path, json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")
    write_atomic(md_path, report)
    print(report)
    say(f"done in {time.monotonic() - T0:.0f} s; wrote {md_path} and {json_path}")
    return 1 if any(m.failed for m in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
