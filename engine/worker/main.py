"""``hl7engine work``: worker processes that consume the queue and write the central record.

``serve_workers`` starts ``count`` processes (one per core is a good start) and stops them on
SIGTERM/SIGINT: each finishes the message in hand (its transaction commits or rolls back; an unacked
RabbitMQ delivery is redelivered to the next worker), then exits.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from engine import accel
from engine.config.loader import load_model
from engine.config.project import load_project, shown_path
from engine.config.routes import RoutesConfig, routes_file
from engine.errors import ConfigError, Problem
from engine.observe import configure_logging, get_logger, tune_gc
from engine.outbound.appack import AppAcks
from engine.outbound.forward import Forwards
from engine.settings import Settings
from engine.store import db
from engine.worker.metrics import WORKERS, Reporter
from engine.worker.processor import Processor
from engine.worker.router import Router

log = get_logger("engine.worker")


def load_routes(root: Path) -> RoutesConfig:
    path = routes_file(root)
    if path is None:
        return RoutesConfig()
    cfg, _, problems = load_model(RoutesConfig, path, shown_path(path))
    if problems or cfg is None:
        raise ConfigError(problems)
    return cfg


def build_processor(root: Path, settings: Settings) -> Processor:
    """Everything a worker needs, loaded and compiled once."""
    from engine.hl7.message import Message
    from engine.record.writer import apply, apply_wave

    project = load_project(root)  # channels, routes.yaml and mappings/, all checked
    routes = project.routes
    mappings = project.mappings
    if mappings is None:
        raise ConfigError([Problem(shown_path(root / "mappings"), 0, 0, "", "no mappings/ directory: workers "
                                   "need the mappings routes.yaml names")])
    url = settings.resolved_database_url(root)
    engine = db.make_engine(url, pool_size=2, writer=db.is_sqlite(url), custom_plans=True)

    def map_message(name: str, msg: Message, context: dict[str, Any]) -> Any:
        ctx = mappings.context(context["channel"], context["timezone"], control_id=context["control_id"],
                               sending_facility=context["sending_facility"],
                               message_type=context.get("message_type", ""))
        mapped = mappings.get(name).apply(msg, ctx)
        for warning in ctx.warnings:
            log.warning("value skipped by the mapping", mapping=name, detail=warning[:200])
        return mapped

    def apply_facts(conn: Any, mapped: Any, uid: str, received_at: Any) -> int:
        result = apply(conn, mapped, message_uid=uid, received_at=received_at)
        return result.inserted + result.updated

    def apply_many(conn: Any, items: list[tuple[Any, str, Any]]) -> list[int]:
        return [r.inserted + r.updated for r in apply_wave(conn, items)]

    timezones = {ch.name: str(ch.config.timezone) for ch in project.channels}
    validated = frozenset(ch.name for ch in project.channels if ch.config.validation == "hl7apy")
    # on SQLite, reads before the write transaction go through an engine that does not take the write lock
    reader = db.make_engine(url, pool_size=1) if db.is_sqlite(url) else None
    processor = Processor(engine, Router(routes), map_message, apply_facts, timezones, validated, apply_many, reader)
    processor.notify_channels = frozenset(ch.name for ch in project.channels if ch.config.ack.after == "processed")
    appacks = AppAcks((ch.name, ch.config) for ch in project.channels)
    processor.appacks = appacks if appacks else None
    forwards = Forwards(routes)
    processor.forwards = forwards if forwards else None
    return processor


def work(root: Path, settings: Settings, index: int, count: int, stop: threading.Event,
         reports: Any = None) -> None:
    """One worker process's loop; its metrics go to ``reports`` (the parent's queue), if given."""
    from engine.worker.sources import run_db_queue, run_rabbit

    processor = build_processor(root, settings)
    processor.reporter = Reporter(reports, f"{os.getpid()}-{time.time_ns()}")
    processor.reporter.start()
    tune_gc()
    log.info("worker started", index=index, of=count, queue="rabbitmq" if settings.broker_url else "database",
             build=accel.report(log))
    try:
        if settings.broker_url:
            from engine.worker.members import Membership

            members = Membership(processor.engine, settings.queue_partitions)
            try:
                run_rabbit(processor, processor.engine, settings.broker_url, settings.queue_name, members.beat, stop,
                           declare=settings.queue_partitions)
            finally:
                members.leave()
        else:
            run_db_queue(processor, processor.engine, stop, index=index, count=count)
    finally:
        processor.reporter.stop()
        processor.engine.dispose()
        log.info("worker stopped", index=index)


def _child(root: str, settings: dict[str, Any], index: int, count: int, reports: Any = None) -> None:
    s = Settings(**settings)
    configure_logging(s.log_level, s.log_format)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    work(Path(root), s, index, count, stop, reports)


def start_workers(root: Path, settings: Settings, count: int) -> list[multiprocessing.process.BaseProcess]:
    """Start ``count`` worker processes (spawned: nothing of the parent's state is shared)."""
    return [_spawn(root, settings, i, count) for i in range(count)]


def _spawn(root: Path, settings: Settings, index: int, count: int) -> multiprocessing.process.BaseProcess:
    """Start worker process ``index`` of ``count``, reporting its metrics to this process."""
    p = multiprocessing.get_context("spawn").Process(
        target=_child, args=(str(root), settings.model_dump(), index, count, worker_reports()),
        name=f"hl7engine-worker-{index}")
    p.start()
    return p


_reports: Any = None


def worker_reports() -> Any:
    """The queue on which this process's workers report their metrics; the first call creates it,
    registers the workers' metrics with this process's /metrics and starts reading reports."""
    global _reports
    if _reports is None:
        from prometheus_client import REGISTRY

        _reports = multiprocessing.get_context("spawn").Queue(maxsize=10_000)
        REGISTRY.register(WORKERS)
        threading.Thread(target=WORKERS.drain, args=(_reports, threading.Event()), name="worker-reports",
                         daemon=True).start()
    return _reports


def stop_workers(procs: list[multiprocessing.process.BaseProcess], timeout: float = 30) -> None:
    for p in procs:
        if p.is_alive() and p.pid is not None:
            p.terminate()  # SIGTERM: finish the message in hand
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()


def serve_workers(root: Path, settings: Settings, count: int) -> None:
    """Run workers until SIGTERM/SIGINT; restart any that dies."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    db.upgrade(settings.resolved_database_url(root))
    procs = start_workers(root, settings, count)
    try:
        while not stop.wait(1.0):
            for i, p in enumerate(procs):
                if not p.is_alive():
                    log.warning("worker exited; starting a new one", index=i, exitcode=p.exitcode)
                    procs[i] = _spawn(root, settings, i, count)
    finally:
        stop_workers(procs)
