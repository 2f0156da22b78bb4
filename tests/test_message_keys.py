"""Finding stored messages by patient identifier and order number (message_keys).

Unit: which fields give keys. Store: write_keys is idempotent, reindex fills in what no worker
indexed, list_messages filters by them through the index (SQLite and PostgreSQL). Over sockets,
on both backends: the workers index every message they take, failed ones included, and
``hl7engine messages --patient/--order`` finds them."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, insert, select, text

from engine.hl7.message import Message
from engine.mllp.client import MLLPClient
from engine.store.keys import keys_of, parse_query, reindex, search_keys, write_keys
from engine.store.query import MessageFilter, get_message, list_messages
from engine.store.schema import message_keys, messages
from tests.conftest import Backend, CorpusFile, store_url
from tests.test_cli import in_process
from tests.test_e2e import lab, project, wait_processed

ORU = ("MSH|^~\\&|LIS|MINSKLAB|HL7ENGINE|CENTRAL|20261122080000||ORU^R01^ORU_R01|K1|P|2.5.1\r"
       "PID|1|EXT-9|4711^^^MINSKLAB^MR~BY1234567^^^BY^NI~\"\"||DOE^JANE||19800101|F|||||||||||ALT-1^^^OLD\r"
       "ORC|RE|PL-77^CIS|ACC-2026-0001^MINSKLAB\r"
       "OBR|1|PL-77^CIS|ACC-2026-0001^MINSKLAB|2345-7^Glucose^LN\r"
       "OBX|1|NM|2345-7^Glucose^LN||5.4|mmol/L|||||F\r"
       "SPM|1|SP-1&MINSKLAB^SP-F\\T\\2&LAB2||BLD\r")


def test_search_keys_take_patient_and_order_fields() -> None:
    keys = search_keys(Message.parse(ORU))
    assert keys == [
        ("patient", "4711", "MINSKLAB"), ("patient", "BY1234567", "BY"), ("patient", "EXT-9", ""),
        ("order", "PL-77", "CIS"), ("order", "ACC-2026-0001", "MINSKLAB"),
        ("order", "SP-1", "MINSKLAB"), ("order", "SP-F&2", "LAB2"),
    ], "PID-4 is field 4 (empty here), not PID-19; \"\" (null) is no identifier; escapes are decoded"


def test_search_keys_of_a_merge_and_of_nothing() -> None:
    a40 = ("MSH|^~\\&|HIS|H1|||20261122||ADT^A40^ADT_A39|M1|P|2.5\rEVN|A40\r"
           "PID|1||NEW-1^^^H1^MR\rMRG|OLD-1^^^H1^MR\r")
    assert search_keys(Message.parse(a40)) == [("patient", "NEW-1", "H1"), ("patient", "OLD-1", "H1")]
    assert search_keys(Message.parse("MSH|^~\\&|A|B|||20261122||QRY^A19|Q1|P|2.5\r")) == []
    assert keys_of(b"not HL7 at all", "utf-8") == []


def test_search_keys_are_bounded() -> None:
    many = "MSH|^~\\&|L|F|||2026||ORU^R01|B1|P|2.5\rPID|1||P1\r" + "".join(
        f"OBR|{i}|PL{i}|FI{i}\r" for i in range(200))
    keys = search_keys(Message.parse(many))
    assert len(keys) == 64 and keys[0] == ("patient", "P1", "")
    long = "MSH|^~\\&|L|F|||2026||ORU^R01|B1|P|2.5\rPID|1||" + "9" * 500 + "\r"
    assert search_keys(Message.parse(long)) == [("patient", "9" * 100, "")]
    spaced = "MSH|^~\\&|L|F|||2026||ORU^R01|B1|P|2.5\rPID|1||" + "9" * 99 + " 8" + "\r"
    assert search_keys(Message.parse(spaced)) == [("patient", "9" * 99, "")], "cut, then trimmed"
    assert parse_query("9" * 99 + " 8") == ("9" * 99, None), "searched as stored"


def test_search_keys_of_every_corpus_message(corpus: list[CorpusFile]) -> None:
    """Every message's first PID-3 identifier is a key (when it has one), and nothing fails."""
    from engine.hl7.charsets import decode
    from engine.mllp.client import split_messages

    checked = 0
    for f in corpus:
        for piece in split_messages(f.data()):
            try:
                msg = Message.parse(decode(piece, "utf-8"))
            except Exception:
                continue
            keys = search_keys(msg)
            pid = msg.first("PID")
            first = pid.value(3, 1, 1) if pid is not None else None
            if first and first.strip() and first.strip() != '""':
                assert ("patient", first.strip()[:100]) in [(k, v) for k, v, _ in keys], f.name
                checked += 1
    assert checked >= 20


_FIELD = st.text(alphabet="AB12 ^~&\\|-\"", max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["PID", "MRG", "ORC", "OBR", "SPM", "OBX", "ZZZ"]),
                          st.lists(_FIELD, max_size=6)), max_size=12))
def test_search_keys_of_any_message(segments: list[tuple[str, list[str]]]) -> None:
    """Whatever the fields hold: no failure, at most 64 keys, each value non-empty, trimmed, at most
    100 characters, and each one a value the message's own accessor reads in a key field."""
    text_ = "MSH|^~\\&|L|F|||2026||ORU^R01|H1|P|2.5\r" + "".join(
        name + "|" + "|".join(fields) + "\r" for name, fields in segments)
    msg = Message.parse(text_)
    keys = search_keys(msg)
    assert len(keys) <= 64 and len(set(keys)) == len(keys)
    readable = set()
    for seg in msg.segments:
        for field in range(1, 5):
            for rep in range(1, len(seg.reps(field)) + 2):
                for comp in (1, 2):
                    for sub in (1, 2):
                        readable.add((seg.value(field, rep, comp, sub) or "").strip()[:100])
    for kind, value, authority in keys:
        assert kind in ("patient", "order")
        assert value and value == value.strip() and len(value) <= 100 and len(authority) <= 100
        assert value in readable


def test_parse_query() -> None:
    assert parse_query("4711") == ("4711", None)
    assert parse_query(" 4711^MINSKLAB ") == ("4711", "MINSKLAB")
    assert parse_query("4711^") == ("4711", "")


def _store(engine: Any, raw: str, status: str = "processed") -> int:
    with engine.begin() as conn:
        return int(conn.execute(insert(messages).values(
            uid=f"u{time.time_ns()}", channel="lab", received_at=datetime.now(UTC), size=len(raw), sha256="0" * 64,
            accepted=True, status=status, raw=raw.encode(), charset="utf-8", control_id="K",
        ).returning(messages.c.id)).scalar_one())


def test_write_reindex_and_filter(db_url: str, engine: Any) -> None:
    first = _store(engine, ORU)
    other = _store(engine, ORU.replace("4711", "4712").replace("ACC-2026-0001", "ACC-2026-0002"), "error")
    broken = _store(engine, "garbage")
    with engine.begin() as conn:
        write_keys(conn, {first: search_keys(Message.parse(ORU))})
        write_keys(conn, {first: search_keys(Message.parse(ORU))})  # a redelivery: nothing new, no error

    def found(**kw: str) -> list[int]:
        return [r["id"] for r in list_messages(engine, MessageFilter(**kw))]  # type: ignore[arg-type]

    assert found(patient="4711") == [first]
    assert found(patient="4712") == [], "not indexed yet"
    assert reindex(engine) == (2, 7), "the two messages without keys were read; the broken one gives none"
    assert found(patient="4712") == [other]
    assert found(patient="4712", status="error") == [other]
    assert found(patient="4712", status="processed") == []
    assert found(patient="BY1234567") == [other, first]
    assert found(patient="4711^MINSKLAB") == [first] and found(patient="4711^OTHER") == []
    assert found(order="ACC-2026-0002") == [other]
    assert found(order="PL-77^CIS") == [other, first]
    assert found(order="4711") == [], "kinds are kept apart"
    assert found(patient="4711", order="ACC-2026-0002") == []
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(message_keys)).scalar_one() == 14
    shown = get_message(engine, first)
    assert shown is not None and ("order", "ACC-2026-0001", "MINSKLAB") in shown["keys"]
    assert reindex(engine) == (1, 0), "only the message without keys is read again"
    assert broken


def test_portable_write_keeps_what_is_there(db_url: str, engine: Any) -> None:
    """The path for databases other than PostgreSQL and SQLite: same result, no duplicates."""
    from engine.store.keys import _write_portable

    mid = _store(engine, ORU)
    keys = search_keys(Message.parse(ORU))
    with engine.begin() as conn:
        write_keys(conn, {mid: keys[:3]})
        _write_portable(conn, {mid: keys})
        _write_portable(conn, {mid: keys})
    with engine.connect() as conn:
        stored = conn.execute(select(message_keys.c.kind, message_keys.c.value, message_keys.c.authority)
                              .where(message_keys.c.message_id == mid)).all()
    assert sorted(tuple(r) for r in stored) == sorted(keys)


def test_search_uses_the_index(db_url: str, engine: Any) -> None:
    from sqlalchemy.dialects import postgresql, sqlite

    from engine.store.query import LIST_COLUMNS

    keyed = select(message_keys.c.message_id).where(message_keys.c.value == "4711", message_keys.c.kind == "patient")
    q = select(*LIST_COLUMNS).where(messages.c.id.in_(keyed)).order_by(messages.c.id.desc()).limit(100)
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            sql = str(q.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}))
            plan = " ".join(str(r[-1]) for r in conn.execute(text("EXPLAIN QUERY PLAN " + sql)))
        else:
            sql = str(q.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
            conn.execute(text("SET enable_seqscan = off"))
            plan = " ".join(str(r[0]) for r in conn.execute(text("EXPLAIN " + sql)))
    assert "ix_message_keys_value" in plan, plan


def test_workers_index_what_they_take(backend: Backend, engine_factory: Any, tmp_path: Path) -> None:
    project(tmp_path)
    eng = engine_factory(backend, HL7ENGINE_WORKERS="1")
    poisoned = lab("KX2", "20261122081000", "BY-77", "DOE^JOHN", "F", "5.5").replace(
        "PID|1||BY-77", "PID|1||BY-77^^^MINSKLAB^MR||DOE^JOHN\rPID|2||BY-78", 1)
    with MLLPClient("127.0.0.1", eng.port, timeout=30) as client:
        for raw in (lab("KX1", "20261122080000", "BY-77", "DOE^JOHN", "F", "4.0"), poisoned,
                    lab("KX3", "20261122082000", "BY-79", "ROE^ANN", "F", "6.0")):
            answer = client.send(raw.encode())
            assert answer is not None and b"MSA|AA|" in answer
    rows = wait_processed(store_url(eng))
    assert sorted(r.status for r in rows) == ["error", "processed", "processed"], rows

    def listed(*args: str) -> list[dict[str, Any]]:
        result = in_process("messages", *args, "--json", "--config", str(eng.config_dir), env=eng.env)
        assert result.returncode == 0, result
        return [json.loads(line) for line in result.stdout.splitlines()]

    assert [(r["control_id"], r["status"]) for r in listed("--patient", "BY-77")] == [
        ("KX2", "error"), ("KX1", "processed")]
    assert [r["control_id"] for r in listed("--patient", "BY-77^MINSKLAB", "--status", "error")] == ["KX2"]
    assert [r["control_id"] for r in listed("--patient", "BY-78")] == ["KX2"], "every PID of the message"
    assert [r["control_id"] for r in listed("--order", "FIL77")] == ["KX3", "KX2", "KX1"]
    text_out = in_process("messages", "--patient", "BY-79", "--config", str(eng.config_dir), env=eng.env)
    assert "KX3" in text_out.stdout and "KX1" not in text_out.stdout
    (kx3,) = listed("--patient", "BY-79")
    shown = in_process("messages", "show", str(kx3["id"]), "--config", str(eng.config_dir), env=eng.env)
    assert "patient_keys:         BY-79^MINSKLAB" in shown.stdout, shown.stdout
    assert "order_keys:           FIL77^MINSKLAB, ORD77" in shown.stdout, shown.stdout
    again = in_process("messages", "reindex", "--config", str(eng.config_dir), env=eng.env)
    assert again.returncode == 0 and again.stdout.startswith("read 0 message(s) without keys, wrote 0"), again.stdout



def test_store_migrations_match_the_schema(db_url: str, engine: Any) -> None:
    """The migrations (0005 included) create exactly the message store tables schema.py declares."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from engine.store.schema import metadata

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={
            "compare_type": True,
            "include_name": lambda name, type_, _p: type_ != "table" or not (name or "").startswith("rec_"),
        })
        assert list(compare_metadata(ctx, metadata)) == []
