"""The store writer process.

The listener's event loop and the store writer share no interpreter lock: the writer runs here,
in its own process, so database and broker work use the second core while the loop keeps
answering. Jobs arrive over a socketpair as length-prefixed pickles (a private channel between
the engine and the process it started); results go back the same way.

The process ignores SIGINT and SIGTERM: it stops when the engine closes the socket, after
finishing (committing or failing) every job it was given.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from engine.intake.writer import BatchWriter, Txn, WireJob
from engine.observe import configure_logging, get_logger, tune_gc
from engine.queue.factory import make_enqueuer
from engine.settings import Settings
from engine.store.db import make_engine

log = get_logger("engine.store")
HEADER = 4
# SQLite: seconds between tries for the write lock while a worker holds it (db.begin_immediate_polling).
# Measured with bench/e2e.py --embedded --workers 2, three alternating pairs: ACK p99 241-339 ms with
# SQLite's own growing sleeps, 30-64 ms with this.
LOCK_POLL = 0.0005


def encode(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(HEADER, "big") + data


def decode_frames(buf: bytearray) -> list[Any]:
    """Take every complete frame off the front of ``buf``."""
    out = []
    pos = 0
    size = len(buf)
    view = memoryview(buf)
    try:
        while size - pos >= HEADER:
            n = int.from_bytes(view[pos:pos + HEADER], "big")
            if size - pos < HEADER + n:
                break
            out.append(pickle.loads(view[pos + HEADER:pos + HEADER + n]))  # noqa: S301 - private socketpair
            pos += HEADER + n
    finally:
        view.release()
    if pos:
        del buf[:pos]
    return out


def serve(sock: socket.socket, config: dict[str, Any]) -> None:
    settings = Settings(**config["settings"])
    configure_logging(settings.log_level, settings.log_format)
    enqueuer = make_enqueuer(settings)
    engine = make_engine(config["database_url"], pool_size=enqueuer.depth + 1, writer=True, lock_poll=LOCK_POLL)
    lock = threading.Lock()

    def send(obj: Any) -> None:
        data = encode(obj)
        with lock:
            sock.sendall(data)

    def report(jobs: list[WireJob], stats: tuple[int, float, str]) -> None:
        send(("results", [j.result() for j in jobs], stats))

    writer = BatchWriter(engine, enqueuer, settings.queue_partitions, depth=enqueuer.depth)
    tune_gc()
    try:
        send(("ready", {"pid": os.getpid(), "queue": enqueuer.name}))
        run(sock, writer, report, config.get("max_batch", 256))
    except OSError as exc:
        log.warning("store writer lost the engine", error=str(exc))
    finally:
        enqueuer.close()
        engine.dispose()


def run(sock: socket.socket, writer: BatchWriter,
        report: Callable[[list[WireJob], tuple[int, float, str]], None], max_batch: int) -> None:
    """One thread reads jobs, groups them and writes them, first in, first out.

    Group commit without waiting: a transaction takes every job that arrived while the previous
    one was busy. (Waiting for more was measured: it lowers throughput whenever the CPU is not
    saturated, and a lone sequential sender would pay for it on every message.)

    Transactions are pipelined up to ``writer.depth``: while the broker confirms one transaction's
    messages, the next is begun on another connection. They are completed, and reported, in the
    order they began, so a connection's ACKs keep their order.
    """
    buf = bytearray()
    waiting: deque[WireJob] = deque()
    inflight: deque[Txn] = deque()
    open_ = True

    def read() -> bool:
        """Read what is available now (jobs before an EOF included). False at EOF."""
        eof = False
        while True:
            data = sock.recv(1 << 20)
            if not data:
                eof = True
                break
            buf.extend(data)
            if not select.select([sock], [], [], 0)[0]:
                break
        stamp = writer.stamp()
        for frame in decode_frames(buf):
            for wire in frame:
                job = WireJob.from_wire(wire)
                writer.prepare(job, stamp)
                waiting.append(job)
        return not eof

    def take() -> list[WireJob]:
        jobs: list[WireJob] = []
        n = 0
        while waiting and n < max_batch:
            job = waiting.popleft()
            jobs.append(job)
            n += len(job.records) or 1
        return jobs

    def complete_head() -> None:
        txn = inflight.popleft()
        report(txn.jobs, writer.complete(txn))

    while open_ or waiting or inflight:
        # finish what can be finished without waiting, oldest first
        while inflight and writer.ready(inflight[0]):
            complete_head()
        if waiting and writer.open < writer.depth:
            if open_ and select.select([sock], [], [], 0)[0]:  # group what else has arrived
                open_ = read()
            jobs = take()
            if writer.conflicts(jobs):  # a resend of a message not committed yet: let it commit first
                while inflight:
                    complete_head()
            txn = writer.begin(jobs)
            if txn.result is not None and not inflight:
                report(txn.jobs, writer.complete(txn))
            else:
                inflight.append(txn)
            continue
        if not open_:
            if inflight:  # nothing more will come: wait for the oldest
                complete_head()
            continue
        # wait for a job, a confirm, or the oldest transaction's deadline (every open transaction
        # that is not ready has accepted messages, hence a deadline)
        timeout = max(0.0, inflight[0].deadline - time.time()) if inflight else None
        wake = writer.enqueuer.wakeup_fd
        watch: list[Any] = [sock] if wake is None else [sock, wake]
        readable, _, _ = select.select(watch, [], [], timeout)
        if wake is not None and wake in readable:
            writer.enqueuer.drain_wakeups()
        if sock in readable:
            open_ = read()
        if not readable and inflight:
            complete_head()  # the deadline has passed: it fails now
    writer.close()


def read_config(sock: socket.socket) -> dict[str, Any]:
    """The first frame is the configuration (kept off the command line: it may hold a password)."""
    buf = bytearray()
    while True:
        frames = decode_frames(buf)
        if frames:
            config: dict[str, Any] = json.loads(frames[0])
            return config
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("engine closed the socket before sending the configuration")
        buf += data


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        serve(sock, read_config(sock))
    except Exception as exc:
        log.exception("store writer failed to start")
        with contextlib.suppress(OSError):
            sock.sendall(encode(("fatal", f"{type(exc).__name__}: {exc}")))
        sys.exit(1)


if __name__ == "__main__":
    main()
