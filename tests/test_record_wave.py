"""``apply_wave``: several patients' messages written with a few statements must leave exactly the
record that ``apply``, one message after the other in the same order, leaves: the same patients and
identifiers, facts, versions, history and outcome counts. On SQLite and PostgreSQL, with generated
traffic (new and known patients, resends, corrections, older messages, new identifiers, two
identifiers of one patient in one wave) and with the whole shared corpus through the shipped mappings.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, select

from engine.record import facts as F
from engine.record.models import (
    FACT_TABLES,
    rec_history,
    rec_patient_identifiers,
    rec_patient_links,
    rec_patients,
)
from engine.record.writer import FACT_LISTS, ApplyResult, NotBatchable, RecordError, apply, apply_wave
from engine.store import db
from tests.conftest import fresh_postgres
from tests.test_record import T0, ident, lab_message, observation, patient

Item = tuple[F.MappedMessage, str]


def waves_of(items: list[Item], key: Callable[[F.MappedMessage, str], str]) -> list[list[Item]]:
    """As the worker forms them: the n-th message of each patient key goes to wave n."""
    seen: Counter[str] = Counter()
    waves: list[list[Item]] = []
    for mapped, uid in items:
        k = key(mapped, uid)
        n = seen[k]
        seen[k] += 1
        if n == len(waves):
            waves.append([])
        waves[n].append((mapped, uid))
    return waves


def first_identifier(mapped: F.MappedMessage, uid: str) -> str:
    if mapped.patient is None or not mapped.patient.identifiers:
        return uid
    i = mapped.patient.identifiers[0]
    return f"{i.system}|{i.assigner}|{i.value}"


def one_by_one(conn: Connection, items: list[Item]) -> list[ApplyResult | str]:
    out: list[ApplyResult | str] = []
    for mapped, uid in items:
        sp = conn.begin_nested()
        try:
            out.append(apply(conn, mapped, message_uid=uid, received_at=T0))
            sp.commit()
        except RecordError as exc:
            sp.rollback()
            out.append(f"refused: {type(exc).__name__}")
    return out


def in_waves(conn: Connection, items: list[Item]) -> tuple[list[ApplyResult | str], int]:
    """apply_wave per wave, falling back to one by one when it is not batchable; and how many
    waves were written together."""
    sp = conn.begin_nested()
    try:
        results: list[ApplyResult | str] = list(apply_wave(conn, [(m, uid, T0) for m, uid in items]))
        sp.commit()
        return results, 1
    except (NotBatchable, RecordError):
        sp.rollback()
    return one_by_one(conn, items), 0


def snapshot(conn: Connection) -> dict[str, Any]:
    """The record without surrogate ids and wall-clock times: patients named by their identifiers."""
    idents: dict[int, set[tuple[str, str]]] = {}
    for r in conn.execute(select(rec_patient_identifiers.c.patient_id, rec_patient_identifiers.c.namespace,
                                 rec_patient_identifiers.c.value, rec_patient_identifiers.c.message_uid)):
        idents.setdefault(int(r.patient_id), set()).add((r.namespace, r.value, r.message_uid))

    def who(pid: int) -> frozenset[tuple[str, str]]:
        return frozenset(idents.get(pid, set()))

    out: dict[str, Any] = {"patients": sorted(
        (sorted(who(int(r.id))), r.content_hash, r.version, r.message_uid, r.message_time.replace(tzinfo=None))
        for r in conn.execute(select(rec_patients)))}
    for kind, table in FACT_TABLES.items():
        cols = [c for c in table.c if c.name not in ("id", "patient_id", "created_at", "updated_at", "fact")]
        out[kind] = sorted(
            (sorted(who(int(r.patient_id))), *(str(getattr(r, c.name)) for c in cols))
            for r in conn.execute(select(table)))
    h = rec_history
    out["history"] = sorted(
        (r.kind, r.key or "", r.content_hash, r.version, r.message_uid, r.superseded_by)
        for r in conn.execute(select(h)))
    out["links"] = sorted((sorted(who(int(r.patient_id))), sorted(who(int(r.replaced_by_id))))
                          for r in conn.execute(select(rec_patient_links)))
    return out


def outcome(r: ApplyResult | str) -> Any:
    if isinstance(r, str):
        return r
    return sorted((k, c.inserted, c.updated, c.unchanged, c.skipped_older) for k, c in r.kinds.items())


def compare(url_a: str, url_b: str, items: list[Item], batch: int,
            key: Callable[[F.MappedMessage, str], str] = first_identifier) -> int:
    """Write ``items`` in batches: into A one by one (in wave order), into B wave by wave; assert the
    outcomes and the records are equal. Returns how many waves went together."""
    a, b = db.make_engine(url_a), db.make_engine(url_b)
    together = 0
    try:
        for start in range(0, len(items), batch):
            waves = waves_of(items[start:start + batch], key)
            with a.begin() as ca, b.begin() as cb:
                for wave in waves:
                    expected = one_by_one(ca, wave)
                    got, n = in_waves(cb, wave)
                    together += n
                    assert [outcome(r) for r in got] == [outcome(r) for r in expected]
        with a.connect() as ca, b.connect() as cb:
            sa, sb = snapshot(ca), snapshot(cb)
        for part in sa:
            assert sb[part] == sa[part], part
    finally:
        a.dispose()
        b.dispose()
    return together


@pytest.fixture
def two_urls(db_url: str, request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[str, str]]:
    """Two empty, migrated records of the same kind (the second: SQLite file or PostgreSQL database)."""
    if db_url.startswith("sqlite"):
        other = f"sqlite:///{tmp_path / 'other.db'}"
        db.upgrade(other)
        yield db_url, other
        return
    with fresh_postgres(request.getfixturevalue("postgres_admin")) as other:
        db.upgrade(other)
        yield db_url, other


def generated(seed: int, n: int) -> list[Item]:
    """Lab traffic for 40 patients: first results, resends, corrections (new values), results sent
    late (older than the stored ones), a second identifier (national number) for some patients,
    a national number shared by two MRNs (one person registered at two labs)."""
    rng = random.Random(seed)
    items: list[Item] = []
    sent: list[F.MappedMessage] = []
    for i in range(n):
        p = rng.randrange(40)
        mrn = ident(f"MRN-{p}")
        ids = [mrn]
        if p % 3 == 0:
            ids.append(ident(f"NPN-{p}", system="urn:oid:1.2.3.npn", type_="NI"))
        if p in (7, 8) and rng.random() < 0.5:  # two labs' MRNs of one person, found by one national number
            ids = [ident(f"MRN-{p}", system="urn:oid:9.9.mrn"), ident("NPN-shared", system="urn:oid:1.2.3.npn")]
        choice = rng.random()
        if choice < 0.15 and sent:
            mapped = rng.choice(sent)  # a resend (or a replay) of an earlier message
        else:
            minutes = i if choice > 0.3 else i - 50  # some arrive late: older than what is stored
            acc = f"ACC-{p}-{rng.randrange(3)}"
            value = str(100 + rng.randrange(5))
            mapped = lab_message(*ids, minutes=minutes, acc=acc,
                                 obs=[observation(report=acc, value=value),
                                      observation("2345-7", str(rng.randrange(3, 7)), sub_id="2", report=acc)])
            if rng.random() < 0.2:
                mapped = mapped.model_copy(update={"patient": patient(*ids, family=f"Family{rng.randrange(3)}")})
            sent.append(mapped)
        items.append((mapped, f"m{i}"))
    return items


def test_generated_traffic_gives_the_same_record(two_urls: tuple[str, str]) -> None:
    items = generated(11, 400)
    together = compare(*two_urls, items, batch=50)
    assert together >= 10  # most waves went together; the others fell back, as they must


def test_a_wave_of_new_patients_takes_a_few_statements(engine: Engine) -> None:
    from sqlalchemy import event

    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2].split()[0].upper()))
    items = [(lab_message(ident(f"MRN-{i}"), minutes=i), f"m{i}") for i in range(30)]
    with engine.begin() as conn:
        results = apply_wave(conn, [(m, uid, T0) for m, uid in items])
    assert [r.inserted for r in results] == [1 + 1 + 1 + 2 + 1] * 30  # patient, identifier, report, 2 obs, specimen
    # identifiers lookup, patients (INSERT ... RETURNING), identifiers, and per kind (report,
    # observation, specimen) an insert; PostgreSQL takes the patients' ids from their sequence (one
    # SELECT) and gets the patients, identifiers and facts as COPY (not seen by SQLAlchemy's events)
    selects, inserts = (2, 0) if engine.dialect.name == "postgresql" else (1, 5)
    assert statements.count("SELECT") == selects and statements.count("INSERT") == inserts, statements
    with engine.connect() as conn:
        stored = {kind: len(conn.execute(select(FACT_TABLES[kind].c.key)).all())
                  for kind in ("report", "observation", "specimen")}
    assert stored == {"report": 30, "observation": 60, "specimen": 30}
    statements.clear()
    with engine.begin() as conn:
        results = apply_wave(conn, [(m, uid, T0) for m, uid in items])  # a resend of all of them
    assert all(r.unchanged == 6 and r.inserted == 0 for r in results)
    assert statements.count("INSERT") == 0 and statements.count("UPDATE") == 0


def test_a_message_that_maps_to_nothing_writes_nothing_and_keeps_the_wave_together(engine: Engine) -> None:
    items = [(lab_message(ident("MRN-1")), "m1", T0), (F.MappedMessage(), "m2", T0),
             (lab_message(ident("MRN-2")), "m3", T0)]
    with engine.begin() as conn:
        results = apply_wave(conn, items)
    assert [r.inserted for r in results] == [6, 0, 6] and results[1].patient_id is None


@pytest.mark.parametrize("case", ["no patient", "merge", "same patient twice", "shared identifier",
                                  "linked patient"])
def test_what_is_not_batchable_is_refused_before_any_write(engine: Engine, case: str) -> None:
    a, b = ident("MRN-A"), ident("MRN-B")
    npn = ident("NPN-1", system="urn:oid:1.2.3.npn", type_="NI")
    with engine.begin() as conn:
        apply(conn, lab_message(a, npn), message_uid="m0", received_at=T0)
        apply(conn, F.MappedMessage(patient=patient(ident("MRN-S")), merges=[F.Merge(replaced=[ident("MRN-R")])]),
              message_uid="m00", received_at=T0)
    waves: dict[str, list[F.MappedMessage]] = {
        "no patient": [lab_message(b), F.MappedMessage(reports=lab_message(b).reports)],
        "merge": [lab_message(b), F.MappedMessage(patient=patient(b), merges=[F.Merge(replaced=[a])])],
        "same patient twice": [lab_message(a, minutes=1), lab_message(ident("MRN-C"), npn, minutes=1)],
        "shared identifier": [lab_message(b, minutes=1), lab_message(ident("MRN-C"), b, minutes=1)],
        "linked patient": [lab_message(b), lab_message(ident("MRN-S"), minutes=1)],
    }
    with engine.connect() as conn:
        before = snapshot(conn)
    with engine.begin() as conn, pytest.raises(NotBatchable):
        apply_wave(conn, [(m, f"w{i}", T0) for i, m in enumerate(waves[case])])
    with engine.connect() as conn:
        assert snapshot(conn) == before


def corpus_mapped(corpus: list[Any]) -> tuple[list[Item], dict[str, str]]:
    """Every ORU, OUL, ADT and VXU message of the corpus that the shipped mappings map, with its
    patient key as the worker computes it."""
    from engine.hl7.charsets import decode
    from engine.hl7.header import message_start, read_header
    from engine.hl7.message import Message
    from engine.mapping import MappingError, load_mappings
    from engine.worker.processor import patient_key
    from tests.conftest import ROOT
    from tests.test_mapping_corpus import TYPES, mapping_for, split_messages

    mset, _ = load_mappings(ROOT)
    items: list[Item] = []
    keys: dict[str, str] = {}
    for cf in corpus:
        if cf.malformed:
            continue
        for n, raw in enumerate(split_messages(cf.data())):
            header = read_header(raw, "utf-8")
            if header.message_type not in TYPES:
                continue
            msg = Message.parse(decode(raw[message_start(raw):], header.codec))
            ctx = mset.context("corpus", "Europe/Minsk", control_id=header.control_id,
                               sending_facility=header.sending_facility, message_type=header.type_label)
            try:
                mapped = mset.get(mapping_for(header.message_type, header.trigger_event)).apply(msg, ctx)
            except MappingError:
                continue
            uid = f"{cf.name}#{n}"
            keys[uid] = patient_key(msg, header.sending_facility) or uid
            items.append((mapped, uid))
    return items, keys


@pytest.mark.corpus
def test_the_corpus_gives_the_same_record(two_urls: tuple[str, str], corpus: list[Any]) -> None:
    """Every ORU, OUL, ADT and VXU message of ../shared/corpus, mapped by the shipped mappings, in
    batches of 50 with waves by MSH-4 + PID-3 as the worker forms them."""
    items, keys = corpus_mapped(corpus)
    assert len(items) > 100
    items = items + items[:40]  # and a resend of some
    together = compare(*two_urls, items, batch=50, key=lambda _m, uid: keys[uid])
    assert together >= 3


@pytest.mark.corpus
def test_canonical_text_is_json_dumps_byte_for_byte(corpus: list[Any]) -> None:
    """The content hash (the idempotence test) is computed with orjson, over data built without
    pydantic's serializer; it must be the same text as json.dumps(sort_keys, compact, UTF-8) gives
    for model_dump(mode="json"), for every fact of the corpus, or records written before would see
    their facts as changed."""
    import hashlib
    import json

    from engine.record.writer import canonical, dump

    items, _ = corpus_mapped(corpus)
    checked = 0
    for mapped, _uid in items:
        for fact in [mapped.patient, *(f for attr in FACT_LISTS.values() for f in getattr(mapped, attr))]:
            if fact is None:
                continue
            data = fact.model_dump(mode="json")
            expected = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
            assert canonical(data) == expected
            # what the record stores and hashes: built without pydantic's serializer (tests/test_fact_json.py)
            text, digest = dump(fact)
            assert text.encode() == expected
            assert digest == hashlib.sha256(expected).hexdigest()
            checked += 1
    assert checked > 2000
    cyrillic = {"names": [{"family": "Иванова", "given": ["Анна"]}], "n": 2**70, "e": "\u2028 \x00"}
    assert canonical(cyrillic) == json.dumps(cyrillic, sort_keys=True, separators=(",", ":"),
                                             ensure_ascii=False).encode()


def test_sqlite_lookups_search_the_indexes(tmp_path: Any) -> None:
    """A wave's lookups of identifiers and stored facts must be index searches: a row-value
    ``(a, b) IN (VALUES ...)`` made SQLite scan a whole index per wave, slower as the record grew."""
    from sqlalchemy import event

    url = f"sqlite:///{tmp_path / 'plan.db'}"
    db.upgrade(url)
    engine = db.make_engine(url, writer=True)
    items = [(lab_message(ident(f"MRN-{i}"), minutes=i), f"m{i}") for i in range(30)]
    with engine.begin() as conn:
        apply_wave(conn, [(m, uid, T0) for m, uid in items])
    selects: list[tuple[str, Any]] = []

    def keep(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", keep)
    with engine.begin() as conn:  # known patients: identifiers and every kind of fact are looked up
        apply_wave(conn, [(m, f"again-{uid}", T0) for m, uid in items])
    event.remove(engine, "before_cursor_execute", keep)
    assert len(selects) >= 4
    with engine.connect() as conn:
        for statement, parameters in selects:
            plan = [r[3] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)]
            scans = [step for step in plan if step.startswith("SCAN rec_")]
            assert not scans, (statement[:120], plan)
    engine.dispose()


def test_postgresql_lookups_are_one_statement_whatever_the_count(postgres_url: str) -> None:
    """On PostgreSQL a wave's lookups (and the worker's reads by message uid) give their values as
    arrays (``= ANY``): an IN list's text changed with every count, so psycopg converted each
    statement anew and never prepared it, and PostgreSQL parsed and planned one parameter per value.
    The lookups must still be index searches and find what IN found."""
    from sqlalchemy import event

    db.upgrade(postgres_url)
    engine = db.make_engine(postgres_url, writer=True)
    sizes = (3, 17, 40)
    texts: dict[int, set[str]] = {}
    selects: list[tuple[str, Any]] = []
    for n in sizes:
        items = [(lab_message(ident(f"MRN-{n}-{i}"), minutes=i), f"m{n}-{i}") for i in range(n)]
        with engine.begin() as conn:
            first = apply_wave(conn, [(m, uid, T0) for m, uid in items])
        seen: list[tuple[str, Any]] = []

        def keep(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any,
                 seen: list[tuple[str, Any]] = seen) -> None:
            if statement.lstrip().upper().startswith("SELECT"):
                seen.append((statement, parameters))

        event.listen(engine, "before_cursor_execute", keep)
        with engine.begin() as conn:  # known patients: identifiers and every kind of fact are looked up
            again = apply_wave(conn, [(m, f"again-{uid}", T0) for m, uid in items])
        event.remove(engine, "before_cursor_execute", keep)
        assert [r.patient_id for r in again] == [r.patient_id for r in first]
        assert all(r.kinds["observation"].unchanged and not r.inserted for r in again), again[0].kinds
        texts[n] = {s for s, _ in seen}
        selects += seen
    assert texts[sizes[0]] == texts[sizes[1]] == texts[sizes[2]], "the statements' text changed with the count"
    assert all("ANY" in s for s in texts[sizes[0]]) and len(texts[sizes[0]]) >= 2
    with engine.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")  # tiny tables: ask whether an index can serve
        for statement, parameters in selects[-len(texts[sizes[2]]):]:
            plan = "\n".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN {statement}", parameters))
            assert "Seq Scan on rec_" not in plan, (statement[:120], plan)
    engine.dispose()
