"""Central record tables (SQLAlchemy Core, their own ``record_metadata``; names prefixed ``rec_``).

Created by the Alembic migration ``0002_central_record`` (a test checks that the migration and
these tables do not drift apart).

Patients
  ``rec_patients`` holds one row per known person: the latest demographics (the ``Patient`` fact as
  JSON). ``rec_patient_identifiers`` holds every identifier ever seen for it, unique by
  (``namespace``, ``value``): a message's patient is found by ANY of its identifiers. The
  namespace is the identifier's system (a URI from the mapping tables); an identifier without a
  system is namespaced by its assigning authority (``assigner:<CX-4>``) so that MRN 123 of two
  hospitals that have no system configured is not taken for one person; with neither it is ``""``.
  ``rec_patient_links`` records ADT^A40 merges: ``patient_id`` was replaced by ``replaced_by_id``
  (a patient is replaced at most once; chains are followed).

Facts (encounters, reports, observations, specimens, allergies, immunizations, conditions,
procedures)
  One table per kind with the same core columns: ``patient_id``, the business ``key`` (unique per
  patient and kind: keys come from the mappings and some fall back to values that are not globally
  unique, such as a placer order number or a control ID, so a key never reaches across patients;
  writes and reads look a key up across the patient's merge group, so a merge does not duplicate
  facts), ``fact`` (the pydantic fact dumped with ``mode="json"``, written as canonical JSON: keys
  sorted, compact), ``content_hash`` (SHA-256 of that text: the idempotence test), ``version`` (1,
  2, … as corrections arrive),
  ``message_uid`` (the ``messages.uid`` of the message that wrote this version), ``message_time``
  (MSH-7, else the receipt time: an older message does not overwrite a newer fact), ``created_at``
  and ``updated_at``; plus the indexed columns that searches need (codes, statuses, times,
  filler/placer order numbers).

History
  ``rec_history`` keeps every superseded version of a patient's demographics or of a fact (OBX-11
  corrections and any other replacement), with the message that superseded it.

``message_uid`` is not a foreign key: the record may live in another database than the message
store, and a record row must survive the message store's retention.

A fact's ``patient_id`` is not a foreign key either (migration 0009): the record writer creates or
finds the patient in the same transaction before it writes the patient's facts, and patients are
never deleted (a merge links them), so the check could only fail on a writer bug; on PostgreSQL it
cost a row lock on the patient per fact row, about a seventh of the database's CPU per ORU^R01 with
10 OBX. Identifiers and merge links keep theirs. ``fact`` is ``json`` on PostgreSQL, not ``jsonb``
(also 0009): the record reads a fact whole and searches by the indexed columns, so ``jsonb``'s
conversion on every write bought nothing; ``->`` and ``->>`` work on ``json`` for ad-hoc queries.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

from engine.store.schema import Id, UTCDateTime

record_metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)

Json = JSON()
KEY_LENGTH = 512  # longer business keys are shortened with a hash (see writer.db_key)
CODE = 250


def _stamps() -> list[Column[object]]:
    """The columns every fact version carries: which message wrote it, and when."""
    return [
        Column("content_hash", String(64), nullable=False),
        Column("version", Integer, nullable=False),
        Column("message_uid", String(32), nullable=False),
        Column("message_time", UTCDateTime, nullable=False),
        Column("created_at", UTCDateTime, nullable=False),
        Column("updated_at", UTCDateTime, nullable=False),
    ]


rec_patients = Table(
    "rec_patients",
    record_metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("fact", Json, nullable=False),
    *_stamps(),
)

rec_patient_identifiers = Table(
    "rec_patient_identifiers",
    record_metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("patient_id", Id, ForeignKey("rec_patients.id"), nullable=False),
    Column("namespace", String(300), nullable=False),  # system, else "assigner:<CX-4>", else ""
    Column("value", String(250), nullable=False),
    Column("system", String(300)),
    Column("type", String(16)),
    Column("assigner", String(250)),
    Column("message_uid", String(32), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    UniqueConstraint("namespace", "value"),
)
Index("ix_rec_patient_identifiers_patient_id", rec_patient_identifiers.c.patient_id)
Index("ix_rec_patient_identifiers_value", rec_patient_identifiers.c.value)

rec_patient_links = Table(
    "rec_patient_links",
    record_metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("patient_id", Id, ForeignKey("rec_patients.id"), nullable=False, unique=True),  # replaced
    Column("replaced_by_id", Id, ForeignKey("rec_patients.id"), nullable=False),
    Column("message_uid", String(32), nullable=False),
    Column("message_time", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)
Index("ix_rec_patient_links_replaced_by_id", rec_patient_links.c.replaced_by_id)


def _fact_table(name: str, *extra: Column[object]) -> Table:
    table = Table(
        name,
        record_metadata,
        Column("id", Id, primary_key=True, autoincrement=True),
        Column("patient_id", Id, nullable=False),  # not a foreign key: see the module docstring
        Column("key", String(KEY_LENGTH), nullable=False),
        Column("fact", Json, nullable=False),
        *extra,
        *_stamps(),
        UniqueConstraint("patient_id", "key"),
    )
    return table


rec_encounters = _fact_table(
    "rec_encounters",
    Column("status", String(32)),
    Column("class_code", String(32)),
    Column("period_start", UTCDateTime),
    Column("period_end", UTCDateTime),
)

rec_reports = _fact_table(
    "rec_reports",
    Column("code", String(CODE)),
    Column("code_system", String(CODE)),
    Column("status", String(32), nullable=False),
    Column("filler_number", String(CODE)),  # OBR-3.1 (accession / filler order number)
    Column("placer_number", String(CODE)),  # OBR-2.1
    Column("effective", UTCDateTime),
    Column("issued", UTCDateTime),
)
Index("ix_rec_reports_patient_id_code", rec_reports.c.patient_id, rec_reports.c.code)
Index("ix_rec_reports_filler_number", rec_reports.c.filler_number)
Index("ix_rec_reports_placer_number", rec_reports.c.placer_number)

rec_observations = _fact_table(
    "rec_observations",
    Column("report_key", String(KEY_LENGTH)),
    Column("code", String(CODE)),  # first coding of OBX-3 (CWE identifier)
    Column("code_system", String(CODE)),
    Column("alt_code", String(CODE)),  # second coding (CWE alternate identifier), e.g. LOINC for a local code
    Column("alt_code_system", String(CODE)),
    Column("status", String(32), nullable=False),
    Column("value_type", String(16)),
    Column("effective", UTCDateTime),
    Column("issued", UTCDateTime),
)
Index("ix_rec_observations_patient_id_code", rec_observations.c.patient_id, rec_observations.c.code)
# only the rows with an alternate code (migration 0010): many senders send one coding, and a search
# by alt_code = X (which implies it is not null) can use the partial index
Index("ix_rec_observations_patient_id_alt_code", rec_observations.c.patient_id, rec_observations.c.alt_code,
      postgresql_where=rec_observations.c.alt_code.is_not(None), sqlite_where=rec_observations.c.alt_code.is_not(None))
Index("ix_rec_observations_patient_id_report_key", rec_observations.c.patient_id, rec_observations.c.report_key)

rec_specimens = _fact_table(
    "rec_specimens",
    Column("report_key", String(KEY_LENGTH)),
    Column("type_code", String(CODE)),
    Column("collected", UTCDateTime),
)
Index("ix_rec_specimens_patient_id_report_key", rec_specimens.c.patient_id, rec_specimens.c.report_key)

rec_allergies = _fact_table(
    "rec_allergies",
    Column("code", String(CODE)),
    Column("code_system", String(CODE)),
)

rec_immunizations = _fact_table(
    "rec_immunizations",
    Column("code", String(CODE)),
    Column("code_system", String(CODE)),
    Column("status", String(32), nullable=False),
    Column("occurrence", UTCDateTime, nullable=False),
)

rec_conditions = _fact_table(
    "rec_conditions",
    Column("code", String(CODE)),
    Column("code_system", String(CODE)),
    Column("onset", UTCDateTime),
)

rec_procedures = _fact_table(
    "rec_procedures",
    Column("code", String(CODE)),
    Column("code_system", String(CODE)),
    Column("performed", UTCDateTime),
)

rec_history = Table(
    "rec_history",
    record_metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),  # patient, encounter, report, observation, ...
    Column("fact_id", Id, nullable=False),  # the row id in the kind's table
    Column("patient_id", Id, nullable=False),
    Column("key", String(KEY_LENGTH)),  # None for patients
    Column("fact", Json, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("message_uid", String(32), nullable=False),  # wrote this (now superseded) version
    Column("message_time", UTCDateTime, nullable=False),
    Column("superseded_at", UTCDateTime, nullable=False),
    Column("superseded_by", String(32), nullable=False),  # the message whose version replaced it
)
Index("ix_rec_history_kind_fact_id", rec_history.c.kind, rec_history.c.fact_id)

# fact kind (as in engine.record.facts.FACT_KINDS) -> table, for the keyed kinds
FACT_TABLES: dict[str, Table] = {
    "encounter": rec_encounters,
    "report": rec_reports,
    "observation": rec_observations,
    "specimen": rec_specimens,
    "allergy": rec_allergies,
    "immunization": rec_immunizations,
    "condition": rec_conditions,
    "procedure": rec_procedures,
}
