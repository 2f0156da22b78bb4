"""FHIR R4 data types rendered from facts: dateTime/date/instant, Coding, CodeableConcept, Quantity,
Identifier, HumanName, Address, ContactPoint; and ``clean`` (FHIR JSON has no empty values).

Times keep their original precision and wall-clock time: an ``Instant`` holds the UTC instant and
the HL7 text as sent, so a value sent as ``202611221015`` in a +03:00 zone renders as
``2026-11-22T10:15:00+03:00`` (the offset is recovered as the difference between the sent wall
time and the instant). FHIR dateTime requires seconds once a time is given, so hour and minute
precision are rendered with zero seconds (and hour precision with zero minutes); year, month and
day precision render as ``2026``, ``2026-11``, ``2026-11-22``. FHIR ``instant`` (``issued``) needs
a full time: coarser values render as that instant (e.g. local midnight) with zero-filled fields.
Without the original text the UTC instant is used.

Coding systems are rendered as the mapping gave them: a URI when the mapping tables know one,
else the HL7 coding system name as sent (``L``, ``99LOCAL``; whitespace percent-encoded). Mapping
local names to URIs is the mapping tables' job (``mappings/tables/``).

Decimals become JSON numbers (integers stay integers); trailing zeros of a decimal are not kept
(``5.10`` renders as ``5.1``): Python's JSON encoder has no exact decimal.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from engine.record import facts as F

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_DTM = re.compile(r"(\d{4})(\d\d)?(\d\d)?(\d\d)?(\d\d)?(\d\d)?(?:\.(\d{1,4}))?([+-]\d{4})?")
_DATE_ONLY = ("year", "month", "day")


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        out = {k: _clean(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, "", [], {})}
    if isinstance(value, list):
        items = [_clean(v) for v in value]
        return [v for v in items if v not in (None, "", [], {})]
    return value


def clean(value: dict[str, Any]) -> dict[str, Any]:
    """Drop None, empty strings, lists and objects, recursively (FHIR JSON allows none of them)."""
    out: dict[str, Any] = _clean(value)
    return out


# -- times ----------------------------------------------------------------------------------------

def _wall(inst: F.Instant) -> tuple[datetime, timedelta, str]:
    """The wall-clock time as sent, its UTC offset and its fraction digits; from the UTC instant
    when the original text is missing or does not agree with it."""
    at = inst.at.astimezone(UTC) if inst.at.tzinfo else inst.at.replace(tzinfo=UTC)
    m = _DTM.fullmatch(inst.text.strip()) if inst.text else None
    if m is not None:
        g = m.groups()
        try:
            micro = int(g[6].ljust(6, "0")) if g[6] else 0
            local = datetime(int(g[0]), int(g[1] or 1), int(g[2] or 1), int(g[3] or 0), int(g[4] or 0),
                             int(g[5] or 0), micro)
        except ValueError:
            local = None
        if local is not None:
            offset = local - at.replace(tzinfo=None)
            if abs(offset) <= timedelta(hours=14) and offset.total_seconds() % 60 == 0:
                return local, offset, g[6] or ""
    return at.replace(tzinfo=None), timedelta(0), f"{at.microsecond // 1000:03d}"


def _offset(offset: timedelta) -> str:
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def date_time(inst: F.Instant | None) -> str | None:
    """FHIR dateTime with the original precision (see the module docstring)."""
    if inst is None:
        return None
    local, offset, fraction = _wall(inst)
    if inst.precision == "year":
        return f"{local.year:04d}"
    if inst.precision == "month":
        return f"{local.year:04d}-{local.month:02d}"
    if inst.precision == "day":
        return f"{local.year:04d}-{local.month:02d}-{local.day:02d}"
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    if inst.precision == "millisecond" and fraction:
        text += f".{fraction}"
    return text + _offset(offset)


def date(inst: F.Instant | None) -> str | None:
    """FHIR date (birthDate): at most day precision, the calendar date as sent."""
    if inst is None:
        return None
    if inst.precision in _DATE_ONLY:
        return date_time(inst)
    return date_time(F.Instant(at=inst.at, precision="day", text=inst.text))


def instant(inst: F.Instant | None) -> str | None:
    """FHIR instant: always to the second, with the offset."""
    if inst is None:
        return None
    local, offset, fraction = _wall(inst)
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    if inst.precision == "millisecond" and fraction:
        text += f".{fraction}"
    return text + _offset(offset)


def timestamp(dt: datetime) -> str:
    """A database timestamp (meta.lastUpdated) as a FHIR instant in UTC."""
    return dt.astimezone(UTC).isoformat(timespec="milliseconds")


# -- codes ----------------------------------------------------------------------------------------

def code(text: str | None) -> str | None:
    """A FHIR code: no leading, trailing or repeated whitespace."""
    return " ".join(text.split()) or None if text else None


def uri(text: str | None) -> str | None:
    return "%20".join(text.split()) or None if text else None


def coding(c: F.Coding | None) -> dict[str, Any] | None:
    if c is None or not code(c.code):
        return None
    return clean({"system": uri(c.system), "code": code(c.code), "display": c.display})


def codeable(cc: F.CodeableConcept | None, *, required: bool = False) -> dict[str, Any] | None:
    """A CodeableConcept; ``required`` gives ``{"text": "unknown"}`` rather than nothing."""
    out = None
    if cc is not None:
        out = clean({"coding": [coding(c) for c in cc.codings], "text": cc.text}) or None
    if out is None and required:
        return {"text": "unknown"}
    return out


def codeable_of(system: str, value: str | None, display: str | None = None) -> dict[str, Any] | None:
    c = code(value)
    return None if c is None else {"coding": [clean({"system": system, "code": c, "display": display})]}


# -- quantities -----------------------------------------------------------------------------------

def number(value: Decimal) -> int | float:
    if value == value.to_integral_value() and value.as_tuple().exponent >= 0:  # type: ignore[operator]
        return int(value)
    return float(value)


def quantity(q: F.Quantity | None, comparator: str | None = None) -> dict[str, Any] | None:
    if q is None:
        return None
    return clean({"value": number(q.value), "comparator": comparator, "unit": q.unit,
                  "system": uri(q.system) if q.code else None, "code": code(q.code) if q.system else None})


# -- people ---------------------------------------------------------------------------------------

NAME_USES = {"usual", "official", "temp", "nickname", "anonymous", "old", "maiden"}
ADDRESS_USES = {"home", "work", "temp", "old", "billing"}


def identifier(i: F.Identifier, *, system: str | None = None) -> dict[str, Any]:
    return clean({"type": codeable_of(V2_0203, i.type), "system": uri(system if system is not None else i.system),
                  "value": i.value, "assigner": {"display": i.assigner} if i.assigner else None})


def human_name(n: F.HumanName) -> dict[str, Any]:
    return clean({"use": n.use if n.use in NAME_USES else None, "text": n.text, "family": n.family,
                  "given": n.given, "prefix": n.prefix, "suffix": n.suffix})


def address(a: F.Address) -> dict[str, Any]:
    return clean({"use": a.use if a.use in ADDRESS_USES else None, "line": a.line, "city": a.city,
                  "state": a.state, "postalCode": a.postal_code, "country": a.country})


def contact_point(value: str) -> dict[str, Any] | None:
    v = value.strip()
    if not v:
        return None
    system = "email" if "@" in v else "url" if v.startswith(("http://", "https://")) else "phone"
    return {"system": system, "value": v}
