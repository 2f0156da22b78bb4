"""One worker's cost per message: CPU and wall time of ``Processor.process_batch`` per ORU^R01.

    .venv/bin/python bench/worker.py                         # PostgreSQL and SQLite, 3,000 messages each
    .venv/bin/python bench/worker.py --only postgresql --messages 5000
    .venv/bin/python bench/worker.py --profile cumulative    # cProfile of the measured part

bench/e2e.py measures the whole pipe, where the listener, RabbitMQ, PostgreSQL and the workers share
the machine's cores and its result moves with everything else the machine does. This script runs
the worker's own code alone, in this process: the messages are stored first (by the store writer's
code, as the listener would), then processed in batches of ``--batch`` (50, as the RabbitMQ consumer
takes them) on this repository's routes.yaml and mappings/. It reports the worker process's CPU time
per message (``time.process_time``: what a worker costs, and the figure to compare when changing its
code), on PostgreSQL the server processes' CPU serving the worker's connections (from /proc), and
the wall time (CPU plus waiting for the database).
The peer baseline, in the same run: python-hl7's ``hl7.parse`` of the same message, on one core.

The message is bench/loadgen.py's ORU^R01 with 10 OBX; patients repeat every 5,000 messages.
PostgreSQL gets a fresh database (dropped afterwards); SQLite a file in a temporary directory.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from e2e import python_hl7_parse_rate  # noqa: E402
from loadgen import SAMPLE  # noqa: E402

from engine import accel  # noqa: E402
from engine.hl7.header import read_header  # noqa: E402
from engine.intake.item import Item, new_uid  # noqa: E402
from engine.intake.writer import BatchWriter, Job, WireJob  # noqa: E402
from engine.observe import configure_logging, tune_gc  # noqa: E402
from engine.queue.dbqueue import DatabaseQueue  # noqa: E402
from engine.settings import Settings  # noqa: E402
from engine.store import db  # noqa: E402
from engine.worker.main import build_processor  # noqa: E402

PG_ADMIN = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
WARMUP = 100


def message(n: int) -> bytes:
    return SAMPLE.format(cid=f"W{n:08d}", pid=f"P{n % 5000}").encode()


def store(url: str, count: int) -> list[str]:
    """Store ``count`` messages as the listener would (status queued), 100 per transaction."""
    writer = BatchWriter(db.make_engine(url, writer=True), DatabaseQueue(), partitions=8)
    uids: list[str] = []
    try:
        for start in range(0, count, 100):
            jobs = []
            for n in range(start, min(count, start + 100)):
                raw = message(n)
                item = Item(new_uid(), "lab", time.time(), "127.0.0.1:1", raw, read_header(raw, "utf-8"),
                            "queued", "AA", b"")
                jobs.append(WireJob.from_wire(Job([item], lambda _j: None, time.time() + 600).wire(n)))
            for job in jobs:
                writer.prepare(job)
            _, _, failed = writer.write(jobs)
            if failed:
                raise SystemExit(f"storing the messages failed ({failed})")
            uids += [job.records[0].uid for job in jobs]
    finally:
        writer.engine.dispose()
    return uids


def database_cpu(url: str) -> float | None:
    """CPU seconds used so far by the PostgreSQL server processes serving this database's client
    connections (from /proc; None for SQLite, whose work is the worker's own, or where /proc is not
    readable). Server processes that ended are not counted: the worker keeps its connections open."""
    if not url.startswith("postgresql"):
        return None
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        pids = [r[0] for r in c.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s "
                                        "AND backend_type = 'client backend'", (name,))]
    ticks = 0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    except OSError:
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def measure(label: str, url: str, count: int, batch: int, profile: str | None) -> None:
    db.upgrade(url)
    uids = store(url, count + WARMUP)
    os.environ["HL7ENGINE_DATABASE_URL"] = url
    processor = build_processor(ROOT, Settings())
    tune_gc()  # as a worker process does
    try:
        processor.process_batch([(u, None) for u in uids[:WARMUP]])
        measured = uids[WARMUP:]
        prof = cProfile.Profile() if profile else None
        db0 = database_cpu(url)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        if prof is not None:
            prof.enable()
        for start in range(0, len(measured), batch):
            outcomes = processor.process_batch([(u, None) for u in measured[start:start + batch]])
            bad = [o for o in outcomes if o.status != "processed"]
            if bad:
                raise SystemExit(f"{label}: a message was not processed: {bad[0].step}: {bad[0].reason}")
        if prof is not None:
            prof.disable()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        db1 = database_cpu(url)
    finally:
        processor.engine.dispose()
    n = len(measured)
    server = f", PostgreSQL server CPU {(db1 - db0) / n * 1e3:.3f} ms" if db0 is not None and db1 is not None else ""
    print(f"{label}: {n:,} ORU^R01 (10 OBX) in batches of {batch}: worker CPU {cpu / n * 1e3:.3f} ms per "
          f"message{server}, wall {wall / n * 1e3:.3f} ms -> {n / wall:,.0f} msgs/s, {10 * n / wall:,.0f} "
          "observations/s for one worker" + (" (profiled: slower)" if prof is not None else ""), flush=True)
    if prof is not None and profile:
        pstats.Stats(prof, stream=sys.stdout).sort_stats(profile).print_stats(40)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=3000, help="messages measured per database (default 3000)")
    ap.add_argument("--batch", type=int, default=50, help="messages per process_batch (default 50)")
    ap.add_argument("--only", default="postgresql,sqlite", help="postgresql, sqlite or both (default)")
    ap.add_argument("--profile", choices=["cumulative", "tottime"], help="print a cProfile of the measured part")
    ap.add_argument("--baseline-seconds", type=float, default=2.0, help="how long the peer baseline runs (default 2)")
    args = ap.parse_args()
    configure_logging("warning", "console")
    only = {x.strip() for x in args.only.split(",")}
    unknown = only - {"postgresql", "sqlite"}
    if unknown:
        raise SystemExit(f"--only: unknown {sorted(unknown)}; expected postgresql and/or sqlite")
    print(f"peer baseline: python-hl7 hl7.parse alone, same message: "
          f"{python_hl7_parse_rate(SAMPLE.format(cid='X', pid='P1'), args.baseline_seconds):,.0f} msgs/s on one core",
          flush=True)
    print(f"engine build: {accel.describe()}", flush=True)
    if "postgresql" in only:
        name = f"hl7wrk_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        try:
            measure("PostgreSQL", f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", args.messages,
                    args.batch, args.profile)
        finally:
            with psycopg.connect(PG_ADMIN, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if "sqlite" in only:
        with tempfile.TemporaryDirectory(prefix="hl7wrk-") as d:
            measure("SQLite", f"sqlite:///{d}/store.db", args.messages, args.batch, args.profile)


if __name__ == "__main__":
    main()
