"""HL7 batches (FHS/BHS ... BTS/FTS): split a batch into its messages and build the batch response.

The response is a batch of its own: FHS (when the sender sent one), BHS with BHS-12 naming the
sender's BHS-11, one ACK message for each message that was *not* accepted, BTS-1 counting those
ACK messages, FTS. A batch in which every message was accepted gets an empty response batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from engine.errors import HL7Error
from engine.hl7.ack import escape
from engine.hl7.charsets import decode
from engine.hl7.header import Delimiters, message_start, read_delimiters


@dataclass(slots=True)
class Envelope:
    """An FHS or BHS segment: its fields numbered as in the standard (fields[3] = FHS-3)."""

    delimiters: Delimiters
    fields: list[str]

    def get(self, n: int) -> str:
        return self.fields[n] if n < len(self.fields) else ""


@dataclass(slots=True)
class Batch:
    file_header: Envelope | None
    batch_header: Envelope | None
    messages: list[bytes] = field(default_factory=list)
    declared_count: int | None = None  # BTS-1
    stray_segments: int = 0  # segments outside any message (before the first MSH)

    @property
    def control_id(self) -> str:
        for env, n in ((self.batch_header, 11), (self.file_header, 11)):
            if env is not None and env.get(n):
                return env.get(n)
        return ""


def is_batch(raw: bytes) -> bool:
    start = message_start(raw)
    return raw.startswith((b"FHS", b"BHS"), start)


def _segments(raw: bytes) -> list[tuple[int, int]]:
    """(start, end) of each non-empty segment; end excludes the terminator (CR, LF or CRLF)."""
    out: list[tuple[int, int]] = []
    i = message_start(raw)
    n = len(raw)
    while i < n:
        j = i
        while j < n and raw[j] not in (13, 10):
            j += 1
        if raw[i:j].strip():
            out.append((i, j))
        while j < n and raw[j] in (13, 10):
            j += 1
        i = j
    return out


def _envelope(seg: bytes, codec: str) -> Envelope:
    d = read_delimiters(seg)
    values = decode(seg, codec).split(d.field)
    return Envelope(d, [values[0], d.field, *values[1:]])


def split_batch(raw: bytes, codec: str) -> Batch:
    """Split a batch frame. Raises HL7Error when the envelope itself is unusable."""
    fhs: Envelope | None = None
    bhs: Envelope | None = None
    batch = Batch(None, None)
    msg_start: int | None = None
    for start, end in _segments(raw):
        seg_id = raw[start:start + 3]
        if seg_id in (b"FHS", b"BHS", b"BTS", b"FTS"):
            if msg_start is not None:
                batch.messages.append(raw[msg_start:start])
                msg_start = None
            if seg_id == b"FHS":
                fhs = _envelope(raw[start:end], codec)
            elif seg_id == b"BHS":
                bhs = _envelope(raw[start:end], codec)
            elif seg_id == b"BTS":
                d = (bhs or fhs or Envelope(Delimiters(), [])).delimiters
                count = raw[start:end].decode("latin-1").split(d.field)[1:2]
                text = count[0].strip() if count else ""
                if text:
                    if not (text.isascii() and text.isdigit()):
                        raise HL7Error("102", "BAD_BATCH", f"BTS-1 batch message count {text!r} is not a number",
                                       "BTS^1^1")
                    batch.declared_count = int(text)
        elif seg_id == b"MSH":
            if msg_start is not None:
                batch.messages.append(raw[msg_start:start])
            msg_start = start
        elif msg_start is None:
            batch.stray_segments += 1
    if msg_start is not None:
        batch.messages.append(raw[msg_start:])
    batch.file_header, batch.batch_header = fhs, bhs
    if fhs is None and bhs is None:
        raise HL7Error("100", "BAD_BATCH", "batch has no FHS or BHS segment", "BHS^1")
    return batch


def batch_response(
    batch: Batch,
    acks: list[str],
    *,
    comment: str,
    clock: Callable[[], str],
    control_ids: Callable[[], str],
    application: str,
    facility: str,
) -> str:
    """The response batch: envelope segments around the ACK messages (text, CR-terminated)."""
    env = batch.batch_header or batch.file_header
    d = env.delimiters if env is not None else Delimiters()
    f = d.field
    out: list[str] = []

    def header(seg_id: str, e: Envelope) -> str:
        return f.join([
            seg_id, d.encoding,
            e.get(5) or application, e.get(6) or facility, e.get(3), e.get(4),
            clock(), "", "", escape(comment, d) if seg_id == "BHS" else "", control_ids(), e.get(11),
        ])

    if batch.file_header is not None:
        out.append(header("FHS", batch.file_header))
    out.append(header("BHS", batch.batch_header or batch.file_header or Envelope(d, [])))
    body = "".join(acks)
    trailer = [f"BTS{f}{len(acks)}{f}{escape(comment, d)}"]
    if batch.file_header is not None:
        trailer.append(f"FTS{f}1")
    return "\r".join(out) + "\r" + body + "\r".join(trailer) + "\r"
