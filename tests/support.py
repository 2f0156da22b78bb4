"""Helpers for integration tests: an independent view of messages and ACKs (python-hl7), the store
and the queue contents."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any

import hl7
from sqlalchemy import create_engine, text

BOM = b"\xef\xbb\xbf"


def python_codec(raw: bytes, default: str = "utf-8") -> str:
    """The character set of a message, read independently of the engine (MSH-18, first MSH only)."""
    start = raw.find(b"MSH")
    seg = raw[start:].split(b"\r")[0].split(b"\n")[0]
    if len(seg) < 4:
        return default
    fields = seg.split(seg[3:4])
    value = fields[17].decode("ascii", "replace").upper() if len(fields) > 17 else ""
    if "IR87" in value.replace(" ", ""):
        return "iso2022_jp"
    if "8859/1" in value:
        return "latin-1"
    if "UTF-8" in value or value == "UNICODE":
        return "utf-8"
    if value == "ASCII":
        return "ascii"
    return default


def parse(raw: bytes, codec: str | None = None) -> hl7.Message:
    """python-hl7's view of a message: BOM and leading whitespace removed, segments split on CR."""
    data = raw[3:] if raw.startswith(BOM) else raw
    data = data.lstrip(b"\r\n \t")
    text_ = data.decode(codec or python_codec(raw), "replace").replace("\r\n", "\r").replace("\n", "\r")
    segments = [s for s in text_.split("\r") if s.strip()]
    return hl7.parse("\r".join(segments))


def msh_field(msg: hl7.Message, n: int) -> str:
    """MSH-n as text, the way python-hl7 numbers it (MSH-1 is the field separator)."""
    msh = msg.segment("MSH")
    try:
        return str(msh(n))
    except (IndexError, KeyError):
        return ""


@dataclass
class Ack:
    code: str
    control_id: str
    msh: list[str]
    err_codes: list[str]
    raw: bytes


def read_ack(answer: bytes, codec: str = "utf-8") -> Ack:
    msg = parse(answer, codec)
    msa = msg.segment("MSA")
    errs = []
    for seg in msg:
        if str(seg[0]) == "ERR":
            try:
                errs.append(str(seg(3)(1)(1)))
            except (IndexError, KeyError):
                errs.append("")
    msh = [msh_field(msg, n) for n in range(0, 19)]
    return Ack(str(msa(1)), str(msa(2)) if len(msa) > 2 else "", msh, errs, answer)


def codec_name(name: str) -> str:
    return codecs.lookup(name).name


def store_rows(url: str) -> list[dict[str, Any]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text("SELECT * FROM messages ORDER BY id"))]
    finally:
        engine.dispose()


def queue_rows(url: str) -> list[dict[str, Any]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text("SELECT * FROM queue_entries ORDER BY id"))]
    finally:
        engine.dispose()


def drain_rabbit(url: str, name: str, partitions: int) -> list[tuple[str, bytes, dict[str, Any]]]:
    """Every message waiting in the engine's partition queues: (message_id, body, headers)."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    out = []
    try:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=500)
        for i in range(partitions):
            for method, props, body in ch.consume(f"{name}.p{i}", inactivity_timeout=1.0):
                if method is None:
                    break
                out.append((props.message_id, body, dict(props.headers or {})))
                ch.basic_ack(method.delivery_tag)
            ch.cancel()
    finally:
        conn.close()
    return out


class TcpProxy:
    """A TCP proxy a test can cut (listener closed, every connection dropped) and restore on the
    same port: a service outage without touching the real service."""

    def __init__(self, target: tuple[str, int]) -> None:
        import socket
        import threading

        self.target = target
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.restore()

    def restore(self) -> None:
        import socket
        import threading

        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(64)
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def _accept(self, lst: Any) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: Any, b: Any) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass

    def cut(self) -> None:
        import socket

        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.cut()


def downgrade(url: str, revision: str) -> None:
    """Apply the store's migrations down to ``revision`` (tests of a migration both ways)."""
    from alembic import command

    from engine.store import db

    engine = db.make_engine(url)
    try:
        with engine.begin() as conn:
            cfg = db.alembic_config(url)
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)
    finally:
        engine.dispose()
