"""Export the record as one FHIR R4 Bundle (type ``collection``): ``export_bundle(conn, identifier)``.

With an identifier (``system|value``, ``|value`` or a bare value, as the Patient ``identifier``
search takes it) the Bundle holds every patient of the matching patients' merge groups (the
survivor and the patients it replaced) and all their resources; with None, every patient and every
resource in the record. The Bundle is built in memory.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, select, true

from engine.record import datatypes as T
from engine.record.fhir import KINDS, patient_identifier_filter, render
from engine.record.links import group_of
from engine.record.models import FACT_TABLES, rec_patients


def export_bundle(conn: Connection, identifier: str | None) -> dict[str, Any]:
    """A collection Bundle of the patient(s) found by ``identifier`` (every patient's when None)."""
    patient_cond: ColumnElement[bool] = true()
    members: list[int] | None = None
    if identifier is not None:
        cond = patient_identifier_filter(conn, identifier.strip())
        matched = conn.execute(select(rec_patients.c.id).where(cond)).all()
        group: set[int] = set()
        for row in matched:
            group.update(group_of(conn, int(row.id)))
        members = sorted(group)
        patient_cond = rec_patients.c.id.in_(members)
    resources: list[dict[str, Any]] = []
    rows = conn.execute(select(rec_patients).where(patient_cond).order_by(rec_patients.c.id)).all()
    resources += render(conn, "Patient", rows)
    if members is None or members:
        for resource_type, kind in KINDS.items():
            table = FACT_TABLES[kind]
            cond = table.c.patient_id.in_(members) if members is not None else true()
            rows = conn.execute(select(table).where(cond).order_by(table.c.id)).all()
            resources += render(conn, resource_type, rows)
    return T.clean({
        "resourceType": "Bundle", "type": "collection", "timestamp": T.timestamp(datetime.now(UTC)),
        "entry": [{"resource": r} for r in resources],
    })
