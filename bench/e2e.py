"""End to end: MLLP in, facts committed in the central record out.

Starts ``hl7engine listen`` and ``hl7engine work --workers N`` on PostgreSQL + RabbitMQ (the
services on 127.0.0.1; a fresh database and queue names per run), or on the embedded defaults with
``--embedded``, with this repository's channels/, routes.yaml and mappings/. Sends ORU^R01 with
10 OBX from 32 connections, then waits until every message is processed and reports:

- intake: msgs/s and ACK latency (as bench/loadgen.py);
- end to end: messages (and observations) per second from the first receipt to the last commit,
  and per-message latency from receipt (``received_at``) to the record commit (``updated_at`` of
  the processed row), p50/p99;
- the peer baseline, in the same run: python-hl7's ``hl7.parse`` of the same message alone, on one
  core (parsing only: no store, queue, mapping or record).

    python bench/e2e.py --messages 20000 --workers 2
    python bench/e2e.py --messages 6000 --workers 2 --rate 250   # latency below the peak
    python bench/e2e.py --messages 6000 --workers 2 --rate 250 --ack-after processed
    python bench/e2e.py --messages 6000 --workers 2 --rate 250 --application-acks
    python bench/e2e.py --messages 6000 --workers 2 --rate 250 --forward
    python bench/e2e.py --messages 400 --workers 1 --no-broker --rate 20   # PostgreSQL, embedded queue

With ``--forward`` the ORU route also forwards each processed message to an ``mllp`` destination: a
listener this script runs (answering AA); it reports receipt -> forward received, p50/p99.

With ``--application-acks`` the channel runs in enhanced mode with ``ack.application_acks`` pointing
at a listener this script runs (it answers each application ACK with CA), the messages ask for
application ACKs (MSH-15/16 AL), and it also reports receipt -> application ACK received, p50/p99.

Sent as fast as ACKs come, the workers fall behind the receiving path and receipt->commit latency
is mostly time spent queued; pace the load with ``--rate`` to measure it below the peak.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import create_engine, select, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from loadgen import SAMPLE, percentile, run_load  # noqa: E402
from run import delete_rabbit_topology, engine_build  # noqa: E402

from engine.store.schema import messages  # noqa: E402

PG_ADMIN = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
AMQP = os.environ.get("BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")


def python_hl7_parse_rate(message: str, seconds: float = 2.0) -> float:
    """Messages per second python-hl7 parses on one core (nothing else done): the peer baseline."""
    import hl7

    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            hl7.parse(message)
        n += 50
    return n / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"engine did not listen on {port}")


class AckListener:
    """The sender's own listener for application ACKs: notes when each arrives (by MSA-2) and
    answers it with CA; and a downstream system for forwarded messages: notes when each arrives (by
    MSH-10) and answers it with AA."""

    def __init__(self) -> None:
        self.arrived: dict[str, tuple[str, float]] = {}  # MSA-2 -> (MSA-1, epoch seconds)
        self.forwarded: dict[str, float] = {}  # MSH-10 -> epoch seconds
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while data := conn.recv(65536):
                buf += data
                while (end := buf.find(b"\x1c\r")) >= 0:
                    start = buf.find(b"\x0b")
                    frame, buf = buf[start + 1:end], buf[end + 2:]
                    segs = frame.decode("latin-1").split("\r")
                    msa = next((x for x in segs if x.startswith("MSA|")), "").split("|")
                    ours = segs[0].split("|")[9]
                    if len(msa) > 2:
                        self.arrived[msa[2]] = (msa[1], time.time())
                    else:
                        self.forwarded[ours] = time.time()
                    conn.sendall(b"\x0bMSH|^~\\&|LIS|CITYLAB|HL7ENGINE|CENTRAL|20261206||ACK|K1|P|2.5.1\rMSA|"
                                 + (b"CA|" if len(msa) > 2 else b"AA|") + ours.encode() + b"\r\x1c\r")


def config_dir(port: int, ack_after: str = "stored", app_acks_port: int = 0, forward_port: int = 0) -> Path:
    """This repository's configuration, with the channel on a free port."""
    d = Path(tempfile.mkdtemp(prefix="hl7e2e-"))
    (d / "channels").mkdir()
    lab = (ROOT / "channels" / "lab.yaml").read_text().replace("port: 2575", f"port: {port}")
    lab = lab.replace("host: 0.0.0.0", "host: 127.0.0.1")
    if ack_after != "stored":  # the example channel says ``after: stored``, with a comment
        lab, n = re.subn(r"(?m)^  after: stored\b", f"  after: {ack_after}\n  processing_timeout: 60s", lab)
        assert n == 1, "channels/lab.yaml: no 'after: stored' line under ack"
    if app_acks_port:
        lab = lab.replace("  mode: original", "  mode: enhanced").replace(
            "\nack:\n", f"\nack:\n  application_acks:\n    to: 127.0.0.1:{app_acks_port}\n")
    (d / "channels" / "lab.yaml").write_text(lab)
    routes = (ROOT / "routes.yaml").read_text()
    if forward_port:
        downstream = f"{{type: mllp, name: downstream, to: '127.0.0.1:{forward_port}'}}"
        routes = routes.replace("    destinations: [record]\n", f"    destinations: [record, {downstream}]\n", 1)
        assert "downstream" in routes
    (d / "routes.yaml").write_text(routes)
    os.symlink(ROOT / "mappings", d / "mappings")
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--embedded", action="store_true", help="SQLite store and queue instead of PostgreSQL + RabbitMQ")
    ap.add_argument("--no-broker", action="store_true",
                    help="PostgreSQL store with the embedded queue (its queue_entries table) instead of RabbitMQ")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="send at this many msgs/s (0: as fast as ACKs come); receipt->commit latency means "
                         "something only below the end-to-end peak, e.g. at half of it")
    ap.add_argument("--ack-after", choices=["stored", "processed"], default="stored",
                    help="the channel's ack.after: processed makes the ACK latency receipt->record commit")
    ap.add_argument("--application-acks", action="store_true",
                    help="enhanced mode with application ACKs to a listener run here; reports receipt -> "
                         "application ACK received")
    ap.add_argument("--forward", action="store_true",
                    help="the ORU route also forwards to an mllp destination run here; reports receipt -> "
                         "forward received")
    args = ap.parse_args()
    if args.application_acks and args.ack_after != "stored":
        raise SystemExit("--application-acks needs enhanced mode, which acknowledges on receipt (ack.after stored)")
    acks = AckListener() if args.application_acks or args.forward else None
    template = SAMPLE.replace("|P|2.5.1\r", "|P|2.5.1|||AL|AL\r", 1) if args.application_acks else SAMPLE

    baseline = python_hl7_parse_rate(SAMPLE.format(cid="BASE1", pid="P1"))
    print(f"peer baseline: python-hl7 hl7.parse alone, same message: {baseline:,.0f} msgs/s on one core")
    print(f"engine build: {engine_build()}")
    port = free_port()
    cfg = config_dir(port, args.ack_after, acks.port if args.application_acks and acks else 0,
                     acks.port if args.forward and acks else 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HL7ENGINE_")}
    env.update(HL7ENGINE_HTTP_PORT="0", HL7ENGINE_LOG_LEVEL="warning")
    dbname = queue = ""
    if args.embedded:
        url = f"sqlite:///{cfg / 'var' / 'hl7engine.db'}"
    else:
        dbname = f"hl7e2e_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{dbname}"')
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{dbname}"
        env.update(HL7ENGINE_DATABASE_URL=url)
        if not args.no_broker:
            queue = f"hl7e2e.{uuid.uuid4().hex[:8]}"
            env.update(HL7ENGINE_BROKER_URL=AMQP, HL7ENGINE_QUEUE_NAME=queue)
    exe = str(Path(sys.executable).with_name("hl7engine"))
    listen = subprocess.Popen([exe, "listen", "--config", str(cfg)], env=env, start_new_session=True)
    work = subprocess.Popen([exe, "work", "--config", str(cfg), "--workers", str(args.workers)], env=env,
                            start_new_session=True)
    try:
        wait_port(port)
        time.sleep(2)  # workers connected
        t0 = time.time()
        measured: list[datetime] = []  # when the measured phase began (after the warm-up)
        res = asyncio.run(run_load("127.0.0.1", port, connections=args.connections, messages=args.messages,
                                   rate=args.rate, template=template,
                                   on_measure=lambda: measured.append(datetime.now(UTC))))
        print(f"intake (ack.after {args.ack_after}): {res.messages} msgs in {res.seconds:.2f}s = "
              f"{res.rate:,.0f} msgs/s; ACK p50 {res.p50_ms:.2f} ms, p99 {res.p99_ms:.2f} ms; errors {res.errors}, "
              f"not AA {res.not_aa}")
        engine = create_engine(url)
        deadline = time.time() + 600
        # until nothing is left queued (warm-up messages included). The newest rows are the last to be
        # processed: look for one still queued from the newest down (a count read every row, 10-15 ms
        # of the database's CPU five times a second, taken from the engine being measured)
        still_queued = (select(messages.c.id).where(messages.c.status.in_(["queued", "replayed"]))
                        .order_by(messages.c.id.desc()).limit(1))
        while time.time() < deadline:
            with engine.connect() as conn:
                left = conn.execute(still_queued).first()
            if left is None:
                break
            time.sleep(0.2)
        with engine.connect() as conn:
            rows = conn.execute(select(messages.c.received_at, messages.c.updated_at, messages.c.status)).all()
            obs = conn.execute(text("SELECT count(*) FROM rec_observations")).scalar() or 0
        processed = [r for r in rows if r.status == "processed"]
        first = min(r.received_at for r in rows)
        last = max(r.updated_at for r in processed)
        span = (last - first).total_seconds()
        # latency of the measured messages only: the warm-up burst meets a worker not yet warm
        since = measured[0] if measured else _aware(first)
        lat = sorted((r.updated_at - r.received_at).total_seconds() * 1000 for r in processed
                     if _aware(r.received_at) >= since)
        statuses: dict[str, int] = {}
        for r in rows:
            statuses[r.status] = statuses.get(r.status, 0) + 1
        setup = "embedded" if args.embedded else "PostgreSQL, no broker" if args.no_broker else "PostgreSQL + RabbitMQ"
        print(f"end to end ({setup}, {args.workers} worker "
              f"process(es)): {len(processed)} ORU (10 OBX) in {span:.2f}s = {len(processed) / span:,.0f} msgs/s, "
              f"{obs / span:,.0f} observations/s; receipt->commit (warm-up excluded) "
              f"p50 {percentile(lat, 0.50):.1f} ms, "
              f"p99 {percentile(lat, 0.99):.1f} ms (p10 {percentile(lat, 0.10):.1f}, p90 {percentile(lat, 0.90):.1f}, "
              f"max {lat[-1]:.1f}); statuses {statuses}; observations stored {obs:,}; "
              f"wall {time.time() - t0:.1f}s")
        if acks is not None and args.application_acks:
            report_application_acks(acks, engine, len(rows))
        if acks is not None and args.forward:
            report_forwards(acks, engine, len(processed))
        engine.dispose()
    finally:
        for p in (listen, work):
            os.killpg(p.pid, signal.SIGTERM)
        for p in (listen, work):
            p.wait(60)
        if queue:
            delete_rabbit_topology(AMQP, queue)
        if dbname:
            with psycopg.connect(PG_ADMIN, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def _aware(t: datetime) -> datetime:
    """SQLite gives naive UTC datetimes back."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def arrivals(seen: dict[str, Any], expected: int, engine: Any) -> dict[str, float]:
    """Wait (at most 5 minutes) until ``seen`` (control ID -> what arrived) holds ``expected``
    entries; then the receipt time of each processed message, by control ID."""
    deadline = time.time() + 300
    while len(seen) < expected and time.time() < deadline:
        time.sleep(0.2)
    with engine.connect() as conn:
        return {r.control_id: r.received_at.timestamp() for r in conn.execute(
            select(messages.c.control_id, messages.c.received_at).where(messages.c.status == "processed"))}


def timing(got: list[tuple[str, float]], received: dict[str, float]) -> tuple[float, list[float]]:
    """Span from the first receipt to the last arrival, and the sorted receipt->arrival latencies (ms)."""
    lat = sorted((at - received[cid]) * 1000 for cid, at in got)
    return max(at for _, at in got) - min(received[cid] for cid, _ in got), lat


def report_application_acks(acks: AckListener, engine: Any, expected: int) -> None:
    """Wait for every message's application ACK; print their rate and latency from receipt."""
    received = arrivals(acks.arrived, expected, engine)
    got = [(cid, at) for cid, (code, at) in acks.arrived.items() if cid in received and code == "AA"]
    span, lat = timing(got, received)
    print(f"application ACKs: {len(got)} AA of {expected} messages at the sender's listener in {span:.2f}s "
          f"= {len(got) / span:,.0f}/s; receipt->application ACK p50 {percentile(lat, 0.50):.1f} ms, "
          f"p99 {percentile(lat, 0.99):.1f} ms; other codes {len(acks.arrived) - len(got)}")


def report_forwards(acks: AckListener, engine: Any, expected: int) -> None:
    """Wait for every processed message to reach the downstream listener; print the rate and the
    latency from receipt."""
    received = arrivals(acks.forwarded, expected, engine)
    got = [(cid, at) for cid, at in acks.forwarded.items() if cid in received]
    span, lat = timing(got, received)
    print(f"forwards: {len(got)} of {expected} processed messages at the downstream listener in {span:.2f}s "
          f"= {len(got) / span:,.0f}/s; receipt->forward received p50 {percentile(lat, 0.50):.1f} ms, "
          f"p99 {percentile(lat, 0.99):.1f} ms")


if __name__ == "__main__":
    main()
