"""Write one message's facts into the central record: ``apply(conn, mapped, ...)``.

Runs inside the caller's transaction (the worker commits it together with the message's status
change, design-notes guarantee 3). The rules:

- **Patient** — found by ANY of the message's identifiers (namespace + value, see ``models``);
  identifiers not yet known are added to it; a patient that no identifier finds is created. If the
  identifiers find two different patients (that are not merged into one), ``RecordConflict``.
  Writes go to the found patient's survivor (a patient merged away by ADT^A40 is replaced by it).
- **Facts** — each has a business key (``Fact.key``), unique per patient and kind, looked up across
  the patient's merge group. Same key and same content: unchanged (a resend or a replay changes
  nothing). Same key, different content: the new version replaces the stored one, which goes to
  ``rec_history`` — unless this message is older (``message_time``: MSH-7, else the receipt time)
  than the one that wrote the stored version: then it is skipped (``skipped_older``). An OBX-11
  correction (C) is such a replacement. Two facts of one kind with the same key in one message:
  the last one counts.
- **Merge** (ADT^A40) — the patient found by the replaced identifiers (created if unknown) is linked
  as replaced by the message's patient; reads of it follow the link (``links``).
- **Concurrency** — the caller serialises one patient's messages; different patients may be written
  at once. Creating a patient or adding identifiers runs in a savepoint against the unique
  (namespace, value) constraint: if another transaction won the race, the patient is matched again.

Errors carry no patient data (no names, no identifier values).
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Connection,
    Integer,
    SmallInteger,
    String,
    Table,
    Text,
    and_,
    bindparam,
    insert,
    literal,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.exc import IntegrityError

from engine.errors import EngineError
from engine.record import facts as F
from engine.record.links import group_of, survivors
from engine.record.models import (
    FACT_TABLES,
    KEY_LENGTH,
    rec_history,
    rec_patient_identifiers,
    rec_patient_links,
    rec_patients,
)
from engine.store.bulk import driver_error, multirow_statements, one_of, sqlite_time
from engine.store.db import JsonText, json_text
from engine.store.schema import UTCDateTime

ASSIGNER_PREFIX = "assigner:"
NAMESPACE_LENGTH, VALUE_LENGTH = 300, 250  # rec_patient_identifiers.namespace, .value
RETRIES = 3
CHUNK = 500

# MappedMessage attribute for each keyed fact kind, in the order they are written
FACT_LISTS = {
    "encounter": "encounters", "report": "reports", "observation": "observations", "specimen": "specimens",
    "allergy": "allergies", "immunization": "immunizations", "condition": "conditions", "procedure": "procedures",
}


class RecordError(EngineError):
    """The facts of a message cannot be written as they are (a permanent failure for the message)."""


class RecordConflict(RecordError):
    """The identifiers of a message find more than one patient."""


@dataclass(slots=True)
class Counts:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped_older: int = 0


@dataclass(slots=True)
class ApplyResult:
    """What ``apply`` did, per kind: ``patient``, ``identifier``, ``link`` and the fact kinds."""

    patient_id: int | None = None
    kinds: dict[str, Counts] = field(default_factory=dict)

    def add(self, kind: str, outcome: str, n: int = 1) -> None:
        if n:
            counts = self.kinds.setdefault(kind, Counts())
            setattr(counts, outcome, getattr(counts, outcome) + n)

    def _total(self, outcome: str) -> int:
        return sum(int(getattr(c, outcome)) for c in self.kinds.values())

    @property
    def inserted(self) -> int:
        return self._total("inserted")

    @property
    def updated(self) -> int:
        return self._total("updated")

    @property
    def unchanged(self) -> int:
        return self._total("unchanged")

    @property
    def skipped_older(self) -> int:
        return self._total("skipped_older")


def apply(conn: Connection, mapped: F.MappedMessage, *, message_uid: str, received_at: datetime) -> ApplyResult:
    """Write ``mapped`` (the facts of the message ``message_uid``) in the caller's transaction."""
    result = ApplyResult()
    lists: dict[str, list[Any]] = {kind: getattr(mapped, attr) for kind, attr in FACT_LISTS.items()}
    if mapped.patient is None:
        if any(lists.values()) or mapped.merges:
            raise RecordError("the message has facts but no patient: record facts belong to a patient (PID)")
        return result
    when = mapped.message_time.at if mapped.message_time is not None else received_at
    w = _Writer(conn, message_uid, _utc(when), datetime.now(UTC), result)
    pid = w.patient(mapped.patient)
    for merge in mapped.merges:
        w.merge(pid, merge)
    # a patient that no link touches (the common case, known from the identifier lookup) is its own group
    group = [pid] if pid in w.unlinked and not mapped.merges else group_of(conn, pid)
    # a patient this message created (and merged nothing into) has no facts yet: nothing to look up
    fresh = pid in w.created and not mapped.merges
    latest = {kind: {db_key(f.key): f for f in items} for kind, items in lists.items() if items}
    stored = {kind: {} for kind in latest} if fresh else w.lookup(pid, group, latest)
    for kind, facts in latest.items():
        w.facts(kind, pid, facts, stored[kind])
    result.patient_id = pid
    return result


class NotBatchable(EngineError):
    """``apply_wave`` cannot write these messages together; write them one by one with ``apply``."""


def apply_wave(conn: Connection, items: list[tuple[F.MappedMessage, str, datetime]]) -> list[ApplyResult]:
    """Write several messages' facts — ``(mapped, message uid, received_at)`` each — with a few
    statements for all of them, to the same effect as ``apply`` on each in turn. A message that
    maps to nothing at all (no patient, no facts) writes nothing, as with ``apply``."""
    empty = [not _has_content(m) for m, _, _ in items]
    if not any(empty):
        return _apply_wave(conn, items)
    written = iter(_apply_wave(conn, [item for item, e in zip(items, empty, strict=True) if not e]))
    return [ApplyResult() if e else next(written) for e in empty]


def _has_content(mapped: F.MappedMessage) -> bool:
    return mapped.patient is not None or bool(mapped.merges) or any(getattr(mapped, a) for a in FACT_LISTS.values())


def _apply_wave(conn: Connection, items: list[tuple[F.MappedMessage, str, datetime]]) -> list[ApplyResult]:
    """``apply_wave`` for messages that each have something to write.

    Only for messages of *different* patients with no merge: the caller passes at most one message
    per patient key. Anything that needs ``apply``'s care raises ``NotBatchable`` before a write
    (a message without a patient, a merge, identifiers shared by two messages of the wave or
    finding two patients, a patient in a merge link, two messages finding the same patient); the
    caller rolls back its savepoint and applies the messages one by one, which then gives each its
    own outcome. A unique-constraint race with another worker raises IntegrityError the same way."""
    if not items:
        return []
    now = datetime.now(UTC)
    results = [ApplyResult() for _ in items]
    wanted: list[dict[tuple[str, str], F.Identifier]] = []
    owner: dict[tuple[str, str], int] = {}
    for i, (mapped, _, _) in enumerate(items):
        if mapped.patient is None or mapped.merges:
            raise NotBatchable("a message without a patient or with a merge")
        keys = _unique(mapped.patient.identifiers)
        if not keys:
            raise NotBatchable("a patient without identifiers")
        for k in keys:
            if owner.setdefault(k, i) != i:
                raise NotBatchable("two messages share an identifier")
        wanted.append(keys)
    if len({uid for _, uid, _ in items}) != len(items):
        raise NotBatchable("one message twice")
    when = [_utc(m.message_time.at if m.message_time is not None else received) for m, _, received in items]

    # patients: one query finds every identifier, its patient's stored version and any merge link
    t = rec_patient_identifiers
    found: dict[tuple[str, str], Any] = {}
    all_keys = list(owner)
    for start in range(0, len(all_keys), CHUNK):
        chunk = all_keys[start:start + CHUNK]
        rows: Sequence[Any] = conn.execute(_identified().where(_pairs(conn, t.c.namespace, t.c.value, chunk))).all()
        for r in rows:
            if (r.namespace, r.value) not in owner:
                continue
            if r.linked:
                raise NotBatchable("a patient in a merge link")
            found[(r.namespace, r.value)] = r
    pids: list[int | None] = []
    stored_patient: dict[int, Any] = {}
    for keys in wanted:
        matched = {int(found[k].patient_id) for k in keys if k in found}
        if len(matched) > 1:
            raise NotBatchable("identifiers find two patients")
        pid = matched.pop() if matched else None
        if pid is not None:
            if pid in stored_patient:
                raise NotBatchable("two messages find the same patient")
            stored_patient[pid] = next(found[k] for k in keys if k in found)
        pids.append(pid)

    dumped = [dump(_patient(m)) for m, _, _ in items]
    new = [i for i, pid in enumerate(pids) if pid is None]
    if new:
        created = _insert_patients(conn, [(dumped[i][0], dumped[i][1], items[i][1], when[i]) for i in new], now)
        for i in new:
            pids[i] = created[items[i][1]]
            results[i].add("patient", "inserted")
    identifiers = []
    for i, keys in enumerate(wanted):
        missing = [ident for k, ident in keys.items() if k not in found]
        results[i].add("identifier", "inserted", len(missing))
        results[i].add("identifier", "unchanged", len(keys) - len(missing))
        identifiers += [{"patient_id": pids[i], "namespace": namespace(ident), "value": ident.value,
                         "system": ident.system, "type": _cut(ident.type, 16), "assigner": _cut(ident.assigner),
                         "message_uid": items[i][1], "created_at": now} for ident in missing]
    if identifiers:
        bulk_insert(conn, rec_patient_identifiers, identifiers)
    known = [i for i, pid in enumerate(pids) if pid in stored_patient]
    outcomes = replace_many(conn, rec_patients, "patient", [
        Replacement(_id(pids[i]), dumped[i][0], dumped[i][1], {}, stored_patient[_id(pids[i])], items[i][1], when[i])
        for i in known], now)
    for i, outcome in zip(known, outcomes, strict=True):
        results[i].add("patient", outcome)

    # facts: per kind, one lookup of the stored keys of the known patients, one insert, the replacements
    for kind, attr in FACT_LISTS.items():
        latest = [{db_key(f.key): f for f in getattr(m, attr)} for m, _, _ in items]
        if not any(latest):
            continue
        table = FACT_TABLES[kind]
        existing: dict[int, dict[str, Any]] = {}  # patient id -> key -> stored row
        lookups = [(_id(pids[i]), key) for i in known for key in latest[i]]
        for start in range(0, len(lookups), CHUNK):
            pairs = lookups[start:start + CHUNK]
            stored_rows: Sequence[Any] = conn.execute(
                select(table.c.id, table.c.patient_id, table.c.key, table.c.content_hash, table.c.message_time)
                .where(_pairs(conn, table.c.patient_id, table.c.key, pairs))).all()
            for r in stored_rows:
                existing.setdefault(int(r.patient_id), {})[r.key] = r  # a superset of the pairs: extras unused
        new_rows: list[dict[str, Any]] = []
        replacements: list[Replacement] = []
        owners: list[int] = []
        for i, facts in enumerate(latest):
            pid = _id(pids[i])
            rows_i, replaced_i = _sort_facts(kind, pid, items[i][1], when[i], now, facts,
                                             existing.get(pid, {}).get)
            results[i].add(kind, "inserted", len(rows_i))
            new_rows += rows_i
            replacements += replaced_i
            owners += [i] * len(replaced_i)
        if new_rows:
            bulk_insert(conn, table, new_rows)
        for i, outcome in zip(owners, replace_many(conn, table, kind, replacements, now), strict=True):
            results[i].add(kind, outcome)
    for i, result in enumerate(results):
        result.patient_id = pids[i]
    return results


def _insert_patients(conn: Connection, rows: list[tuple[JsonText, str, str, datetime]],
                     now: datetime) -> dict[str, int]:
    """Insert new patients, ``(fact, content hash, message uid, message time)`` each; their ids by
    message uid (unique in a wave). On PostgreSQL the ids are taken from the table's sequence first
    and the rows go in like the facts (``bulk_insert``: COPY from 20 rows): SQLAlchemy's multi-row
    ``INSERT … RETURNING`` was a new statement text for every count (25 kB for 100 patients), which
    psycopg converted and PostgreSQL parsed each time."""
    values = [{"fact": fact, "content_hash": digest, "version": 1, "message_uid": uid, "message_time": when,
               "created_at": now, "updated_at": now} for fact, digest, uid, when in rows]
    if conn.dialect.name == "postgresql":
        ids = [int(r[0]) for r in conn.exec_driver_sql(
            "SELECT nextval(pg_get_serial_sequence('rec_patients', 'id')) FROM generate_series(1, %s)", (len(rows),))]
        bulk_insert(conn, rec_patients, [{"id": pid, **v} for pid, v in zip(ids, values, strict=True)])
        return {uid: pid for pid, (_, _, uid, _) in zip(ids, rows, strict=True)}
    # RETURNING with the message uid (unique in the wave) says which row is whose, in any order
    found: Sequence[Any] = conn.execute(
        insert(rec_patients).returning(rec_patients.c.id, rec_patients.c.message_uid), values).all()
    return {str(r.message_uid): int(r.id) for r in found}


def _pairs(conn: Connection, a: Any, b: Any, pairs: list[tuple[Any, Any]]) -> Any:
    """A condition that holds for these (a, b) pairs, and possibly for a few more (the caller drops
    them): ``a IN (...) AND b IN (...)`` (PostgreSQL: ``= ANY`` of arrays, see ``one_of``). Both
    databases answer it from the unique (a, b) index, while SQLite answers a row-value
    ``(a, b) IN (VALUES ...)`` by scanning the whole index."""
    return and_(one_of(conn, a, sorted({x for x, _ in pairs})), one_of(conn, b, sorted({y for _, y in pairs})))


COPY_FROM = 20  # rows from which PostgreSQL gets them by COPY rather than by INSERT


def bulk_insert(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert rows (all with the same keys) in the caller's transaction: on PostgreSQL with COPY when
    there are many (a third of the time of a pipelined INSERT per row; in binary format, see
    ``binary_copy_types``), else one executemany INSERT;
    on SQLite with multi-row INSERTs of values converted here (SQLAlchemy's per-row type processing
    of an executemany cost more than SQLite's work).

    The driver's errors during a COPY are raised as SQLAlchemy's (``IntegrityError``,
    ``OperationalError`` ...), as the INSERT would raise them: the worker tells transient failures
    (deadlock, lost connection), which it retries, from the record refusing a message by them."""
    if not rows:
        return
    if conn.dialect.name == "sqlite":
        if not _sqlite_insert(conn, table, rows):
            conn.execute(insert(table), rows)
        return
    if conn.dialect.name != "postgresql" or len(rows) < COPY_FROM:
        conn.execute(insert(table), rows)
        return
    names = tuple(rows[0])
    json_columns = {n for n in names if isinstance(table.c[n].type, JSON)}
    raw = conn.connection.driver_connection
    assert raw is not None
    columns = ", ".join(f'"{n}"' for n in names)
    types = binary_copy_types(table, names)
    sql = f'COPY "{table.name}" ({columns}) FROM STDIN' + (" (FORMAT BINARY)" if types else "")
    dbapi = conn.dialect.loaded_dbapi
    values = operator.itemgetter(*names)  # a row's values in column order, in one C call
    json_at = [i for i, n in enumerate(names) if n in json_columns]
    try:
        with raw.cursor() as cur, cur.copy(sql) as copy:
            if types:
                copy.set_types(list(types))
            for row in rows:
                got = values(row)
                cells = list(got) if len(names) > 1 else [got]
                for i in json_at:
                    cells[i] = json_text(cells[i])
                copy.write_row(cells)
    except TypeError as exc:  # a value the column's binary form cannot take, e.g. a naive datetime
        raise ValueError(f"{table.name}: a value does not fit its column's type ({exc}); times must be "
                         "timezone-aware (a naive datetime is refused, as UTCDateTime refuses it)") from exc
    except dbapi.Error as exc:
        raise driver_error(conn, sql, exc) from exc


@functools.lru_cache(maxsize=128)
def binary_copy_types(table: Table, names: tuple[str, ...]) -> tuple[str, ...] | None:
    """PostgreSQL's type for each column, for a COPY in binary format (which needs them, exactly:
    an ``integer`` column takes 4 bytes, not 8), or None when a column has a type not listed here
    (then the COPY is in text format). Binary spares formatting every value as text and PostgreSQL
    parsing it back: a timestamp is 8 bytes rather than an ISO string. A JSON column's binary form
    is its text."""
    kinds = [_BINARY_TYPES.get(type(table.c[n].type)) for n in names]
    return None if None in kinds else tuple(k for k in kinds if k is not None)


_BINARY_TYPES: dict[type, str] = {
    BigInteger: "int8", Integer: "int4", SmallInteger: "int2", Boolean: "bool",
    String: "text", Text: "text", JSON: "text", UTCDateTime: "timestamptz",
}


def _sqlite_insert(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> bool:
    """Insert on SQLite the rows of a table whose columns are all integers, text, JSON or UTC times,
    in the form SQLAlchemy stores them; False (nothing done) for a table with any other type."""
    names = tuple(rows[0])
    convert: list[Callable[[Any], Any] | None] = []
    for n in names:
        t = table.c[n].type
        if isinstance(t, JSON):
            convert.append(json_text)
        elif isinstance(t, UTCDateTime):
            convert.append(_sqlite_utc)
        elif isinstance(t, (Integer, String)):
            convert.append(None)
        else:
            return False
    plan = list(zip(names, convert, strict=True))
    values = [tuple(row[n] if f is None else f(row[n]) for n, f in plan) for row in rows]
    # through exec_driver_sql, not the driver's cursor: errors arrive as SQLAlchemy's
    for sql, params in multirow_statements(table, names, "qmark", values):
        conn.exec_driver_sql(sql, tuple(params))
    return True


def _sqlite_utc(dt: datetime | None) -> str | None:
    """A UTC column's value as SQLAlchemy keeps it in SQLite: naive UTC text with microseconds
    (what ``UTCDateTime`` reads back); a naive datetime is refused, as ``UTCDateTime`` refuses it."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return _utc_text(dt)


# the receiving path's conversion, cached: a batch's rows share their times (now, each message's time)
_utc_text = functools.lru_cache(maxsize=4096)(sqlite_time)


def _patient(mapped: F.MappedMessage) -> F.Patient:
    assert mapped.patient is not None  # checked at the top of _apply_wave
    return mapped.patient


def _id(pid: int | None) -> int:
    assert pid is not None
    return pid


# -- helpers --------------------------------------------------------------------------------------

def namespace(ident: F.Identifier) -> str:
    """The matching namespace of an identifier: its system, else its assigning authority."""
    if ident.system:
        return ident.system
    return f"{ASSIGNER_PREFIX}{ident.assigner}" if ident.assigner else ""


def db_key(key: str) -> str:
    """A business key as stored: keys longer than the column keep a prefix and a hash of the whole."""
    if len(key) <= KEY_LENGTH:
        return key
    return f"{key[:KEY_LENGTH - 65]}#{hashlib.sha256(key.encode()).hexdigest()}"


def dump(fact: BaseModel) -> tuple[JsonText, str]:
    """The fact's canonical JSON text, which is what the record stores, and its SHA-256 (the
    idempotence test: a fact whose hash is the stored one is unchanged).

    Canonical text: the fact's ``model_dump(mode="json")`` as ``json.dumps(data, sort_keys=True,
    separators=(",", ":"), ensure_ascii=False)`` writes it, UTF-8. ``fact_data`` builds that data with
    its keys already sorted and orjson writes the same text byte for byte (ten times faster) for fact
    data, which holds no floats (quantities are decimal strings)."""
    text = canonical(fact_data(fact), sort=False)
    return JsonText(text.decode()), hashlib.sha256(text).hexdigest()


def fact_data(fact: BaseModel) -> dict[str, Any]:
    """``fact.model_dump(mode="json")`` of a fact model (engine.record.facts), with the keys of every
    object in sorted order. Values of other types than the facts hold (str, bool, int, None, lists,
    Decimal, UTC datetimes, fact models) are left to pydantic's own conversion, so the result is
    always pydantic's."""
    data: dict[str, Any] = _json_value(fact)
    return data


def _fields(cls: type[BaseModel]) -> dict[type, tuple[str, ...]]:
    out: dict[type, tuple[str, ...]] = {cls: tuple(sorted(cls.model_fields))}
    for sub in cls.__subclasses__():
        out.update(_fields(sub))
    return out


_FIELDS = {cls: names for cls, names in _fields(F.FactModel).items() if cls is not F.FactModel}


# Values the mapping converts once and shares between facts and messages (engine.mapping.convert.new:
# facts are read-only once built): their JSON data is kept too, by identity. Instants included: the
# mapping reads a time once per text, so an ORU's ten OBX-14 (or their OBR-7) are one object.
_SHARED_KINDS = frozenset({F.Coding, F.CodeableConcept, F.Quantity, F.ReferenceRange, F.Identifier, F.HumanName,
                           F.Address, F.Instant})
_SHARED: dict[int, tuple[Any, dict[str, Any]]] = {}


def _model_data(fact: Any, names: tuple[str, ...]) -> dict[str, Any]:
    values: dict[str, Any] = fact.__dict__
    if len(values) != len(names):  # not built with every field (cannot happen to a fact): pydantic's
        data: dict[str, Any] = sorted_data(fact.model_dump(mode="json"))
        return data
    return {name: _json_value(values[name]) for name in names}


def _json_value(v: Any) -> Any:
    if v is None:
        return v
    t = type(v)
    if t is str or t is bool or t is int:
        return v
    names = _FIELDS.get(t)
    if names is not None:
        if t not in _SHARED_KINDS:
            return _model_data(v, names)
        hit = _SHARED.get(id(v))
        if hit is not None and hit[0] is v:
            return hit[1]
        data = _model_data(v, names)
        if len(_SHARED) >= 4096:
            _SHARED.clear()
        _SHARED[id(v)] = (v, data)  # the entry keeps v alive: its id is not reused while cached
        return data
    if t is list:
        return [_json_value(x) for x in v]
    if t is Decimal:
        return str(v)  # pydantic's JSON form of a Decimal
    if t is datetime and v.tzinfo is UTC:
        return v.isoformat()[:-6] + "Z"  # "+00:00" written as pydantic writes it
    return sorted_data(to_jsonable_python(v))


def sorted_data(data: Any) -> Any:
    """JSON-ready data with the keys of every object in sorted order."""
    if isinstance(data, dict):
        return {k: sorted_data(data[k]) for k in sorted(data)}
    if isinstance(data, list):
        return [sorted_data(x) for x in data]
    return data


def canonical(data: Any, sort: bool = True) -> bytes:
    """``json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` as UTF-8
    (``sort=False``: for data whose keys are in sorted order already)."""
    try:
        return orjson.dumps(data, option=orjson.OPT_SORT_KEYS if sort else None)
    except (TypeError, orjson.JSONEncodeError):  # e.g. an integer beyond 64 bits
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _utc(dt: datetime) -> datetime:
    if dt.tzinfo is UTC:  # what facts hold: astimezone would build the same datetime again
        return dt
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _cut(text: str | None, n: int = 250) -> str | None:
    return None if text is None else text[:n]


def _coding(cc: F.CodeableConcept | None, i: int = 0) -> tuple[str | None, str | None]:
    if cc is None or len(cc.codings) <= i:
        return None, None
    c = cc.codings[i]
    return _cut(c.code), _cut(c.system)


def _at(instant: F.Instant | None) -> datetime | None:
    return None if instant is None else _utc(instant.at)


def _code(cc: F.CodeableConcept | None) -> dict[str, Any]:
    code, system = _coding(cc)
    return {"code": code, "code_system": system}


def _encounter(f: F.Encounter) -> dict[str, Any]:
    return {"status": _cut(f.status, 32), "class_code": _cut(f.class_code, 32), "period_start": _at(f.start),
            "period_end": _at(f.end)}


def _report(f: F.Report) -> dict[str, Any]:
    return {**_code(f.code), "status": _cut(f.status, 32),
            "filler_number": _cut(f.filler_order.value) if f.filler_order else None,
            "placer_number": _cut(f.placer_order.value) if f.placer_order else None,
            "effective": _at(f.effective), "issued": _at(f.issued)}


def _observation(f: F.Observation) -> dict[str, Any]:
    alt_code, alt_system = _coding(f.code, 1)
    return {**_code(f.code), "alt_code": alt_code, "alt_code_system": alt_system,
            "report_key": db_key(f.report_key) if f.report_key else None, "status": _cut(f.status, 32),
            "value_type": f.value.type if f.value else None, "effective": _at(f.effective), "issued": _at(f.issued)}


def _specimen(f: F.Specimen) -> dict[str, Any]:
    return {"report_key": db_key(f.report_key) if f.report_key else None, "type_code": _coding(f.type)[0],
            "collected": _at(f.collected)}


def _allergy(f: F.Allergy) -> dict[str, Any]:
    return _code(f.code)


def _immunization(f: F.Immunization) -> dict[str, Any]:
    return {**_code(f.vaccine), "status": _cut(f.status, 32), "occurrence": _at(f.occurrence)}


def _condition(f: F.Condition) -> dict[str, Any]:
    return {**_code(f.code), "onset": _at(f.onset)}


def _procedure(f: F.Procedure) -> dict[str, Any]:
    return {**_code(f.code), "performed": _at(f.performed)}


# the indexed columns of each kind, taken from its fact
COLUMNS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "encounter": _encounter, "report": _report, "observation": _observation, "specimen": _specimen,
    "allergy": _allergy, "immunization": _immunization, "condition": _condition, "procedure": _procedure,
}


def _unique(identifiers: Iterable[F.Identifier]) -> dict[tuple[str, str], F.Identifier]:
    """The identifiers by their matching key. Too long to store exactly: refused, never truncated
    (a truncated identifier could match another person)."""
    out: dict[tuple[str, str], F.Identifier] = {}
    for ident in identifiers:
        if ident.value:
            key = (namespace(ident), ident.value)
            if len(key[0]) > NAMESPACE_LENGTH or len(key[1]) > VALUE_LENGTH:
                raise RecordError(f"a patient identifier is too long for the record (value at most {VALUE_LENGTH}, "
                                  f"system or assigning authority at most {NAMESPACE_LENGTH} characters)")
            out.setdefault(key, ident)
    return out


def _chunks(items: list[str], n: int = CHUNK) -> Iterable[list[str]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


# -- the writer -----------------------------------------------------------------------------------

@dataclass(slots=True)
class _Writer:
    conn: Connection
    message_uid: str
    when: datetime  # the message's time (MSH-7, else receipt)
    now: datetime
    result: ApplyResult
    unlinked: set[int] = field(default_factory=set)  # patients seen to be in no merge link
    stored: dict[int, Any] = field(default_factory=dict)  # patient id -> its content_hash, message_time
    created: set[int] = field(default_factory=set)  # patients created by this message

    # patients ------------------------------------------------------------------------------------

    def patient(self, fact: F.Patient) -> int:
        """Find (or create) the message's patient, add its new identifiers, update its demographics."""
        pid, created = self._find_or_create(fact.identifiers, fact, "identifiers of this message")
        if created:
            self.result.add("patient", "inserted")
        else:
            data, digest = dump(fact)
            (outcome,) = replace_many(self.conn, rec_patients, "patient", [
                Replacement(pid, data, digest, {}, self.stored.get(pid), self.message_uid, self.when)], self.now)
            self.result.add("patient", outcome)
        return pid

    def merge(self, survivor_id: int, merge: F.Merge) -> None:
        """ADT^A40: link the patient of ``merge.replaced`` as replaced by ``survivor_id``."""
        stub = F.Patient(identifiers=merge.replaced)
        replaced, created = self._find_or_create(merge.replaced, stub, "replaced identifiers (MRG) of this merge")
        if created:
            self.result.add("patient", "inserted")
        if replaced == survivor_id:
            self.result.add("link", "unchanged")
            return
        # both are survivors (ends of their chains), so this link cannot close a cycle
        self.conn.execute(insert(rec_patient_links).values(
            patient_id=replaced, replaced_by_id=survivor_id, message_uid=self.message_uid,
            message_time=self.when, created_at=self.now))
        self.result.add("link", "inserted")

    def _find_or_create(self, identifiers: list[F.Identifier], fact: F.Patient, what: str) -> tuple[int, bool]:
        """The survivor of the patient these identifiers find (created when none does), with the
        identifiers it lacked added; and whether it was created."""
        wanted = _unique(identifiers)
        if not wanted:
            raise RecordError(f"the {what} have no value: a patient needs at least one identifier")
        for attempt in range(RETRIES):
            found = self._match(list(wanted))
            matched = set(found.values())
            roots = matched if matched <= self.unlinked else set(survivors(self.conn, matched).values())
            if len(roots) > 1:
                ids = ", ".join(str(r) for r in sorted(roots))
                raise RecordConflict(f"{what} match {len(roots)} different patients (record ids {ids}); "
                                     "merge them (ADT^A40) or correct the identifiers, then replay")
            missing = [k for k in wanted if k not in found]
            if roots and not missing:
                self.result.add("identifier", "unchanged", len(found))
                return roots.pop(), False
            try:
                with self.conn.begin_nested():
                    created = not roots
                    pid = self._create(fact) if created else roots.pop()
                    self._add_identifiers(pid, [wanted[k] for k in missing])
            except IntegrityError:
                if attempt == RETRIES - 1:
                    raise
                continue  # another transaction created one of these identifiers: match again
            if created:  # a new patient: in no link, without facts
                self.unlinked.add(pid)
                self.created.add(pid)
            self.result.add("identifier", "inserted", len(missing))
            self.result.add("identifier", "unchanged", len(found))
            return pid, created
        raise AssertionError("unreachable")  # pragma: no cover

    def _match(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        t = rec_patient_identifiers
        cond = or_(*(and_(t.c.namespace == ns, t.c.value == value) for ns, value in keys))
        # one round trip: the identifiers, their patient's stored version and whether a link touches it
        rows: Sequence[Any] = self.conn.execute(_identified().where(cond)).all()
        for r in rows:
            pid = int(r.patient_id)
            self.stored[pid] = r
            if r.linked:
                self.unlinked.discard(pid)
            else:
                self.unlinked.add(pid)
        return {(r.namespace, r.value): int(r.patient_id) for r in rows}

    def _create(self, fact: F.Patient) -> int:
        data, digest = dump(fact)
        res = self.conn.execute(insert(rec_patients).values(
            fact=data, content_hash=digest, version=1, message_uid=self.message_uid, message_time=self.when,
            created_at=self.now, updated_at=self.now))
        key = res.inserted_primary_key
        assert key is not None
        return int(key[0])

    def _add_identifiers(self, pid: int, identifiers: list[F.Identifier]) -> None:
        if identifiers:
            self.conn.execute(insert(rec_patient_identifiers), [
                {"patient_id": pid, "namespace": namespace(i), "value": i.value, "system": i.system,
                 "type": _cut(i.type, 16), "assigner": _cut(i.assigner), "message_uid": self.message_uid,
                 "created_at": self.now} for i in identifiers])

    # facts ---------------------------------------------------------------------------------------

    def lookup(self, pid: int, group: list[int], latest: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The stored rows of these keys, per kind and key, across the merge group: one UNION ALL query
        for all kinds (per kind and chunk of keys when there are many)."""
        found: dict[str, dict[str, Any]] = {kind: {} for kind in latest}
        parts = []
        for kind, keys in latest.items():
            table = FACT_TABLES[kind]
            owner = table.c.patient_id.in_(group) if len(group) > 1 else table.c.patient_id == pid
            for chunk in _chunks(list(keys)):
                parts.append(select(literal(kind).label("kind"), table.c.id, table.c.patient_id, table.c.key,
                                    table.c.content_hash, table.c.message_time)
                             .where(owner, table.c.key.in_(chunk)))
        statements = [union_all(*parts)] if len(parts) > 1 and sum(map(len, latest.values())) <= CHUNK else parts
        for stmt in statements:
            rows: Sequence[Any] = self.conn.execute(stmt).all()
            for r in rows:
                existing = found[r.kind]
                if r.key not in existing or r.patient_id == pid:  # in a merge group, the survivor's own first
                    existing[r.key] = r
        return found

    def facts(self, kind: str, pid: int, latest: dict[str, Any], existing: dict[str, Any]) -> None:
        """Insert, replace or keep the message's facts of one kind (``latest``: key -> the last fact of
        that key in the message; ``existing``: key -> the stored row)."""
        table = FACT_TABLES[kind]
        new_rows, replacements = _sort_facts(kind, pid, self.message_uid, self.when, self.now, latest, existing.get)
        self.result.add(kind, "inserted", len(new_rows))
        if new_rows:
            bulk_insert(self.conn, table, new_rows)
        for outcome in replace_many(self.conn, table, kind, replacements, self.now):
            self.result.add(kind, outcome)


def _identified() -> Any:
    """Identifiers with their patient's stored version (content_hash, message_time) and whether a
    merge link touches the patient; the caller adds which identifiers."""
    t, p, lk = rec_patient_identifiers, rec_patients, rec_patient_links
    linked = or_(select(lk.c.patient_id).where(lk.c.patient_id == t.c.patient_id).exists(),
                 select(lk.c.patient_id).where(lk.c.replaced_by_id == t.c.patient_id).exists())
    return select(t.c.namespace, t.c.value, t.c.patient_id, p.c.content_hash, p.c.message_time,
                  linked.label("linked")).join(p, p.c.id == t.c.patient_id)


def _sort_facts(kind: str, pid: int, uid: str, when: datetime, now: datetime, facts: dict[str, Any],
                stored: Callable[[str], Any]) -> tuple[list[dict[str, Any]], list[Replacement]]:
    """One message's facts of one kind (key -> fact) as rows to insert (keys not stored yet) and
    replacements of stored rows (``stored(key)``: the stored row or None)."""
    new_rows: list[dict[str, Any]] = []
    replacements: list[Replacement] = []
    for key, fact in facts.items():
        data, digest = dump(fact)
        columns = COLUMNS[kind](fact)
        row = stored(key)
        if row is None:
            new_rows.append({"patient_id": pid, "key": key, "fact": data, "content_hash": digest, "version": 1,
                             "message_uid": uid, "message_time": when, "created_at": now, "updated_at": now,
                             **columns})
        else:
            replacements.append(Replacement(int(row.id), data, digest, columns, row, uid, when))
    return new_rows, replacements


@dataclass(slots=True)
class Replacement:
    """A new version of a stored fact (or of a patient's demographics), from message ``uid`` of time
    ``when``; ``stored`` is its stored row (content_hash, message_time) or None when not read yet."""

    row_id: int
    data: JsonText
    digest: str
    columns: dict[str, Any]
    stored: Any
    uid: str
    when: datetime


def replace_many(conn: Connection, table: Table, kind: str, items: list[Replacement], now: datetime) -> list[str]:
    """Replace stored versions by new ones unless the same or the new message is older; keep the old
    versions in history. One statement each for the stored versions still unknown, the history (per
    message) and the updates. Returns the outcome of each item, in order."""
    missing = [r.row_id for r in items if r.stored is None]
    fetched: dict[int, Any] = {}
    if missing:
        rows: Sequence[Any] = conn.execute(select(table.c.id, table.c.content_hash, table.c.message_time)
                                           .where(one_of(conn, table.c.id, missing))).all()
        fetched = {int(r.id): r for r in rows}
    outcomes: list[str] = []
    changed: list[Replacement] = []
    for r in items:
        stored = r.stored if r.stored is not None else fetched[r.row_id]
        if stored.content_hash == r.digest:
            outcomes.append("unchanged")
        elif r.when < stored.message_time:
            outcomes.append("skipped_older")
        else:
            outcomes.append("updated")
            changed.append(r)
    if not changed:
        return outcomes
    if len({r.row_id for r in changed}) != len(changed):  # pragma: no cover - keys are unique per message
        raise AssertionError("one row replaced twice")
    h = rec_history
    is_fact = "patient_id" in table.c
    for uid in dict.fromkeys(r.uid for r in changed):  # the old versions, superseded by message uid
        ids = [r.row_id for r in changed if r.uid == uid]
        conn.execute(insert(h).from_select(
            [h.c.kind, h.c.fact_id, h.c.patient_id, h.c.key, h.c.fact, h.c.content_hash, h.c.version,
             h.c.message_uid, h.c.message_time, h.c.superseded_at, h.c.superseded_by],
            select(literal(kind), table.c.id, table.c.patient_id if is_fact else table.c.id,
                   table.c.key if is_fact else literal(None, h.c.key.type), table.c.fact, table.c.content_hash,
                   table.c.version, table.c.message_uid, table.c.message_time,
                   literal(now, h.c.superseded_at.type), literal(uid))
            .where(one_of(conn, table.c.id, ids)).order_by(table.c.id)))
    names = list(changed[0].columns)
    stmt = update(table).where(table.c.id == bindparam("b_id")).values(
        fact=bindparam("b_fact", type_=table.c.fact.type), content_hash=bindparam("b_hash"),
        version=table.c.version + 1, message_uid=bindparam("b_uid", type_=table.c.message_uid.type),
        message_time=bindparam("b_when", type_=table.c.message_time.type), updated_at=now,
        **{n: bindparam(f"b_{n}", type_=table.c[n].type) for n in names})
    conn.execute(stmt, [{"b_id": r.row_id, "b_fact": r.data, "b_hash": r.digest, "b_uid": r.uid, "b_when": r.when,
                         **{f"b_{n}": r.columns[n] for n in names}} for r in changed])
    return outcomes
