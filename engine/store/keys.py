"""Search keys of stored messages: the patient identifiers and order numbers operators look for.

"Patient 4711's result never arrived": integration staff need the messages about a patient, or
about one accession number, whatever their status. ``message_keys`` holds, for each message, the
values of the fields that identify them, independent of any mapping:

- ``patient``: PID-3 (every repetition), PID-2 and PID-4 (older versions' external and alternate
  IDs) and MRG-1 (the identifier merged away by an A40), with the assigning authority (CX-4.1);
- ``order``: ORC-2/ORC-3 and OBR-2/OBR-3 (placer and filler order numbers; the filler's is the lab's
  accession number) and SPM-2 (the specimen's placer and filler IDs), with the namespace (EI-2).

Workers write them in the transaction that records the message's outcome; ``reindex`` fills them in
for messages no worker took (refused ones, and messages stored before this table existed).
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, Engine, exists, insert, select

from engine.errors import HL7Error
from engine.hl7.charsets import decode
from engine.hl7.message import Message, Segment
from engine.store.schema import message_keys, messages

VALUE_LENGTH = 100
MAX_KEYS = 64  # per message: a message with hundreds of orders is indexed by its first ones

Key = tuple[str, str, str]  # kind, value, authority

# (segment, field): CX fields for patients (CX-1 the ID, CX-4.1 the authority), EI fields for orders
# (EI-1 the ID, EI-2 the namespace)
_PATIENT_FIELDS = (("PID", 3), ("PID", 2), ("PID", 4), ("MRG", 1))
_ORDER_FIELDS = (("ORC", 2), ("ORC", 3), ("OBR", 2), ("OBR", 3))


def search_keys(msg: Message) -> list[Key]:
    """The message's patient identifiers and order numbers, each once, in message order."""
    keys: dict[Key, None] = {}
    for seg in msg.segments:
        name = seg.name
        if name in ("PID", "MRG"):
            for seg_name, field in _PATIENT_FIELDS:
                if seg_name == name:
                    for rep in range(1, len(seg.reps(field)) + 1):
                        _add(keys, "patient", seg.value(field, rep, 1), seg.value(field, rep, 4, 1))
        elif name in ("ORC", "OBR"):
            for seg_name, field in _ORDER_FIELDS:
                if seg_name == name:
                    _add(keys, "order", seg.value(field, 1, 1), seg.value(field, 1, 2))
        elif name == "SPM":
            _specimen(keys, seg)
        if len(keys) >= MAX_KEYS:
            break
    return list(keys)[:MAX_KEYS]


def _specimen(keys: dict[Key, None], seg: Segment) -> None:
    """SPM-2 is an EIP: placer (component 1) and filler (component 2) IDs, each an EI in subcomponents."""
    for comp in (1, 2):
        _add(keys, "order", seg.value(2, 1, comp, 1), seg.value(2, 1, comp, 2))


def _add(keys: dict[Key, None], kind: str, value: str | None, authority: str | None) -> None:
    v = _norm(value)
    if v and v != '""':
        keys[(kind, v, _norm(authority))] = None


def _norm(text: str | None) -> str:
    """A key as stored and as searched: trimmed, at most VALUE_LENGTH characters."""
    return (text or "").strip()[:VALUE_LENGTH].rstrip()


def parse_query(text: str) -> tuple[str, str | None]:
    """``4711`` matches the value under any authority; ``4711^MINSKLAB`` that authority only."""
    value, sep, authority = text.partition("^")
    return _norm(value), (_norm(authority) if sep else None)


def write_keys(conn: Connection, keys: dict[int, list[Key]]) -> None:
    """Insert the keys of messages (by row id) in the caller's transaction, in one statement per
    500 keys on the driver; keys already there are kept (a message processed again after a replay,
    or indexed by ``reindex`` before a worker took it, writes nothing new)."""
    cols = ([], [], [], [])  # type: tuple[list[int], list[str], list[str], list[str]]
    for mid, ks in keys.items():
        for k, v, a in ks:
            cols[0].append(mid)
            cols[1].append(k)
            cols[2].append(v)
            cols[3].append(a)
    if not cols[0]:
        return
    name = conn.dialect.name
    if name not in ("postgresql", "sqlite"):
        _write_portable(conn, keys)
        return
    # the driver's statement text, through SQLAlchemy: its errors arrive as SQLAlchemy's, which the
    # worker sorts into transient (retried) and permanent
    for start in range(0, len(cols[0]), 500):
        chunk = [c[start:start + 500] for c in cols]
        if name == "postgresql":  # four arrays, one statement whatever the count: prepared once
            conn.exec_driver_sql("INSERT INTO message_keys (message_id, kind, value, authority) "
                                 "SELECT * FROM unnest(%b::bigint[], %b::text[], %b::text[], %b::text[]) "
                                 "ON CONFLICT DO NOTHING", tuple(chunk))
        else:
            n = len(chunk[0])
            conn.exec_driver_sql("INSERT OR IGNORE INTO message_keys (message_id, kind, value, authority) VALUES "
                                 + ", ".join(["(?, ?, ?, ?)"] * n),
                                 tuple(v for row in zip(*chunk, strict=True) for v in row))


def _write_portable(conn: Connection, keys: dict[int, list[Key]]) -> None:
    have = {(r[0], r[1], r[2], r[3]) for r in conn.execute(
        select(message_keys.c.message_id, message_keys.c.kind, message_keys.c.value, message_keys.c.authority)
        .where(message_keys.c.message_id.in_(sorted(keys))))}
    rows = [{"message_id": mid, "kind": k, "value": v, "authority": a}
            for mid, ks in keys.items() for k, v, a in ks if (mid, k, v, a) not in have]
    if rows:
        conn.execute(insert(message_keys), rows)


def keys_of(raw: bytes, charset: str | None) -> list[Key]:
    """Search keys of a stored message's raw bytes ([] when it cannot be parsed)."""
    try:
        return search_keys(Message.parse(decode(raw, charset or "utf-8")))
    except HL7Error:
        return []


def reindex(engine: Engine, *, batch: int = 500) -> tuple[int, int]:
    """Index every message that has no search keys yet. Returns (messages read, keys written)."""
    read = written = 0
    after = 0
    while True:
        with engine.begin() as conn:
            rows = conn.execute(
                select(messages.c.id, messages.c.raw, messages.c.charset)
                .where(messages.c.id > after,
                       ~exists().where(message_keys.c.message_id == messages.c.id))
                .order_by(messages.c.id).limit(batch)).all()
            if not rows:
                return read, written
            found = {r.id: keys_of(r.raw, r.charset) for r in rows}
            write_keys(conn, found)
        read += len(rows)
        written += sum(len(k) for k in found.values())
        after = rows[-1].id


def keys_for(conn: Connection, message_ids: Iterable[int]) -> dict[int, list[Key]]:
    """The stored keys of some messages (for showing them)."""
    out: dict[int, list[Key]] = {}
    ids = list(message_ids)
    if not ids:
        return out
    q = (select(message_keys.c.message_id, message_keys.c.kind, message_keys.c.value, message_keys.c.authority)
         .where(message_keys.c.message_id.in_(ids))
         .order_by(message_keys.c.message_id, message_keys.c.kind, message_keys.c.value, message_keys.c.authority))
    for r in conn.execute(q):
        out.setdefault(r[0], []).append((r[1], r[2], r[3]))
    return out
