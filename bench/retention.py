"""Retention: how fast ``hl7engine messages purge`` removes finished messages, on SQLite and on
PostgreSQL (a fresh database, dropped after).

Fills a message store with N processed ORU messages (1.1 kB each, with one history line, two search
keys and a delivered forward each), ten days apart from N more recent ones that stay, then purges
the old half and prints messages removed per second, and checks that the recent half is intact.

    .venv/bin/python bench/retention.py [--messages 100000] [--only sqlite,postgresql]

With ``--intake``, instead: the embedded engine (``hl7engine run``, no workers, so a backlog stays
queued) receives ORU messages at ``--rate`` from 32 connections, three times for ``--seconds``
each: alone, with a purge of ``--messages`` old messages running beside it, alone again; it prints
ACK latency p50/p99 of each, so the cost of a purge to the receiving path is seen side by side.

    .venv/bin/python bench/retention.py --intake --messages 50000 --rate 800
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from sqlalchemy import Engine, func, insert, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import run_load

from engine.store import db
from engine.store.retention import Purged, purge
from engine.store.schema import message_events, message_keys, messages, outbound

PG_ADMIN = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
RAW = (b"MSH|^~\\&|LIS|MINSKLAB|HL7ENGINE|CENTRAL|20261207080000||ORU^R01^ORU_R01|C|P|2.5.1\r"
       b"PID|1||BY-1^^^MINSKLAB^MR||ROE^JANE||19800101|F\r"
       + b"OBX|1|NM|2345-7^Glucose^LN||4.2|mmol/L|3.9-6.1|N|||F\r" * 10)


def fill(engine: Engine, n: int, start: datetime, chunk: int = 5000) -> None:
    for base in range(0, n, chunk):
        count = min(chunk, n - base)
        at = [start + timedelta(milliseconds=10 * (base + i)) for i in range(count)]
        uids = [uuid.uuid4().hex for _ in range(count)]
        with engine.begin() as conn:
            conn.execute(insert(messages), [
                {"uid": u, "channel": "lab", "received_at": t, "size": len(RAW),
                 "sha256": hashlib.sha256(u.encode()).hexdigest(), "accepted": True, "status": "processed",
                 "raw": RAW, "control_id": u[:20], "updated_at": t} for u, t in zip(uids, at, strict=True)])
            ids = [r.id for r in conn.execute(select(messages.c.id).where(messages.c.uid.in_(uids)))]
            conn.execute(insert(message_events), [{"message_id": i, "at": start, "status": "processed", "step": None,
                                                   "detail": None} for i in ids])
            conn.execute(insert(message_keys), [{"message_id": i, "kind": k, "value": f"{k}-{i}", "authority": ""}
                                                for i in ids for k in ("patient", "order")])
            conn.execute(insert(outbound), [
                {"message_id": i, "kind": "mllp", "channel": "lab", "target": "lis", "destination": "lis:2575",
                 "control_id": "C", "code": "", "payload": RAW, "status": "sent", "attempts": 1, "created_at": start,
                 "due_at": start, "next_attempt_at": start} for i in ids])


def measure(name: str, url: str, n: int) -> None:
    db.upgrade(url)
    engine = db.make_engine(url, pool_size=1, writer=db.is_sqlite(url))
    now = datetime.now(UTC)
    fill(engine, n, now - timedelta(days=40))
    fill(engine, n, now - timedelta(days=5))
    t0 = time.perf_counter()
    done = purge(engine, timedelta(days=30), now=now)
    seconds = time.perf_counter() - t0
    with engine.connect() as conn:
        kept = conn.execute(select(func.count()).select_from(messages)).scalar_one()
    engine.dispose()
    assert done.messages == n and kept == n, (done, kept)
    print(f"{name}: removed {done.messages:,} messages ({done.events:,} history lines, {done.keys:,} keys, "
          f"{done.outbound:,} outbound rows) of {2 * n:,} in {seconds:.2f}s = {done.messages / seconds:,.0f} "
          f"messages/s; {kept:,} recent ones kept")


def intake(n: int, rate: float, seconds: float) -> None:
    d = Path(tempfile.mkdtemp(prefix="hl7ret-intake-"))
    try:
        (d / "channels").mkdir()
        (d / "mappings").mkdir()
        port = 26575
        (d / "channels" / "lab.yaml").write_text(f"name: lab\nlisten:\n  host: 127.0.0.1\n  port: {port}\n"
                                                 "accept:\n  processing_ids: [P, T, D]\n")
        (d / "routes.yaml").write_text("routes: []\ndefault: filter\n")
        url = f"sqlite:///{d}/var/hl7engine.db"
        db.upgrade(url)
        engine = db.make_engine(url, pool_size=1, writer=True)
        fill(engine, n, datetime.now(UTC) - timedelta(days=40))
        env = {k: v for k, v in os.environ.items() if not k.startswith("HL7ENGINE_")}
        env.update(HL7ENGINE_HTTP_PORT="0", HL7ENGINE_LOG_LEVEL="error", HL7ENGINE_WORKERS="0")
        exe = str(Path(sys.executable).with_name("hl7engine"))
        proc = subprocess.Popen([exe, "run", "--config", str(d)], env=env, start_new_session=True)
        try:
            time.sleep(4)
            done: list[Purged] = []
            t = threading.Thread(target=lambda: done.append(purge(engine, timedelta(days=30))))
            for label in ("alone", "purge running", "alone again"):
                if label == "purge running":
                    t.start()
                res = asyncio.run(run_load("127.0.0.1", port, connections=32, messages=int(rate * seconds),
                                           rate=rate))
                print(f"intake, {label}: {res.rate:,.0f} msgs/s, ACK p50 {res.p50_ms:.2f} ms, p99 {res.p99_ms:.2f} ms, "
                      f"max {res.max_ms:.1f} ms; errors {res.errors}, not AA {res.not_aa}")
                if label == "purge running":
                    t.join()
                    print(f"  the purge removed {done[0].messages:,} messages")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
            engine.dispose()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000, help="old messages (as many recent ones are added)")
    ap.add_argument("--only", default="sqlite,postgresql")
    ap.add_argument("--intake", action="store_true", help="ACK latency of the embedded engine with and without a "
                    "purge running beside it")
    ap.add_argument("--rate", type=float, default=800.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    if args.intake:
        intake(args.messages, args.rate, args.seconds)
        return
    only = set(args.only.split(","))
    if "sqlite" in only:
        with tempfile.TemporaryDirectory(prefix="hl7ret-") as d:
            measure("SQLite", f"sqlite:///{d}/store.db", args.messages)
    if "postgresql" in only:
        name = f"hl7ret_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        try:
            measure("PostgreSQL", f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", args.messages)
        finally:
            with psycopg.connect(PG_ADMIN, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
