"""RabbitMQ hand-off with publisher confirms.

Topology: a durable direct exchange ``<name>`` and one durable queue per partition,
``<name>.p<N>`` (quorum where the broker supports it, else classic durable), each with
``x-single-active-consumer`` so one worker at a time applies a partition's messages in order.
Messages are published persistent and ``mandatory`` (an unroutable message fails the batch
instead of vanishing). ``publish`` returns only when the broker has confirmed every message.

pika is not thread-safe: one thread owns the connection and its I/O loop; callers hand it batches
with ``add_callback_threadsafe`` and wait for (or are notified of) the confirms. In the engine the
store writer's ``RabbitQueue`` feeds it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pika
from pika.adapters.select_connection import SelectConnection
from pika.exceptions import AMQPError, ChannelClosedByBroker
from sqlalchemy import Connection

from engine.errors import UnavailableError
from engine.intake.item import Record
from engine.observe import get_logger

log = get_logger("engine.queue")

DEAD_LETTER_SUFFIX = ".dead"


def queue_name(name: str, partition: int) -> str:
    return f"{name}.p{partition}"


def queue_names(name: str, partitions: int) -> list[str]:
    return [queue_name(name, i) for i in range(partitions)]


def connection_parameters(url: str) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.heartbeat = 30
    params.blocked_connection_timeout = 30
    params.connection_attempts = 1
    params.socket_timeout = 3
    params.stack_timeout = 5
    params.client_properties = {"connection_name": "hl7engine"}
    return params


def keeps_bodies_in_memory(version: str) -> bool:
    """Whether a RabbitMQ of this version keeps every message of a quorum queue in memory, unless
    the queue says ``x-max-in-memory-length`` (before 3.12; since then bodies are on disk only and
    the argument is deprecated)."""
    parts = version.split(".")
    try:
        major, minor = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return False
    return (major, minor) < (3, 12)


def _broker_version(conn: pika.BlockingConnection) -> str:
    props = getattr(conn._impl, "server_properties", None) or {}  # where pika keeps connection.start's table
    version = props.get("version", "")
    return version.decode("utf-8", "replace") if isinstance(version, bytes) else str(version)


def declare_topology(url: str, name: str, partitions: int) -> str:
    """Declare exchange, partition queues and bindings (idempotent). Returns the queue type used.

    Quorum queues on a RabbitMQ before 3.12 are declared with ``x-max-in-memory-length: 0``: such
    a broker otherwise keeps every waiting message in memory, so a backlog (workers stopped, the
    record's database down) grows its memory until the memory alarm blocks every publisher, i.e.
    every listener (measured in docs/architecture.md). A queue that exists already with other
    arguments is used as it is (a policy can set the limit on it)."""
    conn = pika.BlockingConnection(connection_parameters(url))
    try:
        extra: dict[str, Any] = {}
        if keeps_bodies_in_memory(_broker_version(conn)):
            extra["x-max-in-memory-length"] = 0
        ch = conn.channel()
        ch.exchange_declare(name, exchange_type="direct", durable=True)
        ch.exchange_declare(name + DEAD_LETTER_SUFFIX, exchange_type="fanout", durable=True)
        kept: list[str] = []
        ch, existing = _declare(conn, ch, name + DEAD_LETTER_SUFFIX, {"x-queue-type": "quorum", **extra})
        if existing is False:
            ch.queue_declare(name + DEAD_LETTER_SUFFIX, durable=True)
        elif existing:
            kept.append(name + DEAD_LETTER_SUFFIX)
        ch.queue_bind(name + DEAD_LETTER_SUFFIX, name + DEAD_LETTER_SUFFIX)
        kind = "quorum"
        for i, q in enumerate(queue_names(name, partitions)):
            args = {"x-single-active-consumer": True, "x-dead-letter-exchange": name + DEAD_LETTER_SUFFIX}
            if kind == "quorum":
                ch, existing = _declare(conn, ch, q, {**args, "x-queue-type": kind, **extra})
                if existing is False:  # not declarable as a quorum queue, and not there: a classic broker
                    kind = "classic"
                elif existing:
                    kept.append(q)
            if kind == "classic":
                ch.queue_declare(q, durable=True, arguments={**args, "x-queue-type": kind})
            ch.queue_bind(q, name, routing_key=str(i))
        if kept:
            log.warning("queues declared earlier with other arguments are used as they are", queues=len(kept),
                        first=kept[0], hint=("unless a policy sets max-in-memory-length, this RabbitMQ keeps "
                                             "their waiting messages in memory: see docs/scale-out.md")
                        if extra else "")
        return kind
    finally:
        conn.close()


def _declare(conn: pika.BlockingConnection, ch: Any, queue: str, args: dict[str, Any]) -> tuple[Any, bool | None]:
    """Declare ``queue`` durable with ``args``. If the broker refuses them (406: it exists with other
    arguments, or another type; 540: no quorum queues here), an existing queue is kept as it is.
    Returns the channel to go on with (a refusal closes it) and None when the declare succeeded,
    True when an existing queue was kept, False when the queue does not exist (to try another type)."""
    try:
        ch.queue_declare(queue, durable=True, arguments=args)
        return ch, None
    except ChannelClosedByBroker as exc:
        if exc.reply_code not in (406, 540):
            raise
        refusal = exc.reply_text
    ch = conn.channel()
    try:
        ch.queue_declare(queue, passive=True)
    except ChannelClosedByBroker:
        return conn.channel(), False
    log.debug("queue exists with other arguments", queue=queue, broker=refusal[:200])
    return ch, True


def queue_depths(url: str, name: str, partitions: int) -> list[tuple[str, int]]:
    """Ready messages in each partition queue (``p0``…) and in the dead-letter queue (``dead``), by
    passive declares on a short-lived connection. Raises when the broker does not answer or a queue
    does not exist (the listeners and workers declare them when they start)."""
    conn = pika.BlockingConnection(connection_parameters(url))
    try:
        ch = conn.channel()
        depths = [(f"p{i}", int(ch.queue_declare(q, passive=True).method.message_count))
                  for i, q in enumerate(queue_names(name, partitions))]
        dead = ch.queue_declare(name + DEAD_LETTER_SUFFIX, passive=True)
        depths.append(("dead", int(dead.method.message_count)))
        return depths
    finally:
        conn.close()


class _Batch:
    __slots__ = ("error", "event", "notify", "remaining")

    def __init__(self, n: int, notify: Callable[[_Batch], None] | None = None) -> None:
        self.remaining = n
        self.error = ""
        self.event = threading.Event()
        self.notify = notify

    def confirm(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self._done()

    def fail(self, reason: str) -> None:
        if not self.error:
            self.error = reason
        self._done()

    def _done(self) -> None:
        if not self.event.is_set():
            self.event.set()
            if self.notify is not None:
                self.notify(self)


class _CoalescingConnection(SelectConnection):  # type: ignore[misc]  # pika is untyped
    """A SelectConnection that can hold back the frames of several publishes and hand them to the
    socket as one buffer: pika writes every frame (method, header, body: three per message) with
    its own ``send`` call, so a batch of 30 messages cost 90 system calls."""

    _held: list[bytes] | None = None

    def _adapter_emit_data(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
        else:
            super()._adapter_emit_data(data)

    def hold(self) -> None:
        self._held = []

    def release(self) -> None:
        held, self._held = self._held, None
        if held:
            super()._adapter_emit_data(b"".join(held))


class RabbitPublisher:
    """Owns one AMQP connection in its own thread; reconnects by itself with backoff."""

    def __init__(self, url: str, exchange: str, *, max_delay: float = 10.0) -> None:
        self.url = url
        self.exchange = exchange
        self.max_delay = max_delay
        self.last_error = "not connected yet"
        self._params = connection_parameters(url)
        self._conn: _CoalescingConnection | None = None
        self._channel: Any = None
        self._ready = threading.Event()
        self._stopping = False
        self._opened = False  # the current connection got as far as confirm mode
        self._lock = threading.Lock()
        self._waiting: set[_Batch] = set()  # handed to the I/O thread, not yet confirmed or failed
        self._tags: dict[int, tuple[_Batch, str]] = {}  # delivery tag -> (batch, message uid)
        self._order: deque[int] = deque()
        self._by_uid: dict[str, _Batch] = {}
        self._next_tag = 0
        self._thread = threading.Thread(target=self._run, name="amqp-publisher", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def publish(self, messages: list[tuple[str, bytes, pika.BasicProperties]], timeout: float) -> None:
        """Publish and wait for every confirm; raise UnavailableError on nack, return or timeout."""
        self.wait(self.send(messages), timeout)

    def send(self, messages: list[tuple[str, bytes, pika.BasicProperties]],
             notify: Callable[[_Batch], None] | None = None) -> _Batch:
        """Hand ``messages`` to the I/O thread for publishing; ``wait`` for their confirms later.
        ``notify(batch)`` is called (in the I/O thread) once every confirm is in or the batch failed."""
        batch = _Batch(len(messages), notify)
        if not messages:
            batch._done()
            return batch
        conn = self._conn
        if conn is None or not self._ready.is_set():
            raise UnavailableError("broker", self.last_error)
        with self._lock:
            self._waiting.add(batch)
        try:
            conn.ioloop.add_callback_threadsafe(lambda: self._publish(batch, messages))
        except Exception as exc:  # the loop is closing
            batch.fail(f"connection closing: {exc}")
        return batch

    def wait(self, batch: _Batch, timeout: float) -> None:
        """Wait for every confirm of ``batch``; raise UnavailableError on nack, return or timeout."""
        ok = batch.event.wait(max(timeout, 0.001))
        with self._lock:
            self._waiting.discard(batch)
        if not ok:
            raise UnavailableError("broker", f"no publisher confirm within {timeout:.1f}s")
        if batch.error:
            raise UnavailableError("broker", batch.error)

    def close(self) -> None:
        self._stopping = True
        conn = self._conn
        if conn is not None:
            try:
                conn.ioloop.add_callback_threadsafe(self._close_now)
            except Exception:
                log.debug("broker connection already closed")
        self._thread.join(timeout=10)

    # -- I/O thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.2
        while True:
            self._opened = False
            try:
                self._conn = _CoalescingConnection(
                    self._params,
                    on_open_callback=self._on_open,
                    on_open_error_callback=self._on_open_error,
                    on_close_callback=self._on_closed,
                )
                self._conn.ioloop.start()
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("broker connection failed", error=self.last_error)
            self._ready.clear()
            self._fail_all(self.last_error)
            if self._stopping:
                return
            delay = 0.2 if self._opened else min(delay * 2, self.max_delay)
            time.sleep(delay)

    def _on_open(self, conn: SelectConnection) -> None:
        conn.channel(on_open_callback=self._on_channel_open)

    def _on_open_error(self, conn: SelectConnection, err: BaseException | str) -> None:
        self.last_error = f"cannot connect to broker: {err}"
        log.warning("broker unreachable", error=str(err))
        conn.ioloop.stop()

    def _on_closed(self, conn: SelectConnection, reason: BaseException) -> None:
        self._ready.clear()
        if not self._stopping:
            self.last_error = f"broker connection lost: {reason}"
            log.warning("broker connection lost", reason=str(reason))
        self._fail_all(self.last_error)
        conn.ioloop.stop()

    def _on_channel_open(self, channel: Any) -> None:
        self._channel = channel
        self._next_tag = 0
        self._tags.clear()
        self._order.clear()
        self._by_uid.clear()
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_ok)

    def _on_confirm_ok(self, _frame: Any) -> None:
        self._opened = True
        self.last_error = ""
        self._ready.set()
        log.info("broker connected", exchange=self.exchange)

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        self._ready.clear()
        self.last_error = f"broker channel closed: {reason}"
        self._fail_all(self.last_error)
        conn = self._conn
        if conn is not None and conn.is_open and not self._stopping:
            conn.close()

    def _publish(self, batch: _Batch, messages: list[tuple[str, bytes, pika.BasicProperties]]) -> None:
        ch = self._channel
        if ch is None or not ch.is_open or not self._ready.is_set():
            batch.fail(self.last_error or "broker channel not open")
            return
        conn = self._conn
        if conn is not None:
            conn.hold()
        try:
            for routing_key, body, props in messages:
                ch.basic_publish(self.exchange, routing_key, body, props, mandatory=True)
                self._next_tag += 1
                uid = props.message_id or ""
                self._tags[self._next_tag] = (batch, uid)
                self._order.append(self._next_tag)
                self._by_uid[uid] = batch
        except AMQPError as exc:
            batch.fail(f"publish failed: {exc}")
        finally:
            if conn is not None:
                conn.release()

    def _on_return(self, _ch: Any, method: Any, props: Any, _body: bytes) -> None:
        batch = self._by_uid.get(props.message_id or "")
        if batch is not None:
            batch.fail(f"broker returned the message ({method.reply_text}): no queue bound for its partition")

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        positive = isinstance(method, pika.spec.Basic.Ack)
        if method.multiple:
            done = []
            while self._order and self._order[0] <= tag:
                done.append(self._order.popleft())
        else:
            done = [tag]
        for t in done:
            entry = self._tags.pop(t, None)
            if entry is None:
                continue
            batch, uid = entry
            self._by_uid.pop(uid, None)
            if positive:
                batch.confirm()
            else:
                batch.fail("broker refused the message (nack)")
        while self._order and self._order[0] not in self._tags:
            self._order.popleft()

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            waiting = list(self._waiting)
        for batch in waiting:
            batch.fail(reason or "broker connection lost")
        self._tags.clear()
        self._order.clear()
        self._by_uid.clear()

    def _close_now(self) -> None:
        conn = self._conn
        if conn is not None and conn.is_open:
            conn.close()
        elif conn is not None:
            conn.ioloop.stop()


class RabbitQueue:
    """Enqueuer for the store writer: publishes accepted messages inside the store transaction.

    ``wakeup_fd`` becomes readable when a batch's confirms are in (or it failed), so the writer can
    wait for its socket and the broker at once. (Running the publisher in a process of its own was
    measured: on two cores the extra process cost more than the interpreter lock it freed.)
    """

    name = "rabbitmq"
    depth = 4  # transactions kept open while their confirms travel

    def __init__(self, publisher: RabbitPublisher) -> None:
        self.publisher = publisher
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    @property
    def wakeup_fd(self) -> int:
        return self._r

    def _wake(self, _batch: _Batch) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._w, b"!")

    def drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._r, 4096):
                pass

    def ready(self, handle: object) -> bool:
        assert isinstance(handle, _Batch)
        return handle.event.is_set()

    def start(self, records: list[Record], deadline: float) -> object:
        """Publish now (the broker works while other transactions go on); ``finish`` waits for the confirms."""
        return self.publisher.send(messages(records), self._wake)

    def finish(self, conn: Connection, started: object, records: list[Record], deadline: float) -> None:
        assert isinstance(started, _Batch)
        self.publisher.wait(started, deadline - time.time())

    def close(self) -> None:
        self.publisher.close()
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


def messages(records: list[Record]) -> list[tuple[str, bytes, pika.BasicProperties]]:
    """What is published for each accepted message: routing key (its partition), body, properties."""
    return [
        (str(r.partition), r.raw, pika.BasicProperties(
            delivery_mode=2,
            message_id=r.uid,
            timestamp=int(r.received_at.timestamp()),
            content_type="application/hl7-v2",
            content_encoding=r.charset,
            type=r.type_label,
            headers={
                "channel": r.channel,
                "control_id": r.control_id or "",
                "sending_facility": r.sending_facility or "",
                "received_at": r.received_at.isoformat(),
                "partition": r.partition,
                "batch_uid": r.batch_uid or "",
            },
        ))
        for r in records
    ]
