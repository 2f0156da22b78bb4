"""Logs and metrics. One event feeds both a log line and a metric.

Log lines carry channel, control ID, message type, size, outcome and timings, never message
content or patient data (design-notes guarantee 6). Per-message lines are at debug level;
refusals and failures at info/warning; a per-channel summary is logged periodically.
"""

from __future__ import annotations

import gc
import logging
import sys
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

import structlog
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _ChannelStats:
    """Per-channel message counters and ACK latency histogram, kept as plain numbers: updated on
    every message by the event loop (a few hundred nanoseconds), read only when scraped."""

    __slots__ = ("buckets", "count", "counts", "total")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def add(self, outcome: str, ack_code: str, latency: float) -> None:
        key = (outcome, ack_code or "-")
        self.counts[key] = self.counts.get(key, 0) + 1
        self.buckets[bisect_left(LATENCY_BUCKETS, latency)] += 1
        self.total += latency
        self.count += 1


class _MessageCollector(Collector):
    def __init__(self) -> None:
        self.channels: dict[str, _ChannelStats] = {}

    def stats(self, channel: str) -> _ChannelStats:
        return self.channels.setdefault(channel, _ChannelStats())

    def collect(self) -> Iterator[Metric]:
        messages = CounterMetricFamily("hl7engine_messages", "Messages answered, by channel, outcome and ACK code",
                                       labels=["channel", "outcome", "ack_code"])
        latency = HistogramMetricFamily("hl7engine_ack_latency_seconds",
                                        "From the end of the frame to the answer being ready", labels=["channel"])
        for name, st in list(self.channels.items()):
            for (outcome, code), n in list(st.counts.items()):
                messages.add_metric([name, outcome, code], n)
            cumulative, running = [], 0
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), st.buckets, strict=True):
                running += n
                cumulative.append((str(bound) if bound != float("inf") else "+Inf", running))
            latency.add_metric([name], cumulative, st.total)
        yield messages
        yield latency


MESSAGE_STATS = _MessageCollector()
REGISTRY.register(MESSAGE_STATS)
CONNECTIONS = Gauge("hl7engine_connections", "Open MLLP connections", ["channel"])
CONNECTIONS_REFUSED = Counter("hl7engine_connections_refused_total", "Connections closed at once",
                              ["channel", "reason"])
DISCARDED_BYTES = Counter("hl7engine_discarded_bytes_total", "Bytes outside MLLP frames, dropped", ["channel"])
STORE_BATCH = Histogram("hl7engine_store_batch_messages", "Messages per store commit",
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
STORE_COMMIT = Histogram("hl7engine_store_commit_seconds", "Time of one store transaction (incl. queue)",
                         buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5))
APPLICATION_ACKS = Counter("hl7engine_application_acks_total", "Application ACK delivery attempts (enhanced "
                           "mode) by outcome: sent, refused, retry, expired", ["channel", "outcome"])
FORWARDS = Counter("hl7engine_forwarded_total", "Deliveries of messages to route destinations (mllp, file) by "
                   "outcome: sent, refused, retry, expired", ["destination", "outcome"])
STORE_FAILURES = Counter("hl7engine_store_failures_total", "Store transactions that failed", ["service"])

_configured = False


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    """Set up structlog once per process; lines go to stderr."""
    global _configured
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # one write per line: the listener and its store writer process share stderr
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # libraries' own log records (alembic, SQLAlchemy, pika) in the same format, on stderr
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    for noisy in ("alembic", "sqlalchemy", "asyncio"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
    # pika logs every lost connection at ERROR with socket details; the publisher reports
    # connection state itself, with the channel context, so only pika's critical records pass
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    _configured = True


def tune_gc() -> None:
    """Fewer cyclic-GC passes on the hot path: the receiving path allocates many short-lived,
    acyclic objects, and a full collection with the startup objects in it costs milliseconds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


class ChannelEvents:
    """Events of one channel: metric children resolved once, log lines without message content."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.log = get_logger("engine.channel").bind(channel=channel)
        self.stats = MESSAGE_STATS.stats(channel)
        self._connections = CONNECTIONS.labels(channel)
        self._discarded = DISCARDED_BYTES.labels(channel)

    def answered(self, outcome: str, ack_code: str, *, control_id: str, msg_type: str, size: int,
                 latency: float, reason: str = "") -> None:
        self.stats.add(outcome, ack_code, latency)
        if outcome in ("accepted", "duplicate", "processed", "filtered"):
            self.log.debug("message", outcome=outcome, ack=ack_code, control_id=control_id, type=msg_type,
                           size=size, ms=round(latency * 1000, 2))
        else:
            self.log.warning("message", outcome=outcome, ack=ack_code, control_id=control_id, type=msg_type,
                             size=size, ms=round(latency * 1000, 2), reason=reason)

    def connection_opened(self, peer: str) -> None:
        self._connections.inc()
        self.log.info("connection opened", peer=peer)

    def connection_closed(self, peer: str, reason: str) -> None:
        self._connections.dec()
        self.log.info("connection closed", peer=peer, reason=reason)

    def connection_refused(self, peer: str, reason: str) -> None:
        CONNECTIONS_REFUSED.labels(self.channel, reason).inc()
        self.log.warning("connection refused", peer=peer, reason=reason)

    def discarded(self, peer: str, size: int, reason: str) -> None:
        self._discarded.inc(size)
        self.log.warning("bytes discarded", peer=peer, bytes=size, reason=reason)
