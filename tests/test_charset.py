"""Character sets: decode by MSH-18, else the channel's charset; keep the original bytes; answer in
the sender's charset; a Cyrillic PID-5 reaches the store intact."""

from __future__ import annotations

import json
import subprocess
import sys

from engine.mllp.client import MLLPClient
from tests.conftest import Backend, store_url
from tests.support import store_rows

NAME = "ИВАНОВА^АННА^ПЕТРОВНА"
FACILITY = "ГКБ №1"


def cyrillic(cid: str, msh18: str = "") -> str:
    return (f"MSH|^~\\&|ЛИС|{FACILITY}|HL7ENGINE|CENTRAL|20261122101500||ADT^A01^ADT_A01|{cid}|P|2.5"
            f"||||||{msh18}\rPID|1||770101^^^ГКБ1^MR||{NAME}||19770101|F\r")


def test_cyrillic_in_windows_1251_and_utf8(backend: Backend, engine_factory) -> None:
    engine = engine_factory(backend, channel_extra="charset: windows-1251\n")
    cp = cyrillic("CP1251-1").encode("cp1251")
    utf = cyrillic("UTF8-1", "UNICODE UTF-8").encode("utf-8")
    with MLLPClient(*engine.address) as client:
        ack_cp = client.send(cp)
        ack_utf = client.send(utf)
    assert ack_cp is not None and ack_utf is not None
    # answered in the sender's character set: the Cyrillic facility comes back in the same encoding
    assert f"|{FACILITY}|".encode("cp1251") in ack_cp and b"MSA|AA|CP1251-1" in ack_cp
    assert f"|{FACILITY}|".encode() in ack_utf and b"MSA|AA|UTF8-1" in ack_utf
    assert ack_utf.decode("utf-8")  # valid UTF-8
    rows = {r["control_id"]: r for r in store_rows(store_url(engine))}
    r1, r2 = rows["CP1251-1"], rows["UTF8-1"]
    assert bytes(r1["raw"]) == cp and bytes(r2["raw"]) == utf, "original bytes kept"
    assert r1["charset"] == "cp1251" and r2["charset"] == "utf-8"
    assert NAME in bytes(r1["raw"]).decode(r1["charset"]) and NAME in bytes(r2["raw"]).decode(r2["charset"])
    assert r1["sending_facility"] == FACILITY == r2["sending_facility"]

    if not backend.services:  # the operator's view shows the names intact
        out = subprocess.run([sys.executable, "-m", "engine.cli", "messages", "show", str(r1["id"]), "--json",
                              "--config", str(engine.config_dir)], capture_output=True, check=True, env=engine.env)
        shown = json.loads(out.stdout)
        assert NAME in shown["raw"] and shown["charset"] == "cp1251"


def test_fields_in_an_unexpected_charset_are_echoed_byte_for_byte(engine_factory) -> None:
    """A UTF-8 message without MSH-18 on a windows-1251 channel: read wrongly, but the ACK still
    echoes the sender's fields byte for byte (0x98 has no meaning in windows-1251)."""
    engine = engine_factory(channel_extra="charset: windows-1251\n")
    utf = cyrillic("MISLABELLED").encode("utf-8")  # "И" is D0 98 in UTF-8
    with MLLPClient(*engine.address) as client:
        ack = client.send(utf)
    assert ack is not None and b"MSA|AA|MISLABELLED" in ack
    assert f"|{FACILITY}|".encode() in ack and "|ЛИС|".encode() in ack
