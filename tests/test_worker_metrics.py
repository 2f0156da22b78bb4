"""Worker metrics: a worker's totals, the parent's sum over workers (restarts included), the
exposition, and the processor feeding them."""

from __future__ import annotations

import queue
import threading
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.worker.metrics import WorkerCollector, WorkerTotals


def samples(collector: WorkerCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def totals(processed: int, errors: int = 0, latency: float = 0.2) -> WorkerTotals:
    t = WorkerTotals()
    for _ in range(processed):
        t.outcome("processed", "", facts=3, latency=latency)
    for _ in range(errors):
        t.outcome("error", "map")
    t.batch(0.5)
    return t


def test_the_parent_sums_its_workers_and_keeps_the_counts_of_restarted_ones() -> None:
    c = WorkerCollector()
    c.update("w1", totals(5))
    c.update("w2", totals(2, errors=1, latency=40))
    c.update("w1", totals(7))  # a later report of w1 replaces its earlier one
    c.update("w3", totals(1))  # w2 died, w3 replaced it: w2's counts stay in the sum
    s = samples(c)
    assert s[("hl7engine_worker_messages_total", (("status", "processed"), ("step", "")))] == 10
    assert s[("hl7engine_worker_messages_total", (("status", "error"), ("step", "map")))] == 1
    assert s[("hl7engine_worker_facts_total", ())] == 30
    assert s[("hl7engine_worker_batches_total", ())] == 3
    assert s[("hl7engine_worker_commit_latency_seconds_count", ())] == 10
    assert s[("hl7engine_worker_commit_latency_seconds_bucket", (("le", "0.25"),))] == 8
    assert s[("hl7engine_worker_commit_latency_seconds_bucket", (("le", "60.0"),))] == 10
    assert s[("hl7engine_workers", ())] == 3


def test_reports_travel_over_a_queue_and_a_stopped_reporter_sends_its_last_totals() -> None:
    from engine.worker.metrics import Reporter

    channel: queue.Queue[object] = queue.Queue()
    c = WorkerCollector()
    stop = threading.Event()
    reader = threading.Thread(target=c.drain, args=(channel, stop))
    reader.start()
    r = Reporter(channel, "w1")
    r.start()
    r.outcome("processed", facts=2, latency=0.1)
    r.outcome("held", "order")
    r.retry()
    r.stop()
    deadline = time.time() + 5
    while time.time() < deadline and c.total()[0].outcomes.get(("held", ""), 0) == 0:
        time.sleep(0.05)
    stop.set()
    reader.join(5)
    t, live = c.total()
    assert t.outcomes == {("processed", ""): 1, ("held", ""): 1} and t.retries == 1 and t.facts == 2
    assert live == 1
