"""The central record as FHIR R4: render rows as resources, read one, search, Bundles.

Resource types: Patient, Encounter, DiagnosticReport, Observation, Specimen, AllergyIntolerance,
Immunization, Condition, Procedure. A resource's id is its row id (ids are per type); ``meta``
carries the fact's version and last update. References to the patient point at the survivor of a
merge (ADT^A40), so a merged patient's facts all point at the patient that replaced it; the
replaced Patient itself is still readable (``active: false``, ``link`` type ``replaced-by``).

Search (``search(conn, resource_type, params)``), one value per parameter:

- every type: ``_id``, ``_count`` (default 100, at most 1000; only the first page is returned,
  ``total`` counts every match), ``_format`` (json only);
- Patient: ``identifier`` = ``system|value``, ``|value`` (no system) or ``value`` (any system);
  the system may also be the assigning authority of identifiers that have no system. A match that
  was merged away brings its survivor along (``search.mode`` ``include``);
- other types: ``patient`` (``123`` or ``Patient/123``) and ``subject`` — the patient's whole merge
  group, so searching a merged-away patient finds the survivor's facts and vice versa;
- Observation, DiagnosticReport: ``code`` = ``system|code``, ``|code`` or ``code``, matching the
  first or the second coding (CWE identifier or alternate identifier);
- DiagnosticReport: ``identifier`` = the filler (accession) or placer order number (the system part,
  if given, is not compared).

Any other parameter raises ``SearchError`` naming it; an unknown type raises ``UnknownResourceType``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import ColumnElement, Connection, Row, Table, and_, false, func, or_, select

from engine.errors import EngineError
from engine.record import datatypes as T
from engine.record import facts as F
from engine.record.links import group_of, survivors
from engine.record.models import (
    FACT_TABLES,
    rec_observations,
    rec_patient_identifiers,
    rec_patient_links,
    rec_patients,
    rec_specimens,
)
from engine.record.writer import ASSIGNER_PREFIX, db_key

DEFAULT_COUNT = 100
MAX_COUNT = 1000
JSON_FORMATS = {"json", "application/json", "application/fhir+json"}

# FHIR resource type -> fact kind
KINDS = {
    "Encounter": "encounter", "DiagnosticReport": "report", "Observation": "observation", "Specimen": "specimen",
    "AllergyIntolerance": "allergy", "Immunization": "immunization", "Condition": "condition",
    "Procedure": "procedure",
}
RESOURCE_TYPES = ("Patient", *KINDS)


class SearchError(EngineError):
    """A search or read the record cannot answer as asked (a client error: HTTP 400)."""


class UnknownResourceType(SearchError):
    """The record holds no resources of this type (HTTP 404)."""


def _table(resource_type: str) -> Table:
    if resource_type == "Patient":
        return rec_patients
    if resource_type not in KINDS:
        raise UnknownResourceType(f"unknown resource type {resource_type!r}; the record serves "
                                  f"{', '.join(RESOURCE_TYPES)}")
    return FACT_TABLES[KINDS[resource_type]]


# -- rendering ------------------------------------------------------------------------------------

@dataclass
class _Context:
    """What rendering a page of rows needs besides the rows: survivors and related rows."""

    conn: Connection
    survivor: dict[int, int]

    def subject(self, patient_id: int) -> dict[str, str]:
        return {"reference": f"Patient/{self.survivor.get(patient_id, patient_id)}"}


def _meta(row: Row[Any]) -> dict[str, str]:
    return {"versionId": str(row.version), "lastUpdated": T.timestamp(row.updated_at)}


def _status(value: str | None, allowed: frozenset[str], default: str) -> str:
    return value if value in allowed else default


OBSERVATION_STATUS = frozenset({"registered", "preliminary", "final", "amended", "corrected", "cancelled",
                                "entered-in-error", "unknown"})
REPORT_STATUS = frozenset({"registered", "partial", "preliminary", "final", "amended", "corrected", "appended",
                           "cancelled", "entered-in-error", "unknown"})
ENCOUNTER_STATUS = frozenset({"planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled",
                              "entered-in-error", "unknown"})
IMMUNIZATION_STATUS = frozenset({"completed", "entered-in-error", "not-done"})
ALLERGY_CATEGORY = frozenset({"food", "medication", "environment", "biologic"})
ALLERGY_CRITICALITY = frozenset({"low", "high", "unable-to-assess"})
COMPARATORS = frozenset({"<", "<=", ">=", ">"})


def _value(v: F.Value | None) -> dict[str, Any]:
    """Observation.value[x] from a typed value."""
    if v is None:
        return {}
    if v.type == "quantity" and v.quantity is not None:
        if v.comparator and v.comparator not in COMPARATORS:  # "<>" has no FHIR Quantity comparator
            return {"valueString": f"{v.comparator}{v.quantity.value}"}
        return {"valueQuantity": T.quantity(v.quantity, v.comparator)}
    if v.type == "coded":
        return {"valueCodeableConcept": T.codeable(v.coded)}
    if v.type == "string":
        return {"valueString": v.string}
    if v.type == "range":
        return {"valueRange": T.clean({"low": T.quantity(v.low), "high": T.quantity(v.high)})}
    if v.type == "ratio":
        return {"valueRatio": T.clean({"numerator": T.quantity(v.low), "denominator": T.quantity(v.high)})}
    if v.type == "datetime":
        return {"valueDateTime": T.date_time(v.instant)}
    if v.type == "sn" and v.quantity is not None:  # a number with a suffix, e.g. "2+": keep it as text
        return {"valueString": f"{v.comparator or ''}{v.quantity.value}{v.string or ''}"}
    return {"valueString": v.string} if v.string else {}


def _reference_range(r: F.ReferenceRange | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return T.clean({"low": T.quantity(r.low), "high": T.quantity(r.high), "text": r.text}) or None


def _observation(ctx: _Context, row: Row[Any]) -> dict[str, Any]:
    f = F.Observation.model_validate(row.fact)
    return {
        "resourceType": "Observation", "id": str(row.id), "meta": _meta(row),
        "status": _status(f.status, OBSERVATION_STATUS, "unknown"),
        "code": T.codeable(f.code, required=True), "subject": ctx.subject(row.patient_id),
        "effectiveDateTime": T.date_time(f.effective), "issued": T.instant(f.issued),
        "performer": [{"display": d} for d in (f.performer, f.producing_lab) if d],
        **_value(f.value),
        "interpretation": [{"coding": [T.coding(c)]} for c in f.interpretation],
        "note": [{"text": n} for n in f.notes if n],
        "method": T.codeable(f.method),
        "referenceRange": [_reference_range(f.reference_range)],
    }


def _report(ctx: _Context, row: Row[Any], results: list[int], specimens: list[int]) -> dict[str, Any]:
    f = F.Report.model_validate(row.fact)
    ids = [T.identifier(i.model_copy(update={"type": i.type or t}))
           for i, t in ((f.filler_order, "FILL"), (f.placer_order, "PLAC")) if i is not None]
    return {
        "resourceType": "DiagnosticReport", "id": str(row.id), "meta": _meta(row), "identifier": ids,
        "status": _status(f.status, REPORT_STATUS, "unknown"), "code": T.codeable(f.code, required=True),
        "subject": ctx.subject(row.patient_id), "effectiveDateTime": T.date_time(f.effective),
        "issued": T.instant(f.issued), "performer": [{"display": f.performer}] if f.performer else [],
        "specimen": [{"reference": f"Specimen/{i}"} for i in specimens],
        "result": [{"reference": f"Observation/{i}"} for i in results],
    }


def _encounter(ctx: _Context, row: Row[Any]) -> dict[str, Any]:
    f = F.Encounter.model_validate(row.fact)
    cls = ({"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": T.code(f.class_code)}
           if T.code(f.class_code) else
           {"system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "code": "UNK"})
    return {
        "resourceType": "Encounter", "id": str(row.id), "meta": _meta(row),
        "status": _status(f.status, ENCOUNTER_STATUS, "unknown"), "class": cls,
        "subject": ctx.subject(row.patient_id),
        "period": {"start": T.date_time(f.start), "end": T.date_time(f.end)},
        "location": [{"location": {"display": f.location}}] if f.location else [],
    }


def _specimen(ctx: _Context, row: Row[Any]) -> dict[str, Any]:
    f = F.Specimen.model_validate(row.fact)
    return {
        "resourceType": "Specimen", "id": str(row.id), "meta": _meta(row), "type": T.codeable(f.type),
        "subject": ctx.subject(row.patient_id), "receivedTime": T.date_time(f.received),
        "collection": {"collectedDateTime": T.date_time(f.collected)},
    }


def _allergy(ctx: _Context, row: Row[Any]) -> dict[str, Any]:
    f = F.Allergy.model_validate(row.fact)
    return {
        "resourceType": "AllergyIntolerance", "id": str(row.id), "meta": _meta(row),
        "clinicalStatus": T.codeable_of("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                                        "active"),
        "category": [f.category] if f.category in ALLERGY_CATEGORY else [],
        "criticality": f.criticality if f.criticality in ALLERGY_CRITICALITY else None,
        "code": T.codeable(f.code), "patient": ctx.subject(row.patient_id),
        "onsetDateTime": T.date_time(f.onset),
        "reaction": [{"manifestation": [{"text": r}]} for r in f.reactions if r],
    }


def _immunization(ctx: _Context, row: Row[Any]) -> dict[str, Any]:
    f = F.Immunization.model_validate(row.fact)
    return {
        "resourceType": "Immunization", "id": str(row.id), "meta": _meta(row),
        "status": _status(f.status, IMMUNIZATION_STATUS, "completed"),
        "vaccineCode": T.codeable(f.vaccine, required=True), "patient": ctx.subject(row.patient_id),
        "occurrenceDateTime": T.date_time(f.occurrence), "primarySource": f.primary_source,
        "lotNumber": f.lot, "manufacturer": {"display": f.manufacturer} if f.manufacturer else None,
        "doseQuantity": T.quantity(f.dose),
    }


def _condition(ctx: _Context, row: Row[Any]) -> dict[str, Any]:
    f = F.Condition.model_validate(row.fact)
    codings = [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "encounter-diagnosis"}]
    kind = T.code(f.category)
    if kind:
        codings.append({"system": "http://terminology.hl7.org/CodeSystem/v2-0052", "code": kind})
    category = {"coding": codings}
    return {
        "resourceType": "Condition", "id": str(row.id), "meta": _meta(row), "category": [category],
        "code": T.codeable(f.code), "subject": ctx.subject(row.patient_id), "onsetDateTime": T.date_time(f.onset),
    }


def _procedure(ctx: _Context, row: Row[Any]) -> dict[str, Any]:
    f = F.Procedure.model_validate(row.fact)
    return {
        "resourceType": "Procedure", "id": str(row.id), "meta": _meta(row), "status": "completed",
        "code": T.codeable(f.code), "subject": ctx.subject(row.patient_id),
        "performedDateTime": T.date_time(f.performed),
    }


_RENDER: dict[str, Callable[[_Context, Row[Any]], dict[str, Any]]] = {
    "Encounter": _encounter, "Observation": _observation, "Specimen": _specimen, "AllergyIntolerance": _allergy,
    "Immunization": _immunization, "Condition": _condition, "Procedure": _procedure,
}


def _patients(conn: Connection, rows: Sequence[Row[Any]]) -> list[dict[str, Any]]:
    ids = [int(r.id) for r in rows]
    idents: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    t = rec_patient_identifiers
    for r in conn.execute(select(t).where(t.c.patient_id.in_(ids)).order_by(t.c.id)):
        i = F.Identifier(value=r.value, system=r.system, type=r.type, assigner=r.assigner)
        idents[int(r.patient_id)].append(T.identifier(i))
    links: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    replaced: set[int] = set()
    lk = rec_patient_links
    for r in conn.execute(select(lk.c.patient_id, lk.c.replaced_by_id)
                          .where(or_(lk.c.patient_id.in_(ids), lk.c.replaced_by_id.in_(ids))).order_by(lk.c.id)):
        if r.patient_id in links:
            links[r.patient_id].append({"other": {"reference": f"Patient/{r.replaced_by_id}"}, "type": "replaced-by"})
            replaced.add(int(r.patient_id))
        if r.replaced_by_id in links:
            links[r.replaced_by_id].append({"other": {"reference": f"Patient/{r.patient_id}"}, "type": "replaces"})
    out = []
    for row in rows:
        f = F.Patient.model_validate(row.fact)
        pid = int(row.id)
        deceased: dict[str, Any] = {}
        if isinstance(f.deceased, bool):
            deceased = {"deceasedBoolean": f.deceased}
        elif f.deceased is not None:
            deceased = {"deceasedDateTime": T.date_time(f.deceased)}
        out.append({
            "resourceType": "Patient", "id": str(pid), "meta": _meta(row), "identifier": idents[pid],
            "active": pid not in replaced, "name": [T.human_name(n) for n in f.names],
            "telecom": [T.contact_point(t) for t in f.telecom], "gender": f.gender,
            "birthDate": T.date(f.birth_date), **deceased, "address": [T.address(a) for a in f.addresses],
            "link": links[pid],
        })
    return out


def _related(conn: Connection, table: Table, ctx: _Context,
             rows: Sequence[Row[Any]]) -> dict[tuple[int, str], list[int]]:
    """Ids of the rows of ``table`` (observations, specimens) under each report, by (survivor, report key)."""
    keys = {str(r.key) for r in rows}
    members: set[int] = set()
    for root in {ctx.survivor[int(r.patient_id)] for r in rows}:
        members.update(group_of(ctx.conn, root))
    found = conn.execute(select(table.c.id, table.c.patient_id, table.c.report_key)
                         .where(table.c.patient_id.in_(sorted(members)), table.c.report_key.in_(sorted(keys)))
                         .order_by(table.c.id)).all()
    roots = survivors(conn, {int(r.patient_id) for r in found})
    out: dict[tuple[int, str], list[int]] = {}
    for r in found:
        out.setdefault((roots[int(r.patient_id)], str(r.report_key)), []).append(int(r.id))
    return out


def render(conn: Connection, resource_type: str, rows: Sequence[Row[Any]]) -> list[dict[str, Any]]:
    """Render rows of ``resource_type``'s table (all columns selected) as FHIR resources."""
    if not rows:
        return []
    if resource_type == "Patient":
        return [T.clean(r) for r in _patients(conn, rows)]
    ctx = _Context(conn, survivors(conn, {int(r.patient_id) for r in rows}))
    if resource_type == "DiagnosticReport":
        results = _related(conn, rec_observations, ctx, rows)
        specimens = _related(conn, rec_specimens, ctx, rows)
        out = []
        for r in rows:
            k = (ctx.survivor[int(r.patient_id)], db_key(str(r.key)))
            out.append(T.clean(_report(ctx, r, results.get(k, []), specimens.get(k, []))))
        return out
    fn = _RENDER[resource_type]
    return [T.clean(fn(ctx, r)) for r in rows]


# -- read and search ------------------------------------------------------------------------------

def _row_id(value: str) -> int | None:
    v = value.strip()
    if v.startswith("Patient/"):
        v = v[len("Patient/"):]
    return int(v) if v.isdigit() and len(v) < 19 else None


def read(conn: Connection, resource_type: str, resource_id: str) -> dict[str, Any] | None:
    """One resource by id, or None."""
    table = _table(resource_type)
    rid = _row_id(resource_id) if "/" not in resource_id else None
    if rid is None:
        return None
    row = conn.execute(select(table).where(table.c.id == rid)).first()
    return render(conn, resource_type, [row])[0] if row is not None else None


def _token(value: str) -> tuple[str | None, str]:
    """``system|code`` -> (system, code); ``|code`` -> ("", code); ``code`` -> (None, code)."""
    if "|" in value:
        system, _, rest = value.partition("|")
        return system, rest
    return None, value


def _code_match(table: Table, value: str, pairs: Sequence[tuple[str, str]]) -> ColumnElement[bool]:
    system, code = _token(value)
    conds = []
    for code_col, system_col in pairs:
        c, s = table.c[code_col], table.c[system_col]
        if system is None:
            conds.append(c == code)
        elif system == "":
            conds.append(and_(c == code, s.is_(None)))
        else:
            conds.append(and_(c == code, s == system))
    return or_(*conds)


def patient_identifier_filter(conn: Connection, value: str) -> ColumnElement[bool]:
    t = rec_patient_identifiers
    system, ident = _token(value)
    cond = t.c.value == ident
    if system == "":
        cond = and_(cond, t.c.namespace == "")
    elif system is not None:
        cond = and_(cond, t.c.namespace.in_([system, f"{ASSIGNER_PREFIX}{system}"]))
    return rec_patients.c.id.in_(select(t.c.patient_id).where(cond))


def _patient_group(conn: Connection, table: Table, value: str) -> ColumnElement[bool]:
    pid = _row_id(value)
    if pid is None:
        return false()
    return table.c.patient_id.in_(group_of(conn, pid))


Param = Callable[[Connection, Table, str], ColumnElement[bool]]


def _by_id(conn: Connection, table: Table, value: str) -> ColumnElement[bool]:
    rid = _row_id(value) if "/" not in value else None
    return table.c.id == rid if rid is not None else false()


PARAMS: dict[str, dict[str, Param]] = {
    "Patient": {"_id": _by_id, "identifier": lambda conn, t, v: patient_identifier_filter(conn, v)},
    **{rt: {"_id": _by_id, "patient": _patient_group, "subject": _patient_group} for rt in KINDS},
}
PARAMS["Observation"]["code"] = lambda conn, t, v: _code_match(t, v, [("code", "code_system"),
                                                                       ("alt_code", "alt_code_system")])
PARAMS["DiagnosticReport"]["code"] = lambda conn, t, v: _code_match(t, v, [("code", "code_system")])
PARAMS["DiagnosticReport"]["identifier"] = lambda conn, t, v: or_(t.c.filler_number == _token(v)[1],
                                                                   t.c.placer_number == _token(v)[1])


def _count(value: str) -> int:
    if not value.strip().isdigit():
        raise SearchError("_count must be a whole number")
    return min(int(value), MAX_COUNT)


def search(conn: Connection, resource_type: str, params: dict[str, str], *, base_url: str = "") -> dict[str, Any]:
    """A searchset Bundle of the ``resource_type`` resources matching ``params`` (see the module doc)."""
    table = _table(resource_type)
    supported = PARAMS[resource_type]
    limit = DEFAULT_COUNT
    conds: list[ColumnElement[bool]] = []
    for name, value in params.items():
        if name == "_count":
            limit = _count(value)
        elif name == "_format":
            if value not in JSON_FORMATS:
                raise SearchError("_format: this server answers in JSON only")
        elif name in supported:
            if not value.strip():
                raise SearchError(f"search parameter {name!r} has no value")
            conds.append(supported[name](conn, table, value.strip()))
        else:
            raise SearchError(f"unknown search parameter {name!r} for {resource_type}; supported: "
                              f"{', '.join(sorted({*supported, '_count', '_format'}))}")
    total = int(conn.execute(select(func.count()).select_from(table).where(*conds)).scalar_one())
    rows = conn.execute(select(table).where(*conds).order_by(table.c.id).limit(limit)).all() if limit else []
    entries = [(r, "match") for r in render(conn, resource_type, rows)]
    if resource_type == "Patient" and rows:
        entries += [(r, "include") for r in _survivors_of(conn, [int(r.id) for r in rows])]
    prefix = f"{base_url.rstrip('/')}/" if base_url else ""
    query = urlencode(params)
    return T.clean({
        "resourceType": "Bundle", "type": "searchset", "total": total,
        "link": [{"relation": "self", "url": f"{prefix}{resource_type}" + (f"?{query}" if query else "")}],
        "entry": [{"fullUrl": f"{prefix}{r['resourceType']}/{r['id']}" if prefix else None, "resource": r,
                   "search": {"mode": mode}} for r, mode in entries],
    })


def _survivors_of(conn: Connection, patient_ids: list[int]) -> list[dict[str, Any]]:
    """The survivors of merged-away patients among ``patient_ids`` that are not in it themselves."""
    extra = sorted({s for s in survivors(conn, patient_ids).values()} - set(patient_ids))
    if not extra:
        return []
    rows = conn.execute(select(rec_patients).where(rec_patients.c.id.in_(extra)).order_by(rec_patients.c.id)).all()
    return render(conn, "Patient", rows)
