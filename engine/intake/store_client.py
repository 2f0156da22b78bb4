"""The event loop's side of the store writer processes: submit jobs, get outcomes, restart on crash.

There is one writer process for SQLite (a single writer by nature) and several for a database
server, so that transactions waiting on the network and the broker overlap without sharing an
interpreter lock. Every connection is pinned to one writer ("lane"), and each writer handles its
jobs first in, first out: messages pipelined on one connection reach the queue in the order they
arrived. All jobs submitted to a writer during one turn of the event loop go to it in one write.

If a writer process dies, every job it held is failed (the senders get AE and resend) and a new
one is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
import zlib
from typing import Any

from engine.errors import UnavailableError
from engine.intake.writer import Job
from engine.intake.writerproc import decode_frames, encode
from engine.observe import STORE_BATCH, STORE_COMMIT, STORE_FAILURES, get_logger
from engine.settings import Settings

log = get_logger("engine.store")


class _Pipe(asyncio.Protocol):
    def __init__(self, writer: _Writer) -> None:
        self.writer = writer
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        for msg in decode_frames(self.buf):
            self.writer.message(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.writer.lost(self)


class _Writer:
    """One store writer process and the jobs it holds."""

    def __init__(self, client: StoreClient, index: int) -> None:
        self.client = client
        self.index = index
        self.jobs: dict[int, Job] = {}
        self.outbox: list[tuple[Any, ...]] = []
        self.flush_handle: asyncio.Handle | None = None
        self.pipe: _Pipe | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: asyncio.Future[str] | None = None
        self.restart_task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.pipe is not None and self.ready is not None and self.ready.done() \
            and not self.ready.cancelled() and self.ready.exception() is None

    async def start(self, timeout: float = 60) -> str:
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.intake.writerproc", str(child.fileno())], pass_fds=[child.fileno()],
        )
        child.close()
        parent.sendall(encode(json.dumps(self.client.config)))  # kept off the command line: it may hold a password
        self.ready = loop.create_future()
        _, pipe = await loop.create_unix_connection(lambda: _Pipe(self), sock=parent)
        self.pipe = pipe
        try:
            queue = await asyncio.wait_for(self.ready, timeout)
        except TimeoutError:
            raise UnavailableError("store", f"store writer process not ready within {timeout:g}s") from None
        log.info("store writer started", pid=self.proc.pid, lane=self.index, queue=queue)
        return queue

    def submit(self, job_id: int, job: Job) -> None:
        self.jobs[job_id] = job
        if not self.connected:
            asyncio.get_running_loop().call_soon(self.fail_job, job_id, "store writer process not running")
            return
        self.outbox.append(job.wire(job_id))
        if self.flush_handle is None:
            self.flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_handle = None
        if not self.outbox:
            return
        out, self.outbox = self.outbox, []
        pipe = self.pipe
        if pipe is None or pipe.transport is None:
            for wire in out:
                self.fail_job(wire[0], "store writer process not running")
            return
        pipe.transport.write(encode(out))

    def message(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "ready":
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(msg[1].get("queue", ""))
            return
        if kind == "fatal":
            log.error("store writer process failed", lane=self.index, error=msg[1])
            if self.ready is not None and not self.ready.done():
                self.ready.set_exception(UnavailableError("store", msg[1]))
            return
        _, results, (count, seconds, failed) = msg
        if count:
            STORE_BATCH.observe(count)
            STORE_COMMIT.observe(seconds)
        if failed:
            STORE_FAILURES.labels(failed).inc()
        for job_id, outcomes in results:
            job = self.jobs.pop(job_id, None)
            if job is None:
                continue
            for item, (outcome, duplicate_of, failure, service) in zip(job.items, outcomes, strict=True):
                item.outcome, item.duplicate_of, item.failure, item.failure_service = (
                    outcome, duplicate_of, failure, service)
            self.client.done(job)

    def fail_job(self, job_id: int, reason: str) -> None:
        job = self.jobs.pop(job_id, None)
        if job is None:
            return
        for item in job.items:
            item.outcome, item.failure, item.failure_service = "failed", reason, "store"
        self.client.done(job)

    def lost(self, pipe: _Pipe) -> None:
        if pipe is not self.pipe:
            return
        self.pipe = None
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(UnavailableError("store", "store writer process exited at start"))
        for job_id in list(self.jobs):
            self.fail_job(job_id, "store writer process stopped")
        if not self.client.closing:
            code = self.proc.poll() if self.proc else None
            log.error("store writer process stopped; restarting", lane=self.index, exit_code=code)
            self.restart_task = asyncio.get_running_loop().create_task(self.restart())

    async def restart(self) -> None:
        delay = 0.5
        while not self.client.closing:
            if self.proc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.proc.wait, 5)
            try:
                await self.start()
                return
            except (UnavailableError, OSError) as exc:
                log.error("store writer restart failed", lane=self.index, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    async def close(self, timeout: float) -> None:
        if self.restart_task is not None:
            self.restart_task.cancel()
        self.flush()
        pipe = self.pipe
        if pipe is not None and pipe.transport is not None:
            pipe.transport.write_eof()
        proc = self.proc
        if proc is not None:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if proc.poll() is None:
                log.error("store writer did not stop; killing it", pid=proc.pid)
                proc.kill()
        if pipe is not None and pipe.transport is not None:
            pipe.transport.close()


class StoreClient:
    """Start and talk to the store writer processes. ``submit`` is called on the event loop only."""

    def __init__(self, database_url: str, settings: Settings, *, writers: int = 1) -> None:
        self.database_url = database_url
        self.settings = settings
        self.config = {"database_url": database_url, "settings": settings.model_dump(mode="json")}
        self.queue_name = ""
        self.closing = False
        self._writers = [_Writer(self, i) for i in range(max(1, writers))]
        self._next_id = 0
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def connected(self) -> bool:
        return all(w.connected for w in self._writers)

    async def start(self, timeout: float = 60) -> None:
        names = await asyncio.gather(*(w.start(timeout) for w in self._writers))
        self.queue_name = names[0]

    def submit(self, job: Job) -> None:
        """Hand ``job`` to the writer of its connection (``job.key``): first in, first out."""
        self._next_id += 1
        self._pending += 1
        self._idle.clear()
        n = len(self._writers)
        lane = zlib.crc32(job.key.encode()) % n if n > 1 else 0
        self._writers[lane].submit(self._next_id, job)

    def done(self, job: Job) -> None:
        self._pending -= 1
        try:
            job.done(job)
        except Exception:
            log.exception("completing a store job failed")
        if self._pending == 0:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Wait until every submitted job has its outcome (for a graceful stop)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self, timeout: float = 30) -> None:
        """Let the writers finish what they have, then stop them."""
        self.closing = True
        await asyncio.gather(*(w.close(timeout) for w in self._writers))
