"""A small blocking MLLP client (``hl7engine send``) and the file splitting it uses."""

from __future__ import annotations

import contextlib
import re
import select
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.hl7.header import message_start
from engine.mllp.framing import END_B, START_B, Frame, FrameDecoder, frame

if TYPE_CHECKING:
    from engine.config.models import ClientTLSConfig

_MSH_LINE = re.compile(rb"(?:\r\n|\r|\n)(?=MSH)")


def split_messages(data: bytes) -> list[bytes]:
    """Split the content of a file into what is sent as one frame each.

    - MLLP-framed content (0x0B ... 0x1C): each block as it is;
    - a batch (starts with FHS or BHS): the whole batch as one frame;
    - otherwise one message per MSH line, segments kept with their own terminators (CR, LF, CRLF).
    Empty or whitespace-only pieces are dropped.
    """
    if START_B in data or END_B in data:
        pieces = []
        for block in data.split(END_B):
            start = block.find(START_B)
            body = block[start + 1:] if start >= 0 else block
            if body.strip(b"\r\n \t\x00"):
                pieces.append(body.lstrip(b"\r\n"))
        return pieces
    start = message_start(data)
    if data.startswith((b"FHS", b"BHS"), start):
        return [data]
    pieces = []
    pos = 0
    for m in _MSH_LINE.finditer(data):
        pieces.append(data[pos:m.end()])
        pos = m.end()
    pieces.append(data[pos:])
    return [p for p in pieces if p.strip(b"\r\n \t\x00")]


def to_cr(message: bytes) -> bytes:
    """Segment terminators CRLF and LF turned into CR (the HL7 standard's)."""
    return message.replace(b"\r\n", b"\r").replace(b"\n", b"\r")


@dataclass(slots=True)
class AckSummary:
    """One MSA found in an answer (a batch response can hold several)."""

    code: str
    control_id: str
    text: str


def read_acks(answer: bytes) -> list[AckSummary]:
    """MSA code, MSA-2 and the error text (ERR-8, else MSA-3) of every ACK in an answer."""
    out: list[AckSummary] = []
    text = answer.decode("utf-8", "replace")
    segments = re.split(r"\r\n|\r|\n", text)
    fs = "|"
    current: AckSummary | None = None
    errored = False
    for seg in segments:
        if seg[:3] in ("MSH", "BHS", "FHS") and len(seg) > 3:
            fs = seg[3]
        elif seg.startswith("MSA") and len(seg) > 3:
            f = seg.split(fs)
            current = AckSummary(f[1] if len(f) > 1 else "", f[2] if len(f) > 2 else "", f[3] if len(f) > 3 else "")
            errored = False
            out.append(current)
        elif seg.startswith("ERR") and current is not None:
            f = seg.split(fs)
            if len(f) > 8 and f[8] and not errored:
                current.text = f[8]  # ERR-8 (the user message) over MSA-3; the first ERR wins
                errored = True
    return out


def client_tls_context(tls: ClientTLSConfig | None) -> ssl.SSLContext | None:
    """The context for connecting out with TLS (None: plain TCP); raises ssl.SSLError or OSError
    when a file does not load."""
    if tls is None:
        return None
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None and tls.key_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


class MLLPClient:
    """Send frames one at a time and read each answer."""

    def __init__(self, host: str, port: int, *, timeout: float = 30.0, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=server_hostname or host)
        self.sock = sock
        self.timeout = timeout
        self._decoder = FrameDecoder(64 * 1024 * 1024)
        self._ready: list[bytes] = []

    def __enter__(self) -> MLLPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def alive(self) -> bool:
        """False when the peer has closed the connection (an idle connection a server dropped).
        Reads only what is already there: a frame that came unasked is kept for ``receive``."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        if not readable:
            return True
        self.sock.settimeout(0)
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError):
            return True
        except OSError:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        if not data:
            return False
        self._ready.extend(ev.payload for ev in self._decoder.feed(data) if isinstance(ev, Frame))
        return True

    def write(self, payload: bytes) -> None:
        """Send one frame and read nothing (for a peer that answers nothing)."""
        self.sock.sendall(frame(payload))

    def send(self, payload: bytes, timeout: float | None = None) -> bytes | None:
        """Send one frame; return the answer, or None if none came within ``timeout``."""
        self.sock.sendall(frame(payload))
        return self.receive(timeout)

    def receive(self, timeout: float | None = None) -> bytes | None:
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        while not self._ready:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not data:
                raise ConnectionError("the server closed the connection without answering")
            self._ready.extend(ev.payload for ev in self._decoder.feed(data) if isinstance(ev, Frame))
        return self._ready.pop(0)
