"""The central record's writer (engine.record.writer) and its tables and migration, on SQLite and
PostgreSQL: idempotence, corrections with history, older messages skipped, patients matched by any
identifier, conflicts, ADT^A40 merge links and reads that follow them, concurrent patient creation.

``facts`` builders here are shared with tests/test_fhir.py.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Connection, Engine, Integer, MetaData, Table, func, inspect, select
from sqlalchemy.exc import IntegrityError

from engine.errors import EngineError
from engine.record import facts as F
from engine.record.fhir import read, search
from engine.record.models import (
    FACT_TABLES,
    KEY_LENGTH,
    rec_history,
    rec_observations,
    rec_patient_identifiers,
    rec_patient_links,
    rec_patients,
    rec_reports,
    record_metadata,
)
from engine.record.writer import COPY_FROM, ApplyResult, RecordConflict, RecordError, apply, bulk_insert, db_key
from engine.store import db
from tests.support import downgrade

T0 = datetime(2026, 11, 22, 7, 15, tzinfo=UTC)
RECORD_TABLES = {t.name for t in record_metadata.sorted_tables}


# -- fact builders (also used by test_fhir) -------------------------------------------------------

def at(minutes: int = 0, precision: F.Precision = "minute", text: str = "") -> F.Instant:
    return F.Instant(at=T0 + timedelta(minutes=minutes), precision=precision, text=text)


def cc(code: str, system: str | None = None, display: str | None = None, *more: F.Coding) -> F.CodeableConcept:
    return F.CodeableConcept(codings=[F.Coding(code=code, system=system, display=display), *more])


def ident(value: str, system: str | None = "urn:oid:1.2.3.mrn", type_: str = "MR",
          assigner: str | None = None) -> F.Identifier:
    return F.Identifier(value=value, system=system, type=type_, assigner=assigner)


def qty(value: str, unit: str = "g/L") -> F.Quantity:
    return F.Quantity(value=Decimal(value), unit=unit, system="http://unitsofmeasure.org", code=unit)


def patient(*identifiers: F.Identifier, family: str = "Иванов") -> F.Patient:
    return F.Patient(identifiers=list(identifiers) or [ident("MRN-1")],
                     names=[F.HumanName(family=family, given=["Иван", "Петрович"], use="official")],
                     birth_date=F.Instant(at=datetime(1980, 1, 31, 21, tzinfo=UTC), precision="day",
                                          text="19800201"),
                     gender="male", addresses=[F.Address(line=["ул. Ленина 1"], city="Минск", country="BY")],
                     telecom=["+375291234567", "ivanov@example.org"])


def observation(code: str = "718-7", value: str = "135", status: str = "final", report: str = "ACC-1",
                result_status: str = "F", sub_id: str = "1") -> F.Observation:
    return F.Observation(
        key=f"{report}|{code}|http://loinc.org|{sub_id}", report_key=report,
        code=cc("HGB", "L", "Hemoglobin", F.Coding(code=code, system="http://loinc.org", display="Hemoglobin")),
        value=F.Value(type="quantity", quantity=qty(value)),
        reference_range=F.ReferenceRange(low=qty("120"), high=qty("160"), text="120-160"),
        interpretation=[F.Coding(code="N", system="http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation")],
        status=status, result_status=result_status, effective=at(), issued=at(30), performer="Dr Who",
        producing_lab="Central lab", sub_id=sub_id, notes=["hemolysed sample"],
    )


def report(key: str = "ACC-1", status: str = "final") -> F.Report:
    return F.Report(key=key, filler_order=F.Identifier(value=key, system="urn:oid:1.2.3.lab"),
                    placer_order=F.Identifier(value=f"P-{key}"), code=cc("CBC", "L", "Blood count"), status=status,
                    effective=at(), issued=at(30), performer="Central lab")


def lab_message(*identifiers: F.Identifier, minutes: int = 0, obs: list[F.Observation] | None = None,
                acc: str = "ACC-1", **extra: Any) -> F.MappedMessage:
    """A lab result message: one report (accession ``acc``), its observations and specimen."""
    return F.MappedMessage(
        patient=patient(*identifiers), reports=[report(acc)],
        observations=obs if obs is not None else [observation(report=acc),
                                                  observation("2345-7", "5.4", sub_id="2", report=acc)],
        specimens=[F.Specimen(key=f"SPM-{acc}", report_key=acc, collected=at(-30), received=at(-10),
                              type=cc("BLD", "http://terminology.hl7.org/CodeSystem/v2-0487"))],
        message_time=at(minutes, "second", ""), **extra)


# -- fixtures -------------------------------------------------------------------------------------

# db_url (SQLite and PostgreSQL, migrated) and engine: tests/conftest.py


def write(engine: Engine, mapped: F.MappedMessage, uid: str = "m1") -> ApplyResult:
    with engine.begin() as conn:
        return apply(conn, mapped, message_uid=uid, received_at=T0)


def count(conn: Connection, table: Any) -> int:
    return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def counts(result: ApplyResult, kind: str) -> tuple[int, int, int, int]:
    c = result.kinds[kind]
    return c.inserted, c.updated, c.unchanged, c.skipped_older


# -- migration ------------------------------------------------------------------------------------

def _diff(conn: Connection, metadata: Any) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={
        "compare_type": True,
        "include_name": lambda name, type_, _parent: type_ != "table" or bool(name and name.startswith("rec_")),
    })
    return list(compare_metadata(ctx, metadata))


def test_migration_creates_the_tables_and_matches_the_models(db_url: str) -> None:
    eng = db.make_engine(db_url)
    try:
        with eng.connect() as conn:
            assert set(inspect(conn).get_table_names()) >= RECORD_TABLES
            assert _diff(conn, record_metadata) == []
            # the comparison does see drift: a column the migration does not create
            drifted = MetaData(naming_convention=record_metadata.naming_convention)
            for table in record_metadata.sorted_tables:
                table.to_metadata(drifted)
            drifted.tables["rec_observations"].append_column(Column("extra", Integer))
            diff = _diff(conn, drifted)
            assert [d[0] for d in diff] == ["add_column"]
    finally:
        eng.dispose()
    assert {"rec_patients", "rec_patient_identifiers", "rec_patient_links", "rec_encounters", "rec_reports",
            "rec_observations", "rec_specimens", "rec_allergies", "rec_immunizations", "rec_conditions",
            "rec_procedures", "rec_history"} == RECORD_TABLES


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_0009_keeps_stored_facts_both_ways(backend: str, request: pytest.FixtureRequest,
                                                     tmp_path: Any) -> None:
    """0009 drops the facts' foreign key to rec_patients and makes fact columns json (PostgreSQL):
    facts written before it read back the same after it, and after a downgrade to 0008."""
    from alembic import command

    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    db.upgrade(url, "0008")
    eng = db.make_engine(url)
    try:
        with eng.begin() as conn:
            fks = inspect(conn).get_foreign_keys("rec_observations")
            assert [fk["referred_table"] for fk in fks] == ["rec_patients"]
            pid = conn.execute(rec_patients.insert().returning(rec_patients.c.id),
                               {"fact": {"names": [{"family": "Иванов"}]}, "content_hash": "h", "version": 1,
                                "message_uid": "m0", "message_time": T0, "created_at": T0, "updated_at": T0}
                               ).scalar_one()
            conn.execute(rec_observations.insert(), {
                "patient_id": pid, "key": "ACC-1|718-7", "fact": {"value": {"quantity": {"value": "13.5"}}},
                "status": "final", "content_hash": "h", "version": 1, "message_uid": "m0", "message_time": T0,
                "created_at": T0, "updated_at": T0})
    finally:
        eng.dispose()

    def facts() -> tuple[Any, Any, list[Any]]:
        e = db.make_engine(url)
        try:
            with e.connect() as conn:
                return (conn.execute(select(rec_patients.c.fact)).scalar_one(),
                        conn.execute(select(rec_observations.c.fact, rec_observations.c.patient_id)).one()[0],
                        inspect(conn).get_foreign_keys("rec_observations"))
        finally:
            e.dispose()

    db.upgrade(url)
    pat, obs, fks = facts()
    assert pat == {"names": [{"family": "Иванов"}]} and obs == {"value": {"quantity": {"value": "13.5"}}}
    assert fks == []
    eng = db.make_engine(url)
    try:
        with eng.begin() as conn:
            assert _diff(conn, record_metadata) == []
            cfg = db.alembic_config(url)
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0008")
    finally:
        eng.dispose()
    pat, obs, fks = facts()
    assert pat == {"names": [{"family": "Иванов"}]} and obs == {"value": {"quantity": {"value": "13.5"}}}
    assert [fk["referred_table"] for fk in fks] == ["rec_patients"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_0010_partial_alt_code_index_and_no_event_foreign_key(backend: str, request: pytest.FixtureRequest,
                                                                        tmp_path: Any) -> None:
    """0010: the alternate-code index lists only observations that have one, and still serves a
    search by alternate code; message events no longer reference messages by a foreign key. Rows
    written before it read back the same, both ways (down to 0009 and up again)."""
    from engine.store.schema import message_events, messages

    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    db.upgrade(url, "0009")
    eng = db.make_engine(url)
    try:
        with eng.begin() as conn:
            assert [fk["referred_table"] for fk in inspect(conn).get_foreign_keys("message_events")] == ["messages"]
            mid = conn.execute(messages.insert().returning(messages.c.id), {
                "uid": "u1", "channel": "lab", "received_at": T0, "size": 1, "sha256": "0" * 64, "accepted": True,
                "status": "processed", "raw": b"MSH|"}).scalar_one()
            conn.execute(message_events.insert(), {"message_id": mid, "at": T0, "status": "processed"})
            for n, alt in enumerate(["2345-7", None]):
                conn.execute(rec_observations.insert(), {
                    "patient_id": 7, "key": f"k{n}", "fact": {"n": n}, "alt_code": alt, "status": "final",
                    "content_hash": "h", "version": 1, "message_uid": "u1", "message_time": T0, "created_at": T0,
                    "updated_at": T0})
    finally:
        eng.dispose()

    def check(after: bool) -> None:
        e = db.make_engine(url)
        try:
            with e.begin() as conn:
                fks = inspect(conn).get_foreign_keys("message_events")
                assert [fk["referred_table"] for fk in fks] == ([] if after else ["messages"])
                assert conn.execute(select(message_events.c.message_id, message_events.c.status)).all() == [
                    (1, "processed")]
                q = ("SELECT key FROM rec_observations WHERE patient_id = 7 AND alt_code = '2345-7'")
                assert conn.exec_driver_sql(q).scalars().all() == ["k0"]
                if backend == "postgresql":
                    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
                    plan = "\n".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN {q}"))
                    size = conn.exec_driver_sql(
                        "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                        "WHERE c.relname = 'ix_rec_observations_patient_id_alt_code' AND i.indpred IS NOT NULL"
                    ).scalar_one()
                    assert size == (1 if after else 0)
                else:
                    plan = "\n".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {q}"))
                    sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = "
                                               "'ix_rec_observations_patient_id_alt_code'").scalar_one()
                    assert ("WHERE alt_code IS NOT NULL" in sql) is after, sql
                assert "ix_rec_observations_patient_id_alt_code" in plan, plan
                if after:
                    assert _diff(conn, record_metadata) == []
        finally:
            e.dispose()

    db.upgrade(url)
    check(after=True)
    downgrade(url, "0009")
    check(after=False)
    db.upgrade(url)
    check(after=True)


def test_upgrade_is_idempotent(db_url: str) -> None:
    db.upgrade(db_url)
    assert db.current_revision(db_url) is not None


# -- idempotence, corrections, order --------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, COPY_FROM])  # one INSERT; PostgreSQL: COPY
def test_bulk_insert_raises_the_database_errors_as_sqlalchemy_does(engine: Engine, rows: int) -> None:
    """A duplicate identifier is an IntegrityError however the rows were sent (the worker tells a
    transient failure, which it retries, from one that fails the message by SQLAlchemy's classes)."""
    def ident_rows(pid: int, start: int) -> list[dict[str, Any]]:
        return [{"patient_id": pid, "namespace": "urn:oid:1.2.3.mrn", "value": f"MRN-{start + n}", "system": None,
                 "type": "MR", "assigner": None, "message_uid": "m1", "created_at": T0} for n in range(rows)]

    pid = write(engine, lab_message()).patient_id
    assert pid is not None
    with engine.begin() as conn:
        bulk_insert(conn, rec_patient_identifiers, ident_rows(pid, 100))
    with engine.connect() as conn, pytest.raises(IntegrityError) as caught:
        bulk_insert(conn, rec_patient_identifiers, ident_rows(pid, 100 + rows - 1))  # the last one again
    assert getattr(caught.value.orig, "sqlstate", "23505") == "23505"
    with engine.connect() as conn:
        assert count(conn, rec_patient_identifiers) == 1 + rows


def test_bulk_insert_on_sqlite_stores_what_sqlalchemy_stores(tmp_path: Any) -> None:
    """SQLite's bulk_insert converts values itself (multi-row INSERTs without SQLAlchemy's per-row
    type processing): the stored text must be SQLAlchemy's, times before 1970 and in other zones
    included, and a naive datetime is refused as UTCDateTime refuses it."""
    from datetime import timezone

    from sqlalchemy import insert, text

    url = f"sqlite:///{tmp_path / 'bulk.db'}"
    db.upgrade(url)
    eng = db.make_engine(url)
    times = [datetime(1965, 1, 1, 0, 0, 0, 500000, tzinfo=UTC), T0,
             datetime(2026, 12, 7, 13, 1, 2, 999999, tzinfo=timezone(timedelta(hours=3)))]

    def row(n: int, at: datetime, uid: str) -> dict[str, Any]:
        return {"patient_id": 1, "key": f"{uid}-{n}", "fact": {"name": "Иванов", "n": [n, None, "x"]},
                "report_key": None, "code": "718-7", "code_system": None, "alt_code": None,
                "alt_code_system": None, "status": "final", "value_type": "quantity", "effective": at,
                "issued": None, "content_hash": "h", "version": 1, "message_uid": uid, "message_time": at,
                "created_at": at, "updated_at": at}

    try:
        with eng.begin() as conn:
            conn.execute(insert(rec_observations), [row(n, at, "orm") for n, at in enumerate(times)])
            bulk_insert(conn, rec_observations, [row(n, at, "bulk") for n, at in enumerate(times)])
        with eng.connect() as conn:
            stored = conn.execute(text("SELECT message_uid, fact, effective, issued, message_time FROM rec_observations"
                                       " ORDER BY key")).all()
            assert [tuple(r[1:]) for r in stored if r[0] == "bulk"] == [tuple(r[1:]) for r in stored if r[0] == "orm"]
            read = conn.execute(select(rec_observations.c.effective, rec_observations.c.fact)
                                .where(rec_observations.c.message_uid == "bulk")
                                .order_by(rec_observations.c.key)).all()
            assert [r.effective for r in read] == times and read[0].fact == {"name": "Иванов", "n": [0, None, "x"]}
        with eng.begin() as conn, pytest.raises(ValueError, match="naive"):
            bulk_insert(conn, rec_observations, [row(99, datetime(2026, 1, 1), "naive")])
    finally:
        eng.dispose()


def test_bulk_insert_on_postgresql_stores_what_sqlalchemy_stores(postgres_url: str) -> None:
    """From COPY_FROM rows PostgreSQL gets them by COPY in binary format, with each column's type
    spelled out: what is stored must be what SQLAlchemy's INSERT stores (times before 1970 and in
    other zones, microseconds, NULLs, JSON with Cyrillic text), and every record table must have a
    binary plan (a column type without one would quietly fall back to the slower text COPY)."""
    from datetime import timezone

    from sqlalchemy import insert, text

    from engine.record import models
    from engine.record.writer import binary_copy_types

    for name in dir(models):
        table = getattr(models, name)
        if name.startswith("rec_") and isinstance(table, Table):
            assert binary_copy_types(table, tuple(c.name for c in table.columns)) is not None, table.name

    db.upgrade(postgres_url)
    eng = db.make_engine(postgres_url)
    # binary COPY needs the database's own column types (the migrations', not only the models'):
    # an integer sent for a bigint column, or text for a jsonb one, fails the whole COPY
    same = {"int8": {"bigint"}, "int4": {"integer"}, "int2": {"smallint"}, "bool": {"boolean"},
            "timestamptz": {"timestamp with time zone"}, "text": {"text", "character varying", "json"}}
    with eng.connect() as conn:
        for name in dir(models):
            table = getattr(models, name)
            if not (name.startswith("rec_") and isinstance(table, Table)):
                continue
            stored = dict(conn.execute(text("SELECT column_name, data_type FROM information_schema.columns "
                                            "WHERE table_name = :t"), {"t": table.name}).all())
            names = tuple(c.name for c in table.columns)
            plan = binary_copy_types(table, names)
            assert plan is not None
            for column, kind in zip(names, plan, strict=True):
                assert stored[column] in same[kind], f"{table.name}.{column}: {stored[column]} is not {kind}"
    times = [datetime(1965, 1, 1, 0, 0, 0, 500000, tzinfo=UTC), T0,
             datetime(2026, 12, 7, 13, 1, 2, 999999, tzinfo=timezone(timedelta(hours=3)))]

    def row(n: int, uid: str) -> dict[str, Any]:
        at = times[n % len(times)]
        return {"patient_id": 1, "key": f"{uid}-{n:03d}", "fact": {"name": "Иванов", "n": [n, None, "x\t\\"]},
                "report_key": None if n % 2 else f"r{n}", "code": "718-7", "code_system": None, "alt_code": None,
                "alt_code_system": None, "status": "final", "value_type": "quantity", "effective": at,
                "issued": None, "content_hash": "h", "version": n + 1, "message_uid": uid, "message_time": at,
                "created_at": at, "updated_at": at}

    n_rows = max(COPY_FROM, 24)
    try:
        with eng.begin() as conn:
            conn.execute(text("SET TIME ZONE 'America/New_York'"))  # binary times do not depend on it
            conn.execute(insert(rec_observations), [row(n, "orm") for n in range(n_rows)])
            bulk_insert(conn, rec_observations, [row(n, "bulk") for n in range(n_rows)])
        with eng.connect() as conn:
            cols = ("fact::text, report_key, code_system, effective, issued, version, message_time, created_at, "
                    "updated_at, split_part(key, '-', 2)")
            orm = conn.execute(text(f"SELECT {cols} FROM rec_observations WHERE message_uid = 'orm' ORDER BY key"))
            bulk = conn.execute(text(f"SELECT {cols} FROM rec_observations WHERE message_uid = 'bulk' ORDER BY key"))
            assert [tuple(r) for r in bulk.all()] == [tuple(r) for r in orm.all()]
            read = conn.execute(select(rec_observations.c.effective, rec_observations.c.fact)
                                .where(rec_observations.c.message_uid == "bulk")
                                .order_by(rec_observations.c.key)).all()
            assert [r.effective for r in read[:3]] == times
            assert read[0].fact == {"name": "Иванов", "n": [0, None, "x\t\\"]}
        naive = [{**row(n, "naive"), "effective": datetime(2026, 1, 1)} for n in range(n_rows)]
        with eng.begin() as conn, pytest.raises(ValueError, match="naive"):
            bulk_insert(conn, rec_observations, naive)
    finally:
        eng.dispose()


def test_first_write_inserts_everything(engine: Engine) -> None:
    r = write(engine, lab_message())
    assert counts(r, "patient") == (1, 0, 0, 0)
    assert counts(r, "identifier") == (1, 0, 0, 0)
    assert counts(r, "report") == (1, 0, 0, 0)
    assert counts(r, "observation") == (2, 0, 0, 0)
    assert counts(r, "specimen") == (1, 0, 0, 0)
    assert r.inserted == 6 and r.updated == 0 and r.patient_id is not None
    with engine.connect() as conn:
        row = conn.execute(select(rec_observations).order_by(rec_observations.c.id)).first()
        assert row is not None
        assert (row.code, row.code_system, row.alt_code, row.alt_code_system) == ("HGB", "L", "718-7", "http://loinc.org")
        assert row.status == "final" and row.version == 1 and row.message_uid == "m1"
        assert row.effective == T0 and row.report_key == "ACC-1"
        assert F.Observation.model_validate(row.fact) == observation()
        rep = conn.execute(select(rec_reports)).one()
        assert (rep.filler_number, rep.placer_number) == ("ACC-1", "P-ACC-1")


def test_applying_the_same_message_twice_changes_nothing(engine: Engine) -> None:
    write(engine, lab_message(), "m1")
    with engine.connect() as conn:
        before = {t: conn.execute(select(FACT_TABLES[t])).all() for t in FACT_TABLES}
    r = write(engine, lab_message(), "m2")  # a resend processed twice, or a replay
    assert r.inserted == 0 and r.updated == 0 and r.skipped_older == 0
    assert r.unchanged == 1 + 1 + 1 + 2 + 1  # patient, identifier, report, 2 observations, specimen
    with engine.connect() as conn:
        after = {t: conn.execute(select(FACT_TABLES[t])).all() for t in FACT_TABLES}
        assert after == before  # not even message_uid or updated_at moved
        assert count(conn, rec_history) == 0 and count(conn, rec_patients) == 1


def test_a_correction_replaces_the_result_and_keeps_history(engine: Engine) -> None:
    write(engine, lab_message(minutes=0), "m1")
    corrected = lab_message(minutes=60, obs=[observation(value="128", status="corrected", result_status="C"),
                                             observation("2345-7", "5.4", sub_id="2")])
    r = write(engine, corrected, "m2")
    assert counts(r, "observation") == (0, 1, 1, 0)
    with engine.connect() as conn:
        row = conn.execute(select(rec_observations).where(rec_observations.c.alt_code == "718-7")).one()
        assert row.status == "corrected" and row.version == 2 and row.message_uid == "m2"
        assert row.message_time == T0 + timedelta(minutes=60)
        assert F.Observation.model_validate(row.fact).value.quantity.value == Decimal("128")  # type: ignore[union-attr]
        hist = conn.execute(select(rec_history)).one()
        assert (hist.kind, hist.fact_id, hist.version, hist.message_uid, hist.superseded_by) == (
            "observation", row.id, 1, "m1", "m2")
        assert hist.patient_id == row.patient_id and hist.key == row.key
        assert F.Observation.model_validate(hist.fact) == observation()
    # replaying the correction changes nothing more
    assert write(engine, corrected, "m2").updated == 0


def test_an_older_message_does_not_overwrite_a_newer_fact(engine: Engine) -> None:
    corrected = lab_message(minutes=60, obs=[observation(value="128", status="corrected", result_status="C")])
    write(engine, corrected, "m2")
    r = write(engine, lab_message(minutes=0, obs=[observation()]), "m1")  # the original arrives late
    assert counts(r, "observation") == (0, 0, 0, 1)
    assert r.skipped_older >= 1
    with engine.connect() as conn:
        row = conn.execute(select(rec_observations)).one()
        assert row.status == "corrected" and row.message_uid == "m2" and row.version == 1
        assert count(conn, rec_history) == 0


def test_same_time_different_content_replaces(engine: Engine) -> None:
    write(engine, lab_message(obs=[observation()]), "m1")
    r = write(engine, lab_message(obs=[observation(value="140")]), "m2")
    assert counts(r, "observation") == (0, 1, 0, 0)


def test_without_msh7_the_receipt_time_orders(engine: Engine) -> None:
    msg = lab_message(obs=[observation()])
    msg.message_time = None
    with engine.begin() as conn:
        apply(conn, msg, message_uid="m1", received_at=T0 + timedelta(hours=1))
    late = lab_message(obs=[observation(value="1")])
    late.message_time = None
    with engine.begin() as conn:
        r = apply(conn, late, message_uid="m0", received_at=T0)
    assert counts(r, "observation") == (0, 0, 0, 1)


def test_patient_demographics_update_with_history(engine: Engine) -> None:
    write(engine, lab_message(), "m1")
    newer = lab_message(minutes=5)
    assert newer.patient is not None
    newer.patient.names[0].family = "Петров"
    r = write(engine, newer, "m2")
    assert counts(r, "patient") == (0, 1, 0, 0)
    with engine.connect() as conn:
        p = conn.execute(select(rec_patients)).one()
        assert p.version == 2 and F.Patient.model_validate(p.fact).names[0].family == "Петров"
        h = conn.execute(select(rec_history)).one()
        assert (h.kind, h.fact_id, h.patient_id, h.key) == ("patient", p.id, p.id, None)


def test_duplicate_keys_in_one_message_the_last_counts(engine: Engine) -> None:
    msg = lab_message(obs=[observation(value="1"), observation(value="2")])
    r = write(engine, msg, "m1")
    assert counts(r, "observation") == (1, 0, 0, 0)
    assert write(engine, msg, "m1").kinds["observation"].unchanged == 1
    with engine.connect() as conn:
        fact = F.Observation.model_validate(conn.execute(select(rec_observations.c.fact)).scalar_one())
        assert fact.value is not None and fact.value.quantity is not None
        assert fact.value.quantity.value == Decimal("2")


def test_long_business_keys_are_hashed_and_stay_unique(engine: Engine) -> None:
    long_a = "A" * 600 + "1"
    long_b = "A" * 600 + "2"
    assert db_key(long_a) != db_key(long_b) and len(db_key(long_a)) == KEY_LENGTH
    obs = [observation(), observation()]
    obs[0].key, obs[1].key = long_a, long_b
    msg = lab_message(obs=obs)
    assert write(engine, msg).kinds["observation"].inserted == 2
    assert write(engine, msg).kinds["observation"].unchanged == 2


# -- patients -------------------------------------------------------------------------------------

def test_patient_found_by_any_identifier_and_new_identifiers_added(engine: Engine) -> None:
    mrn = ident("MRN-1")
    national = ident("3010180A001PB1", "urn:oid:1.2.112.national", "NI")
    r1 = write(engine, lab_message(mrn), "m1")
    r2 = write(engine, lab_message(mrn, national, minutes=1), "m2")
    assert r2.patient_id == r1.patient_id
    assert counts(r2, "identifier") == (1, 0, 1, 0)
    r3 = write(engine, lab_message(national, minutes=2), "m3")  # only the national number now
    assert r3.patient_id == r1.patient_id
    with engine.connect() as conn:
        assert count(conn, rec_patients) == 1
        rows = conn.execute(select(rec_patient_identifiers).order_by(rec_patient_identifiers.c.id)).all()
        assert [(i.namespace, i.value, i.type, i.message_uid) for i in rows] == [
            ("urn:oid:1.2.3.mrn", "MRN-1", "MR", "m1"), ("urn:oid:1.2.112.national", "3010180A001PB1", "NI", "m2")]
        # facts found by their keys: no duplicates across the three messages
        assert count(conn, rec_observations) == 2


def test_identifiers_without_a_system_are_namespaced_by_their_assigner(engine: Engine) -> None:
    a = write(engine, lab_message(ident("123", None, "MR", "HOSP_A")), "m1")
    b = write(engine, lab_message(ident("123", None, "MR", "HOSP_B")), "m2")
    c = write(engine, lab_message(ident("123", None, "MR", None)), "m3")
    assert len({a.patient_id, b.patient_id, c.patient_id}) == 3
    with engine.connect() as conn:
        namespaces = set(conn.execute(select(rec_patient_identifiers.c.namespace)).scalars())
        assert namespaces == {"assigner:HOSP_A", "assigner:HOSP_B", ""}


def test_identifiers_of_two_patients_raise_a_conflict_without_patient_data(engine: Engine) -> None:
    write(engine, lab_message(ident("MRN-1")), "m1")
    write(engine, lab_message(ident("NAT-9", "urn:national", "NI")), "m2")
    with pytest.raises(RecordConflict) as err, engine.begin() as conn:
        apply(conn, lab_message(ident("MRN-1"), ident("NAT-9", "urn:national", "NI")), message_uid="m3",
              received_at=T0)
    text = str(err.value)
    assert "identifiers of this message match 2 different patients" in text
    for secret in ("MRN-1", "NAT-9", "Иванов", "Иван", "urn:national"):
        assert secret not in text
    assert isinstance(err.value, EngineError)
    with engine.connect() as conn:  # nothing of m3 was written (the caller's transaction rolled back)
        assert count(conn, rec_patients) == 2
        assert count(conn, rec_patient_identifiers) == 2


def test_identifiers_too_long_to_store_are_refused_not_truncated(engine: Engine) -> None:
    with pytest.raises(RecordError, match="too long") as err, engine.begin() as conn:
        apply(conn, lab_message(ident("9" * 251)), message_uid="m1", received_at=T0)
    assert "999" not in str(err.value)


def test_facts_without_a_patient_are_refused(engine: Engine) -> None:
    msg = lab_message()
    msg.patient = None
    with pytest.raises(RecordError, match="no patient"), engine.begin() as conn:
        apply(conn, msg, message_uid="m1", received_at=T0)
    with engine.begin() as conn:  # a message without patient and facts is a no-op
        assert apply(conn, F.MappedMessage(), message_uid="m2", received_at=T0).kinds == {}


# -- merges (ADT^A40) -----------------------------------------------------------------------------

def test_a40_links_the_replaced_patient_and_reads_follow_the_link(engine: Engine) -> None:
    old, new = ident("MRN-OLD"), ident("MRN-NEW")
    a = write(engine, lab_message(old), "m1")  # results filed under the old record
    b = write(engine, F.MappedMessage(patient=patient(new), message_time=at(10)), "m2")
    assert a.patient_id != b.patient_id
    merge = F.MappedMessage(patient=patient(new), merges=[F.Merge(replaced=[old])], message_time=at(20))
    r = write(engine, merge, "m3")
    assert counts(r, "link") == (1, 0, 0, 0) and r.patient_id == b.patient_id
    assert write(engine, merge, "m3").kinds["link"].unchanged == 1  # replay: no second link
    with engine.connect() as conn:
        link = conn.execute(select(rec_patient_links)).one()
        assert (link.patient_id, link.replaced_by_id, link.message_uid) == (a.patient_id, b.patient_id, "m3")
        # searching either patient finds the merged record; references point at the survivor
        for pid in (a.patient_id, b.patient_id):
            bundle = search(conn, "Observation", {"patient": str(pid)})
            assert bundle["total"] == 2
            assert {e["resource"]["subject"]["reference"] for e in bundle["entry"]} == {f"Patient/{b.patient_id}"}
        replaced = read(conn, "Patient", str(a.patient_id))
        assert replaced is not None and replaced["active"] is False
        assert replaced["link"] == [{"other": {"reference": f"Patient/{b.patient_id}"}, "type": "replaced-by"}]
        survivor = read(conn, "Patient", str(b.patient_id))
        assert survivor is not None and survivor["active"] is True
        assert survivor["link"] == [{"other": {"reference": f"Patient/{a.patient_id}"}, "type": "replaces"}]
        found = search(conn, "Patient", {"identifier": "urn:oid:1.2.3.mrn|MRN-OLD"})
        assert [(e["resource"]["id"], e["search"]["mode"]) for e in found["entry"]] == [
            (str(a.patient_id), "match"), (str(b.patient_id), "include")]
    # a later message under the old identifier goes to the survivor and finds the facts already there
    late = write(engine, lab_message(old, minutes=30), "m4")
    assert late.patient_id == b.patient_id
    assert late.kinds["observation"].unchanged == 2 and late.kinds["observation"].inserted == 0
    # both identifiers together are one (merged) patient, not a conflict
    assert write(engine, lab_message(old, new, minutes=40), "m5").patient_id == b.patient_id
    with engine.connect() as conn:
        assert count(conn, rec_observations) == 2 and count(conn, rec_patients) == 2


def test_a40_with_an_unknown_replaced_patient_creates_and_links_it(engine: Engine) -> None:
    merge = F.MappedMessage(patient=patient(ident("MRN-NEW")), merges=[F.Merge(replaced=[ident("MRN-GONE")])],
                            message_time=at())
    r = write(engine, merge, "m1")
    assert counts(r, "patient") == (2, 0, 0, 0) and counts(r, "link") == (1, 0, 0, 0)
    with engine.connect() as conn:
        link = conn.execute(select(rec_patient_links)).one()
        assert link.replaced_by_id == r.patient_id
        stub = conn.execute(select(rec_patients).where(rec_patients.c.id == link.patient_id)).one()
        assert F.Patient.model_validate(stub.fact).identifiers == [ident("MRN-GONE")]


def test_merge_chains_are_followed(engine: Engine) -> None:
    p1 = write(engine, lab_message(ident("A")), "m1").patient_id
    write(engine, F.MappedMessage(patient=patient(ident("B")), merges=[F.Merge(replaced=[ident("A")])],
                                  message_time=at(1)), "m2")
    p3 = write(engine, F.MappedMessage(patient=patient(ident("C")), merges=[F.Merge(replaced=[ident("B")])],
                                       message_time=at(2)), "m3").patient_id
    with engine.connect() as conn:
        bundle = search(conn, "Observation", {"patient": f"Patient/{p1}"})
        assert bundle["total"] == 2
        assert {e["resource"]["subject"]["reference"] for e in bundle["entry"]} == {f"Patient/{p3}"}
    assert write(engine, lab_message(ident("A"), minutes=5), "m4").patient_id == p3


def test_merging_a_patient_into_two_survivors_is_a_conflict(engine: Engine) -> None:
    write(engine, lab_message(ident("X")), "m1")
    write(engine, lab_message(ident("Y")), "m2")
    msg = F.MappedMessage(patient=patient(ident("Z")), merges=[F.Merge(replaced=[ident("X"), ident("Y")])])
    with pytest.raises(RecordConflict, match="match 2 different patients"), engine.begin() as conn:
        apply(conn, msg, message_uid="m3", received_at=T0)


# -- concurrency (PostgreSQL) ---------------------------------------------------------------------

def test_concurrent_creation_of_the_same_patient_yields_one_patient(postgres_url: str) -> None:
    db.upgrade(postgres_url)
    eng = db.make_engine(postgres_url)
    try:
        msg = lab_message(ident("RACE-1"))
        results: dict[str, Any] = {}
        conn1 = eng.connect()
        tx1 = conn1.begin()
        results["first"] = apply(conn1, msg, message_uid="m1", received_at=T0)  # holds the new identifier

        def second() -> None:
            try:
                with eng.begin() as conn2:  # blocks on the identifier's unique key until the first commits
                    results["second"] = apply(conn2, msg, message_uid="m2", received_at=T0)
            except Exception as exc:  # surfaced below
                results["error"] = exc

        worker = threading.Thread(target=second)
        worker.start()
        worker.join(1.0)
        assert worker.is_alive()  # waiting on the first transaction's uncommitted identifier
        tx1.commit()
        conn1.close()
        worker.join(30)
        assert "error" not in results, results.get("error")
        assert results["second"].patient_id == results["first"].patient_id
        assert results["second"].kinds["observation"].unchanged == 2
        with eng.connect() as conn:
            assert count(conn, rec_patients) == 1 and count(conn, rec_observations) == 2
    finally:
        eng.dispose()


def test_different_patients_are_written_in_parallel(postgres_url: str) -> None:
    db.upgrade(postgres_url)
    eng = db.make_engine(postgres_url)
    try:
        conn1, conn2 = eng.connect(), eng.connect()
        tx1, tx2 = conn1.begin(), conn2.begin()
        a = apply(conn1, lab_message(ident("P-1")), message_uid="m1", received_at=T0)
        b = apply(conn2, lab_message(ident("P-2")), message_uid="m2", received_at=T0)  # does not wait for tx1
        tx2.commit()
        tx1.commit()
        conn1.close()
        conn2.close()
        assert a.patient_id != b.patient_id
        with eng.connect() as conn:
            assert count(conn, rec_patients) == 2 and count(conn, rec_observations) == 4
    finally:
        eng.dispose()


# -- batched writes -------------------------------------------------------------------------------

def test_many_replacements_in_one_message_each_keep_their_history(engine: Engine) -> None:
    obs = [observation(code, "1", sub_id=str(i)) for i, code in enumerate(["718-7", "2345-7", "789-8", "777-3"])]
    first = write(engine, lab_message(obs=obs), "m1")
    newer = lab_message(minutes=10, obs=[
        observation("718-7", "2", sub_id="0"), observation("2345-7", "1", sub_id="1"),  # changed, same
        observation("789-8", "3", status="corrected", result_status="C", sub_id="2"),  # changed
        observation("777-3", "1", sub_id="3"), observation("6690-2", "9", sub_id="4")])  # same, new
    newer.reports[0].status = "corrected"
    assert newer.patient is not None
    newer.patient.gender = "female"
    r = write(engine, newer, "m2")
    assert r.patient_id == first.patient_id
    assert counts(r, "observation") == (1, 2, 2, 0)
    assert counts(r, "report") == (0, 1, 0, 0) and counts(r, "specimen") == (0, 0, 1, 0)
    assert counts(r, "patient") == (0, 1, 0, 0)
    with engine.connect() as conn:
        rows = {row.alt_code: row for row in conn.execute(select(rec_observations))}
        assert {c: (row.version, row.message_uid) for c, row in rows.items()} == {
            "718-7": (2, "m2"), "2345-7": (1, "m1"), "789-8": (2, "m2"), "777-3": (1, "m1"), "6690-2": (1, "m2")}
        assert rows["789-8"].status == "corrected"
        assert F.Observation.model_validate(rows["718-7"].fact) == observation("718-7", "2", sub_id="0")
        hist = conn.execute(select(rec_history).order_by(rec_history.c.id)).all()
        by_kind = sorted((h.kind, h.fact_id, h.key, h.version, h.message_uid, h.superseded_by) for h in hist)
        rep = conn.execute(select(rec_reports)).one()
        assert by_kind == sorted([
            ("observation", rows["718-7"].id, rows["718-7"].key, 1, "m1", "m2"),
            ("observation", rows["789-8"].id, rows["789-8"].key, 1, "m1", "m2"),
            ("report", rep.id, rep.key, 1, "m1", "m2"),
            ("patient", first.patient_id, None, 1, "m1", "m2")])
        for h in hist:
            if h.kind == "observation":
                assert F.Observation.model_validate(h.fact).value == observation(value="1").value
    # older than what is stored: every kind skipped, nothing written
    late = write(engine, lab_message(minutes=5, obs=obs), "m0")
    assert late.updated == 0 and late.kinds["observation"].skipped_older == 2
    assert write(engine, newer, "m2").updated == 0  # replay


def test_round_trips_per_message(engine: Engine) -> None:
    """A new patient's message looks nothing up but its identifiers; a known patient's message reads
    its identifiers (with its stored demographics and links) and all its facts in two queries."""
    from sqlalchemy import event

    statements: list[str] = []

    def count_statement(*args: Any) -> None:
        verb = args[2].split()[0].upper()
        if verb not in ("BEGIN", "COMMIT"):  # the transaction of ``write``, not of ``apply``
            statements.append(verb)

    event.listen(engine, "before_cursor_execute", count_statement)
    try:
        write(engine, lab_message(), "m1")
        selects_new = statements.count("SELECT")
        statements.clear()
        r = write(engine, lab_message(), "m2")
    finally:
        event.remove(engine, "before_cursor_execute", count_statement)
    assert selects_new == 1
    assert r.unchanged == 6 and statements == ["SELECT", "SELECT"]


@pytest.mark.interpreted
def test_losing_the_creation_race_undoes_the_attempt_and_matches_again(engine: Engine,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """As if another transaction committed the identifiers between the lookup and the insert: the
    attempt's patient and identifiers are removed again and the message goes to the existing patient."""
    from engine.record import writer

    first = write(engine, lab_message(ident("MRN-1")), "m1")
    real = writer._Writer._match
    calls = {"n": 0}

    def stale_once(self: Any, keys: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        calls["n"] += 1
        return {} if calls["n"] == 1 else real(self, keys)

    monkeypatch.setattr(writer._Writer, "_match", stale_once)
    r = write(engine, lab_message(ident("MRN-2"), ident("MRN-1"), minutes=5), "m2")
    assert calls["n"] == 2 and r.patient_id == first.patient_id
    assert counts(r, "identifier") == (1, 0, 1, 0) and counts(r, "observation") == (0, 0, 2, 0)
    with engine.connect() as conn:
        assert count(conn, rec_patients) == 1
        idents = conn.execute(select(rec_patient_identifiers.c.value, rec_patient_identifiers.c.patient_id)).all()
        assert sorted(idents) == [("MRN-1", first.patient_id), ("MRN-2", first.patient_id)]
