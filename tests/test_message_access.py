"""engine.hl7.message: the rules of its module docstring, by hand-written messages; equality with
python-hl7 on every message of the corpus (every segment, field, repetition, component and
subcomponent), with each deliberate difference asserted as such; and a hypothesis round trip of
random messages built from random field trees and random delimiters."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import hl7
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import HL7Error
from engine.hl7.batch import is_batch, split_batch
from engine.hl7.charsets import codec_for_charset
from engine.hl7.message import Message, Repetition, Segment
from engine.mllp.client import split_messages
from tests.conftest import CorpusFile

V = "\\"  # the default escape character, to keep the messages below readable


def msg(*segments: str, end: str = "\r") -> Message:
    return Message.parse(end.join(segments) + end)


ORU = msg(
    "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240102030405||ORU^R01^ORU_R01|CTRL1|P|2.5.1",
    "PID|1||123^^^NS&1.2.3&ISO^MR~456^^^OTHER^PI||Smith^John^Q^^Dr||19800101|M",
    "OBR|1|||24331-1^Lipid panel^LN",
    "OBX|1|NM|2093-3^Cholesterol^LN||196|mg/dL^milligram per deciliter^UCUM|||||F",
    "OBX|2|ST|text^Comment||a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f||",
    "NTE|1||\"\"",
)


# -- parsing ----------------------------------------------------------------------------------------

def test_segments_in_order_with_index_and_names() -> None:
    assert [s.name for s in ORU.segments] == ["MSH", "PID", "OBR", "OBX", "OBX", "NTE"]
    assert [s.index for s in ORU.segments] == list(range(6))
    assert all(ORU.segments[i] is s for i, s in enumerate(ORU.segments))
    assert ORU.first("OBX") is ORU.segments[3]
    assert ORU.all("OBX") == ORU.segments[3:5]
    assert ORU.first("ZZZ") is None
    assert ORU.all("ZZZ") == []
    ORU.all("OBX").clear()  # a copy: the message is not changed
    assert len(ORU.all("OBX")) == 2


@pytest.mark.parametrize("end", ["\r", "\n", "\r\n"])
def test_segment_terminators(end: str) -> None:
    m = msg("MSH|^~\\&|A", "PID|1||X", "OBX|1|ST|c||v", end=end)
    assert [s.name for s in m.segments] == ["MSH", "PID", "OBX"]
    assert m.get("OBX-5") == "v"
    assert m.first("OBX").raw(5) == "v"  # no CR or LF left in the last field


def test_mixed_terminators_blank_lines_and_no_trailing_terminator() -> None:
    m = Message.parse("MSH|^~\\&|A\r\n\r\nPID|1\n  \n\r\rOBX|1|ST|x||last")
    assert [s.name for s in m.segments] == ["MSH", "PID", "OBX"]
    assert m.get("OBX-5") == "last"
    assert [s.index for s in m.segments] == [0, 1, 2]


def test_bom_and_leading_whitespace_skipped() -> None:
    m = Message.parse("\ufeff\r\n  MSH|^~\\&|A|B")
    assert m.get("MSH-3") == "A"


@pytest.mark.parametrize("text", ["", "PID|1", " FHS|^~\\&\rMSH|^~\\&|A", "msh|^~\\&", "XMSH|^~\\&"])
def test_must_start_with_msh(text: str) -> None:
    with pytest.raises(HL7Error) as e:
        Message.parse(text)
    assert e.value.code == "100"


def test_msh_without_field_separator() -> None:
    with pytest.raises(HL7Error) as e:
        Message.parse("MSH\rPID|1")
    assert e.value.code == "100"


def test_batch_envelopes_and_second_msh_are_ordinary_segments() -> None:
    m = msg("MSH|^~\\&|A", "PID|1", "BTS|1|note", "FTS|1", "MSH|^~\\&|B", "FHS|^~\\&|F")
    assert [s.name for s in m.segments] == ["MSH", "PID", "BTS", "FTS", "MSH", "FHS"]
    assert m.all("BTS")[0].value(1) == "1"
    assert m.all("MSH")[1].value(3) == "B"
    fhs = m.first("FHS")
    assert fhs.raw(1) == "|"
    assert fhs.raw(2) == "^~\\&"
    assert fhs.value(3) == "F"  # FHS is numbered as MSH


def test_segment_names() -> None:
    m = msg("MSH|^~\\&", "ZP1|a", "PID", "AB|x", "  ", "X^Y|z")
    assert [s.name for s in m.segments] == ["MSH", "ZP1", "PID", "AB", "X^Y"]
    bare = m.segments[2]
    assert bare.field_count() == 0
    assert bare.value(1) is None
    assert bare.raw(1) == ""
    assert m.segments[3].value(1) == "x"


# -- delimiters -----------------------------------------------------------------------------------

def test_default_delimiters_and_truncation_character() -> None:
    m = msg("MSH|^~\\&#|A")
    assert m.separators == "|^~\\&"
    d = m.delimiters
    assert (d.field, d.component, d.repetition, d.escape, d.subcomponent) == ("|", "^", "~", "\\", "&")
    assert d.encoding == "^~\\&#"
    assert m.get("MSH-2") == "^~\\&#"  # MSH-2 is kept exactly as sent


NONDEFAULT = msg(
    "MSH#$*@%#APP#FAC#####ORU$R01#1#P#2.5",
    "PID#1##a$b%c*d$e##name@F@x@S@y@T@z@R@w@E@v|^~\\&",
    "OBX#1#ST#c##one*two*three",
)


def test_nondefault_delimiters() -> None:
    m = NONDEFAULT
    assert m.separators == "#$*@%"
    assert m.get("MSH-1") == "#"
    assert m.get("MSH-2") == "$*@%"
    assert m.get("MSH-3") == "APP"
    assert m.get("MSH-9.1") == "ORU"
    assert m.get("MSH-9.2") == "R01"
    pid = m.first("PID")
    assert pid.value(3) == "a"
    assert pid.value(3, 1, 2) == "b"
    assert pid.value(3, 1, 2, 2) == "c"
    assert pid.value(3, 2, 1) == "d"
    assert pid.value(3, 2, 2) == "e"
    assert pid.get("3") == "a$b%c"
    assert pid.get("3[2]") == "d$e"
    assert pid.get("3.2") == "b%c"
    # escapes name the message's own delimiters; the default characters are plain text here
    assert pid.value(5) == "name#x$y%z*w@v|^~\\&"
    assert [r.text() for r in m.first("OBX").reps(5)] == ["one", "two", "three"]


@pytest.mark.parametrize(("enc", "want"), [
    ("^~\\", "^~\\&"),
    ("^~", "^~\\&"),
    ("^", "^~\\&"),
    ("", "^~\\&"),
    ("$", "$~\\&"),
])
def test_missing_encoding_characters_take_the_defaults(enc: str, want: str) -> None:
    m = Message.parse(f"MSH|{enc}|A^1~B&2|x\\S\\y\rPID|1")
    d = m.delimiters
    assert d.component + d.repetition + d.escape + d.subcomponent == want
    assert m.separators == "|" + enc  # as found
    assert m.get("MSH-2") == (enc or None)
    msh = m.first("MSH")
    assert msh.raw(3) == "A^1~B&2"
    assert msh.field_count() == 4
    assert len(msh.reps(3)) == 2
    if d.component == "^":
        assert msh.value(3, 1, 2) == "1"
        assert msh.value(3, 2, 1, 2) == "2"
    assert msh.value(4) == ("x^y" if d.component == "^" else "x$y")


def test_msh_without_anything_after_msh2() -> None:
    for text in ("MSH|^~\\&", "MSH|^~\\&\rPID|1", "MSH|"):
        m = Message.parse(text)
        msh = m.first("MSH")
        assert msh.raw(1) == "|"
        assert msh.field_count() == 2
        assert msh.value(3) is None


def test_duplicated_delimiters_do_not_crash() -> None:
    m = Message.parse("MSH|&&&&|a&b|c\rPID|1|x&y")
    pid = m.first("PID")
    assert [r.text() for r in pid.reps(2)] == ["x", "y"]  # the repetition level takes the character
    assert pid.value(2, 2) == "y"
    assert pid.value(2, 1, 2) is None


# -- numbering, absent, out of range ---------------------------------------------------------------

def test_msh_numbering() -> None:
    msh = ORU.first("MSH")
    assert msh.raw(1) == "|"
    assert msh.value(1) == "|"
    assert msh.raw(2) == "^~\\&"
    assert msh.value(2) == "^~\\&"  # never unescaped, never split
    assert msh.value(2, 1, 2) is None
    assert msh.value(2, 2) is None
    assert msh.get("2") == "^~\\&"
    assert msh.get("2.1") == "^~\\&"
    assert [r.components() for r in msh.reps(2)] == [["^~\\&"]]
    assert [r.text() for r in msh.reps(1)] == ["|"]
    assert msh.reps(2)[0].component(1) == "^~\\&"
    assert msh.reps(2)[0].component(2) is None
    assert msh.reps(2)[0].subcomponents(1) == ["^~\\&"]
    assert msh.value(3) == "LAB"
    assert msh.value(9, 1, 2) == "R01"
    assert msh.value(10) == "CTRL1"
    assert msh.field_count() == 12
    assert ORU.get("MSH-9") == "ORU^R01^ORU_R01"
    assert ORU.get("MSH-12") == "2.5.1"


def test_field_count_counts_trailing_empty_fields() -> None:
    assert ORU.first("PID").field_count() == 8
    assert ORU.all("OBX")[1].field_count() == 7  # "...||" as sent
    assert Message.parse("MSH|^~\\&").first("MSH").field_count() == 2


def test_absent_empty_and_out_of_range_are_none() -> None:
    pid = ORU.first("PID")
    assert pid.value(2) is None  # empty
    assert pid.value(99) is None  # absent
    assert pid.value(0) is None  # field 0 is the name, not a field
    assert pid.value(-1) is None
    assert pid.value(3, 3) is None  # only two repetitions
    assert pid.value(3, -1) is None
    assert pid.value(3, 1, 6) is None
    assert pid.value(3, 1, -1) is None
    assert pid.value(3, 1, 4, 4) is None
    assert pid.value(3, 1, 4, -2) is None
    assert pid.value(3, 1, 2) is None  # empty component
    assert pid.value(8, 1, 2) is None  # a simple value has no component 2
    assert pid.value(8, 1, 1, 2) is None
    assert pid.raw(99) == ""
    assert pid.raw(0) == ""
    assert pid.reps(2) == []
    assert pid.reps(99) == []
    assert pid.get("99") is None
    assert ORU.get("ZZZ-1") is None
    assert ORU.get("OBX[3]-1") is None
    assert ORU.get("OBX[0]-1") is None


def test_explicit_null_is_returned_unchanged() -> None:
    nte = ORU.first("NTE")
    assert nte.value(3) == '""'
    assert nte.get("3") == '""'
    assert nte.raw(3) == '""'


# -- values, repetitions, components, subcomponents ------------------------------------------------

def test_value_reaches_every_level() -> None:
    pid = ORU.first("PID")
    assert pid.value(3) == "123"
    assert pid.value(3, 1, 4) == "NS"
    assert pid.value(3, 1, 4, 2) == "1.2.3"
    assert pid.value(3, 1, 4, 3) == "ISO"
    assert pid.value(3, 1, 5) == "MR"
    assert pid.value(3, 2) == "456"
    assert pid.value(3, 2, 4) == "OTHER"
    assert pid.value(5, 1, 2) == "John"
    assert pid.value(8) == "M"


def test_whole_reads_with_zero_and_get_specs() -> None:
    pid = ORU.first("PID")
    assert pid.value(3, 1, 0) == "123^^^NS&1.2.3&ISO^MR"
    assert pid.value(3, 2, 0) == "456^^^OTHER^PI"
    assert pid.value(3, 0) == "123^^^NS&1.2.3&ISO^MR~456^^^OTHER^PI"
    assert pid.value(3, 1, 4, 0) == "NS&1.2.3&ISO"
    assert pid.value(3, 1, 4, 1) == "NS"
    assert pid.value(5, 1, 0) == "Smith^John^Q^^Dr"
    # in get(), a level not written is read whole; the repetition defaults to the first
    assert pid.get("3") == "123^^^NS&1.2.3&ISO^MR"
    assert pid.get("3[2]") == "456^^^OTHER^PI"
    assert pid.get("3[0]") == "123^^^NS&1.2.3&ISO^MR~456^^^OTHER^PI"
    assert pid.get("3.4") == "NS&1.2.3&ISO"
    assert pid.get("3.4.2") == "1.2.3"
    assert pid.get("3[2].4") == "OTHER"
    assert pid.get("3[2].4.1") == "OTHER"
    assert pid.get("3[3]") is None
    assert pid.get("8") == "M"
    assert pid.get(" 8 ") == "M"
    assert ORU.get("PID-5.1") == "Smith"
    assert ORU.get("PID-3[2].4.1") == "OTHER"
    assert ORU.get("OBX-5") == "196"
    assert ORU.get("OBX[2]-1") == "2"
    assert ORU.get("OBX-6.1") == "mg/dL"


def test_whole_reads_of_delimiters_only_are_none() -> None:
    m = msg("MSH|^~\\&", "PID|1|^^|~|&|^&~|a^^")
    pid = m.first("PID")
    assert pid.get("2") is None
    assert pid.value(2, 0) is None
    assert pid.value(3, 0) is None
    assert pid.get("4.1") is None
    assert pid.value(5, 0) is None
    assert pid.get("6") == "a^^"  # delimiters kept as sent
    assert pid.reps(3)[0].text() == ""
    assert [r.text() for r in pid.reps(5)] == ["^&", ""]


def test_whole_reads_unescape_each_part() -> None:
    m = msg("MSH|^~\\&", "OBX|1|ST|x||a\\S\\b^c\\T\\d&e\\R\\f~g\\E\\h")
    obx = m.first("OBX")
    assert obx.get("5") == "a^b^c&d&e~f"
    assert obx.value(5, 0) == "a^b^c&d&e~f~g\\h"
    assert obx.get("5.2") == "c&d&e~f"
    assert obx.value(5, 1, 2, 1) == "c&d"
    assert obx.value(5, 1, 2, 2) == "e~f"
    assert obx.raw(5) == "a\\S\\b^c\\T\\d&e\\R\\f~g\\E\\h"


def test_repetition_objects() -> None:
    pid = ORU.first("PID")
    reps = pid.reps(3)
    assert len(reps) == 2
    assert all(isinstance(r, Repetition) for r in reps)
    r1, r2 = reps
    assert r1.raw == "123^^^NS&1.2.3&ISO^MR"
    assert r1.components() == ["123", "", "", "NS", "MR"]
    assert r1.component(4) == "NS"
    assert r1.component(4, 2) == "1.2.3"
    assert r1.component(4, 0) == "NS&1.2.3&ISO"
    assert r1.component(0) == r1.text() == "123^^^NS&1.2.3&ISO^MR"
    assert r1.component(2) is None
    assert r1.component(9) is None
    assert r1.subcomponents(4) == ["NS", "1.2.3", "ISO"]
    assert r1.subcomponents(9) == []
    assert r2.components() == ["456", "", "", "OTHER", "PI"]
    m = msg("MSH|^~\\&", "PID|1||a^b^^~~c&d\\S\\^")
    reps = m.first("PID").reps(3)
    assert [r.components() for r in reps] == [["a", "b", "", ""], [""], ["c", ""]]  # trailing empties kept
    assert [r.text() for r in reps] == ["a^b^^", "", "c&d^^"]
    assert reps[1].component(1) is None
    assert repr(reps[0]) == "<Repetition of 5 characters>"  # no content in reprs (they end up in logs)
    assert repr(m.first("PID")) == "<Segment PID #1>"
    assert repr(m) == "<Message of 2 segments>"


def test_lazy_split_and_raw() -> None:
    m = msg("MSH|^~\\&", "OBX|1|ST|c||a\\F\\b^x")
    obx = m.first("OBX")
    assert obx._fields is None  # not split until read
    assert obx.raw(5) == "a\\F\\b^x"
    assert obx._fields is not None
    assert obx.text == "OBX|1|ST|c||a\\F\\b^x"
    assert isinstance(obx, Segment)


def test_bad_specs_raise_value_error() -> None:
    pid = ORU.first("PID")
    for spec in ("", "x", "5.", "5..1", "5[1", "-5", "5.1.2.3", "PID-5"):
        with pytest.raises(ValueError, match="spec"):
            pid.get(spec)
    for path in ("PID", "PID5", "-5", "PID-", "PID-x"):
        with pytest.raises(ValueError):
            ORU.get(path)


# -- escapes --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("sent", "want"), [
    ("a\\F\\b", "a|b"),
    ("a\\S\\b", "a^b"),
    ("a\\T\\b", "a&b"),
    ("a\\R\\b", "a~b"),
    ("a\\E\\b", "a\\b"),
    ("\\E\\F\\E\\", "\\F\\"),  # an escaped escape character is not re-read
    ("line1\\.br\\line2", "line1\nline2"),
    ("a\\.sp\\b\\.sp3\\c", "a\nb\n\n\nc"),
    ("\\.ce\\t", "\nt"),
    ("\\.fi\\a\\.nf\\b", "ab"),
    ("\\.in\\x", "    x"),
    ("\\.in+2\\x", "        x"),
    ("\\.ti-1\\x", "x"),
    ("\\.sk\\x\\.sk2\\y", " x  y"),
    ("\\X41\\", "A"),
    ("\\X414243\\", "ABC"),
    ("\\X0D0A\\", "\r\n"),
    ("\\Xc3a9\\", "\u00c3\u00a9"),  # bytes -> characters one by one, as python-hl7
    ("\\X414\\", "A\x04"),  # an odd last digit is a value of its own
    ("a\\X\\b", "ab"),
    ("\\H\\bold\\N\\ normal", "bold normal"),
    ("a\\Zfoo\\b", "a\\Zfoo\\b"),  # unknown: kept as sent
    ("a\\C2842\\b", "a\\C2842\\b"),  # character set switch: not supported, kept
    ("a\\M2442\\b", "a\\M2442\\b"),
    ("a\\XZZ\\b", "a\\XZZ\\b"),  # bad hex: kept
    ("a\\X41G\\b", "a\\X41G\\b"),
    ("a\\.spx\\b", "a\\.spx\\b"),  # count not a number: kept
    ("a\\.zz\\b", "a\\.zz\\b"),
    ("a\\\\b", "a\\\\b"),  # empty sequence: kept
    ("C:\\temp", "C:\\temp"),  # unterminated: kept
    ("a\\F\\b\\c", "a|b\\c"),
    ("a\\Q\\F\\", "a\\Q\\F\\"),  # pairs left to right: \Q\ then an unterminated "\"
    ("\\f\\", "\\f\\"),  # escape letters are upper case
])
def test_escapes(sent: str, want: str) -> None:
    m = msg("MSH|^~\\&", f"NTE|1||{sent}")
    assert m.first("NTE").value(3) == want
    assert m.first("NTE").raw(3) == sent


def test_escape_that_decodes_to_nothing_is_none() -> None:
    m = msg("MSH|^~\\&", "NTE|1||\\H\\|\\.fi\\^x")
    assert m.first("NTE").value(3) is None
    assert m.first("NTE").value(4) is None
    assert m.first("NTE").value(4, 1, 2) == "x"


def test_escapes_with_nondefault_escape_character() -> None:
    m = Message.parse("MSH|^~/&\rNTE|1||a/F/b/S/c/E/d\\e/.br/f/X41/")
    assert m.first("NTE").value(3) == "a|b^c/d\\e\nfA"


def test_escapes_are_decoded_after_splitting() -> None:
    m = msg("MSH|^~\\&", "NTE|1||a\\F^b\\")
    nte = m.first("NTE")
    assert nte.value(3, 1, 1) == "a\\F"  # "\F^b\" straddles a delimiter: never a sequence
    assert nte.value(3, 1, 2) == "b\\"


# -- python-hl7 on the corpus ------------------------------------------------------------------------

logging.getLogger(hl7.util.__file__).disabled = True  # python-hl7 logs values it cannot unescape

# The deliberate differences 1 and 2 of the module docstring, as a python-hl7 application map.
APP_MAP = {".br": "\n", ".sp": "\n", ".ce": "\n", "H": "", "N": ""}
KNOWN = {"F", "S", "T", "R", "E", "H", "N", ".br", ".sp", ".ce", ".fi", ".nf", ".in", ".ti", ".sk"}


def known_sequence(seq: str) -> bool:
    if seq in KNOWN:
        return True
    if seq[:1] == "X":
        return all(c in "0123456789abcdefABCDEF" for c in seq[1:])
    if seq[:3] in KNOWN and seq[:1] == ".":
        rest = seq[3:].lstrip("+-")
        return rest.isascii() and rest.isdigit() and len(seq[3:]) - len(rest) <= 1
    return False


def protect(leaf: str, esc: str) -> tuple[str, bool]:
    """``leaf`` with every sequence kept as sent (difference 3) written with \\E\\ escapes, so that
    python-hl7 gives it back literally; and whether there was one."""
    out: list[str] = []
    pos, changed = 0, False
    i = leaf.find(esc)
    while i >= 0:
        j = leaf.find(esc, i + 1)
        if j < 0:
            break
        if not known_sequence(leaf[i + 1:j]):
            out.append(leaf[pos:i] + f"{esc}E{esc}" + leaf[i + 1:j] + f"{esc}E{esc}")
            pos, changed = j + 1, True
        i = leaf.find(esc, j + 1)
    if i >= 0:  # unterminated
        out.append(leaf[pos:i] + f"{esc}E{esc}")
        pos, changed = i + 1, True
    out.append(leaf[pos:])
    return "".join(out), changed


def tree(seg: Any) -> tuple[str, list[list[list[list[str]]]]]:
    """A python-hl7 segment as name and fields -> repetitions -> components -> subcomponents
    (raw leaves); fields[0] is field 1."""
    if isinstance(seg[0], str):  # a segment without any separator: python-hl7 names it seg[0][0]
        return seg[0][0], []
    fields = []
    for f in seg[1:]:
        if len(f) == 1 and isinstance(f[0], str):
            fields.append([[[f[0]]]])
            continue
        reps = []
        for r in f:
            if len(r) == 1 and isinstance(r[0], str):
                reps.append([[r[0]]])
            else:
                reps.append([[str(s) for s in c] for c in r])
        fields.append(reps)
    return str(seg[0]), fields


@dataclass
class Tally:
    messages: int = 0
    segments: int = 0
    values: int = 0
    differences: Counter[str] = field(default_factory=Counter)
    files: dict[str, set[str]] = field(default_factory=dict)
    refused_by_python_hl7: list[str] = field(default_factory=list)

    def note(self, kind: str, name: str) -> None:
        self.differences[kind] += 1
        self.files.setdefault(kind, set()).add(name)


def corpus_codec(raw: bytes) -> str:
    """MSH-18 of the first MSH (engine.hl7.charsets names it), else UTF-8."""
    start = raw.find(b"MSH")
    if start < 0:
        return "utf-8"
    seg = raw[start:].split(b"\r")[0].split(b"\n")[0]
    fields = seg.split(seg[3:4]) if len(seg) > 3 else []
    value = fields[17].decode("ascii", "replace") if len(fields) > 17 else ""
    return (codec_for_charset(value) if value else None) or "utf-8"


def corpus_messages(f: CorpusFile) -> list[bytes]:
    """The messages of a file, split as the engine does (engine.mllp.client / engine.hl7.batch)."""
    out: list[bytes] = []
    for piece in split_messages(f.data()):
        if is_batch(piece):
            try:
                out.extend(split_batch(piece, corpus_codec(piece)).messages)
            except HL7Error:
                continue  # an unusable envelope (malformed:batch-without-msh)
        else:
            out.append(piece)
    return out


def for_python_hl7(text: str) -> str:
    """What hl7.parse needs: segments separated by CR only, no BOM, no blank lines."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\r").replace("\n", "\r")
    return "\r".join(s for s in text.split("\r") if s.strip())


def compare(name: str, text: str, t: Tally) -> None:
    mine = Message.parse(text)
    norm = for_python_hl7(text)
    try:
        theirs = hl7.parse(norm)
    except (AssertionError, IndexError, ValueError, hl7.ParseException):
        # python-hl7 fails (an assertion in its parse plan) when delimiters repeat, and on an MSH
        # with nothing after MSH-1 (IndexError); this parser reads both
        d = mine.delimiters
        msh = mine.segments[0]
        assert len({d.field, d.component, d.repetition, d.escape, d.subcomponent}) < 5 or \
            msh.text.find(d.field, 4) < 0, name
        assert msh.field_count() >= 2 and all(s.field_count() >= 0 for s in mine.segments), name
        t.refused_by_python_hl7.append(name)
        return
    t.messages += 1
    d = mine.delimiters
    _, fs, rep, comp, sub = theirs.separators  # python-hl7 keeps CR, field, repetition, component, subcomponent
    assert (d.field, d.component, d.repetition, d.escape, d.subcomponent) == (fs, comp, rep, theirs.esc, sub), name
    esc = mine.delimiters.escape
    assert len(mine.segments) == len(theirs), name
    last = len(theirs) - 1
    for k, (my_seg, their_seg) in enumerate(zip(mine.segments, theirs, strict=True)):
        t.segments += 1
        seg_name, fields = tree(their_seg)
        where = f"{name} segment {k} {my_seg.name}"
        if not fields and my_seg.name != seg_name:
            # difference 5: python-hl7 names a segment without separators by its first letter
            assert my_seg.name == their_seg[0] and my_seg.field_count() == 0, where
            t.note("5 bare segment name", name)
            continue
        assert my_seg.name == seg_name, where
        header = my_seg.name in ("MSH", "FHS", "BHS")
        if header and my_seg.text.find(mine.delimiters.field, 4) < 0:
            # difference 6: python-hl7 repeats the whole segment after MSH-2
            assert my_seg.field_count() == 2, where
            assert my_seg.raw(1) == str(fields[0][0][0][0]), where
            t.note("6 MSH ends at MSH-2", name)
            continue
        stripped = k == last and my_seg.text != my_seg.text.rstrip()
        if stripped:
            # difference 4: python-hl7 strips the end of the message (its last field's end)
            t.note("4 trailing whitespace", name)
            assert my_seg.text.rstrip() == str(their_seg), where
        assert my_seg.field_count() == len(fields), where
        for fi, reps in enumerate(fields, start=1):
            fwhere = f"{where}-{fi}"
            raw = my_seg.raw(fi)
            if stripped and fi == len(fields):
                assert raw.rstrip() == str(their_seg[fi]) and my_seg.value(fi, 0) == (raw or None), fwhere
                continue
            assert raw == str(their_seg[fi]), fwhere
            my_reps = my_seg.reps(fi)
            if header and fi <= 2:
                assert my_seg.value(fi) == (reps[0][0][0] or None), fwhere
                t.values += 1
                continue
            assert len(my_reps) == (len(reps) if raw else 0), fwhere
            for ri, comps in enumerate(reps, start=1):
                if raw:
                    assert len(my_reps[ri - 1].components()) == len(comps), fwhere
                for ci, subs in enumerate(comps, start=1):
                    if raw:
                        assert len(my_reps[ri - 1].subcomponents(ci)) == len(subs), fwhere
                    for si, leaf in enumerate(subs, start=1):
                        got = my_seg.value(fi, ri, ci, si)
                        protected, kept = protect(leaf, esc)
                        try:
                            plain = theirs.unescape(leaf)
                        except ValueError:  # python-hl7 raises on \.spX\
                            plain = None
                        want = theirs.unescape(protected, app_map=APP_MAP)
                        assert (got or "") == want, f"{fwhere}[{ri}].{ci}.{si}"
                        if plain is not None:  # python-hl7's own accessor reads the same leaf
                            assert their_seg.extract_field(1, fi, ri, ci, si) == plain, fwhere
                        if (got or "") != plain:
                            if kept:
                                t.note("3 kept as sent", name)
                            if any(f"{esc}{s}" in leaf for s in (".br", ".sp", ".ce")):
                                t.note("1 line break", name)
                            if f"{esc}H{esc}" in leaf or f"{esc}N{esc}" in leaf:
                                t.note("2 highlighting dropped", name)
                        t.values += 1
            # beyond the last repetition / component: None here, "" or IndexError in python-hl7
            assert my_seg.value(fi, len(reps) + 1) is None, fwhere
            assert my_seg.value(fi, 1, len(reps[0]) + 1) is None or header, fwhere
        assert my_seg.value(len(fields) + 1) is None, where


@pytest.mark.corpus
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # python-hl7's logger.warn
def test_equal_to_python_hl7_on_the_corpus(corpus: list[CorpusFile]) -> None:
    t = Tally()
    refused_by_me: list[str] = []
    for f in corpus:
        for raw in corpus_messages(f):
            text = raw.decode(corpus_codec(raw), "replace")
            try:
                Message.parse(text)
            except HL7Error:
                # refused only when there is no MSH with a field separator; python-hl7 then either
                # fails too or reads the segment terminator as the field separator (difference 6)
                start = text.lstrip("\ufeff \t\r\n\x00")
                assert not start.startswith("MSH") or start[3:4] in ("", "\r", "\n"), f.name
                refused_by_me.append(f.name)
                continue
            compare(f.name, text, t)
    print(f"\ncorpus: {len(corpus)} files, {t.messages} messages compared with python-hl7, {t.segments} segments, "
          f"{t.values} values; python-hl7 cannot parse {len(t.refused_by_python_hl7)} "
          f"({', '.join(sorted(set(t.refused_by_python_hl7)))}); refused here {len(refused_by_me)} "
          f"({', '.join(sorted(set(refused_by_me)))})")
    for kind, n in sorted(t.differences.items()):
        print(f"  deliberate difference {kind}: {n} in {', '.join(sorted(t.files[kind]))}")
    assert t.messages >= 0.9 * len(corpus)
    assert t.values >= 50 * t.messages


# -- round trip of random messages -----------------------------------------------------------------

DELIMITER_POOL = "|^~\\&#$*@%!?/+=:;<>{}[]_-'\"`,"
TEXT = st.text(alphabet=st.sampled_from(
    "abcXYZ019 .-\t\u00e9\u4e2d\r\n" + "FSTREXHN" + DELIMITER_POOL), max_size=8)
LEAF = st.one_of(st.just(""), TEXT)
COMPONENT = st.lists(LEAF, min_size=1, max_size=3)
REPETITION = st.lists(COMPONENT, min_size=1, max_size=3)
FIELD = st.lists(REPETITION, min_size=1, max_size=3)
SEGMENT = st.tuples(st.sampled_from(["PID", "OBX", "ZX1", "NTE", "PV1"]), st.lists(FIELD, max_size=6))


def escape(value: str, d: str) -> str:
    fs, comp, rep, esc, sub = d
    table = {fs: "F", comp: "S", rep: "R", esc: "E", sub: "T", "\n": ".br", "\r": "X0D"}
    return "".join(f"{esc}{table[c]}{esc}" if c in table else c for c in value)


def render(segments: list[tuple[str, list[Any]]], d: str) -> str:
    fs, comp, rep, _, sub = d
    lines = [f"MSH{d}{fs}SND{fs}FAC"]
    for name, fields in segments:
        parts = [name]
        for f in fields:
            parts.append(rep.join(comp.join(sub.join(escape(s, d) for s in c) for c in r) for r in f))
        lines.append(fs.join(parts))
    return "\r".join(lines) + "\r"


@settings(max_examples=300, deadline=None)
@given(st.permutations(DELIMITER_POOL).map(lambda p: "".join(p[:5])), st.lists(SEGMENT, max_size=5),
       st.sampled_from(["\r", "\n", "\r\n"]))
def test_round_trip(d: str, segments: list[tuple[str, list[Any]]], end: str) -> None:
    text = render(segments, d).replace("\r", end)
    m = Message.parse(text)
    assert m.separators == d
    assert m.get("MSH-1") == d[0]
    assert m.get("MSH-2") == d[1:]
    assert m.get("MSH-3") == "SND"
    assert [s.name for s in m.segments] == ["MSH"] + [n for n, _ in segments]
    _, comp, rep, _, sub = d
    blank = rep + comp + sub

    def whole(text: str, raw: str) -> str | None:  # a whole read: None when raw is delimiters only
        return text if raw.strip(blank) else None

    for seg, (_, fields) in zip(m.segments[1:], segments, strict=True):
        assert seg.field_count() == len(fields)
        for fi, f in enumerate(fields, start=1):
            reps = seg.reps(fi)
            assert len(reps) == (0 if f == [[[""]]] else len(f))
            raw_reps = [comp.join(sub.join(escape(x, d) for x in c) for c in r) for r in f]
            assert seg.raw(fi) == rep.join(raw_reps)
            assert seg.value(fi, 0) == whole(rep.join(comp.join(sub.join(c) for c in r) for r in f), seg.raw(fi))
            for ri, r in enumerate(f, start=1):
                text_rep = comp.join(sub.join(c) for c in r)
                if reps:
                    assert reps[ri - 1].components() == [c[0] for c in r]
                    assert reps[ri - 1].text() == text_rep
                assert seg.value(fi, ri, 0) == whole(text_rep, raw_reps[ri - 1])
                for ci, c in enumerate(r, start=1):
                    for si, x in enumerate(c, start=1):
                        assert seg.value(fi, ri, ci, si) == (x or None)
                        assert seg.get(f"{fi}[{ri}].{ci}.{si}") == (x or None)
                    raw_comp = sub.join(escape(x, d) for x in c)
                    assert seg.value(fi, ri, ci, 0) == whole(sub.join(c), raw_comp)
                    if reps:
                        assert reps[ri - 1].subcomponents(ci) == c
                        assert reps[ri - 1].component(ci, 0) == whole(sub.join(c), raw_comp)
                assert seg.value(fi, ri, len(r) + 1) is None
            assert seg.value(fi, len(f) + 1) is None
        assert seg.value(len(fields) + 1) is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@settings(max_examples=150, deadline=None)
@given(st.permutations(DELIMITER_POOL).map(lambda p: "".join(p[:5])), st.lists(SEGMENT, max_size=4))
def test_random_messages_equal_to_python_hl7(d: str, segments: list[tuple[str, list[Any]]]) -> None:
    text = render(segments, d) + "ZZZ" + d[0] + "end"  # python-hl7 strips the end of a message
    t = Tally()
    compare("random", text, t)
    assert t.messages == 1
