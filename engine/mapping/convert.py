"""Typed conversions from HL7 v2 values to the facts' types (``engine.record.facts``).

Each conversion reads one HL7 value: a repetition of a field (anything with
``component(comp, sub=1)``) or a plain string. They raise ``ConversionError`` with a message that
names the problem but never the value (the value may be patient data; the engine adds the field
path and the rule).

Facts are built with ``model_construct``: the conversions produce exactly the declared types, and
validating every small object again would cost more than the mapping itself.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Protocol, TypeVar
from zoneinfo import ZoneInfo

from pydantic import BaseModel

from engine.record.facts import (
    Address,
    CodeableConcept,
    Coding,
    HumanName,
    Identifier,
    Instant,
    Precision,
    Quantity,
    ReferenceRange,
    Value,
)

_M = TypeVar("_M", bound=BaseModel)
_SHAPES: dict[type[BaseModel], tuple[dict[str, Any], tuple[tuple[str, Callable[[], Any]], ...]]] = {}


def new(cls: type[_M], **values: Any) -> _M:
    """Build a fact model from values of the right types without validating them (what
    ``model_construct`` does, about twice as fast: the mapping builds ~100 objects per ORU).

    Facts are read-only once built: identical coded values, names and identifiers are converted
    once and the same object is shared by every fact (and message) that holds them."""
    return new_from(cls, values)


def new_from(cls: type[_M], values: dict[str, Any]) -> _M:
    """``new(cls, **values)`` for values already in a dict (not kept): compiled, a call with
    ``**`` goes through Python's argument parsing, which cost as much as the building."""
    shape = _SHAPES.get(cls)
    if shape is None:
        defaults: dict[str, Any] = {}
        factories: list[tuple[str, Callable[[], Any]]] = []
        for name, info in cls.model_fields.items():
            # every field, in the model's order (serialisation follows it): update() keeps it
            defaults[name] = None if info.is_required() or info.default_factory is not None else info.default
            if info.default_factory is not None:
                factories.append((name, typing.cast(Callable[[], Any], info.default_factory)))
        shape = _SHAPES[cls] = (defaults, tuple(factories))
    data = shape[0].copy()
    for name, factory in shape[1]:
        if name not in values:
            data[name] = [] if factory is list else factory()
    data.update(values)
    obj = _object_new(cls)
    _set_dict(obj, data)
    _set_fields_set(obj, set(values))
    _set_extra(obj, None)
    _set_private(obj, None)
    return obj


_object_new = object.__new__
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


class RepLike(Protocol):
    """A repetition of a field, as ``engine.hl7.message.Repetition``."""

    def component(self, comp: int, sub: int = 1) -> str | None: ...

    def components(self) -> list[str]: ...

    def text(self) -> str: ...

    @property
    def raw(self) -> str: ...


Parts = list[str]  # the components of one repetition (first subcomponent each, unescaped)


class ConversionError(ValueError):
    """A value cannot be converted; the message never contains the value itself."""


class TextRep:
    """A plain string seen as a one-component repetition."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def component(self, comp: int, sub: int = 1) -> str | None:
        return self.value if comp in (0, 1) and sub in (0, 1) and self.value else None

    def components(self) -> list[str]:
        return [self.value]

    def text(self) -> str:
        return self.value

    @property
    def raw(self) -> str:
        return self.value


def c(p: Parts, k: int) -> str | None:
    """Component ``k`` (1-based) with blanks and HL7's explicit null (``""``) read as empty."""
    if k > len(p):
        return None
    v = p[k - 1]
    if not v:
        return None
    v = v.strip()
    return v if v and v != '""' else None


def text1(v: str | None) -> str | None:
    """A read text value with blanks and ``""`` read as empty."""
    if not v:
        return None
    v = v.strip()
    return v if v and v != '""' else None


# -- lookup tables --------------------------------------------------------------------------------

class Unmapped(Exception):
    """A value was not found in a table whose ``unmapped`` behaviour is ``fail``."""

    def __init__(self, table: str) -> None:
        self.table = table
        super().__init__(f"value not found in table {table} (the table says unmapped: fail)")


@dataclass(slots=True)
class Table:
    """A lookup table from ``mappings/tables/``; entries map a code to a string or a Coding."""

    name: str
    entries: dict[str, str | Coding]
    unmapped: str = "pass"  # pass | fail | empty | default
    default: str | None = None
    case_sensitive: bool = True
    file: str = ""
    _folded: dict[str, str | Coding] = field(default_factory=dict)

    qualified: bool = False  # some keys are "SYSTEM|CODE"

    def __post_init__(self) -> None:
        if not self.case_sensitive:
            self._folded = {k.casefold(): v for k, v in self.entries.items()}
        self.qualified = any("|" in k for k in self.entries)

    def find(self, key: str) -> str | Coding | None:
        """The entry for ``key``, or None (no unmapped behaviour applied)."""
        if self.case_sensitive:
            return self.entries.get(key)
        return self._folded.get(key.casefold())

    def lookup(self, key: str | None) -> str | None:
        """The mapped string for ``key`` applying the table's unmapped behaviour."""
        if key is None or key == "":
            return None
        hit = self.find(key)
        if hit is not None:
            return hit.code if isinstance(hit, Coding) else hit
        return self.miss(key)

    def miss(self, key: str) -> str | None:
        if self.unmapped == "pass":
            return key
        if self.unmapped == "empty":
            return None
        if self.unmapped == "default":
            return self.default
        raise Unmapped(self.name)


# -- coding systems -------------------------------------------------------------------------------

CODING_SYSTEMS: dict[str, str] = {
    "LN": "http://loinc.org",
    "LOINC": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "SNOMED": "http://snomed.info/sct",
    "SNOMEDCT": "http://snomed.info/sct",
    "UCUM": "http://unitsofmeasure.org",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
    "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "I10P": "http://www.cms.gov/Medicare/Coding/ICD10",
    "I9": "http://hl7.org/fhir/sid/icd-9-cm",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "CVX": "http://hl7.org/fhir/sid/cvx",
    "MVX": "http://terminology.hl7.org/CodeSystem/MVX",
    "NDC": "http://hl7.org/fhir/sid/ndc",
    "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "C4": "http://www.ama-assn.org/go/cpt",
    "CPT": "http://www.ama-assn.org/go/cpt",
    "NUCCPT": "http://nucc.org/provider-taxonomy",
    "ISO3166": "urn:iso:std:iso:3166",
    "ISO+": "urn:iso:std:iso:11073:10101",
    "ATC": "http://www.whocc.no/atc",
    "NCIT": "http://ncimeta.nci.nih.gov",
}
_HL7_TABLE = re.compile(r"^HL7[-_ ]?(\d{4})$", re.IGNORECASE)


@lru_cache(maxsize=1024)
def _builtin_system(name: str) -> str:
    upper = name.upper()
    if upper in CODING_SYSTEMS:
        return CODING_SYSTEMS[upper]
    m = _HL7_TABLE.match(name)
    if m:
        return f"http://terminology.hl7.org/CodeSystem/v2-{m.group(1)}"
    return name


@dataclass(slots=True)
class Conv:
    """What conversions need beyond the value: the channel's zone and the lookup tables."""

    tz: ZoneInfo
    tables: Mapping[str, Table]
    systems: Table | None = None  # the coding_systems table (HL7 name -> URI), when shipped
    units: Table | None = None  # the units table (local unit -> UCUM code), when shipped
    unit_cache: dict[tuple[str, ...], tuple[str | None, str | None]] = field(default_factory=dict)
    uri_cache: dict[str, str] = field(default_factory=dict)

    def system_uri(self, name: str | None) -> str | None:
        if not name:
            return None
        uri = self.uri_cache.get(name)
        if uri is not None:
            return uri
        uri = _builtin_system(name)
        if self.systems is not None:
            hit = self.systems.find(name)
            if hit is not None:
                uri = hit.code if isinstance(hit, Coding) else hit
        if len(self.uri_cache) < 1024:
            self.uri_cache[name] = uri
        return uri


# -- times ----------------------------------------------------------------------------------------

# the fraction may come without its dot (YYYYMMDDHHMMSSmmm): some senders write it so
_DTM = re.compile(r"(\d{4})(\d\d)?(\d\d)?(\d\d)?(\d\d)?(\d\d)?(?:\.?(\d{1,4}))?([+-]\d{4})?")
_PRECISION: tuple[Precision, ...] = ("year", "month", "day", "hour", "minute", "second")


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@lru_cache(maxsize=256)
def _offset(text: str) -> timezone:
    sign = -1 if text[0] == "-" else 1
    hours, minutes = int(text[1:3]), int(text[3:5])
    if hours > 14 or minutes > 59:
        raise ConversionError("time zone offset is out of range")
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def dtm(text: str | None, tz: ZoneInfo) -> Instant | None:
    """HL7 DTM / TS / DT (see ``_dtm``); results are cached (the same times recur in a message:
    every OBX-14 of a panel). The Instant returned may be shared: never modify it."""
    if not text:
        return None
    return _dtm_cached(text, tz)


@lru_cache(maxsize=4096)
def _dtm_cached(text: str, tz: ZoneInfo) -> Instant | None:
    return _dtm(text, tz)


def _dtm(text: str, tz: ZoneInfo) -> Instant | None:
    """HL7 DTM / TS / DT: ``YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]``.

    Without an offset the value is local time in the channel's zone ``tz``. The precision of the
    value is kept ("day" for a birth date); the instant is in UTC.
    """
    s = text.strip()
    if not s or s == '""':
        return None
    m = _DTM.fullmatch(s)
    if m is None:
        raise ConversionError("not an HL7 date/time (expected YYYY[MM[DD[HHMM[SS[.S]]]]][+/-ZZZZ])")
    g = m.groups()
    if g[6] is not None and g[5] is None:
        raise ConversionError("not an HL7 date/time (a fraction needs the seconds)")
    n = 1
    while n < 6 and g[n] is not None:
        n += 1
    precision: Precision = "millisecond" if g[6] else _PRECISION[n - 1]
    try:
        micro = int((g[6] or "0").ljust(6, "0")) if g[6] else 0
        local = datetime(int(g[0]), int(g[1] or 1), int(g[2] or 1), int(g[3] or 0), int(g[4] or 0),
                         int(g[5] or 0), micro)
    except ValueError as exc:
        raise ConversionError("not a valid calendar date/time") from exc
    if g[3] is not None and int(g[3]) > 23:
        raise ConversionError("hour out of range")
    at = local.replace(tzinfo=_offset(g[7]) if g[7] else tz).astimezone(UTC)
    return new(Instant, at=at, precision=precision, text=s)


# -- numbers --------------------------------------------------------------------------------------

def decimal(text: str | None) -> Decimal | None:
    if text is None:
        return None
    s = text.strip()
    if not s or s == '""':
        return None
    try:
        d = Decimal(s)
    except InvalidOperation:
        d = None
    if d is None or not d.is_finite() or not (s[0].isdigit() or s[0] in "+-."):
        raise ConversionError("not a number")
    return d


_UCUM = "http://unitsofmeasure.org"


def quantity(value: Decimal, unit: Parts | None, cv: Conv) -> Quantity:
    """A number with its unit (a CE/CWE units field such as OBX-6: code, text, coding system).
    The UCUM code is the code when the coding system is UCUM, else the ``units`` table's entry."""
    if not unit:
        return new(Quantity, value=value)
    key = tuple(unit[:3])
    hit = cv.unit_cache.get(key)
    if hit is None:
        code, text, system = c(unit, 1), c(unit, 2), c(unit, 3)
        ucum: str | None = None
        if code and system and system.upper() == "UCUM":
            ucum = code
        elif code and cv.units is not None:
            found = cv.units.find(code)
            if found is not None:
                ucum = found.code if isinstance(found, Coding) else found
        hit = (text or code, ucum)
        if len(cv.unit_cache) < 4096:
            cv.unit_cache[key] = hit
    shown, ucum = hit
    if ucum is not None:
        return new(Quantity, value=value, unit=shown, system=_UCUM, code=ucum)
    if shown is None:
        return new(Quantity, value=value)
    return new(Quantity, value=value, unit=shown)


# -- coded values ---------------------------------------------------------------------------------

def coding(p: Parts, cv: Conv, default_system: str | None = None, offset: int = 0) -> Coding | None:
    code = c(p, 1 + offset)
    if code is None:
        return None
    system = c(p, 3 + offset) or default_system
    return new(Coding, code=code, system=cv.system_uri(system), display=c(p, 2 + offset))


def cwe(p: Parts, cv: Conv, default_system: str | None = None, table: Table | None = None
        ) -> CodeableConcept | None:
    """CWE / CE / CNE / CF: the identifier and the alternate identifier as codings; the text is the
    original text (CWE-9) or the first text given. A ``table`` maps the code (e.g. a local test code)
    to a standard coding, which is put first; the coding as sent is kept after it."""
    codings: list[Coding] = []
    first = coding(p, cv, default_system)
    if first is not None:
        codings.append(first)
    if len(p) > 3:
        alt = coding(p, cv, None, 3)
        if alt is not None:
            codings.append(alt)
    text = c(p, 9) or c(p, 2) or c(p, 5)
    if table is not None and first is not None:
        sent_system = c(p, 3)
        hit = table.find(f"{sent_system}|{first.code}") if sent_system and table.qualified else None
        if hit is None:
            hit = table.find(first.code)
        if hit is not None:
            mapped = hit if isinstance(hit, Coding) else new(Coding, code=hit)
            if all(x.code != mapped.code or x.system != mapped.system for x in codings):
                codings.insert(0, mapped)
        else:
            fallback = table.miss(first.code)
            if fallback is not None and fallback != first.code:
                codings.insert(0, new(Coding, code=fallback))
    if not codings and text is None:
        return None
    return new(CodeableConcept, codings=codings, text=text)


# -- people, identifiers, addresses ---------------------------------------------------------------

NAME_USE = {"L": "official", "D": "usual", "M": "maiden", "N": "nickname", "A": "usual", "B": "official",
            "C": "official", "S": "anonymous", "T": "temp", "U": None, "R": "official", "I": "usual"}
ADDRESS_USE = {"H": "home", "P": "home", "B": "work", "O": "work", "C": "temp", "BA": "billing", "M": None,
               "L": "home", "BR": "old", "BDL": "old", "F": "old"}


def xpn(p: Parts) -> HumanName | None:
    """XPN (v2.3+): family (XPN-1, surname), given (XPN-2, and further given names XPN-3),
    suffix (XPN-4, degree XPN-6), prefix (XPN-5), use from the name type (XPN-7)."""
    family = c(p, 1)
    given = [g for g in (c(p, 2), c(p, 3)) if g]
    suffix = [s for s in (c(p, 4), c(p, 6)) if s]
    prefix = [x for x in (c(p, 5),) if x]
    if family is None and not given and not prefix and not suffix:
        return None
    use_code = c(p, 7)
    use = NAME_USE.get(use_code.upper()) if use_code else None
    return new(HumanName, family=family, given=given, prefix=prefix, suffix=suffix, use=use)


def cx(p: Parts, rep: RepLike | None, systems: Table | None = None, id_type: str | None = None
       ) -> Identifier | None:
    """CX: value (CX-1), assigning authority (CX-4: namespace, else universal ID), type (CX-5).
    The system URI comes from the ``systems`` table keyed by the authority (namespace, then
    universal ID); else None."""
    value = c(p, 1)
    if value is None:
        return None
    ns = c(p, 4)
    uid = None
    system = None
    if systems is not None and ns:
        hit = systems.find(ns)
        if hit is not None:
            system = hit.code if isinstance(hit, Coding) else hit
    if system is None and rep is not None and len(p) >= 4:
        uid = text1(rep.component(4, 2))
        if systems is not None:
            hit = systems.find(uid) if uid else None
            if hit is not None:
                system = hit.code if isinstance(hit, Coding) else hit
            elif ns or uid:
                system = systems.miss(ns or uid or "")
    return new(Identifier, value=value, system=system, type=c(p, 5) or id_type, assigner=ns or uid)


def ei(p: Parts, systems: Table | None = None, id_type: str | None = None) -> Identifier | None:
    """EI (entity identifier: order numbers, specimen IDs): ID (EI-1), namespace (EI-2), universal
    ID (EI-3)."""
    value = c(p, 1)
    if value is None:
        return None
    ns, uid = c(p, 2), c(p, 3)
    system = None
    if systems is not None:
        for key in (ns, uid):
            if key:
                hit = systems.find(key)
                if hit is not None:
                    system = hit.code if isinstance(hit, Coding) else hit
                    break
        else:
            if ns or uid:
                system = systems.miss(ns or uid or "")
    return new(Identifier, value=value, system=system, type=id_type, assigner=ns or uid)


def xad(p: Parts) -> Address | None:
    """XAD: street (XAD-1.1), other designation (XAD-2), city, state, postal code, country, type."""
    line = [x for x in (c(p, 1), c(p, 2)) if x]
    city, state, postal, country = c(p, 3), c(p, 4), c(p, 5), c(p, 6)
    if not line and not (city or state or postal or country):
        return None
    use_code = c(p, 7)
    use = ADDRESS_USE.get(use_code.upper()) if use_code else None
    return new(Address, line=line, city=city, state=state, postal_code=postal, country=country, use=use)


def xtn(p: Parts) -> str | None:
    """XTN: the email (XTN-4), else the number built from country/area/local/extension
    (XTN-5..8), else the formatted number (XTN-1)."""
    email = c(p, 4)
    if email and "@" in email:
        return email
    local = c(p, 7)
    if local:
        country = c(p, 5)
        parts = [f"+{country}" if country else "", c(p, 6) or "", local]
        number_text = " ".join(x for x in parts if x)
        ext = c(p, 8)
        return f"{number_text} ext. {ext}" if ext else number_text
    return c(p, 1) or email


def hd(p: Parts) -> str | None:
    """HD / XON as a name: the first component (namespace or organisation name), else the second."""
    return c(p, 1) or c(p, 2)


def xcn(p: Parts) -> str | None:
    """XCN (a person: ID, family, given) as text: 'ID family given' with the parts present."""
    parts = [x for x in (c(p, 1), c(p, 2), c(p, 3)) if x]
    return " ".join(parts) if parts else None


# -- observation values ---------------------------------------------------------------------------

_SN_SEPARATORS = {":": "ratio", "/": "ratio", "-": "range"}
_COMPARATORS = ("<=", ">=", "<>", "<", ">", "=")


def sn(p: Parts, unit: Parts | None, cv: Conv) -> Value | None:
    """SN structured numeric: comparator (SN-1), number (SN-2), separator/suffix (SN-3), number (SN-4).
    ``<^5`` is a quantity with a comparator, ``^1^:^128`` a ratio, ``^3^-^5`` a range."""
    comparator = c(p, 1)
    n1, sep, n2 = c(p, 2), c(p, 3), c(p, 4)
    if n1 is None and n2 is None:
        if comparator is None:
            return None
        raise ConversionError("structured numeric (SN) value has no number")
    if comparator is not None and comparator not in _COMPARATORS:
        raise ConversionError("structured numeric (SN) comparator must be one of > < >= <= = <>")
    if comparator == "=":
        comparator = None
    d1 = decimal(n1)
    d2 = decimal(n2)
    if sep in _SN_SEPARATORS and d2 is not None:
        low = quantity(d1, unit, cv) if d1 is not None else None
        high = quantity(d2, unit, cv)
        kind = "ratio" if _SN_SEPARATORS[sep] == "ratio" else "range"
        return new(Value, type=kind, low=low, high=high, comparator=comparator)
    if d1 is None:
        raise ConversionError("structured numeric (SN) value has no first number")
    q = quantity(d1, unit, cv)
    if sep:  # a suffix such as "+" (e.g. 2+): keep it as the text of the value
        return new(Value, type="sn", quantity=q, comparator=comparator, string=sep)
    return new(Value, type="quantity", quantity=q, comparator=comparator)


_NUMERIC_WITH_COMPARATOR = re.compile(r"^\s*(<=|>=|<>|<|>|=)?\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*$")


def nm(text: str | None, unit: Parts | None, cv: Conv) -> Value | None:
    """NM: a quantity. A value such as ``<0.5`` (a comparator in an NM field, common in practice) is
    read as a quantity with that comparator."""
    s = text1(text)
    if s is None:
        return None
    if s.isascii() and s.replace(".", "", 1).isdigit():  # "6.1", "254", ".5": most values, no regex
        return new(Value, type="quantity", quantity=quantity(Decimal(s), unit, cv))
    m = _NUMERIC_WITH_COMPARATOR.match(s)
    if m is None and " " in s:  # "0 .07": a space typed inside the number
        m = _NUMERIC_WITH_COMPARATOR.match(s.replace(" ", ""))
    if m is None:
        raise ConversionError("OBX-2 says NM but the value is not a number")
    comparator = m.group(1)
    q = quantity(Decimal(m.group(2)), unit, cv)
    if comparator is None or comparator == "=":
        return new(Value, type="quantity", quantity=q)
    return new(Value, type="quantity", quantity=q, comparator=comparator)


CODED_TYPES = frozenset({"CE", "CWE", "CNE", "CF"})
DATE_TYPES = frozenset({"DT", "DTM", "TS"})


def _present(r: RepLike) -> bool:
    t = r.text()
    return bool(t) and t.strip() not in ("", '""')


def obx_value(type_code: str | None, reps: Sequence[RepLike], unit: Parts | None, cv: Conv) -> Value | None:
    """An observation value typed by OBX-2.

    NM -> quantity; SN -> quantity / ratio / range / sn; CE, CWE, CNE, CF -> coded; DT, DTM, TS ->
    datetime; ST, TX, FT and other text types -> string (repetitions joined with newlines, as a
    TX/FT text is sent line by line); ED/RP -> string (the data as sent). An unknown or empty OBX-2
    with a value gives a string.
    """
    present = [r for r in reps if _present(r)]
    if not present:
        return None
    t = (type_code or "").strip().upper()
    first = present[0]
    if t == "NM":
        value = nm(first.component(1), unit, cv)
        if value is not None and len(present) > 1:
            # NM does not repeat; when a sender repeats it anyway the first is the quantity and the
            # text keeps every repetition, so nothing is lost
            value.string = "~".join(text1(r.component(1)) or "" for r in present)
        return value
    if t == "SN":
        return sn(first.components(), unit, cv)
    if t in CODED_TYPES:
        concept = cwe(first.components(), cv)
        return new(Value, type="coded", coded=concept) if concept is not None else None
    if t in DATE_TYPES:
        inst = dtm(first.component(1), cv.tz)
        return new(Value, type="datetime", instant=inst) if inst is not None else None
    if len(present) == 1:
        return new(Value, type="string", string=first.text())
    return new(Value, type="string", string="\n".join(r.text() for r in present))


_RANGE = re.compile(r"^\s*([+-]?\d*\.?\d+)\s*(?:-|\u2013|\.\.)\s*([+-]?\d*\.?\d+)\s*$")
_BOUND = re.compile(r"^\s*(<=|>=|<|>)\s*([+-]?\d*\.?\d+)\s*$")


def reference_range(text: str | None, unit: Parts | None, cv: Conv) -> ReferenceRange | None:
    """OBX-7: ``3.5-5.0`` gives low and high, ``<5`` a high, ``>10`` a low; the text is always kept."""
    s = text1(text)
    if s is None:
        return None
    m = _RANGE.match(s)
    if m:
        return new(ReferenceRange, low=quantity(Decimal(m.group(1)), unit, cv),
                   high=quantity(Decimal(m.group(2)), unit, cv), text=s)
    m = _BOUND.match(s)
    if m:
        q = quantity(Decimal(m.group(2)), unit, cv)
        if m.group(1).startswith("<"):
            return new(ReferenceRange, high=q, text=s)
        return new(ReferenceRange, low=q, text=s)
    return new(ReferenceRange, text=s)


# -- the registry the mapping loader checks against -----------------------------------------------

@dataclass(frozen=True, slots=True)
class ConversionInfo:
    produces: type | tuple[type, ...]
    params: frozenset[str]  # which of the field keys type/unit/system/systems/id_type it accepts
    takes_all: bool = False  # reads every repetition at once (TX text, observation values)
    doc: str = ""
    aliases: tuple[str, ...] = ()


CONVERSIONS: dict[str, ConversionInfo] = {
    "string": ConversionInfo(str, frozenset(), doc="the value as text (the first component of a field)"),
    "text": ConversionInfo(str, frozenset(), True, "every repetition as text, joined with newlines (TX, FT)"),
    "datetime": ConversionInfo(Instant, frozenset(), doc="DTM/TS/DT with precision, channel timezone",
                               aliases=("DTM", "TS", "DT")),
    "number": ConversionInfo(Decimal, frozenset(), doc="NM", aliases=("NM",)),
    "boolean": ConversionInfo(bool, frozenset(), doc="Y/N, true/false, 1/0 (empty stays empty)"),
    "quantity": ConversionInfo(Quantity, frozenset({"unit"}), doc="a number with unit (CE/CWE units field)"),
    "codeable": ConversionInfo(CodeableConcept, frozenset({"system"}), doc="CWE/CE/CNE to a CodeableConcept",
                               aliases=("CWE", "CE", "CNE", "CF")),
    "coding": ConversionInfo(Coding, frozenset({"system"}), doc="the first coding of a CWE/CE (or a code)"),
    "name": ConversionInfo(HumanName, frozenset(), doc="XPN to HumanName", aliases=("XPN",)),
    "identifier": ConversionInfo(Identifier, frozenset({"systems", "id_type"}), doc="CX to Identifier",
                                 aliases=("CX",)),
    "entity_id": ConversionInfo(Identifier, frozenset({"systems", "id_type"}),
                                doc="EI (order numbers, specimen IDs) to Identifier", aliases=("EI",)),
    "address": ConversionInfo(Address, frozenset(), doc="XAD to Address", aliases=("XAD",)),
    "telecom": ConversionInfo(str, frozenset(), doc="XTN to a phone number or email", aliases=("XTN",)),
    "organization": ConversionInfo(str, frozenset(), doc="HD/XON: the name or namespace",
                                   aliases=("HD", "XON")),
    "person": ConversionInfo(str, frozenset(), doc="XCN: ID, family and given name", aliases=("XCN",)),
    "value": ConversionInfo(Value, frozenset({"type", "unit"}), True,
                            "an observation value typed by OBX-2 (type:) with units (unit:)"),
    "sn": ConversionInfo(Value, frozenset({"unit"}), doc="SN structured numeric", aliases=("SN",)),
    "reference_range": ConversionInfo(ReferenceRange, frozenset({"unit"}), doc="OBX-7 reference range"),
}
ALIASES: dict[str, str] = {a: name for name, info in CONVERSIONS.items() for a in (name, *info.aliases)}

_TRUE = {"Y", "YES", "T", "TRUE", "1"}
_FALSE = {"N", "NO", "F", "FALSE", "0"}


def boolean(text: str | None) -> bool | None:
    if text is None:
        return None
    s = text.strip().upper()
    if not s or s == '""':
        return None
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ConversionError("not a yes/no value (Y/N)")


Converter = Callable[[Any, dict[str, Any], Conv], Any]
