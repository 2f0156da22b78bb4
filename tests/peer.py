"""A fake sender's listener for application ACKs: records every frame it gets and answers each with a
commit ACK (CA by default) whose MSA-2 is the frame's MSH-10."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

from engine.mllp.framing import Frame, FrameDecoder, frame


def control_id(payload: bytes) -> str:
    """MSH-10 (segments may end in CR, LF or CRLF, and a UTF-8 byte-order mark may come first, as
    senders send them)."""
    msh = payload.removeprefix(b"\xef\xbb\xbf").replace(b"\n", b"\r").split(b"\r", 1)[0].decode("latin-1")
    fields = msh.split(msh[3]) if len(msh) > 3 else []
    return fields[9] if len(fields) > 9 else ""


def tls_server(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server-side TLS context with a new self-signed certificate for localhost, and that
    certificate's file (the CA a client must trust)."""
    from tests.test_config import self_signed

    cert, key = directory / "peer.crt", directory / "peer.key"
    self_signed(cert, key)  # CN=localhost
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(cert), str(key))
    return server, cert


class Peer:
    def __init__(self, port: int = 0, answer: str = "CA", tls: ssl.SSLContext | None = None,
                 delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay  # seconds before each answer
        self.tls = tls  # CA, CE, CR, "" (answer nothing), "wrong" (MSA-2 of another message)
        self.received: list[bytes] = []
        self.conns: list[socket.socket] = []
        self.sock = socket.create_server(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        self.conns.append(conn)
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError):
                conn.close()
                return
        self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        decoder = FrameDecoder(1 << 20)
        with conn:
            while not self.closed.is_set():
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for ev in decoder.feed(data):
                    if not isinstance(ev, Frame):
                        continue
                    self.received.append(ev.payload)
                    if not self.answer:
                        continue
                    time.sleep(self.delay)
                    cid = "OTHER" if self.answer == "wrong" else control_id(ev.payload)
                    code = "CA" if self.answer == "wrong" else self.answer
                    conn.sendall(frame(f"MSH|^~\\&|LIS|MINSKLAB|HL7ENGINE|CENTRAL|20261206||ACK|K{len(self.received)}"
                                       f"|P|2.5.1\rMSA|{code}|{cid}|peer says {code}\r".encode()))

    def wait(self, n: int, timeout: float = 60) -> list[bytes]:
        deadline = time.time() + timeout
        while len(self.received) < n and time.time() < deadline:
            time.sleep(0.05)
        return list(self.received)

    def close(self) -> None:
        """Stop listening and drop every connection (as a sender's listener that goes away)."""
        self.closed.set()
        for s in [self.sock, *self.conns]:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept() or recv()
            except OSError:
                pass
            s.close()
