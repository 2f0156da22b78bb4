"""Worker metrics: what the workers did, on the /metrics of the process that started them.

Each worker process counts, as plain numbers, the outcomes of the messages it handled (by status
and failed step), the facts written, its batches and their time, the transient failures it retried
and the latency from receipt to the commit of the facts. Once a second it sends its totals to its
parent (``hl7engine run`` or ``hl7engine work``) over a multiprocessing queue; the parent serves
their sum with its other metrics. A worker that exits leaves its last totals behind, so the
counters never go down when one is restarted. ``hl7engine_workers`` counts the workers that
reported in the last 15 seconds.

    hl7engine_worker_messages_total{status, step}        processed, filtered, held, error (step), ...
    hl7engine_worker_facts_total                         facts inserted or updated in the record
    hl7engine_worker_batches_total, _batch_seconds_sum   transactions and their time
    hl7engine_worker_retries_total                       transient failures (batch rolled back, retried)
    hl7engine_worker_commit_latency_seconds              receipt -> record commit, per processed message
    hl7engine_workers                                    worker processes reporting
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
SEND_EVERY = 1.0  # seconds
STALE_AFTER = 15.0  # seconds without a report: a worker no longer counted in hl7engine_workers


@dataclass(slots=True)
class WorkerTotals:
    """Counts since a worker process started (or, summed, of several)."""

    outcomes: dict[tuple[str, str], int] = field(default_factory=dict)  # (status, step) -> messages
    facts: int = 0
    batches: int = 0
    batch_seconds: float = 0.0
    retries: int = 0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def outcome(self, status: str, step: str = "", facts: int = 0, latency: float | None = None) -> None:
        key = (status, step if status == "error" else "")
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        self.facts += facts
        if latency is not None:
            self.latency_buckets[bisect_left(LATENCY_BUCKETS, latency)] += 1
            self.latency_sum += latency

    def batch(self, seconds: float) -> None:
        self.batches += 1
        self.batch_seconds += seconds

    def add(self, other: WorkerTotals) -> None:
        for k, n in other.outcomes.items():
            self.outcomes[k] = self.outcomes.get(k, 0) + n
        self.facts += other.facts
        self.batches += other.batches
        self.batch_seconds += other.batch_seconds
        self.retries += other.retries
        self.latency_buckets = [a + b for a, b in zip(self.latency_buckets, other.latency_buckets, strict=True)]
        self.latency_sum += other.latency_sum

    def copy(self) -> WorkerTotals:
        out = WorkerTotals()
        out.add(self)
        return out


class Reporter:
    """In a worker process: the totals, sent to the parent every second (and when stopped)."""

    def __init__(self, channel: Any, worker: str) -> None:
        self.totals = WorkerTotals()
        self.channel = channel  # a multiprocessing queue, or None (nobody listens)
        self.worker = worker
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.channel is not None:
            self._thread = threading.Thread(target=self._loop, name="worker-metrics", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.send()

    def send(self) -> None:
        if self.channel is None:
            return
        with self._lock:
            snapshot = self.totals.copy()
        with contextlib.suppress(Exception):  # a parent gone away: nothing to report to
            self.channel.put_nowait((self.worker, snapshot))

    def _loop(self) -> None:
        while not self._stop.wait(SEND_EVERY):
            self.send()

    # called by the processor, from the worker's thread
    def outcome(self, status: str, step: str = "", facts: int = 0, latency: float | None = None) -> None:
        with self._lock:
            self.totals.outcome(status, step, facts, latency)

    def batch(self, seconds: float) -> None:
        with self._lock:
            self.totals.batch(seconds)

    def retry(self) -> None:
        with self._lock:
            self.totals.retries += 1


class WorkerCollector(Collector):
    """In the parent: the latest totals of every worker process that has reported (each names
    itself uniquely, so a restarted worker adds to the sum instead of replacing a predecessor)."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[float, WorkerTotals]] = {}  # worker -> (monotonic time, totals)
        self._lock = threading.Lock()

    def update(self, worker: str, totals: WorkerTotals) -> None:
        with self._lock:
            self.latest[worker] = (time.monotonic(), totals)

    def drain(self, channel: Any, stop: threading.Event) -> None:
        """Read reports from ``channel`` until ``stop`` is set (a thread of the parent)."""
        while not stop.is_set():
            try:
                worker, totals = channel.get(timeout=0.5)
            except queue.Empty:
                continue
            except (EOFError, OSError):  # the queue was closed
                return
            self.update(worker, totals)

    def total(self) -> tuple[WorkerTotals, int]:
        """The sum of every worker's totals, and how many reported in the last few seconds."""
        recent = time.monotonic() - STALE_AFTER
        out = WorkerTotals()
        live = 0
        with self._lock:
            for at, t in self.latest.values():
                out.add(t)
                live += at >= recent
        return out, live

    def collect(self) -> Iterator[Metric]:
        t, workers = self.total()
        messages = CounterMetricFamily("hl7engine_worker_messages", "Messages handled by workers, by status and "
                                       "the step that failed (error)", labels=["status", "step"])
        for (status, step), n in sorted(t.outcomes.items()):
            messages.add_metric([status, step], n)
        yield messages
        yield CounterMetricFamily("hl7engine_worker_facts", "Facts inserted or updated in the central record",
                                  value=t.facts)
        yield CounterMetricFamily("hl7engine_worker_batches", "Worker transactions committed", value=t.batches)
        yield CounterMetricFamily("hl7engine_worker_batch_seconds", "Time spent in committed worker transactions",
                                  value=t.batch_seconds)
        yield CounterMetricFamily("hl7engine_worker_retries", "Transient failures: batch rolled back and retried",
                                  value=t.retries)
        latency = HistogramMetricFamily("hl7engine_worker_commit_latency_seconds",
                                        "From receipt to the commit of the message's facts")
        cumulative, running = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), t.latency_buckets, strict=True):
            running += n
            cumulative.append((str(bound) if bound != float("inf") else "+Inf", running))
        latency.add_metric([], cumulative, t.latency_sum)
        yield latency
        yield GaugeMetricFamily("hl7engine_workers", "Worker processes reporting to this process", value=workers)


WORKERS = WorkerCollector()  # registered by the process that starts workers (see main.start_workers)

