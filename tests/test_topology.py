"""The RabbitMQ topology: partition queues, their arguments, and queues declared earlier."""

from __future__ import annotations

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker
from structlog.testing import capture_logs

from engine.queue.rabbitmq import (
    DEAD_LETTER_SUFFIX,
    RabbitPublisher,
    _broker_version,
    declare_topology,
    keeps_bodies_in_memory,
    queue_depths,
    queue_names,
)


@pytest.mark.parametrize(("version", "expected"), [
    ("3.8.9", True), ("3.10.8", True), ("3.11.28", True),
    ("3.12.0", False), ("3.13.7", False), ("4.1.2", False), ("10.0", False),
    ("", False), ("unknown", False), ("4", False),
])
def test_which_brokers_keep_quorum_queue_bodies_in_memory(version: str, expected: bool) -> None:
    assert keeps_bodies_in_memory(version) is expected


def _partition_args(name: str) -> dict[str, object]:
    return {"x-single-active-consumer": True, "x-dead-letter-exchange": name + DEAD_LETTER_SUFFIX,
            "x-queue-type": "quorum"}


def _redeclare(url: str, queue: str, args: dict[str, object]) -> int:
    """Declare ``queue`` again with ``args``: 0 when the broker agrees they are its arguments,
    else the reply code (406 when they differ)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().queue_declare(queue, durable=True, arguments=args)
        return 0
    except ChannelClosedByBroker as exc:
        return int(exc.reply_code)
    finally:
        if conn.is_open:
            conn.close()


def test_quorum_queues_keep_bodies_on_disk_on_older_brokers(rabbitmq_url: str, queue_name: str) -> None:
    """Before RabbitMQ 3.12 the partition and dead-letter queues get ``x-max-in-memory-length: 0``
    (a backlog must not fill the broker's memory); later brokers keep bodies on disk anyway and get
    the arguments they always had."""
    assert declare_topology(rabbitmq_url, queue_name, 2) == "quorum"
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    version = _broker_version(conn)
    conn.close()
    assert version, "the broker names its version"
    limit = {"x-max-in-memory-length": 0} if keeps_bodies_in_memory(version) else {}
    for q in queue_names(queue_name, 2):
        assert _redeclare(rabbitmq_url, q, {**_partition_args(queue_name), **limit}) == 0
    assert _redeclare(rabbitmq_url, queue_name + DEAD_LETTER_SUFFIX, {"x-queue-type": "quorum", **limit}) == 0
    if limit:  # the broker holds the declared arguments, not merely accepts anything
        assert _redeclare(rabbitmq_url, queue_names(queue_name, 2)[0], _partition_args(queue_name)) == 406


def test_queues_declared_earlier_with_other_arguments_are_used_as_they_are(
        rabbitmq_url: str, queue_name: str) -> None:
    """An existing deployment's queues (declared before the in-memory limit) are kept: the engine
    starts, publishes and counts on them, and they keep their arguments."""
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    ch = conn.channel()
    ch.queue_declare(queue_name + DEAD_LETTER_SUFFIX, durable=True, arguments={"x-queue-type": "quorum"})
    for q in queue_names(queue_name, 2):
        ch.queue_declare(q, durable=True, arguments=_partition_args(queue_name))
    ch.basic_publish("", queue_names(queue_name, 2)[0], b"already waiting")
    conn.close()

    with capture_logs() as logs:
        assert declare_topology(rabbitmq_url, queue_name, 2) == "quorum"
    assert declare_topology(rabbitmq_url, queue_name, 2) == "quorum", "idempotent"
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    older = keeps_bodies_in_memory(_broker_version(conn))
    conn.close()
    warnings = [e for e in logs if e["log_level"] == "warning"]
    if older:  # the new arguments differ from the old ones only on such a broker
        assert len(warnings) == 1, "one line per start, not one per queue"
        assert warnings[0]["queues"] == 3 and "max-in-memory-length" in warnings[0]["hint"]
    else:
        assert warnings == []
    for q in queue_names(queue_name, 2):
        assert _redeclare(rabbitmq_url, q, _partition_args(queue_name)) == 0, "its arguments are unchanged"
    publisher = RabbitPublisher(rabbitmq_url, queue_name)
    try:
        assert publisher.wait_connected(10)
        publisher.publish([("1", b"new", pika.BasicProperties(delivery_mode=2, message_id="m1"))], 10)
    finally:
        publisher.close()
    assert queue_depths(rabbitmq_url, queue_name, 2) == [("p0", 1), ("p1", 1), ("dead", 0)]
