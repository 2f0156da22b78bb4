"""Mappings: loading and checking (every problem with file:line:col), expressions, conversions,
group iteration, business keys, unused segments, tables, fixture tests."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.hl7.message import Message
from engine.mapping import MapContext, MappingError, load_mappings
from engine.mapping import convert as cv
from engine.mapping.expr import ExprError, parse
from engine.mapping.paths import PathError, check_path, parse_path
from engine.mapping.testing import format_results, run_tests
from engine.record.facts import Value
from tests.conftest import ROOT


def project(tmp_path: Path, mappings: dict[str, str], tables: dict[str, str] | None = None) -> Path:
    (tmp_path / "mappings" / "tables").mkdir(parents=True)
    for name, text in mappings.items():
        (tmp_path / "mappings" / name).write_text(textwrap.dedent(text), encoding="utf-8")
    for name, text in (tables or {}).items():
        (tmp_path / "mappings" / "tables" / name).write_text(textwrap.dedent(text), encoding="utf-8")
    return tmp_path


def msg(*segments: str) -> Message:
    return Message.parse("\r".join(segments) + "\r")


MSH = "MSH|^~\\&|LIS|LAB|HIS|HOSP|20261122101500||ORU^R01|C-1|P|2.5.1"
PID = "PID|1||12345^^^HOSP^MR||Doe^John||19700101|M"


# -- paths and expressions ------------------------------------------------------------------------

def test_paths() -> None:
    p = parse_path("PID-3[2].4.1")
    assert (p.seg, p.field, p.rep, p.comp, p.sub) == ("PID", 3, 2, 4, 1)
    assert parse_path("NTE[*]-3[*]").many
    assert "cannot exist" in (check_path(parse_path("PID-45")) or "")
    assert "cannot exist" in (check_path(parse_path("OBX-3.30")) or "")
    assert "cannot exist" in (check_path(parse_path("MSH-10.2")) or "")
    assert "unknown segment" in (check_path(parse_path("XYZ-1")) or "")
    assert check_path(parse_path("ZPD-99")) is None  # Z-segments are local
    assert check_path(parse_path("OBX-5.3")) is None  # OBX-5 varies
    with pytest.raises(PathError):
        parse_path("PID.3")


def test_expression_errors_have_columns() -> None:
    with pytest.raises(ExprError) as info:
        parse("OBX-2 == 'NM' and")
    assert info.value.column == 18
    with pytest.raises(ExprError) as info:
        parse("OBX-2 = 'NM'")
    assert info.value.column == 7


# -- conversions ----------------------------------------------------------------------------------

def test_datetime_precision_and_timezone() -> None:
    minsk = ZoneInfo("Europe/Minsk")
    i = cv.dtm("202611221015", minsk)
    assert i is not None and i.at == datetime(2026, 11, 22, 7, 15, tzinfo=UTC) and i.precision == "minute"
    i = cv.dtm("20261122101500.123+0100", minsk)
    assert i is not None and i.at == datetime(2026, 11, 22, 9, 15, 0, 123000, tzinfo=UTC)
    assert i.precision == "millisecond" and i.text == "20261122101500.123+0100"
    assert cv.dtm("1978", minsk).precision == "year"  # type: ignore[union-attr]
    assert cv.dtm("19780214", minsk).precision == "day"  # type: ignore[union-attr]
    assert cv.dtm("20110613122406637", minsk).precision == "millisecond"  # type: ignore[union-attr]
    for bad in ("20170229", "DOB", "2026132", "202611221015+9900"):
        with pytest.raises(cv.ConversionError) as info:
            cv.dtm(bad, minsk)
        assert bad not in str(info.value)


def _conv(units: dict[str, str] | None = None) -> cv.Conv:
    table = cv.Table("units", dict(units or {}), case_sensitive=False)
    return cv.Conv(ZoneInfo("UTC"), {"units": table}, None, table)


def test_numbers_sn_and_ranges() -> None:
    c = _conv({"мкмоль/л": "umol/L"})
    v = cv.nm("<0.5", ["мкмоль/л"], c)
    assert v is not None and v.comparator == "<" and v.quantity is not None
    assert v.quantity.value == Decimal("0.5") and v.quantity.code == "umol/L" and v.quantity.unit == "мкмоль/л"
    with pytest.raises(cv.ConversionError):
        cv.nm("positive", None, c)
    r = cv.sn(["", "1", ":", "128"], None, c)
    assert r is not None and r.type == "ratio" and r.high is not None and r.high.value == 128
    r = cv.sn(["", "3", "-", "5"], None, c)
    assert r is not None and r.type == "range"
    r = cv.sn([">", "10"], ["mg/dL", "", "UCUM"], c)
    assert r is not None and r.type == "quantity" and r.comparator == ">" and r.quantity is not None
    assert r.quantity.system == "http://unitsofmeasure.org"
    rr = cv.reference_range("3.5-5.0", None, c)
    assert rr is not None and rr.low is not None and rr.low.value == Decimal("3.5")
    rr = cv.reference_range("<5", None, c)
    assert rr is not None and rr.high is not None and rr.low is None


def _nm_by_pattern(text: str, c: cv.Conv) -> Value | str:
    """NM read by the pattern alone (as before the fast path for plain numbers): the reference."""
    s = text.strip()
    m = cv._NUMERIC_WITH_COMPARATOR.match(s) or (cv._NUMERIC_WITH_COMPARATOR.match(s.replace(" ", ""))
                                                 if " " in s else None)
    if m is None:
        return "refused"
    q = cv.quantity(Decimal(m.group(2)), ["mg/dL", "", "UCUM"], c)
    if m.group(1) in (None, "="):
        return cv.new(Value, type="quantity", quantity=q)
    return cv.new(Value, type="quantity", quantity=q, comparator=m.group(1))


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(alphabet="0123456789.", min_size=1, max_size=8),
                 st.text(alphabet="0123456789.+-<>= \u0660\u00b2\uff11e_", min_size=1, max_size=8),
                 st.sampled_from(["6.1", "254", ".5", "5.", "1.2.3", ".", "..", "007", "1_000", "1e5", "٣",
                                  "²", "１", " 4.2 ", "+4", "-0.0", "<=5", "0 .07"])))
def test_nm_reads_plain_numbers_as_the_pattern_does(text: str) -> None:
    """Plain numbers skip the pattern (the common case); the result must be the pattern's, and what
    the pattern refuses (other digits than ASCII, two dots, "1e5", "1_000", which Decimal would
    take) must still be refused."""
    c = _conv()
    want = _nm_by_pattern(text, c)
    if not text.strip() or text.strip() == '""':
        assert cv.nm(text, ["mg/dL", "", "UCUM"], c) is None
        return
    if want == "refused":
        with pytest.raises(cv.ConversionError):
            cv.nm(text, ["mg/dL", "", "UCUM"], c)
        return
    got = cv.nm(text, ["mg/dL", "", "UCUM"], c)
    assert got == want and got is not None and got.quantity is not None
    assert isinstance(want, Value) and want.quantity is not None
    assert str(got.quantity.value) == str(want.quantity.value)  # the same digits, not only an equal number


def test_coded_names_identifiers() -> None:
    c = _conv()
    cc = cv.cwe(["2345-7", "Glucose", "LN", "GLU", "Glucose local", "L", "", "", "Blood glucose"], c)
    assert cc is not None and [x.system for x in cc.codings] == ["http://loinc.org", "L"]
    assert cc.text == "Blood glucose"
    assert cv.cwe(["1", "x", "HL70136"], c).codings[0].system == (  # type: ignore[union-attr]
        "http://terminology.hl7.org/CodeSystem/v2-0136")
    assert cv.cwe(["", "only text"], c).codings == []  # type: ignore[union-attr]
    name = cv.xpn(["Иванова", "Анна", "Петровна", "", "", "", "L"])
    assert name is not None and name.family == "Иванова" and name.given == ["Анна", "Петровна"]
    assert name.use == "official"
    systems = cv.Table("ids", {"HOSP": "https://hosp.example/mrn"}, unmapped="empty")
    ident = cv.cx(["123", "", "", "HOSP", "MR"], None, systems)
    assert ident is not None and ident.system == "https://hosp.example/mrn" and ident.type == "MR"
    assert ident.assigner == "HOSP"
    addr = cv.xad(["ул. Ленина 1", "", "Минск", "", "220030", "BY", "H"])
    assert addr is not None and addr.city == "Минск" and addr.use == "home"


# -- loading: every problem, with its position -----------------------------------------------------

BAD = """\
mapping: bad
rules:
  - fact: observation
    for_each: OBX
    under: OBR
    key: "OBX-3.1 ~ nosuch"
    colour: red
    fields:
      code: {path: OBX-3, as: CWE, table: nosuch_table}
      value: {path: OBX-99, as: value, type: OBX-2}
      status: {path: OBX-11, as: CWE}
      flavour: OBX-8
      effective: "OBX-14 or"
  - fact: sandwich
"""


def test_load_reports_every_problem_with_position(tmp_path: Path) -> None:
    root = project(tmp_path, {"bad.yaml": BAD})
    mset, problems = load_mappings(root)
    text = "\n".join(str(p) for p in problems)
    assert "bad" not in mset
    want = [
        ("bad.yaml:7:5", "rules[0].colour: unknown key"),
    ]
    for where, what in want:
        assert any(where in str(p) and what in str(p) for p in problems), text
    # the semantic pass needs a valid file: fix the unknown key and check the rest
    root2 = project(tmp_path / "b", {"bad.yaml": BAD.replace("    colour: red\n", "")})
    _, problems = load_mappings(root2)
    text = "\n".join(str(p) for p in problems)
    for needle in ("unknown table 'nosuch_table'", "OBX-99 cannot exist",
                   "the codeable conversion gives CodeableConcept, but this field takes str",
                   "observation has no field 'flavour'", "expression: expression is incomplete",
                   "unknown name 'nosuch'", "unknown fact kind 'sandwich'"):
        assert needle in text, (needle, text)
    for p in problems:
        assert p.file.endswith("bad.yaml") and p.line > 1 and p.column >= 1, p
    table_line = next(p for p in problems if "nosuch_table" in p.message)
    assert table_line.line == 8 and table_line.path == "rules[0].fields.code.table"


def test_required_fields_and_kinds(tmp_path: Path) -> None:
    root = project(tmp_path, {"m.yaml": """\
        rules:
          - fact: observation
            for_each: OBX
            fields:
              code: OBX-3
          - fact: patient
            key: PID-3
            fields:
              identifiers: "PID-3[*]"
        """})
    _, problems = load_mappings(root)
    text = "\n".join(str(p) for p in problems)
    assert "observation needs status" in text
    assert "needs key:" in text
    assert "patient facts have no key" in text


def test_expressions_are_safe(tmp_path: Path) -> None:
    root = project(tmp_path, {"m.yaml": """\
        rules:
          - fact: patient
            when: "__import__('os').system('true')"
            fields:
              identifiers: "PID-3[*]"
          - fact: encounter
            when: "__import__('os')"
            key: "PV1-19.__class__"
            fields:
              class_code: PV1-2
        """})
    _, problems = load_mappings(root)
    text = "\n".join(str(p) for p in problems)
    assert "rules[0].when: expression: unexpected character '.'" in text
    assert "unknown function __import__()" in text
    assert "rules[1].key: expression:" in text


# -- running --------------------------------------------------------------------------------------

LAB = """\
mapping: lab
messages: [ORU^R01]
groups: [ORC]
rules:
  - fact: patient
    required: true
    fields:
      identifiers: {path: "PID-3[*]", as: CX}
      names: "PID-5[*]"
      gender: {path: PID-8, table: sex}
  - fact: report
    for_each: OBR
    key: "OBR-3.1 or control_id ~ '/' ~ nth(OBR)"
    fields:
      code: OBR-4
      status: {path: OBR-25, default: unknown}
  - fact: observation
    for_each: OBX
    under: OBR
    when: "OBX-11 != 'X' or OBX-5"
    key: "keyof('report') ~ '|' ~ OBX-3.1 ~ '|' ~ OBX-4"
    fields:
      report_key: "keyof('report')"
      code: {path: OBX-3, required: true}
      value: {path: OBX-5, as: value, type: OBX-2, unit: OBX-6}
      status: {path: OBX-11, table: status}
      effective: "OBX-14 or OBR-7"
      notes: "NTE[*]-3[*]"
"""
TABLES = {
    "sex.yaml": "unmapped: default\ndefault: unknown\nvalues: {M: male, F: female}\n",
    "status.csv": "# unmapped: default\n# default: unknown\ncode,value\nF,final\nP,preliminary\nC,corrected\n",
}


@pytest.fixture
def lab(tmp_path: Path):  # type: ignore[no-untyped-def]
    mset, problems = load_mappings(project(tmp_path, {"lab.yaml": LAB}, TABLES))
    assert not problems, problems
    return mset


def test_groups_keys_notes_and_unused(lab) -> None:  # type: ignore[no-untyped-def]
    m = msg(MSH, PID, "ORC|RE|P1|F1", "OBR|1|P1|F1|CBC^CBC^LN|||202611220900",
            "OBX|1|NM|718-7^Hgb^LN||13.2|g/dL^^UCUM|||||F",
            "NTE|1||first note", "NTE|2||second note",
            "OBX|2|NM|718-7^Hgb^LN||13.4|g/dL^^UCUM|||||C",
            "OBR|2|P2||GLU^Glucose^L|||202611220915",
            "OBX|1|ST|X^Comment^L||see report||||||P",
            "ZXT|1|local")
    out = lab.get("lab").apply(m, MapContext("lab", "Europe/Minsk", lab.tables))
    assert out.patient is not None and out.patient.gender == "male"
    assert [r.key for r in out.reports] == ["F1", "C-1/2"]
    obs = out.observations
    assert [o.report_key for o in obs] == ["F1", "F1", "C-1/2"]  # OBX belongs to the nearest preceding OBR
    assert obs[0].key == "F1|718-7|" and obs[1].key == "F1|718-7|#2"  # same business key: numbered
    assert obs[0].notes == ["first note", "second note"] and obs[1].notes == [] and obs[2].notes == []
    assert [o.status for o in obs] == ["final", "corrected", "preliminary"]
    assert obs[2].effective is not None and obs[2].effective.at == datetime(2026, 11, 22, 6, 15, tzinfo=UTC)
    assert obs[0].value is not None and obs[0].value.quantity is not None
    assert obs[0].value.quantity.value == Decimal("13.2")
    assert out.unused_segments == ["MSH", "ORC", "ZXT"]


def test_required_value_fails_without_patient_data(lab) -> None:  # type: ignore[no-untyped-def]
    m = msg(MSH, "PID|1||SECRET123^^^HOSP^MR||Secretname^John", "OBR|1|P1|F1|CBC",
            "OBX|1|NM|||99.5|g/dL|||||F")
    with pytest.raises(MappingError) as info:
        lab.get("lab").apply(m, MapContext("lab", "UTC", lab.tables))
    err = info.value
    assert err.step == "map" and err.where.startswith("observations[0].code (") and "lab.yaml:" in err.where
    assert "OBX-3" in err.reason
    assert "SECRET123" not in str(err) and "Secretname" not in str(err) and "99.5" not in str(err)
    m = msg(MSH, "PID|1||SECRET123^^^HOSP^MR", "OBR|1|P1|F1|CBC", "OBX|1|NM|718-7^Hgb^LN||12,7|g/dL|||||F")
    with pytest.raises(MappingError) as info:
        lab.get("lab").apply(m, MapContext("lab", "UTC", lab.tables))
    assert "observations[0].value" in info.value.where and "not a number" in info.value.reason
    assert "12,7" not in str(info.value)


def test_oul_spm_groups(tmp_path: Path) -> None:
    mset, problems = load_mappings(ROOT)
    assert not problems
    m = msg("MSH|^~\\&|A|B|C|D|20261122||OUL^R22|X1|P|2.5.1", PID,
            "SPM|1|S1&L^S1&L||BLD", "OBX|1|NM|A^a^L||1||||||F",
            "OBR|1|O1|F1|G^g^L", "OBX|1|NM|B^b^L||2||||||F",
            "SPM|2|S2&L^S2&L||UR", "OBX|1|NM|C^c^L||3||||||F",
            "OBR|1|O2|F2|U^u^L", "OBX|1|NM|D^d^L||4||||||P")
    out = mset.get("oul_r22").apply(m, mset.context("lab", "UTC"))
    assert [o.report_key for o in out.observations] == [None, "F1", None, "F2"]
    assert [o.key.split("|")[0] for o in out.observations] == ["S1", "F1", "S2", "F2"]
    assert [s.key for s in out.specimens] == ["S1", "S2"]
    assert [o.status for o in out.observations] == ["final", "final", "final", "preliminary"]


def test_invalid_skip_warns(tmp_path: Path) -> None:
    mset, _ = load_mappings(ROOT)
    m = msg(MSH, "PID|1||1^^^H^MR||Doe^J||DOB|F", "OBR|1|P|F|C^c^LN", "OBX|1|NM|A^a^LN||1||||||F|||20170229")
    ctx = mset.context("lab", "UTC")
    out = mset.get("oru_r01").apply(m, ctx)
    assert out.patient is not None and out.patient.birth_date is None
    assert out.observations[0].effective is None
    assert len(ctx.warnings) == 2 and "patient.birth_date" in ctx.warnings[0] and "DOB" not in ctx.warnings[0]


def test_shipped_mappings_load_and_fixtures_pass() -> None:
    results = run_tests(ROOT)
    report = format_results(results)
    assert all(r.passed for r in results), report
    mappings = {r.mapping for r in results}
    assert {"oru_r01", "oul_r22", "adt", "adt_a40", "vxu_v04"} <= mappings


def test_fixture_failure_shows_a_diff(tmp_path: Path, lab) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path
    tests = root / "mappings" / "tests"
    tests.mkdir(parents=True, exist_ok=True)
    (tests / "one.yaml").write_text(textwrap.dedent("""\
        mapping: lab
        message: |
          MSH|^~\\&|LIS|LAB|HIS|HOSP|20261122101500||ORU^R01|C-1|P|2.5.1
          PID|1||12345^^^HOSP^MR||Doe^John||19700101|M
        expect:
          patient:
            identifiers: [{value: '12345', type: MR, assigner: HOSP}]
            names: [{family: Doe, given: [Jon]}]
            gender: male
          unused_segments: [MSH]
        """), encoding="utf-8")
    results = run_tests(root, [tests], mappings=lab)
    assert len(results) == 1 and not results[0].passed
    out = format_results(results)
    assert "-    - Jon" in out and "+    - John" in out and "0 passed, 1 failed" in out
    run_tests(root, [tests], mappings=lab, update=True)
    assert run_tests(root, [tests], mappings=lab)[0].passed
    missing = run_tests(root, [tests / "nope.yaml"], mappings=lab)
    assert not missing[0].passed and "no such file" in missing[0].detail


def test_cyrillic_windows_1251_fixture_keeps_names() -> None:
    path = ROOT / "mappings" / "tests" / "oru_r01" / "minsk-cp1251.hl7"
    assert "Иванова".encode("cp1251") in path.read_bytes()
    results = run_tests(ROOT, [path.with_suffix(".yaml")])
    assert results and all(r.passed for r in results), format_results(results)
    text = path.with_suffix(".yaml").read_text(encoding="utf-8")
    assert "family: Иванова" in text


def test_one_patient_per_message() -> None:
    mset, _ = load_mappings(ROOT)
    m = msg(MSH, PID, "OBR|1|P|F|C^c^LN", "OBX|1|NM|A^a^LN||1||||||F",
            "PID|2||99999^^^HOSP^MR||Roe^Richard", "OBR|1|P2|F2|C^c^LN", "OBX|1|NM|A^a^LN||2||||||F")
    with pytest.raises(MappingError) as info:
        mset.get("oru_r01").apply(m, mset.context("lab", "UTC"))
    assert "several patients" in info.value.reason and info.value.where.startswith("checks[0]")


# -- template: (Jinja2, sandboxed) ------------------------------------------------------------------

TEMPLATED = """\
mapping: t
rules:
  - fact: patient
    fields:
      identifiers: "PID-3[*]"
  - fact: report
    for_each: OBR
    key: OBR-3.1
    fields:
      code: OBR-4
      status: {const: final}
      performer:
        template: >-
          {{ field('OBR-16.3') | title }} {{ field('OBR-16.2') | upper }}{% if field('OBR-16.1') %}
          ({{ field('OBR-16.1') }}){% endif %}, {{ channel }}/{{ status }}
  - fact: observation
    for_each: OBX
    under: OBR
    key: "OBR-3.1 ~ '|' ~ OBX-3.1"
    fields:
      code: OBX-3
      status: {const: final}
      producing_lab:
        template: "{% for n in field('NTE[*]-3') %}{{ n }}{% if not loop.last %}; {% endif %}{% endfor %}"
      performer: {template: "{{ field('OBX-16.2') }}"}
"""


def test_a_template_computes_a_string_with_paths_names_filters_and_loops(tmp_path: Path) -> None:
    mset, problems = load_mappings(project(tmp_path, {"t.yaml": TEMPLATED}))
    assert not problems, problems
    m = msg(MSH, PID, "OBR|1|P1|F1|CBC^CBC^LN||||||||||||77^ivanov^petr", "OBX|1|ST|X^x^L||a||||||F",
            "NTE|1||first", "NTE|2||second", "OBX|2|ST|Y^y^L||b||||||F")
    out = mset.get("t").apply(m, MapContext("lab", "UTC", mset.tables))
    assert out.reports[0].performer == "Petr IVANOV (77), lab/final"
    obs = out.observations
    assert obs[0].producing_lab == "first; second"
    assert obs[1].producing_lab is None  # no NTE: empty, so the field keeps its default
    assert obs[0].performer is None  # empty rendering is no value


@pytest.mark.parametrize(("template", "problem"), [
    ("{{ field('OBR-16.2' }}", "template: unexpected '}'"),
    ("{{ field(path) }}", "field() takes one HL7 path in quotes"),
    ("{{ field('OBR-99') }}", "template: field('OBR-99'):"),
    ("{{ nosuch }}", "template: unknown name 'nosuch'"),
    ("{{ performer }}", "performer is not computed before this point"),
    ("{{ field('OBR-16.2') | nosuch }}", "template: No filter named 'nosuch'"),
])
def test_template_problems_are_found_at_load(tmp_path: Path, template: str, problem: str) -> None:
    start = TEMPLATED.index("template: >-")
    end = TEMPLATED.index("\n", TEMPLATED.index("{{ channel }}"))
    text = TEMPLATED[:start] + f"template: \"{template}\"" + TEMPLATED[end:]
    assert text != TEMPLATED
    _, problems = load_mappings(project(tmp_path, {"t.yaml": text}))
    assert any(problem in p.message and p.path == "rules[1].fields.performer.template" and p.line == 13
               for p in problems), [str(p) for p in problems]


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",  # no way out of the sandbox
    "{{ (field('OBX-16.2') | list)[99] }}",  # index out of range
    "{{ range(10**9) | list | length }}",  # the sandbox bounds range()
    "{{ 1 / 0 }}",
])
def test_a_template_that_fails_at_run_time_is_a_conversion_error_without_values(tmp_path: Path,
                                                                                template: str) -> None:
    text = TEMPLATED.replace("performer: {template: \"{{ field('OBX-16.2') }}\"}",
                             f"performer: {{template: \"{template}\"}}")
    assert text != TEMPLATED
    mset, problems = load_mappings(project(tmp_path, {"t.yaml": text}))
    assert not problems, problems
    m = msg(MSH, PID, "OBR|1|P1|F1|CBC^CBC^LN||||||||||||77^SECRETNAME", "OBX|1|ST|X^x^L||a||||||F")
    with pytest.raises(MappingError) as info:
        mset.get("t").apply(m, MapContext("lab", "UTC", mset.tables))
    assert "observations[0].performer" in info.value.where and "template" in info.value.reason
    assert "SECRETNAME" not in str(info.value)
