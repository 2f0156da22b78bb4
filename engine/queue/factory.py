"""Choose the queue hand-off: RabbitMQ when a broker URL is set, else the embedded database queue."""

from __future__ import annotations

import threading
import time

from engine.intake.writer import Enqueuer
from engine.observe import get_logger
from engine.queue.dbqueue import DatabaseQueue
from engine.settings import Settings

log = get_logger("engine.queue")


def make_enqueuer(settings: Settings) -> Enqueuer:
    if not settings.broker_url:
        return DatabaseQueue()
    from engine.queue.rabbitmq import RabbitPublisher, RabbitQueue, declare_topology

    url = settings.broker_url
    publisher = RabbitPublisher(url, settings.queue_name)
    ready = threading.Event()

    def topology() -> None:  # keeps trying until the broker answers; publishing fails (AE) until then
        delay = 0.5
        while not ready.is_set():
            try:
                kind = declare_topology(url, settings.queue_name, settings.queue_partitions)
                log.info("broker topology declared", exchange=settings.queue_name,
                         partitions=settings.queue_partitions, queue_type=kind)
                ready.set()
            except Exception as exc:
                log.warning("broker topology not declared yet", error=str(exc)[:200])
                time.sleep(delay)
                delay = min(delay * 2, 10)

    threading.Thread(target=topology, name="amqp-topology", daemon=True).start()
    ready.wait(5)
    publisher.wait_connected(5)
    return RabbitQueue(publisher)
