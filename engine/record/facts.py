"""Facts: what a mapping produces from one message and what the central record writes.

This is the contract between ``engine.mapping`` (YAML mappings evaluate to facts) and
``engine.record`` (facts become rows, and rows become FHIR R4 resources). Facts are plain,
FHIR-aligned values; each kind has a *business key* (``Fact.key``) so that a resend or a replay
finds the fact it wrote before instead of writing a second one (design-notes guarantee 3).

One message is about one patient: its facts come as a ``MappedMessage`` holding the patient (or
none, for messages that carry no patient), and the other facts, which all belong to that patient.
Observations refer to their report by the report's key (``report_key``); specimens likewise.

Times keep their precision: ``Instant`` holds the UTC instant (read in the channel's timezone when
the HL7 value had no offset), the precision of the original ("year" … "second", "millisecond")
and the original text.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Precision = Literal["year", "month", "day", "hour", "minute", "second", "millisecond"]


class FactModel(BaseModel):
    """Every model of this module (facts and the values in them).

    Read-only once built: the mapping shares a converted value (a coding, a unit, a reference
    range) between facts and messages, and the record writer keeps the JSON of such values by
    identity (engine.record.writer.fact_data). Build a new object rather than change one."""

    model_config = ConfigDict(extra="forbid", frozen=False)


class Instant(FactModel):
    at: datetime  # timezone-aware, UTC
    precision: Precision
    text: str = ""  # the HL7 value as sent, e.g. "202611221015+0300"


class Coding(FactModel):
    code: str
    system: str | None = None  # a URI (http://loinc.org) when known, else the HL7 coding system name
    display: str | None = None


class CodeableConcept(FactModel):
    codings: list[Coding] = Field(default_factory=list)  # CWE/CE identifier and alternate identifier
    text: str | None = None


class Identifier(FactModel):
    value: str
    system: str | None = None  # URI from mappings/tables (assigning authority -> system), else None
    type: str | None = None  # HL7 table 0203 code: MR, NI (national), PI, VN, FILL, PLAC, ...
    assigner: str | None = None  # the assigning authority as sent (CX-4.1)


class HumanName(FactModel):
    family: str | None = None
    given: list[str] = Field(default_factory=list)
    prefix: list[str] = Field(default_factory=list)
    suffix: list[str] = Field(default_factory=list)
    use: str | None = None  # FHIR name-use (official, usual, maiden, ...)
    text: str | None = None


class Address(FactModel):
    line: list[str] = Field(default_factory=list)
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None
    country: str | None = None
    use: str | None = None


class Quantity(FactModel):
    value: Decimal
    unit: str | None = None  # as displayed (OBX-6.2 or 6.1)
    system: str | None = None  # http://unitsofmeasure.org when the code is UCUM
    code: str | None = None  # UCUM code


class Value(FactModel):
    """A typed observation value (OBX-2 decides the type)."""

    type: Literal["quantity", "coded", "string", "ratio", "range", "datetime", "sn"]
    quantity: Quantity | None = None  # NM, and SN with a plain number
    coded: CodeableConcept | None = None  # CWE, CE, CNE
    string: str | None = None  # ST, TX, FT (TX/FT repetitions joined with newlines)
    comparator: str | None = None  # SN: <, <=, >, >=, <>
    low: Quantity | None = None  # SN ranges (1-5) and ratios (1:128, low = numerator)
    high: Quantity | None = None
    instant: Instant | None = None  # DT, DTM, TS


class ReferenceRange(FactModel):
    low: Quantity | None = None
    high: Quantity | None = None
    text: str | None = None  # OBX-7 as sent


# -- facts ------------------------------------------------------------------------------------------

class Patient(FactModel):
    identifiers: list[Identifier] = Field(min_length=1)
    names: list[HumanName] = Field(default_factory=list)
    birth_date: Instant | None = None
    gender: Literal["male", "female", "other", "unknown"] | None = None
    addresses: list[Address] = Field(default_factory=list)
    telecom: list[str] = Field(default_factory=list)
    deceased: Instant | bool | None = None


class Encounter(FactModel):
    key: str  # visit number (PV1-19), else the message's control ID
    status: str | None = None  # FHIR encounter-status
    class_code: str | None = None  # PV1-2 mapped to FHIR v3 ActCode (IMP, AMB, EMER, ...)
    location: str | None = None
    start: Instant | None = None
    end: Instant | None = None


class Report(FactModel):
    """A diagnostic report: one OBR (its order and the results under it)."""

    key: str  # filler order number (OBR-3.1, with its namespace), else placer (OBR-2)
    placer_order: Identifier | None = None
    filler_order: Identifier | None = None
    code: CodeableConcept
    status: str  # FHIR diagnostic-report-status, from OBR-25
    effective: Instant | None = None  # OBR-7
    issued: Instant | None = None  # OBR-22
    performer: str | None = None  # the producing laboratory / organisation


class Observation(FactModel):
    key: str  # business key: report key + OBX-3 code (+ system) + OBX-4 sub-ID
    report_key: str | None = None
    code: CodeableConcept
    value: Value | None = None
    reference_range: ReferenceRange | None = None
    interpretation: list[Coding] = Field(default_factory=list)  # OBX-8
    status: str  # FHIR observation-status from OBX-11: final, preliminary, corrected, ...
    result_status: str | None = None  # OBX-11 as sent (F, P, C, D, X, I, ...)
    effective: Instant | None = None  # OBX-14, else OBR-7
    issued: Instant | None = None  # OBX-19 (analysis time) or OBR-22
    performer: str | None = None  # OBX-16 responsible observer
    producing_lab: str | None = None  # OBX-23 (2.5+) or OBX-15
    method: CodeableConcept | None = None  # OBX-17
    sub_id: str | None = None  # OBX-4
    notes: list[str] = Field(default_factory=list)  # NTE under the OBX


class Specimen(FactModel):
    key: str  # SPM-2 (specimen ID), else report key + SPM-1
    report_key: str | None = None
    type: CodeableConcept | None = None  # SPM-4
    collected: Instant | None = None  # SPM-17.1
    received: Instant | None = None  # SPM-18


class Allergy(FactModel):
    key: str  # allergen code (AL1-3.1 with system), else its text
    code: CodeableConcept
    category: str | None = None  # AL1-2 -> food | medication | environment | biologic
    criticality: str | None = None  # AL1-4 -> low | high | unable-to-assess
    reactions: list[str] = Field(default_factory=list)  # AL1-5
    onset: Instant | None = None  # AL1-6


class Immunization(FactModel):
    key: str  # vaccine code + administration date (+ lot)
    vaccine: CodeableConcept  # RXA-5
    occurrence: Instant  # RXA-3
    status: str = "completed"  # RXA-20: CP completed, NA/RE not-done, PA completed (partial)
    dose: Quantity | None = None  # RXA-6, RXA-7
    lot: str | None = None  # RXA-15
    manufacturer: str | None = None  # RXA-17
    primary_source: bool | None = None  # RXA-9 00 new record = True, else historical


class Condition(FactModel):
    key: str  # diagnosis code (DG1-3.1 with system)
    code: CodeableConcept
    onset: Instant | None = None  # DG1-5
    category: str | None = None  # DG1-6 diagnosis type (A admitting, W working, F final)


class Procedure(FactModel):
    key: str  # procedure code + time
    code: CodeableConcept
    performed: Instant | None = None  # PR1-5


class Merge(FactModel):
    """ADT^A40: the patient with these identifiers (MRG-1) is replaced by the message's patient."""

    replaced: list[Identifier] = Field(min_length=1)


class MappedMessage(FactModel):
    """Everything a mapping produced from one message."""

    patient: Patient | None = None
    encounters: list[Encounter] = Field(default_factory=list)
    reports: list[Report] = Field(default_factory=list)
    observations: list[Observation] = Field(default_factory=list)
    specimens: list[Specimen] = Field(default_factory=list)
    allergies: list[Allergy] = Field(default_factory=list)
    immunizations: list[Immunization] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
    procedures: list[Procedure] = Field(default_factory=list)
    merges: list[Merge] = Field(default_factory=list)
    message_time: Instant | None = None  # MSH-7: "a message older than the stored fact does not overwrite it"
    unused_segments: list[str] = Field(default_factory=list)  # segments no rule read, e.g. ["ZXT", "NK1"]


FACT_KINDS = {
    "patient": Patient, "encounter": Encounter, "report": Report, "observation": Observation,
    "specimen": Specimen, "allergy": Allergy, "immunization": Immunization, "condition": Condition,
    "procedure": Procedure, "merge": Merge,
}
