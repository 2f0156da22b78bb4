"""Peer baselines for the benchmark, each run in its own process on uvloop (as the engine is).

    python bench/servers.py python-hl7 --port 2576   # python-hl7's asyncio MLLP server: parse + ACK
    python bench/servers.py floor --port 2577        # bare asyncio Protocol: a fixed ACK per frame

``python-hl7``: ``hl7.mllp.start_hl7_server`` with a handler that reads each message with
``reader.readmessage()`` (which parses it) and writes ``message.create_ack()``. Nothing is stored:
this is what a naive parse-then-ACK Python server achieves.

``floor``: answers every complete MLLP frame (0x1C 0x0D) with the same ACK frame (``MSA|AA|``),
without looking at the message. It measures the cost of the sockets, the event loop and the load
generator alone on this machine: no HL7 server written in Python can beat it here.

Prints ``listening on HOST:PORT`` on stdout when ready; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

SB, EB = b"\x0b", b"\x1c\x0d"
FLOOR_ACK = SB + (
    b"MSH|^~\\&|FLOOR|BENCH|LIS|CITYLAB|20261122101500||ACK^R01^ACK|FLOOR1|P|2.5.1\r"
    b"MSA|AA|0\r"
) + EB


class FloorProtocol(asyncio.Protocol):
    """One fixed ACK per complete frame; bytes after the last frame end are kept for the next read."""

    __slots__ = ("tail", "transport")

    def __init__(self) -> None:
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.tail + data if self.tail else data
        n = buf.count(EB)
        if n:
            assert self.transport is not None
            self.transport.write(FLOOR_ACK * n)
            self.tail = buf[buf.rfind(EB) + 2:]
        else:
            self.tail = buf


async def start_floor(host: str, port: int) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(FloorProtocol, host, port, reuse_address=True, backlog=1024)


async def start_python_hl7(host: str, port: int) -> asyncio.AbstractServer:
    import hl7.mllp

    async def handle(reader: Any, writer: Any) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()  # reads one frame and parses it (hl7.parse)
                writer.writemessage(message.create_ack())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server: asyncio.AbstractServer = await hl7.mllp.start_hl7_server(handle, host, port, reuse_address=True,
                                                                     backlog=1024)
    return server


SERVERS: dict[str, Callable[[str, int], Coroutine[Any, Any, asyncio.AbstractServer]]] = {
    "floor": start_floor,
    "python-hl7": start_python_hl7,
}


async def serve(kind: str, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await SERVERS[kind](host, port)
    print(f"listening on {host}:{port} ({kind}, {type(loop).__module__})", flush=True)
    await stop.wait()
    server.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.wait_closed(), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=sorted(SERVERS))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    import uvloop

    try:
        uvloop.run(serve(args.kind, args.host, args.port))
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
