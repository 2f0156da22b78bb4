"""The event loop's side of the store writer process: submit jobs, get outcomes, restart on crash.

All jobs submitted during one turn of the event loop go to the writer in one write. If the writer
process dies, every job it had is failed (the senders get AE and resend) and a new one is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from typing import Any

from engine.errors import UnavailableError
from engine.intake.writer import Job
from engine.intake.writerproc import decode_frames, encode
from engine.observe import STORE_BATCH, STORE_COMMIT, STORE_FAILURES, get_logger
from engine.settings import Settings

log = get_logger("engine.store")


class _Pipe(asyncio.Protocol):
    def __init__(self, client: StoreClient) -> None:
        self.client = client
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        for msg in decode_frames(self.buf):
            self.client._message(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(self)


class StoreClient:
    """Start and talk to the store writer process. ``submit`` is called on the event loop only."""

    def __init__(self, database_url: str, settings: Settings, *, threads: int) -> None:
        self.database_url = database_url
        self.settings = settings
        self.threads = threads
        self.queue_name = ""
        self._jobs: dict[int, Job] = {}
        self._outbox: list[tuple[Any, ...]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._next_id = 0
        self._pipe: _Pipe | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready: asyncio.Future[str] | None = None
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._restart: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._jobs)

    @property
    def connected(self) -> bool:
        return self._pipe is not None and self._ready is not None and self._ready.done()

    async def start(self, timeout: float = 60) -> None:
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair()
        config = {
            "database_url": self.database_url,
            "threads": self.threads,
            "settings": self.settings.model_dump(mode="json"),
        }
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "engine.intake.writerproc", str(child.fileno())], pass_fds=[child.fileno()],
        )
        child.close()
        parent.sendall(encode(json.dumps(config)))
        self._ready = loop.create_future()
        _, pipe = await loop.create_unix_connection(lambda: _Pipe(self), sock=parent)
        self._pipe = pipe
        try:
            self.queue_name = await asyncio.wait_for(self._ready, timeout)
        except TimeoutError:
            raise UnavailableError("store", f"store writer process not ready within {timeout:g}s") from None
        log.info("store writer started", pid=self._proc.pid, queue=self.queue_name)

    def submit(self, job: Job) -> None:
        self._next_id += 1
        job_id = self._next_id
        self._jobs[job_id] = job
        self._idle.clear()
        if not self.connected:
            asyncio.get_running_loop().call_soon(self._fail_job, job_id, "store writer process not running")
            return
        self._outbox.append(job.wire(job_id))
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if not self._outbox:
            return
        out, self._outbox = self._outbox, []
        pipe = self._pipe
        if pipe is None or pipe.transport is None:
            for wire in out:
                self._fail_job(wire[0], "store writer process not running")
            return
        pipe.transport.write(encode(out))

    def _message(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "ready":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(msg[1].get("queue", ""))
            return
        if kind == "fatal":
            log.error("store writer process failed", error=msg[1])
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(UnavailableError("store", msg[1]))
            return
        _, results, (count, seconds, failed) = msg
        if count:
            STORE_BATCH.observe(count)
            STORE_COMMIT.observe(seconds)
        if failed:
            STORE_FAILURES.labels(failed).inc()
        for job_id, outcomes in results:
            job = self._jobs.pop(job_id, None)
            if job is None:
                continue
            for item, (outcome, duplicate_of, failure, service) in zip(job.items, outcomes, strict=True):
                item.outcome, item.duplicate_of, item.failure, item.failure_service = (
                    outcome, duplicate_of, failure, service)
            self._done(job)
        if not self._jobs:
            self._idle.set()

    def _done(self, job: Job) -> None:
        try:
            job.done(job)
        except Exception:
            log.exception("completing a store job failed")

    def _fail_job(self, job_id: int, reason: str) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        for item in job.items:
            item.outcome, item.failure, item.failure_service = "failed", reason, "store"
        self._done(job)
        if not self._jobs:
            self._idle.set()

    def _lost(self, pipe: _Pipe) -> None:
        if pipe is not self._pipe:
            return
        self._pipe = None
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(UnavailableError("store", "store writer process exited at start"))
        for job_id in list(self._jobs):
            self._fail_job(job_id, "store writer process stopped")
        if not self._closing:
            code = self._proc.poll() if self._proc else None
            log.error("store writer process stopped; restarting", exit_code=code)
            self._restart = asyncio.get_running_loop().create_task(self._restart_loop())

    async def _restart_loop(self) -> None:
        delay = 0.5
        while not self._closing:
            if self._proc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._proc.wait, 5)
            try:
                await self.start()
                return
            except (UnavailableError, OSError) as exc:
                log.error("store writer restart failed", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    async def drain(self, timeout: float) -> bool:
        """Wait until every submitted job has its outcome (for a graceful stop)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self, timeout: float = 30) -> None:
        """Let the writer finish what it has, then stop it."""
        self._closing = True
        if self._restart is not None:
            self._restart.cancel()
        self._flush()
        pipe = self._pipe
        if pipe is not None and pipe.transport is not None:
            pipe.transport.write_eof()
        proc = self._proc
        if proc is not None:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if proc.poll() is None:
                log.error("store writer did not stop; killing it", pid=proc.pid)
                proc.kill()
        if pipe is not None and pipe.transport is not None:
            pipe.transport.close()
