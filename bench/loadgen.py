"""MLLP load generator: N concurrent connections, each sends a message and waits for its ACK.

Loopback only, a bounded number of messages. Prints msgs/s and ACK latency percentiles.

Paced mode (``--rate``) spreads the connections' send times evenly over one interval (instead of
all connections sending at the same instant) and measures each ACK from the moment its message
was written; a connection that falls behind its schedule sends at once until it catches up. An
ACK that does not come within ``--ack-timeout`` seconds counts as an error and ends that
connection's share of the run (so a stuck server cannot hang the benchmark).

    python bench/loadgen.py 127.0.0.1:2575 --connections 32 --messages 50000
    python bench/loadgen.py 127.0.0.1:2575 --rate 5000 --messages 50000    # paced (open loop per connection)
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

SB, EB = b"\x0b", b"\x1c\x0d"

SAMPLE = (
    "MSH|^~\\&|LIS|CITYLAB|HL7ENGINE|CENTRAL|20261122101500+0300||ORU^R01^ORU_R01|{cid}|P|2.5.1\r"
    "PID|1||{pid}^^^CITYLAB^MR||IVANOVA^ANNA^P||19800101|F\r"
    "OBR|1|ORD{cid}|FIL{cid}|57021-8^CBC W Auto Differential panel - Blood^LN|||20261122093000+0300\r"
    + "".join(
        f"OBX|{i}|NM|{code}^{name}^LN||{val}|{unit}^{unit}^UCUM|{rng}|N|||F|||20261122094500+0300\r"
        for i, (code, name, val, unit, rng) in enumerate([
            ("6690-2", "Leukocytes", "6.1", "10*3/uL", "4.0-10.0"),
            ("789-8", "Erythrocytes", "4.62", "10*6/uL", "4.2-5.4"),
            ("718-7", "Hemoglobin", "13.9", "g/dL", "12.0-16.0"),
            ("4544-3", "Hematocrit", "41.2", "%", "37-47"),
            ("787-2", "MCV", "89.2", "fL", "80-100"),
            ("785-6", "MCH", "30.1", "pg", "27-33"),
            ("786-4", "MCHC", "33.7", "g/dL", "32-36"),
            ("777-3", "Platelets", "254", "10*3/uL", "150-400"),
            ("770-8", "Neutrophils/100 leukocytes", "58.3", "%", "40-75"),
            ("736-9", "Lymphocytes/100 leukocytes", "31.0", "%", "20-45"),
        ], 1)
    )
)


@dataclass
class Result:
    label: str
    connections: int
    messages: int
    seconds: float
    rate: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    not_aa: int


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(EB)
        if end >= 0 and self.waiter is not None and not self.waiter.done():
            start = self.buf.find(SB)
            ack = bytes(self.buf[start + 1:end])
            del self.buf[:end + 2]
            self.waiter.set_result(ack)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))
        if not self.lost.done():
            self.lost.set_result(None)

    async def request(self, payload: bytes) -> bytes:
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(payload)
        return await self.waiter

    def expire(self, now: float, timeout: float) -> None:
        """Fail the outstanding request if its ACK is overdue (called by the watchdog)."""
        if self.waiter is not None and not self.waiter.done() and now - self.sent_at > timeout:
            self.waiter.set_exception(TimeoutError(f"no ACK within {timeout:g}s"))


async def _watchdog(clients: list[Client], timeout: float) -> None:
    """One timer for all connections: no per-message timer on the hot path."""
    while True:
        await asyncio.sleep(min(1.0, timeout / 4))
        now = time.perf_counter()
        for c in clients:
            c.expire(now, timeout)


async def run_load(host: str, port: int, *, connections: int, messages: int, rate: float = 0.0,
                   label: str = "", warmup: int = 200, template: str = SAMPLE, ack_timeout: float = 30.0,
                   on_measure: Callable[[], object] | None = None) -> Result:
    """Connect, warm up, then send ``messages`` messages and collect their ACK latencies.

    ``on_measure`` is called just before the measured phase starts (after the warm-up), e.g. to
    take a CPU snapshot."""
    if not ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
        raise SystemExit("the load generator only targets loopback addresses")
    loop = asyncio.get_running_loop()
    counter = iter(range(10**12))
    run_id = f"{time.time_ns() % 10**9:09d}"

    def payload() -> bytes:
        n = next(counter)
        text = template.format(cid=f"B{run_id}{n}", pid=f"P{n % 5000}")
        return SB + text.encode() + EB

    clients: list[Client] = []
    watchdog = asyncio.ensure_future(_watchdog(clients, ack_timeout))
    try:
        for _ in range(connections):
            _, proto = await loop.create_connection(Client, host, port)
            clients.append(proto)
        # warm-up (not measured)
        per = max(1, warmup // connections)
        await asyncio.gather(*(_drive(c, per, payload, [], [0, 0], 0.0) for c in clients))

        latencies: list[float] = []
        stats = [0, 0]  # errors, not AA
        per_conn = [messages // connections + (1 if i < messages % connections else 0) for i in range(connections)]
        interval = connections / rate if rate else 0.0
        if on_measure is not None:
            on_measure()
        t0 = time.perf_counter()
        await asyncio.gather(*(_drive(c, n, payload, latencies, stats, interval, interval * i / connections)
                               for i, (c, n) in enumerate(zip(clients, per_conn, strict=True))))
        elapsed = time.perf_counter() - t0
    finally:
        watchdog.cancel()
        for c in clients:
            if c.transport is not None:
                c.transport.close()
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    return Result(label, connections, len(latencies), round(elapsed, 3), round(len(latencies) / elapsed, 1),
                  round(percentile(ms, 0.50), 3), round(percentile(ms, 0.90), 3), round(percentile(ms, 0.99), 3),
                  round(ms[-1] if ms else float("nan"), 3), stats[0], stats[1])


async def _drive(client: Client, n: int, payload, latencies: list[float], stats: list[int],  # type: ignore[no-untyped-def]
                 interval: float, offset: float = 0.0) -> None:
    next_at = time.perf_counter() + offset
    for _ in range(n):
        if interval:
            now = time.perf_counter()
            if next_at > now:
                await asyncio.sleep(next_at - now)
            next_at += interval
        data = payload()
        t = time.perf_counter()
        try:
            ack = await client.request(data)
        except (ConnectionError, TimeoutError):
            stats[0] += 1
            if client.transport is not None:
                client.transport.close()
            return
        latencies.append(time.perf_counter() - t)
        if b"MSA|AA|" not in ack and b"MSA|CA|" not in ack:
            stats[1] += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("address", help="HOST:PORT (loopback only)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--messages", type=int, default=50000)
    ap.add_argument("--rate", type=float, default=0.0, help="target msgs/s in total (0 = as fast as ACKs come)")
    ap.add_argument("--label", default="")
    ap.add_argument("--warmup", type=int, default=200, help="messages sent before measuring (not counted)")
    ap.add_argument("--ack-timeout", type=float, default=30.0, help="seconds to wait for each ACK")
    ap.add_argument("--file", type=Path, help="send this message instead of the built-in ORU (10 OBX); "
                                              "{cid} and {pid} are replaced")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    host, _, port = args.address.rpartition(":")
    template = args.file.read_text().replace("\n", "\r") if args.file else SAMPLE
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    res = runner(run_load(host, int(port), connections=args.connections, messages=args.messages, rate=args.rate,
                          label=args.label, template=template, warmup=args.warmup,
                          ack_timeout=args.ack_timeout))
    if args.json:
        print(json.dumps(asdict(res)))
    else:
        print(f"{res.label or args.address}: {res.messages} msgs in {res.seconds}s = {res.rate:.0f} msgs/s; "
              f"ACK latency p50 {res.p50_ms} ms, p99 {res.p99_ms} ms, max {res.max_ms} ms; "
              f"errors {res.errors}, not AA {res.not_aa}", file=sys.stdout)


if __name__ == "__main__":
    main()
