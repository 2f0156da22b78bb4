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
from collections import deque
from collections.abc import Callable
from typing import Any

from engine.intake.writer import BatchWriter, WireJob, WriterThreads
from engine.observe import configure_logging, get_logger, tune_gc
from engine.queue.factory import make_enqueuer
from engine.settings import Settings
from engine.store.db import make_engine

log = get_logger("engine.store")
HEADER = 4


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
    engine = make_engine(config["database_url"], pool_size=config["threads"] + 1, writer=True)
    enqueuer = make_enqueuer(settings)
    lock = threading.Lock()

    def send(obj: Any) -> None:
        data = encode(obj)
        with lock:
            sock.sendall(data)

    def report(jobs: list[WireJob], stats: tuple[int, float, str]) -> None:
        send(("results", [j.result() for j in jobs], stats))

    writer = BatchWriter(engine, enqueuer, settings.queue_partitions)
    tune_gc()
    try:
        if config["threads"] <= 1:
            send(("ready", {"pid": os.getpid(), "queue": enqueuer.name}))
            single_threaded(sock, writer, report, config.get("max_batch", 256))
        else:
            threaded(sock, writer, report, config["threads"], config.get("max_batch", 256),
                     lambda: send(("ready", {"pid": os.getpid(), "queue": enqueuer.name})))
    except OSError as exc:
        log.warning("store writer lost the engine", error=str(exc))
    finally:
        enqueuer.close()
        engine.dispose()


def single_threaded(sock: socket.socket, writer: BatchWriter,
                    report: Callable[[list[WireJob], tuple[int, float, str]], None], max_batch: int) -> None:
    """One thread reads jobs, groups them and writes them: no lock shared with another thread.

    Group commit without waiting: a transaction takes every job that arrived while the previous
    one was committing. (Waiting for more was measured: it lowers throughput whenever the CPU is
    not saturated, and a lone sequential sender would pay for it on every message.)
    """
    buf = bytearray()
    waiting: deque[WireJob] = deque()
    open_ = True

    def read(block: bool) -> bool:
        """Read what is available (when ``block``, wait until something comes). False at EOF."""
        if not block:
            ready, _, _ = select.select([sock], [], [], 0)
            if not ready:
                return True
        data = sock.recv(1 << 20)
        if not data:
            return False
        buf.extend(data)
        while True:  # drain whatever else is already there
            ready, _, _ = select.select([sock], [], [], 0)
            if not ready:
                break
            more = sock.recv(1 << 20)
            if not more:
                break
            buf.extend(more)
        for frame in decode_frames(buf):
            for wire in frame:
                job = WireJob.from_wire(wire)
                writer.prepare(job)
                waiting.append(job)
        return True

    while open_ or waiting:
        if not waiting:
            open_ = read(True)
            continue
        if open_:
            open_ = read(False)
        jobs: list[WireJob] = []
        n = 0
        while waiting and n < max_batch:
            job = waiting.popleft()
            jobs.append(job)
            n += len(job.records)
        report(jobs, writer.write(jobs))
    writer.close()


def threaded(sock: socket.socket, writer: BatchWriter,
             report: Callable[[list[WireJob], tuple[int, float, str]], None], threads: int, max_batch: int,
             ready: Callable[[], None]) -> None:
    """Several writer threads (for a database server: network round trips overlap)."""
    pool = WriterThreads(writer, report, threads=threads, max_batch=max_batch)
    ready()
    buf = bytearray()
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            buf += data
            for frame in decode_frames(buf):
                for wire in frame:
                    job = WireJob.from_wire(wire)
                    writer.prepare(job)
                    pool.submit(job)
    finally:
        pool.close()


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
