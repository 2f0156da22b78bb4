"""The central record as FHIR R4 (engine.record.fhir, engine.record.export, engine.admin.http).

Every resource and Bundle the record renders is validated against HL7's FHIR R4 JSON schema
(tests/fixtures/fhir/, see its README), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jsonschema  # type: ignore[import-untyped]
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from engine.admin.http import capability_statement, create_app
from engine.record import datatypes as T
from engine.record import facts as F
from engine.record.export import export_bundle
from engine.record.fhir import RESOURCE_TYPES, SearchError, UnknownResourceType, read, render, search
from engine.record.models import FACT_TABLES, rec_patients
from engine.record.writer import apply
from tests.test_record import T0, at, cc, ident, lab_message, observation, patient, qty, report

SCHEMA = Path(__file__).parent / "fixtures" / "fhir" / "fhir.schema.json.gz"
MINSK = ZoneInfo("Europe/Minsk")


# -- the schema -----------------------------------------------------------------------------------

@cache
def _definitions() -> dict[str, Any]:
    with gzip.open(SCHEMA, "rt", encoding="utf-8") as f:
        schema = json.load(f)
    assert schema["id"] == "http://hl7.org/fhir/json-schema/4.0"
    defs: dict[str, Any] = schema["definitions"]
    # the file is the 4.0.0 edition of R4; the 4.0.1 technical correction added "4.0.1" to the
    # FHIR version value set, which the record's CapabilityStatement reports
    versions = defs["CapabilityStatement"]["properties"]["fhirVersion"]["enum"]
    assert versions[-1] == "4.0.0"
    versions.append("4.0.1")
    return defs


@cache
def _validator(resource_type: str) -> jsonschema.Draft6Validator:
    schema = {"$schema": "http://json-schema.org/draft-06/schema#", "definitions": _definitions(),
              "$ref": f"#/definitions/{resource_type}"}
    return jsonschema.Draft6Validator(schema)


# Required (1..1) primitive elements: the JSON schema cannot require them (a primitive may come as
# its "_element" extension alone), so they are checked here.
REQUIRED_PRIMITIVES = {
    "Observation": ["status"], "DiagnosticReport": ["status"], "Encounter": ["status"],
    "Immunization": ["status", "occurrenceDateTime"], "Procedure": ["status"], "Bundle": ["type"],
    "CapabilityStatement": ["status", "date", "kind", "fhirVersion", "format"],
}


def problems(resource: dict[str, Any]) -> list[str]:
    """Schema errors of a resource (and of each resource in a Bundle, by its own definition)."""
    rt = resource.get("resourceType", "")
    if rt not in _definitions():
        return [f"unknown resourceType {rt!r}"]
    out = [f"{rt}/{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}"
           for e in _validator(rt).iter_errors(resource)]
    out += [f"{rt}: {name} is required" for name in REQUIRED_PRIMITIVES.get(rt, []) if name not in resource]
    out += [f"OperationOutcome: issue {i} needs severity and code" for i, issue in enumerate(resource.get("issue", []))
            if rt == "OperationOutcome" and not ("severity" in issue and "code" in issue)]
    for entry in resource.get("entry", []) if rt == "Bundle" else []:
        out += problems(entry["resource"])
    return out


def assert_valid(resource: dict[str, Any]) -> None:
    found = problems(resource)
    assert not found, "\n".join(found)


def test_the_schema_is_r4_and_catches_errors() -> None:
    defs = _definitions()
    assert "MedicinalProductPharmaceutical" in defs  # R4 (R4B/R5 renamed it)
    assert "SubstanceDefinition" not in defs  # R5
    good = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    assert problems(good) == []
    assert problems({**good, "status": "done"})  # not in the value set
    assert problems({**good, "effectiveDateTime": "2026-11-22T10:15+03:00"})  # dateTime needs seconds
    assert problems({**good, "valueString": ""})  # no empty strings
    assert problems({**good, "valueQuantity": {"value": "5"}})  # decimals are numbers
    assert problems({"resourceType": "Observation", "status": "final"})  # code is required
    assert problems({"resourceType": "Observation", "code": {"text": "x"}})  # status too (checked here)
    assert problems({**good, "subject": {"reference": "Patient/1"}, "extra": 1})  # no unknown elements


# -- a message with every kind of fact ------------------------------------------------------------

def minsk(text: str, precision: F.Precision) -> F.Instant:
    """An instant sent as ``text`` (YYYY[MM[DD[HHMM]]]) without an offset, read in Europe/Minsk."""
    y, mo, d, h, mi = (int(text[i:i + n] or dflt) for i, n, dflt in
                       ((0, 4, 1), (4, 2, 1), (6, 2, 1), (8, 2, 0), (10, 2, 0)))
    local = datetime(y, mo, d, h, mi, tzinfo=MINSK)
    return F.Instant(at=local.astimezone(UTC), precision=precision, text=text)


def value(type_: str, **kw: Any) -> F.Value:
    return F.Value(type=type_, **kw)


def full_message(*identifiers: F.Identifier) -> F.MappedMessage:
    base = patient(*identifiers)
    base.deceased = False
    obs = [
        observation(),  # quantity with reference range, interpretation, notes, performers
        F.Observation(key="ACC-1|K|1", report_key="ACC-1", code=cc("K", "L"), status="preliminary",
                      value=value("quantity", quantity=qty("0.5", "mmol/L"), comparator="<")),
        F.Observation(key="ACC-1|ABO|1", report_key="ACC-1", code=cc("ABO", "L"), status="final",
                      value=value("coded", coded=cc("A+", "L", "A positive"))),
        F.Observation(key="ACC-1|TXT|1", report_key="ACC-1", code=cc("TXT", "L"), status="final",
                      value=value("string", string="line 1\nline 2")),
        F.Observation(key="ACC-1|RNG|1", report_key="ACC-1", code=cc("RNG", "L"), status="final",
                      value=value("range", low=qty("3"), high=qty("5"))),
        F.Observation(key="ACC-1|TTR|1", report_key="ACC-1", code=cc("TTR", "L"), status="final",
                      value=value("ratio", low=qty("1", "1"), high=qty("128", "1"))),
        F.Observation(key="ACC-1|DT|1", report_key="ACC-1", code=cc("DT", "L"), status="final",
                      value=value("datetime", instant=minsk("20261122", "day"))),
        F.Observation(key="ACC-1|SN|1", report_key="ACC-1", code=cc("SN", "L"), status="final",
                      value=value("sn", quantity=qty("2", "1"), string="+")),
        F.Observation(key="ACC-1|NE|1", report_key="ACC-1", code=cc("NE", "L"), status="final",
                      value=value("quantity", quantity=qty("7", "1"), comparator="<>")),
        F.Observation(key="ACC-1|NOVAL|1", report_key="ACC-1", code=F.CodeableConcept(), status="weird"),
    ]
    return F.MappedMessage(
        patient=base,
        encounters=[F.Encounter(key="V-1", status="in-progress", class_code="IMP", location="Ward 3^12^A",
                                start=at(-600), end=None),
                    F.Encounter(key="V-2")],
        reports=[report(), report("ACC-2", status="nonsense")],
        observations=obs,
        specimens=[F.Specimen(key="SPM-1", report_key="ACC-1", collected=at(-30), received=at(-10),
                              type=cc("BLD", "http://terminology.hl7.org/CodeSystem/v2-0487"))],
        allergies=[F.Allergy(key="PENICILLIN", code=cc("P1", "L", "Penicillin"), category="medication",
                             criticality="high", reactions=["rash", "hives"], onset=minsk("2001", "year")),
                   F.Allergy(key="DUST", code=F.CodeableConcept(text="dust"), category="EA", criticality="SV")],
        immunizations=[F.Immunization(key="CVX-03|20261122", vaccine=cc("03", "http://hl7.org/fhir/sid/cvx", "MMR"),
                                      occurrence=minsk("20261122", "day"), dose=qty("0.5", "mL"), lot="L123",
                                      manufacturer="Merck", primary_source=True)],
        conditions=[F.Condition(key="J18.9", code=cc("J18.9", "http://hl7.org/fhir/sid/icd-10"),
                                onset=minsk("202611", "month"), category="F")],
        procedures=[F.Procedure(key="0DTJ4ZZ|2026", code=cc("0DTJ4ZZ", "ICD10PCS"), performed=at(0, "minute", ""))],
        message_time=at(0, "second"),
    )


# -- fixtures -------------------------------------------------------------------------------------

# db_url (SQLite and PostgreSQL, migrated) and engine: tests/conftest.py


@pytest.fixture
def record(engine: Engine) -> dict[str, int]:
    """Two patients: one with every kind of fact, one merged into it (ADT^A40) with a lab result."""
    ids = {}
    with engine.begin() as conn:
        ids["old"] = apply(conn, lab_message(ident("MRN-OLD"), acc="ACC-9",
                                       obs=[observation("6690-2", "7.1", report="ACC-9")]),
                           message_uid="m0", received_at=T0).patient_id or 0
        main = full_message(ident("MRN-1"), ident("NAT-1", "urn:oid:1.2.112.ni", "NI"))
        ids["main"] = apply(conn, main, message_uid="m1", received_at=T0).patient_id or 0
        apply(conn, F.MappedMessage(patient=main.patient, merges=[F.Merge(replaced=[ident("MRN-OLD")])],
                                    message_time=at(60)), message_uid="m2", received_at=T0)
    return ids


def _entries(bundle: dict[str, Any], resource_type: str | None = None) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", [])
            if resource_type is None or e["resource"]["resourceType"] == resource_type]


# -- every rendering is valid R4 ------------------------------------------------------------------

def test_every_rendered_resource_is_valid_fhir_r4(engine: Engine, record: dict[str, int]) -> None:
    with engine.connect() as conn:
        everything = export_bundle(conn, None)
        assert_valid(everything)
        seen = {r["resourceType"] for r in _entries(everything)}
        assert seen == set(RESOURCE_TYPES)
        for resource_type in RESOURCE_TYPES:
            bundle = search(conn, resource_type, {}, base_url="http://localhost/fhir")
            assert_valid(bundle)
            assert bundle["total"] == len(bundle["entry"]) > 0
            for resource in _entries(bundle):
                assert read(conn, resource_type, resource["id"]) == resource
        assert_valid(export_bundle(conn, "MRN-1"))
        assert_valid(search(conn, "Patient", {"identifier": "MRN-OLD"}))
    assert_valid(capability_statement())


# -- rendering details ----------------------------------------------------------------------------

def _observation(conn: Any, patient_id: int, code: str) -> dict[str, Any]:
    found = _entries(search(conn, "Observation", {"patient": str(patient_id), "code": code}))
    assert len(found) == 1, found
    return found[0]


def test_observation_values(engine: Engine, record: dict[str, int]) -> None:
    p = record["main"]
    with engine.connect() as conn:
        hgb = _observation(conn, p, "http://loinc.org|718-7")
        assert hgb["valueQuantity"] == {"value": 135, "unit": "g/L", "system": "http://unitsofmeasure.org",
                                        "code": "g/L"}
        assert hgb["code"]["coding"][1] == {"system": "http://loinc.org", "code": "718-7", "display": "Hemoglobin"}
        assert hgb["referenceRange"] == [{"low": {"value": 120, "unit": "g/L", "system": "http://unitsofmeasure.org",
                                                  "code": "g/L"},
                                          "high": {"value": 160, "unit": "g/L", "system": "http://unitsofmeasure.org",
                                                   "code": "g/L"},
                                          "text": "120-160"}]
        assert hgb["interpretation"][0]["coding"][0]["code"] == "N"
        assert hgb["performer"] == [{"display": "Dr Who"}, {"display": "Central lab"}]
        assert hgb["note"] == [{"text": "hemolysed sample"}]
        assert hgb["subject"] == {"reference": f"Patient/{p}"}
        assert hgb["effectiveDateTime"] == "2026-11-22T07:15:00+00:00"
        assert hgb["issued"] == "2026-11-22T07:45:00+00:00"
        assert hgb["meta"]["versionId"] == "1"
        k = _observation(conn, p, "K")
        assert k["valueQuantity"]["comparator"] == "<" and k["valueQuantity"]["value"] == 0.5
        assert k["status"] == "preliminary"
        assert _observation(conn, p, "ABO")["valueCodeableConcept"] == {
            "coding": [{"system": "L", "code": "A+", "display": "A positive"}]}
        assert _observation(conn, p, "TXT")["valueString"] == "line 1\nline 2"
        assert _observation(conn, p, "RNG")["valueRange"]["low"]["value"] == 3
        ratio = _observation(conn, p, "TTR")["valueRatio"]
        assert (ratio["numerator"]["value"], ratio["denominator"]["value"]) == (1, 128)
        assert _observation(conn, p, "DT")["valueDateTime"] == "2026-11-22"
        assert _observation(conn, p, "SN")["valueString"] == "2+"
        assert _observation(conn, p, "NE")["valueString"] == "<>7"
        unknown = [o for o in _entries(search(conn, "Observation", {"patient": str(p)}))
                   if o["code"] == {"text": "unknown"}]
        assert len(unknown) == 1 and unknown[0]["status"] == "unknown" and "valueString" not in unknown[0]


def test_report_references_its_results_and_specimen(engine: Engine, record: dict[str, int]) -> None:
    with engine.connect() as conn:
        reports = _entries(search(conn, "DiagnosticReport", {"patient": str(record["main"])}))
        by_key = {r["identifier"][0]["value"]: r for r in reports}
        acc1 = by_key["ACC-1"]
        results = {ref["reference"] for ref in acc1["result"]}
        assert len(results) == 10
        for ref in results:
            rt, rid = ref.split("/")
            resource = read(conn, rt, rid)
            assert resource is not None and resource["subject"] == acc1["subject"]
        assert [s["reference"].split("/")[0] for s in acc1["specimen"]] == ["Specimen"]
        assert acc1["identifier"][0]["type"]["coding"][0]["code"] == "FILL"
        assert acc1["identifier"][1] == {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                              "code": "PLAC"}]}, "value": "P-ACC-1"}
        assert by_key["ACC-2"]["status"] == "unknown" and "result" not in by_key["ACC-2"]
        # the merged-away patient's report keeps its own results, now pointing at the survivor
        acc9 = by_key["ACC-9"]
        assert acc9["subject"] == {"reference": f"Patient/{record['main']}"} and len(acc9["result"]) == 1


def test_patient_and_other_resources(engine: Engine, record: dict[str, int]) -> None:
    with engine.connect() as conn:
        p = read(conn, "Patient", str(record["main"]))
        assert p is not None
        assert p["name"] == [{"use": "official", "family": "Иванов", "given": ["Иван", "Петрович"]}]
        assert p["birthDate"] == "1980-02-01"  # the date as sent, not the UTC instant's
        assert p["gender"] == "male" and p["deceasedBoolean"] is False
        assert p["telecom"] == [{"system": "phone", "value": "+375291234567"},
                                {"system": "email", "value": "ivanov@example.org"}]
        assert p["address"] == [{"line": ["ул. Ленина 1"], "city": "Минск", "country": "BY"}]
        assert [i["value"] for i in p["identifier"]] == ["MRN-1", "NAT-1"]
        assert p["link"] == [{"other": {"reference": f"Patient/{record['old']}"}, "type": "replaces"}]
        pid = str(record["main"])
        enc = _entries(search(conn, "Encounter", {"patient": pid}))
        assert enc[0]["class"]["code"] == "IMP" and enc[0]["status"] == "in-progress"
        assert enc[0]["location"] == [{"location": {"display": "Ward 3^12^A"}}]
        assert enc[1]["status"] == "unknown" and enc[1]["class"]["code"] == "UNK"
        allergies = _entries(search(conn, "AllergyIntolerance", {"patient": pid}))
        assert allergies[0]["category"] == ["medication"] and allergies[0]["criticality"] == "high"
        assert allergies[0]["onsetDateTime"] == "2001"
        assert allergies[0]["reaction"] == [{"manifestation": [{"text": "rash"}]},
                                            {"manifestation": [{"text": "hives"}]}]
        assert "category" not in allergies[1] and "criticality" not in allergies[1]  # not FHIR codes: left out
        imm = _entries(search(conn, "Immunization", {"patient": pid}))[0]
        assert imm["occurrenceDateTime"] == "2026-11-22" and imm["lotNumber"] == "L123"
        assert imm["doseQuantity"]["value"] == 0.5 and imm["primarySource"] is True
        cond = _entries(search(conn, "Condition", {"patient": pid}))[0]
        assert cond["onsetDateTime"] == "2026-11"
        assert cond["category"][0]["coding"][1] == {"system": "http://terminology.hl7.org/CodeSystem/v2-0052",
                                                    "code": "F"}
        proc = _entries(search(conn, "Procedure", {"patient": pid}))[0]
        assert proc["performedDateTime"] == "2026-11-22T07:15:00+00:00" and proc["status"] == "completed"
        spm = _entries(search(conn, "Specimen", {"patient": pid}))[0]
        assert spm["collection"]["collectedDateTime"] == "2026-11-22T06:45:00+00:00"


# -- dates and times ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "precision", "expected"), [
    ("2026", "year", "2026"),
    ("202611", "month", "2026-11"),
    ("20261122", "day", "2026-11-22"),
    ("2026112210", "hour", "2026-11-22T10:00:00+03:00"),
    ("202611221015", "minute", "2026-11-22T10:15:00+03:00"),
    ("20261122101530", "second", "2026-11-22T10:15:30+03:00"),
    ("20261122101530.1234", "millisecond", "2026-11-22T10:15:30.1234+03:00"),
    ("202611221015-0500", "minute", "2026-11-22T10:15:00-05:00"),
    ("202611221015+0000", "minute", "2026-11-22T10:15:00+00:00"),
])
def test_date_times_keep_their_precision_and_wall_time(text: str, precision: str, expected: str) -> None:
    from engine.mapping.convert import dtm  # the mapping's own conversion: the contract end to end

    inst = dtm(text, MINSK)
    assert inst is not None and inst.precision == precision
    assert T.date_time(inst) == expected
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "effectiveDateTime": expected}
    assert_valid(obs)


def test_dates_and_instants() -> None:
    day = F.Instant(at=datetime(2026, 11, 21, 21, tzinfo=UTC), precision="day", text="20261122")
    assert T.date_time(day) == "2026-11-22"  # local midnight in Minsk is 21:00 UTC the day before
    assert T.instant(day) == "2026-11-22T00:00:00+03:00"
    born = F.Instant(at=datetime(1980, 2, 1, 5, 30, tzinfo=UTC), precision="minute", text="198002010830")
    assert T.date(born) == "1980-02-01"
    bare = F.Instant(at=datetime(2026, 11, 22, 7, 15, 30, 250000, tzinfo=UTC), precision="millisecond")
    assert T.date_time(bare) == "2026-11-22T07:15:30.250+00:00"  # no original text: the UTC instant
    assert T.instant(F.Instant(at=datetime(2026, 11, 22, 7, 15, tzinfo=UTC), precision="minute")) == \
        "2026-11-22T07:15:00+00:00"
    assert T.date_time(None) is None and T.date(None) is None and T.instant(None) is None
    assert T.number(Decimal("100")) == 100 and isinstance(T.number(Decimal("100")), int)
    assert T.number(Decimal("1.50")) == 1.5 and T.number(Decimal("1E+2")) == 100
    assert T.code("  a   b ") == "a b" and T.code("  ") is None and T.uri("99 LOCAL") == "99%20LOCAL"


# -- search ---------------------------------------------------------------------------------------

def test_patient_search(engine: Engine, record: dict[str, int]) -> None:
    main, old = str(record["main"]), str(record["old"])
    with engine.connect() as conn:
        def ids(params: dict[str, str]) -> list[tuple[str, str]]:
            bundle = search(conn, "Patient", params)
            return [(e["resource"]["id"], e["search"]["mode"]) for e in bundle.get("entry", [])]

        assert ids({"_id": main}) == [(main, "match")]
        assert ids({"identifier": "urn:oid:1.2.3.mrn|MRN-1"}) == [(main, "match")]
        assert ids({"identifier": "MRN-1"}) == [(main, "match")]
        assert ids({"identifier": "urn:oid:1.2.112.ni|NAT-1"}) == [(main, "match")]
        assert ids({"identifier": "urn:other|MRN-1"}) == []
        assert ids({"identifier": "|MRN-1"}) == []  # it has a system
        assert ids({"identifier": "MRN-OLD"}) == [(old, "match"), (main, "include")]
        assert ids({"_id": "nope"}) == [] and ids({"_id": "999999"}) == []
        assert search(conn, "Patient", {"_count": "1"})["total"] == 2
        assert ids({"_count": "1"}) == [(old, "match"), (main, "include")]  # the page's survivor comes along
        assert "entry" not in search(conn, "Patient", {"_count": "0"})


def test_assigner_identifier_search(engine: Engine) -> None:
    with engine.begin() as conn:
        pid = apply(conn, lab_message(ident("42", None, "MR", "HOSP")), message_uid="m1", received_at=T0).patient_id
        bundle = search(conn, "Patient", {"identifier": "HOSP|42"})
        assert [e["resource"]["id"] for e in bundle["entry"]] == [str(pid)]
        resource = bundle["entry"][0]["resource"]
        assert resource["identifier"][0] == {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                                  "code": "MR"}]},
                                             "value": "42", "assigner": {"display": "HOSP"}}
        assert_valid(resource)


def test_fact_search(engine: Engine, record: dict[str, int]) -> None:
    main, old = str(record["main"]), str(record["old"])
    with engine.connect() as conn:
        def total(rt: str, params: dict[str, str]) -> int:
            return int(search(conn, rt, params)["total"])

        assert total("Observation", {"patient": main}) == 11  # 10 + 1 of the merged-away patient
        assert total("Observation", {"patient": old}) == 11  # reads of the replaced patient follow the link
        assert total("Observation", {"subject": f"Patient/{main}"}) == 11
        assert total("Observation", {"patient": main, "code": "http://loinc.org|718-7"}) == 1
        assert total("Observation", {"patient": main, "code": "L|HGB"}) == 2  # both patients' local code
        assert total("Observation", {"code": "718-7"}) == 1
        assert total("Observation", {"code": "|718-7"}) == 0
        assert total("Observation", {"code": "6690-2"}) == 1
        assert total("Observation", {"patient": "Patient/abc"}) == 0
        assert total("DiagnosticReport", {"identifier": "ACC-2"}) == 1
        assert total("DiagnosticReport", {"identifier": "P-ACC-1"}) == 1
        assert total("DiagnosticReport", {"code": "L|CBC", "patient": main}) == 3
        page = search(conn, "Observation", {"patient": main, "_count": "3"}, base_url="http://h/fhir")
        assert page["total"] == 11 and len(page["entry"]) == 3
        assert page["entry"][0]["fullUrl"].startswith("http://h/fhir/Observation/")
        assert page["link"][0]["url"].startswith("http://h/fhir/Observation?patient=")


def test_search_errors_name_the_parameter(engine: Engine, record: dict[str, int]) -> None:
    with engine.connect() as conn:
        with pytest.raises(SearchError, match="'name'"):
            search(conn, "Patient", {"name": "x"})
        with pytest.raises(SearchError, match="'code'"):
            search(conn, "Encounter", {"code": "x"})
        with pytest.raises(SearchError, match="'code:text'"):
            search(conn, "Observation", {"code:text": "x"})
        with pytest.raises(SearchError, match="_count"):
            search(conn, "Observation", {"_count": "-1"})
        with pytest.raises(SearchError, match="no value"):
            search(conn, "Observation", {"patient": " "})
        with pytest.raises(UnknownResourceType, match="Medication"):
            search(conn, "Medication", {})
        with pytest.raises(UnknownResourceType):
            read(conn, "Foo", "1")
        assert read(conn, "Patient", "999999") is None and read(conn, "Patient", "x/1") is None


def test_export_bundle(engine: Engine, record: dict[str, int]) -> None:
    with engine.connect() as conn:
        everything = export_bundle(conn, None)
        assert everything["type"] == "collection"
        one = export_bundle(conn, "urn:oid:1.2.3.mrn|MRN-OLD")  # the merged group, found by the old identifier
        assert {p["id"] for p in _entries(one, "Patient")} == {str(record["main"]), str(record["old"])}
        assert len(_entries(one, "Observation")) == 11
        assert len(_entries(one)) == len(_entries(everything))
        assert "entry" not in export_bundle(conn, "no-such-identifier")
        json.dumps(everything)  # plain JSON (the CLI prints it)
        # render() takes the rows of any type
        rows = conn.execute(select(rec_patients)).all()
        assert [r["resourceType"] for r in render(conn, "Patient", rows)] == ["Patient", "Patient"]
        assert render(conn, "Observation", []) == []
        assert set(FACT_TABLES) == {"encounter", "report", "observation", "specimen", "allergy", "immunization",
                                    "condition", "procedure"}


# -- HTTP -----------------------------------------------------------------------------------------

@pytest.fixture
def client(db_url: str, record: dict[str, int]) -> Iterator[TestClient]:
    with TestClient(create_app(db_url), client=("127.0.0.1", 50000)) as c:  # loopback: no token needed
        yield c


def test_http_read_and_search(client: TestClient, record: dict[str, int]) -> None:
    r = client.get(f"/fhir/Patient/{record['main']}")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    assert body["resourceType"] == "Patient" and body["name"][0]["family"] == "Иванов"
    assert_valid(body)
    r = client.get("/fhir/Observation", params={"patient": str(record["main"]), "code": "http://loinc.org|718-7"})
    assert r.status_code == 200
    bundle = r.json()
    assert bundle["type"] == "searchset" and bundle["total"] == 1
    assert bundle["entry"][0]["fullUrl"] == f"http://testserver/fhir/Observation/{bundle['entry'][0]['resource']['id']}"
    assert_valid(bundle)
    obs_id = bundle["entry"][0]["resource"]["id"]
    assert client.get(f"/fhir/Observation/{obs_id}").json() == bundle["entry"][0]["resource"]
    r = client.get("/fhir/Patient", params={"identifier": "MRN-OLD"})
    assert [e["search"]["mode"] for e in r.json()["entry"]] == ["match", "include"]


def test_http_errors_are_operation_outcomes(client: TestClient) -> None:
    cases = [
        ("/fhir/Patient/999999", 404, "not-found"),
        ("/fhir/Medication/1", 404, "not-supported"),
        ("/fhir/Medication", 404, "not-supported"),
        ("/fhir/Observation?bogus=1", 400, "invalid"),
        ("/fhir/Observation?patient=1&patient=2", 400, "not-supported"),
        ("/fhir/Observation?_count=x", 400, "invalid"),
        ("/nothing/here", 404, "not-found"),
    ]
    for path, status, code in cases:
        r = client.get(path)
        assert r.status_code == status, path
        assert r.headers["content-type"].startswith("application/fhir+json"), path
        body = r.json()
        assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == code, (path, body)
        assert_valid(body)
    assert "'bogus'" in client.get("/fhir/Observation?bogus=1").json()["issue"][0]["diagnostics"]


def test_http_metadata_and_health(client: TestClient) -> None:
    r = client.get("/fhir/metadata")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    cap = r.json()
    assert cap["resourceType"] == "CapabilityStatement" and cap["fhirVersion"] == "4.0.1"
    assert {res["type"] for res in cap["rest"][0]["resource"]} == set(RESOURCE_TYPES)
    assert_valid(cap)
    assert client.get("/healthz").json() == {"status": "ok"}


def test_http_metrics(client: TestClient) -> None:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "python_info" in r.text or "process_" in r.text or "hl7engine" in r.text
