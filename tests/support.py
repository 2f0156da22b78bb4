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
