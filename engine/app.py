"""Assemble and run the engine: listeners, the store writer and the queue hand-off."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from engine import accel
from engine.config.project import Project
from engine.errors import UnavailableError
from engine.intake.receiver import Receiver
from engine.intake.runtime import ChannelRuntime
from engine.intake.store_client import StoreClient
from engine.intake.watch import ProcessWatcher
from engine.mllp.server import MLLPServer
from engine.observe import ChannelEvents, get_logger, tune_gc
from engine.outbound.deliver import Deliverer
from engine.settings import Settings
from engine.store import db
from engine.store.retention import Pruner

log = get_logger("engine.app")


@dataclass
class Engine:
    """One engine process: every enabled channel of a project, one writer, one queue hand-off."""

    project: Project
    settings: Settings
    servers: list[MLLPServer] = field(default_factory=list)
    store: StoreClient | None = None
    watcher: ProcessWatcher | None = None
    deliverer: Deliverer | None = None
    pruner: Pruner | None = None

    @property
    def database_url(self) -> str:
        return self.settings.resolved_database_url(self.project.root)

    async def start(self) -> None:
        url = self.database_url
        await asyncio.to_thread(db.upgrade, url)
        writers = 1 if db.is_sqlite(url) else (self.settings.store_writers or 1)
        self.store = StoreClient(url, self.settings, writers=writers)
        await self.store.start()
        channels = [ch for ch in self.project.channels if ch.config.enabled]
        if any(ch.config.ack.after == "processed" for ch in channels):
            self.watcher = ProcessWatcher(url)
        for ch in channels:
            rt = ChannelRuntime.build(ch.name, ch.config)
            events = ChannelEvents(ch.name)
            server = MLLPServer(rt, Receiver(rt, self.store, events, self.watcher), events)
            await server.start()
            self.servers.append(server)
        # application ACKs of these channels, and messages forwarded to routes' mllp and file destinations
        deliverer = Deliverer(url, [(ch.name, ch.config) for ch in channels], self.project.routes.forwards().values())
        if deliverer:
            self.deliverer = deliverer
            deliverer.start()
        if self.settings.retain_messages:
            self.pruner = Pruner(url, self.settings.retain_messages)
            self.pruner.start()
        log.info("engine started", channels=len(self.servers), store="sqlite" if db.is_sqlite(url) else "server",
                 queue=self.store.queue_name, build=accel.report(log))

    async def stop(self) -> None:
        # messages waiting for their processing (ack.after: processed) get this long too, then AE
        grace = max((s.rt.config.ack.timeout for s in self.servers), default=10.0) + 1
        await asyncio.gather(*(s.stop(grace) for s in self.servers))
        if self.watcher is not None:
            await self.watcher.close()
        if self.deliverer is not None:
            await asyncio.to_thread(self.deliverer.close)
        if self.pruner is not None:
            await asyncio.to_thread(self.pruner.close)
        if self.store is not None:
            if not await self.store.drain(grace):
                log.warning("store writer still busy at stop", pending=self.store.pending)
            await self.store.close()
        log.info("engine stopped")


async def serve(project: Project, settings: Settings, started: asyncio.Event | None = None) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    engine = Engine(project, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await engine.start()
    except (OSError, UnavailableError):
        await engine.stop()
        raise
    tune_gc()
    if started is not None:
        started.set()
    await stop.wait()
    log.info("stopping: no new connections; answering in-flight messages")
    await engine.stop()


def run(main: Coroutine[Any, Any, None], loop_kind: str = "auto") -> None:
    """Run ``main`` on uvloop when available (``loop_kind``: auto, uvloop, asyncio)."""
    if loop_kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if loop_kind == "uvloop":
                raise
        else:
            uvloop.run(main)
            return
    asyncio.run(main)
