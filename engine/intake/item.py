"""One received message on its way to the store and the queue.

``Item`` lives on the event loop (it keeps the parsed MSH to build ACKs). The store writer runs
in its own process and works on ``Record``s: the same message as plain column values, sent over
as a tuple (``Item.wire`` / ``Record.from_wire``).
"""

from __future__ import annotations

import itertools
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import sha256
from typing import Any

from engine.hl7.charsets import clean
from engine.hl7.header import Header

_UID_PREFIX = os.urandom(5).hex()  # per process; with the counter below, unique without a syscall each
_uid_counter = itertools.count(int.from_bytes(os.urandom(3), "big"))


def new_uid() -> str:
    """32 hex digits, time-ordered like UUIDv7: 48-bit milliseconds, 40 random bits chosen once per
    process, a 40-bit counter. Inserts land at the end of the unique index instead of dirtying
    pages all over it, and two processes never produce the same value."""
    return f"{time.time_ns() // 1_000_000:012x}{_UID_PREFIX}{next(_uid_counter) & 0xFFFFFFFFFF:010x}"


@dataclass(slots=True, eq=False)
class Item:
    """A message and what the writer must record for it.

    ``status`` is ``queued`` for a message to accept (the writer turns it into ``duplicate`` for a
    resend) or ``error`` for a refused one, recorded for the operators but never queued. The writer
    reports ``outcome``: accepted, duplicate, recorded (a refused message stored) or failed.
    """

    uid: str
    channel: str
    received_at: float  # epoch seconds
    peer: str
    raw: bytes
    header: Header | None
    status: str
    ack_code: str | None = None
    ack: bytes | None = None
    error_step: str | None = None
    error: str | None = None
    batch_uid: str | None = None
    size: int = 0  # bytes as received; more than len(raw) when only the head of an oversize frame was kept
    # reported by the writer
    outcome: str = ""
    duplicate_of: int | None = None
    failure: str = ""
    failure_service: str = ""

    def __post_init__(self) -> None:
        if not self.size:
            self.size = len(self.raw)

    @property
    def control_id(self) -> str:
        return self.header.control_id if self.header is not None else ""

    @property
    def type_label(self) -> str:
        return self.header.type_label if self.header is not None else ""

    def wire(self) -> tuple[Any, ...]:
        h = self.header
        if h is None:
            head: tuple[Any, ...] = (None,) * 11
            delims = None
        else:
            delims = h.delimiters.field + h.delimiters.encoding
            f = h.fields
            n = len(f)
            c = h.codec
            head = (
                clean(f[3], c) if n > 3 else "", clean(h.sending_facility, c), clean(f[5], c) if n > 5 else "",
                clean(f[6], c) if n > 6 else "", clean(h.message_type, c), clean(h.trigger_event, c),
                clean(h.structure, c), clean(h.control_id, c), clean(h.processing_id, c), clean(h.version, c), c,
            )
        return (self.uid, self.channel, self.received_at, self.peer, *head, self.size,
                self.status, delims, self.raw, self.ack_code, self.ack, self.error_step, self.error,
                self.batch_uid)


class Record:
    """A message as the store writer sees it: column values and the outcome to report."""

    __slots__ = (
        "ack",
        "ack_code",
        "batch_uid",
        "channel",
        "charset",
        "control_id",
        "delimiters",
        "duplicate_of",
        "duplicate_of_uid",
        "error",
        "error_step",
        "failure",
        "failure_service",
        "message_type",
        "outcome",
        "partition",
        "peer",
        "processing_id",
        "raw",
        "received_at",
        "receiving_application",
        "receiving_facility",
        "row",
        "sending_application",
        "sending_facility",
        "sha256",
        "size",
        "status",
        "structure",
        "trigger_event",
        "uid",
        "version",
    )

    def __init__(self, wire: tuple[Any, ...]) -> None:
        (self.uid, self.channel, received, self.peer, self.sending_application, self.sending_facility,
         self.receiving_application, self.receiving_facility, self.message_type, self.trigger_event,
         self.structure, self.control_id, self.processing_id, self.version, self.charset, self.size,
         self.status, self.delimiters, self.raw, self.ack_code, self.ack, self.error_step,
         self.error, self.batch_uid) = wire
        self.received_at = datetime.fromtimestamp(received, UTC)
        self.sha256 = sha256(self.raw).hexdigest()
        self.outcome = ""
        self.duplicate_of: int | None = None
        self.duplicate_of_uid: str | None = None
        self.failure = ""
        self.failure_service = ""
        self.row: tuple[Any, ...] = ()
        self.partition = 0

    @property
    def type_label(self) -> str:
        t, e = self.message_type or "", self.trigger_event or ""
        return f"{t}^{e}" if e else t

    def result(self) -> tuple[str, int | None, str, str]:
        return self.outcome, self.duplicate_of, self.failure, self.failure_service

    def prepare(self, now: Any, t: Callable[[datetime | None], Any], partitions: int) -> None:
        """Build the row for ``messages`` (MESSAGE_COLUMNS order); ``t`` adapts datetimes for the
        driver. Done as jobs arrive, while the previous transaction is still committing."""
        if self.status == "queued" and self.delimiters:
            d = self.delimiters
            self.partition = patient_partition(self.raw, d[0], d[1], d[2], self.sending_facility or "",
                                               self.control_id or "", partitions)
        # header fields cut to their columns' lengths (``v and v[:n]`` keeps None and "" as they are)
        self.row = (
            self.uid,
            self.channel,
            t(self.received_at),
            self.peer,
            self.sending_application and self.sending_application[:250],
            self.sending_facility and self.sending_facility[:250],
            self.receiving_application and self.receiving_application[:250],
            self.receiving_facility and self.receiving_facility[:250],
            self.message_type and self.message_type[:16],
            self.trigger_event and self.trigger_event[:16],
            self.structure and self.structure[:16],
            self.control_id and self.control_id[:199],
            self.processing_id and self.processing_id[:8],
            self.version and self.version[:16],
            self.charset,
            self.size,
            self.sha256,
            self.status == "queued",
            self.status,
            self.duplicate_of,
            self.batch_uid,
            self.partition,
            self.raw,
            self.ack_code,
            self.ack,
            now if self.ack_code else None,
            self.error_step,
            self.error,
            now,
        )


MESSAGE_COLUMNS = (
    "uid", "channel", "received_at", "peer", "sending_application", "sending_facility", "receiving_application",
    "receiving_facility", "message_type", "trigger_event", "structure", "control_id", "processing_id", "version",
    "charset", "size", "sha256", "accepted", "status", "duplicate_of", "batch_uid", "partition", "raw",
    "ack_code", "ack", "acked_at", "error_step", "error", "updated_at",
)


def patient_partition(raw: bytes, field_sep: str, component: str, repetition: str, facility: str,
                      control_id: str, partitions: int) -> int:
    """Stable partition for per-patient ordering: a hash of the sender's patient identifier.

    The key is the first repetition of PID-3 (ID and assigning authority) together with MSH-4, so
    one sender's messages about one patient stay in one partition (applied in arrival order).
    Messages without a PID are spread by their control ID.
    """
    if partitions <= 1:
        return 0
    fs = field_sep.encode("latin-1")
    key = b""
    tag = b"PID" + fs
    i = raw.find(tag)
    while i > 0 and raw[i - 1] not in (13, 10):
        i = raw.find(tag, i + 4)
    if i > 0:
        end = raw.find(fs, i + 4)  # PID-1 ends
        end = raw.find(fs, end + 1) if end >= 0 else -1  # PID-2 ends
        if end >= 0:
            stop = raw.find(fs, end + 1)
            pid3 = raw[end + 1:stop if stop >= 0 else len(raw)]
            pid3 = pid3.split(b"\r", 1)[0].split(b"\n", 1)[0].split(repetition.encode("latin-1"), 1)[0]
            comps = pid3.split(component.encode("latin-1"))
            key = comps[0] + b"^" + (comps[3] if len(comps) > 3 else b"")
    if not key.strip(b"^ "):
        key = control_id.encode("utf-8", "replace")
    key = facility.encode("utf-8", "replace") + b"|" + key
    return zlib.crc32(key) % partitions
