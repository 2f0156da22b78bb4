"""The record's fact text: ``engine.record.writer.dump`` builds it without pydantic's serializer, and
must give exactly pydantic's ``model_dump(mode="json")`` written as canonical JSON (keys sorted,
compact, UTF-8). A difference would store other facts than the mapping produced, and would make
every fact written before look changed (its content hash differs) on a resend or replay.

The corpus-wide check is in tests/test_record_wave.py (test_canonical_text_is_json_dumps_byte_for_byte).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from engine.mapping.convert import new
from engine.record import facts as F
from engine.record.writer import dump, fact_data
from engine.store.db import JsonText, json_text


def expected(fact: BaseModel) -> str:
    return json.dumps(fact.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def check(fact: BaseModel) -> None:
    for _ in range(2):  # the second time, shared values come from the cache
        text, digest = dump(fact)
        assert type(text) is JsonText
        assert text == expected(fact)
        assert digest == hashlib.sha256(text.encode()).hexdigest()
        assert json_text(text) == text  # stored as it is, not as a JSON string


def instant(at: datetime, precision: Any = "second") -> F.Instant:
    return F.Instant(at=at, precision=precision, text="x")


def test_every_kind_of_value_is_written_as_pydantic_writes_it() -> None:
    units = F.Quantity(value=Decimal("1E+2"), unit="mmol/L", system="http://unitsofmeasure.org", code="mmol/L")
    coded = F.CodeableConcept(codings=[F.Coding(code="718-7", system="http://loinc.org", display="Гемоглобин")],
                              text="Hb \u2028 \"quoted\" \\ \x00")
    obs = F.Observation(
        key="k", code=coded, status="final",
        value=F.Value(type="sn", comparator=">=", low=units,
                      high=F.Quantity(value=Decimal("-0.000")), instant=instant(datetime(1, 1, 1, tzinfo=UTC))),
        reference_range=F.ReferenceRange(low=units, text="4-10"),
        interpretation=[F.Coding(code="H"), F.Coding(code="N", system=None)],
        effective=instant(datetime(2026, 11, 22, 6, 45, 0, 120000, tzinfo=UTC), "millisecond"),
        issued=instant(datetime(2026, 11, 22, 9, 45, tzinfo=ZoneInfo("Europe/Minsk"))),  # not UTC: pydantic's way
        notes=["a", "б"])
    check(obs)
    check(F.Patient(identifiers=[F.Identifier(value="1", system="urn:oid:1.2", type="MR")],
                    names=[F.HumanName(family="Иванова", given=["Анна", "Петровна"])],
                    birth_date=instant(datetime(1980, 3, 14, tzinfo=UTC), "day"), gender="female",
                    addresses=[F.Address(line=["ul. Lenina 1"], city="Minsk")], deceased=True))
    check(F.Patient(identifiers=[F.Identifier(value="2")], deceased=instant(datetime(2026, 1, 2, tzinfo=UTC))))
    check(F.Immunization(key="k", vaccine=coded, occurrence=instant(datetime(2026, 1, 2, 3, 4, 5)),  # naive
                         dose=units, primary_source=False))
    # odd offsets: pydantic drops an offset's seconds
    check(F.Encounter(key="e", start=instant(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(seconds=30)))),
                      end=instant(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-3, minutes=-30))))))
    # built the way the mapping builds facts (engine.mapping.convert.new: no validation, every field set)
    check(new(F.Report, key="r", code=coded, status="final", filler_order=new(F.Identifier, value="F1")))


def test_fact_data_is_model_dump_with_sorted_keys() -> None:
    fact = F.Specimen(key="s", type=F.CodeableConcept(text="blood"),
                      collected=instant(datetime(2026, 1, 2, tzinfo=UTC)))
    data = fact_data(fact)
    assert data == fact.model_dump(mode="json")
    assert list(data) == sorted(data)
    assert list(data["type"]) == sorted(data["type"])


def test_a_model_built_without_every_field_falls_back_to_pydantic() -> None:
    fact = F.Condition.model_construct(key="c", code=F.CodeableConcept(text="x"))  # the defaults are set
    check(fact)
    partial = F.Condition.model_construct(key="c", code=F.CodeableConcept(text="x"))
    del partial.__dict__["onset"]  # a field missing from the instance: pydantic decides what to write
    assert fact_data(partial) == _sorted(partial.model_dump(mode="json", warnings=False))


def _sorted(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _sorted(data[k]) for k in sorted(data)}
    return [_sorted(x) for x in data] if isinstance(data, list) else data


zones = st.sampled_from([UTC, timezone(timedelta(hours=3)), timezone(timedelta(hours=-9, minutes=-30)),
                         ZoneInfo("Europe/Minsk"), ZoneInfo("UTC"), None])


@settings(max_examples=300, deadline=None)
@given(value=st.decimals(allow_nan=True, allow_infinity=True, places=None),
       at=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)), zone=zones,
       text=st.text(max_size=20), flag=st.booleans())
def test_decimals_times_and_text_as_pydantic_writes_them(value: Decimal, at: datetime, zone: Any, text: str,
                                                        flag: bool) -> None:
    q = new(F.Quantity, value=value, unit=text or None)  # unvalidated, as the mapping builds it: NaN too
    fact = F.Observation(key=text or "k", code=F.CodeableConcept(text=text), status="final",
                         value=F.Value(type="quantity", quantity=q, string=text),
                         effective=instant(at.replace(tzinfo=zone) if zone is not None else at),
                         issued=instant(at.replace(tzinfo=UTC)), sub_id=None if flag else text)
    check(fact)
