"""MLLP framing: <VT> message <FS><CR> (0x0B ... 0x1C 0x0D), HL7 MLLP release 1.

``FrameDecoder`` is fed whatever bytes the socket gave and returns complete events. It never
holds more than ``max_size`` bytes of one frame: a larger frame is reported as ``Oversize`` with
only its first bytes kept (enough to read the MSH for the reject ACK), and its remaining bytes are
counted and dropped as they arrive.
"""

from __future__ import annotations

from dataclasses import dataclass

START = 0x0B
END = 0x1C
CR = 0x0D
START_B = b"\x0b"
END_B = b"\x1c"
TRAILER = b"\x1c\x0d"


def frame(payload: bytes) -> bytes:
    """Wrap one message (or a batch) in an MLLP block."""
    return START_B + payload + TRAILER


@dataclass(slots=True, frozen=True)
class Frame:
    payload: bytes


@dataclass(slots=True, frozen=True)
class Oversize:
    head: bytes  # the first bytes of the frame, for the reject ACK
    size: int  # the whole frame's size in bytes


@dataclass(slots=True, frozen=True)
class Discarded:
    """Bytes outside any frame (or a frame cut short by a new start block) that were dropped."""

    size: int
    reason: str


Event = Frame | Oversize | Discarded


class FrameDecoder:
    """Incremental MLLP decoder with bounded memory."""

    __slots__ = (
        "_buf",
        "_discarded",
        "_head_size",
        "_in_frame",
        "_oversize",
        "_scan",
        "_size",
        "_skip_cr",
        "max_size",
    )

    def __init__(self, max_size: int, head_size: int = 65536) -> None:
        self.max_size = max_size
        self._head_size = min(head_size, max_size)
        self._buf = bytearray()
        self._in_frame = False
        self._oversize = False
        self._size = 0  # bytes of the current frame seen so far (oversize frames)
        self._scan = 0  # where to continue looking for END in _buf
        self._discarded = 0  # bytes outside frames (other than whitespace), not yet reported
        self._skip_cr = False  # a frame ended with FS as the last byte read; drop the CR if it follows

    @property
    def in_frame(self) -> bool:
        return self._in_frame

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Event]:
        n = len(data)
        # fast path: exactly one whole frame in this read (the usual case on a LAN)
        if (not self._in_frame and not self._skip_cr and n > 3 and data[0] == START
                and data.endswith(TRAILER) and n - 3 <= self.max_size
                and data.find(END_B, 1) == n - 2 and data.find(START_B, 1) < 0):
            return [Frame(data[1:-2])]
        events: list[Event] = []
        pos = 0
        if self._skip_cr and n:
            self._skip_cr = False
            if data[0] == CR:
                pos = 1
        while pos < n:
            if not self._in_frame:
                s = data.find(START_B, pos)
                stop = n if s < 0 else s
                if stop > pos:
                    self._count_outside(data, pos, stop)
                if s < 0:
                    break
                self._flush_discarded(events)
                self._in_frame = True
                self._oversize = False
                self._size = 0
                self._buf.clear()
                self._scan = 0
                pos = s + 1
                continue
            # inside a frame: look for FS (end) and for a stray VT (a new frame before the end)
            e = data.find(END_B, pos)
            chunk_end = n if e < 0 else e
            vt = data.find(START_B, pos, chunk_end)
            if vt >= 0:
                # a new start block before the end: the partial frame is abandoned
                self._append(data, pos, vt)
                events.append(Discarded(self._size, "frame restarted before its end block"))
                self._in_frame = False
                pos = vt
                continue
            self._append(data, pos, chunk_end)
            if e < 0:
                break
            events.append(self._finish())
            pos = e + 1
            if pos < n:
                if data[pos] == CR:
                    pos += 1
            else:
                self._skip_cr = True
        self._flush_discarded(events)
        return events

    def _append(self, data: bytes, start: int, end: int) -> None:
        size = end - start
        if size <= 0:
            return
        self._size += size
        if self._oversize:
            room = self._head_size - len(self._buf)
            if room > 0:
                self._buf += data[start:start + room]
            return
        if self._size > self.max_size:
            self._oversize = True
            room = self._head_size - len(self._buf)
            if room < 0:
                del self._buf[self._head_size:]
            else:
                self._buf += data[start:start + room]
            return
        self._buf += data[start:end]

    def _finish(self) -> Event:
        self._in_frame = False
        payload = bytes(self._buf)
        self._buf.clear()
        if self._oversize:
            self._oversize = False
            return Oversize(payload, self._size)
        return Frame(payload)

    def _count_outside(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if chunk.strip(b"\r\n \t\x00"):  # line ends between frames are common and harmless
            self._discarded += len(chunk)

    def _flush_discarded(self, events: list[Event]) -> None:
        if self._discarded:
            events.append(Discarded(self._discarded, "bytes outside an MLLP frame"))
            self._discarded = 0
