"""The MLLP listener: one asyncio server per channel.

Each connection decodes frames as bytes arrive and answers them strictly in the order they came
(a sender that pipelines gets its ACKs in order, each matched to its own MSH-10). A connection
with too many unanswered frames, or whose ACKs the sender does not read, stops being read until
it catches up, so memory stays bounded. A periodic sweep enforces the ACK timeout, the frame
timeout (a frame that never ends) and the idle timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from typing import Any

from engine.intake.receiver import Pending, Receiver
from engine.intake.runtime import ChannelRuntime
from engine.mllp.framing import Discarded, Frame, FrameDecoder, Oversize, frame
from engine.observe import ChannelEvents

SWEEP_INTERVAL = 0.2


def tls_context(rt: ChannelRuntime) -> ssl.SSLContext | None:
    tls = rt.config.listen.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.client_ca_file is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(tls.client_ca_file))
    return ctx


class MLLPConnection(asyncio.Protocol):
    __slots__ = ("allowed", "closed", "closing", "decoder", "discarded", "frame_started", "last_activity",
                 "paused_read", "paused_write", "peer", "pending", "server", "transport")

    def __init__(self, server: MLLPServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.allowed = True
        self.decoder = FrameDecoder(server.rt.config.max_message_size)
        self.pending: deque[Pending] = deque()
        self.last_activity = time.monotonic()
        self.frame_started = 0.0
        self.paused_read = False
        self.paused_write = False
        self.closing = False
        self.closed = False
        self.discarded = 0

    # -- asyncio callbacks -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        self.transport = tr
        peername: Any = transport.get_extra_info("peername")
        host = str(peername[0]) if peername else "?"
        self.peer = f"{host}:{peername[1]}" if peername else "?"
        srv = self.server
        if srv.stopping or len(srv.connections) >= srv.rt.config.listen.max_connections:
            reason = "engine stopping" if srv.stopping else "max_connections reached"
            srv.events.connection_refused(self.peer, reason)
            self.closed = True
            tr.abort()
            return
        self.allowed = srv.rt.sender_allowed(host)
        srv.connections.add(self)
        srv.events.connection_opened(self.peer)
        if not self.allowed:
            srv.events.log.warning("sender not allowed; its messages will be refused", peer=self.peer)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        now = time.monotonic()
        self.last_activity = now
        was_in_frame = self.decoder.in_frame
        srv = self.server
        timeout = srv.rt.config.ack.timeout
        for ev in self.decoder.feed(data):
            if isinstance(ev, Frame):
                p = Pending(now, now + timeout, self._flush)
                self.pending.append(p)
                srv.receiver.frame(ev.payload, self.peer, self.allowed, p)
            elif isinstance(ev, Oversize):
                p = Pending(now, now + timeout, self._flush)
                self.pending.append(p)
                srv.receiver.oversize(ev.head, ev.size, self.peer, self.allowed, p)
            elif isinstance(ev, Discarded):
                self.discarded += ev.size
                srv.events.discarded(self.peer, ev.size, ev.reason)
                if self.discarded > srv.rt.config.max_message_size:
                    self.close("too many bytes outside MLLP frames (is the sender using MLLP?)")
                    return
        if self.decoder.in_frame and (not was_in_frame or not self.frame_started):
            self.frame_started = now
        elif not self.decoder.in_frame:
            self.frame_started = 0.0
        if len(self.pending) >= srv.rt.config.listen.max_pipelined and not self.paused_read:
            self.paused_read = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool | None:
        # the sender half-closed: answer what is pending, then close
        self.closing = True
        return bool(self.pending)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.connections.discard(self)
        reason = "peer closed" if exc is None else f"{type(exc).__name__}"
        unanswered = sum(1 for p in self.pending if not p.done)
        if unanswered:
            reason += f", {unanswered} answers not delivered"
        self.server.events.connection_closed(self.peer, reason)

    def pause_writing(self) -> None:
        self.paused_write = True
        if not self.paused_read and self.transport is not None:
            self.paused_read = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused_write = False
        self._maybe_resume()

    # -- answers in order --------------------------------------------------------------------------

    def _flush(self) -> None:
        pending = self.pending
        transport = self.transport
        while pending and pending[0].done:
            p = pending.popleft()
            if p.data is not None and not self.closed and transport is not None:
                transport.write(frame(p.data))
        if self.closing and not pending:
            self.close("answered all before closing")
            return
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        if (self.paused_read and not self.paused_write and not self.closing and not self.closed
                and len(self.pending) <= self.server.rt.config.listen.max_pipelined // 2):
            self.paused_read = False
            if self.transport is not None:
                self.transport.resume_reading()

    def close(self, reason: str) -> None:
        if self.closed or self.transport is None:
            return
        self.closing = True
        self.server.events.log.info("closing connection", peer=self.peer, reason=reason)
        self.transport.close()

    def stop_reading(self) -> None:
        """For a graceful stop: take no more frames, answer the ones already received."""
        self.closing = True
        if self.transport is not None and not self.paused_read:
            self.paused_read = True
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()
        if not self.pending:
            self.close("engine stopping")

    def sweep(self, now: float) -> None:
        for p in self.pending:
            if p.done:
                continue
            if p.deadline > now:
                break
            p.expire()
        cfg = self.server.rt.config.listen
        if self.decoder.in_frame and self.frame_started and now - self.frame_started > cfg.frame_timeout:
            self.close(f"frame not completed within {cfg.frame_timeout:g}s ({self.decoder.buffered} bytes buffered)")
        elif (cfg.idle_timeout and not self.pending and not self.decoder.in_frame
              and now - self.last_activity > cfg.idle_timeout):
            self.close(f"idle for {cfg.idle_timeout:g}s")


class MLLPServer:
    """Listens for one channel."""

    def __init__(self, rt: ChannelRuntime, receiver: Receiver, events: ChannelEvents) -> None:
        self.rt = rt
        self.receiver = receiver
        self.events = events
        self.connections: set[MLLPConnection] = set()
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when the configuration said 0)."""
        assert self._server is not None
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def start(self) -> None:
        cfg = self.rt.config.listen
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: MLLPConnection(self), cfg.host, cfg.port, ssl=tls_context(self.rt), reuse_address=True,
            backlog=1024,
        )
        self._sweeper = asyncio.create_task(self._sweep(), name=f"sweep-{self.rt.name}")
        self.events.log.info("listening", host=cfg.host, port=self.port, tls=cfg.tls is not None)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.sweep(now)

    async def stop(self, grace: float) -> None:
        """Stop accepting, answer in-flight messages (up to ``grace`` seconds), close connections."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.stop_reading()
        deadline = time.monotonic() + grace
        while any(c.pending for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            # stored messages still waiting for their processing are answered AE (they stay queued)
            for p in list(conn.pending):
                if p.processing and not p.done:
                    p.expire()
            conn.close("engine stopping")
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
