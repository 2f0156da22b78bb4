"""MSH reading (engine.hl7.header) and MSH-18 character sets (engine.hl7.charsets), byte by byte."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.errors import HL7Error
from engine.hl7.charsets import clean, codec_for_charset
from engine.hl7.header import (
    Delimiters,
    message_start,
    read_delimiters,
    read_header,
    salvage_header,
    segment_end,
)

STD = (b"MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240102030405||ADT^A01^ADT_A01|CTRL123|P|2.5.1|||AL|NE\r"
       b"EVN|A01|20240102030405\rPID|1||12345^^^HOSP^MR||DOE^JOHN\r")


def msh(*fields: str, fs: str = "|", enc: str = "^~\\&", charset: str | None = None, codec: str = "utf-8") -> bytes:
    """An MSH segment from MSH-3 onwards (``fields[0]`` is MSH-3), with MSH-18 if given."""
    values = list(fields)
    if charset is not None:
        values += [""] * (15 - len(values)) + [charset]  # MSH-3..MSH-17 then MSH-18
    return ("MSH" + fs + enc + fs + fs.join(values) + "\r").encode(codec)


def basic(facility: str = "SENDFAC", charset: str | None = None, codec: str = "utf-8") -> bytes:
    return msh("SENDAPP", facility, "RECVAPP", "RECVFAC", "20240102030405", "", "ADT^A01", "CTRL1", "P", "2.5",
               charset=charset, codec=codec) + "PID|1||X\r".encode(codec)


# -- standard messages ----------------------------------------------------------------------------------

def test_standard_delimiters() -> None:
    h = read_header(STD, "utf-8")
    d = h.delimiters
    assert (d.field, d.component, d.repetition, d.escape, d.subcomponent) == ("|", "^", "~", "\\", "&")
    assert d.encoding == "^~\\&"
    assert h.fields[0] == "MSH"
    assert h.fields[1] == "|"
    assert h.fields[2] == "^~\\&"
    assert h.fields[3] == "SENDAPP"
    assert h.sending_application == "SENDAPP"
    assert h.sending_facility == "SENDFAC"
    assert h.receiving_application == "RECVAPP"
    assert h.receiving_facility == "RECVFAC"
    assert h.fields[7] == "20240102030405"
    assert h.fields[9] == "ADT^A01^ADT_A01"
    assert (h.message_type, h.trigger_event, h.structure) == ("ADT", "A01", "ADT_A01")
    assert h.type_label == "ADT^A01"
    assert h.control_id == "CTRL123"
    assert h.processing_id == "P"
    assert h.version == "2.5.1"
    assert h.accept_ack_type == "AL"
    assert h.application_ack_type == "NE"
    assert len(h.fields) == 17
    assert h.get(17) == ""
    assert h.get(99) == ""
    assert h.charset == ""
    assert h.codec == "utf-8"
    assert h.charset_known is True
    assert h.salvaged is False
    assert h.problems == []
    assert h.component(9, 2) == "A01"
    assert h.component(9, 4) == ""


def test_header_reads_only_the_first_segment() -> None:
    h = read_header(STD, "utf-8")
    assert all("\r" not in f and "EVN" not in f for f in h.fields)


def test_components_of_processing_and_version_fields() -> None:
    h = read_header(msh("A", "B", "C", "D", "20240101", "", "ORU^R01", "ID9", "T^A", "2.4^USA^X", "", "", " al ", "er"),
                    "ascii")
    assert h.processing_id == "T"
    assert h.version == "2.4"
    assert h.fields[12] == "2.4^USA^X"
    assert h.accept_ack_type == "AL"
    assert h.application_ack_type == "ER"
    assert h.type_label == "ORU^R01"
    assert h.structure == ""


def test_type_label_without_trigger() -> None:
    h = read_header(msh("A", "B", "C", "D", "20240101", "", "ACK", "ID9", "P", "2.1"), "ascii")
    assert h.message_type == "ACK"
    assert h.trigger_event == ""
    assert h.type_label == "ACK"


def test_custom_delimiters() -> None:
    raw = b"MSH#!@%*#SENDER#FAC#RECV#FAC2#20260301120000##ADT!A01#MSG007#P#2.5\rPID#1##12345!!!MRN\r"
    h = read_header(raw, "utf-8")
    d = h.delimiters
    assert (d.field, d.component, d.repetition, d.escape, d.subcomponent) == ("#", "!", "@", "%", "*")
    assert d.encoding == "!@%*"
    assert h.fields[1] == "#"
    assert h.fields[2] == "!@%*"
    assert h.fields[3] == "SENDER"
    assert h.fields[6] == "FAC2"
    assert h.fields[9] == "ADT!A01"
    assert (h.message_type, h.trigger_event) == ("ADT", "A01")
    assert h.control_id == "MSG007"
    assert h.version == "2.5"
    assert h.problems == []


def test_hl7apy_style_delimiters_are_readable() -> None:
    # hl7apy's own test message uses "!" as field and "$r?@" as encoding characters (a letter as repetition)
    h = read_header(b"MSH!$r?@!LIP!LIP!LB!LB!20111207121030!!RSP$SLI$RSP_K11!430102!D!2.5!!!!!IT!!EN", "utf-8")
    assert h.delimiters.field == "!"
    assert h.delimiters.component == "$"
    assert (h.message_type, h.trigger_event, h.structure) == ("RSP", "SLI", "RSP_K11")
    assert h.control_id == "430102"
    assert h.processing_id == "D"
    assert h.fields[17] == "IT"
    assert h.fields[19] == "EN"


def test_truncation_character_v27() -> None:
    raw = b"MSH|^~\\&#|APP|FAC|R|RF|20240101||ORU^R01^ORU_R01|X1|P|2.7\rOBX|1\r"
    h = read_header(raw, "utf-8")
    d = h.delimiters
    assert d.encoding == "^~\\&#"
    assert (d.component, d.repetition, d.escape, d.subcomponent) == ("^", "~", "\\", "&")
    assert h.fields[2] == "^~\\&#"
    assert h.fields[3] == "APP"
    assert h.version == "2.7"
    assert h.trigger_event == "R01"


def test_utf8_bom_before_msh() -> None:
    h = read_header(b"\xef\xbb\xbf" + STD, "utf-8")
    assert h.fields[0] == "MSH"
    assert h.fields[3] == "SENDAPP"
    assert h.control_id == "CTRL123"


@pytest.mark.parametrize("prefix", [b"\r", b"\n", b"\r\n\r\n", b" \t\n", b"\xef\xbb\xbf\r\n"])
def test_leading_whitespace(prefix: bytes) -> None:
    h = read_header(prefix + STD, "utf-8")
    assert h.fields[3] == "SENDAPP"
    assert h.fields[16] == "NE"


@pytest.mark.parametrize("term", [b"\r", b"\n", b"\r\n"])
def test_segment_terminators(term: bytes) -> None:
    raw = STD.replace(b"\r", term)
    h = read_header(raw, "utf-8")
    assert h.fields[16] == "NE"  # last MSH field, no terminator glued to it
    assert h.version == "2.5.1"
    assert len(h.fields) == 17


def test_no_terminator_at_all() -> None:
    h = read_header(STD.split(b"\r", 1)[0], "utf-8")
    assert h.fields[16] == "NE"


def test_message_start_and_segment_end() -> None:
    assert message_start(b"MSH|") == 0
    assert message_start(b"\xef\xbb\xbf\r\n MSH|") == 6
    assert message_start(b"\r\n") == 2
    assert message_start(b"") == 0
    assert segment_end(b"MSH|a\rPID", 0) == 5
    assert segment_end(b"MSH|a\nPID", 0) == 5
    assert segment_end(b"MSH|a\r\nPID", 0) == 5
    assert segment_end(b"MSH|a\nB\rC", 0) == 5
    assert segment_end(b"MSH|a", 0) == 5
    assert segment_end(b"X\rMSH|a\rB", 2) == 7


# -- MSH-18 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("charset", "codec"),
    [
        ("UNICODE UTF-8", "utf-8"),
        ("UNICODE", "utf-8"),
        ("8859/1", "latin-1"),
        ("8859/5", "iso8859-5"),
        ("8859/15", "iso8859-15"),
        ("ASCII", "ascii"),
        ("~ISO IR87", "iso2022_jp_ext"),
        ("ISO IR87", "iso2022_jp_ext"),
        ("~ISOIR87", "iso2022_jp_ext"),
        ("ISO IR100", "latin-1"),
        ("ISO IR144", "iso8859-5"),
        ("unicode utf-8", "utf-8"),
        (" UNICODE  UTF-8 ", "utf-8"),
        ("WINDOWS-1251", "cp1251"),
    ],
)
def test_msh18_charsets(charset: str, codec: str) -> None:
    h = read_header(basic(charset=charset, codec="ascii"), "cp1252")
    assert h.charset == charset
    assert h.codec == codec
    assert h.charset_known is True
    assert h.fields[3] == "SENDAPP"


@pytest.mark.parametrize("charset", ["KLINGON", "8859/99", "FOO~UNICODE UTF-8"])
def test_unknown_msh18_uses_default_codec(charset: str) -> None:
    h = read_header(basic("Zürich", charset=charset, codec="latin-1"), "latin-1")
    assert h.charset == charset
    assert h.charset_known is False
    assert h.codec == "latin-1"
    assert h.sending_facility == "Zürich"


def test_empty_msh18_uses_default_codec_and_is_known() -> None:
    h = read_header(basic(charset=""), "cp1252")
    assert h.codec == "cp1252"
    assert h.charset_known is True


def test_msh18_8859_1_decodes_latin1_bytes() -> None:
    raw = basic("Hôpital Zürich", charset="8859/1", codec="latin-1")
    h = read_header(raw, "utf-8")
    assert h.codec == "latin-1"
    assert h.sending_facility == "Hôpital Zürich"


def test_msh18_8859_5_decodes_cyrillic() -> None:
    raw = basic("Больница", charset="8859/5", codec="iso8859-5")
    h = read_header(raw, "utf-8")
    assert h.codec == "iso8859-5"
    assert h.sending_facility == "Больница"


def test_msh18_utf8_overrides_latin1_default() -> None:
    raw = basic("Größe €", charset="UNICODE UTF-8", codec="utf-8")
    h = read_header(raw, "latin-1")
    assert h.codec == "utf-8"
    assert h.sending_facility == "Größe €"


def test_msh18_iso_ir87_decodes_iso2022_jp() -> None:
    raw = basic("東京病院", charset="~ISO IR87", codec="iso2022_jp")
    assert b"\x1b$B" in raw
    h = read_header(raw, "utf-8")
    assert h.codec == "iso2022_jp_ext"
    assert h.sending_facility == "東京病院"


def test_cp1251_default_codec_reads_cyrillic_msh4() -> None:
    raw = basic("ГКБ №1", codec="cp1251")
    assert "ГКБ №1".encode("cp1251") in raw
    h = read_header(raw, "cp1251")
    assert h.codec == "cp1251"
    assert h.charset_known is True
    assert h.sending_facility == "ГКБ №1"
    assert h.fields[4] == "ГКБ №1"


def test_cp1251_bytes_read_as_utf8_survive_undecoded() -> None:
    raw = basic("ГКБ №1", codec="cp1251")
    h = read_header(raw, "utf-8")
    assert h.sending_facility != "ГКБ №1"
    assert h.control_id == "CTRL1"
    # bytes the codec cannot decode are kept (surrogateescape), so they can be echoed unchanged
    assert h.sending_facility.encode("utf-8", "surrogateescape") == "ГКБ №1".encode("cp1251")
    assert clean(h.sending_facility, "utf-8") == "\ufffd" * 3 + " \ufffd1"
    assert clean("ГКБ №1", "cp1251") == "ГКБ №1"
    assert clean("plain", "ascii") == "plain"


def test_codec_for_charset_values() -> None:
    assert codec_for_charset("") is None
    assert codec_for_charset("NOPE") is None
    assert codec_for_charset("8859/2") == "iso8859-2"
    assert codec_for_charset("KS X 1001") == "euc_kr"
    assert codec_for_charset("GB 18030-2000") == "gb18030"
    assert codec_for_charset("BIG-5") == "big5"
    assert codec_for_charset("UNICODE_UTF-8") == "utf-8"
    assert codec_for_charset("8859/1~ISO IR87") == "iso2022_jp_ext"
    assert codec_for_charset("~8859/1") == "latin-1"
    assert codec_for_charset("KOI8-R") == "koi8-r"


@pytest.mark.parametrize("charset", ["HEX", "BASE64", "ROT13", "ZIP", "UNDEFINED", "IDNA"])
def test_msh18_naming_a_non_text_codec_is_an_unknown_charset(charset: str) -> None:
    h = read_header(basic(charset=charset), "utf-8")
    assert h.charset_known is False
    assert h.codec == "utf-8"
    assert h.sending_facility == "SENDFAC"
    assert codec_for_charset(charset) is None


BROKEN_JIS = b"\x1b$B\x30"  # ESC $ B then half a two-byte character: invalid ISO-2022-JP


@pytest.mark.parametrize(("msh18", "default"), [("~ISO IR87", "utf-8"), ("", "iso2022_jp_ext")])
def test_invalid_iso2022_bytes_do_not_raise(msh18: str, default: str) -> None:
    raw = (b"MSH|^~\\&|APP|" + BROKEN_JIS + b"|R|RF|2024||ADT^A01|C12|P|2.5||||||" + msh18.encode()
           + b"\rPID|1\r")
    try:
        h = read_header(raw, default)
    except HL7Error:
        return  # refusing it is fine
    # what follows the broken sequence may be lost, but what precedes it is read
    assert h.codec == "iso2022_jp_ext"
    assert h.fields[3] == "APP"


@pytest.mark.parametrize("msh18", ["UNICODE UTF-16", "UNICODE UTF-32"])
def test_utf16_utf32_msh18_does_not_raise(msh18: str) -> None:
    raw = b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|C1|P|2.5||||||" + msh18.encode() + b"\rPID|1\r"
    try:
        h = read_header(raw, "utf-8")
    except HL7Error:
        return  # refusing it is fine
    assert h.fields[0] == "MSH"


# -- required fields -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("n", "location"),
    [(9, "MSH^1^9"), (10, "MSH^1^10"), (11, "MSH^1^11"), (12, "MSH^1^12")],
)
def test_empty_required_field_is_a_problem(n: int, location: str) -> None:
    values = ["SENDAPP", "SENDFAC", "RECVAPP", "RECVFAC", "20240102", "", "ADT^A01", "C1", "P", "2.5"]
    values[n - 3] = ""
    h = read_header(msh(*values), "utf-8")
    assert len(h.problems) == 1
    err = h.problems[0]
    assert isinstance(err, HL7Error)
    assert err.code == "101"
    assert err.reason == "MISSING_FIELD"
    assert err.location == location
    assert f"MSH-{n}" in err.text


def test_whitespace_only_required_fields_are_problems() -> None:
    h = read_header(msh("A", "B", "C", "D", "2024", "", "ADT^A01", "  ", " ", " "), "utf-8")
    assert [p.location for p in h.problems] == ["MSH^1^10", "MSH^1^11", "MSH^1^12"]


@pytest.mark.parametrize("msh9", [" ", "\t", "  ^A01"])
def test_whitespace_only_msh9_is_a_problem(msh9: str) -> None:
    h = read_header(msh("A", "B", "C", "D", "2024", "", msh9, "C1", "P", "2.5"), "utf-8")
    assert [(p.code, p.location) for p in h.problems] == [("101", "MSH^1^9")]


def test_msh9_with_trigger_only_is_missing_type() -> None:
    h = read_header(msh("A", "B", "C", "D", "2024", "", "^A01", "C1", "P", "2.5"), "utf-8")
    assert h.message_type == ""
    assert h.trigger_event == "A01"
    assert [p.location for p in h.problems] == ["MSH^1^9"]


def test_short_msh_lists_all_four_problems() -> None:
    h = read_header(b"MSH|^~\\&|APP|FAC\r", "utf-8")
    assert [(p.code, p.location) for p in h.problems] == [
        ("101", "MSH^1^9"), ("101", "MSH^1^10"), ("101", "MSH^1^11"), ("101", "MSH^1^12"),
    ]
    assert h.fields == ["MSH", "|", "^~\\&", "APP", "FAC"]


def test_complete_header_has_no_problems() -> None:
    assert read_header(basic(), "utf-8").problems == []


# -- delimiters refused ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "seg",
    [
        b"MSH|^~\\|A|B",      # three encoding characters
        b"MSH|^~|A",          # two
        b"MSH||A|B",          # none
        b"MSH|^~\\",          # three, no second field
        b"MSH|&&&&|A|B",      # all the same
        b"MSH|^^\\&|A",       # repeated component / repetition
        b"MSH|^~\\^|A",       # repeated
        b"MSH|1~\\&|A",       # digit as component
        b"MSH|^~\\9|A",       # digit as subcomponent
        b"MSH0^~\\&0A",       # digit as field separator
        b"MSH|^ \\&|A",       # space
        b"MSH|^~\t&|A",       # control character
        b"MSH ^~\\& A",       # space as field separator
    ],
)
def test_read_delimiters_refuses(seg: bytes) -> None:
    with pytest.raises(HL7Error) as info:
        read_delimiters(seg)
    assert info.value.code == "102"
    assert info.value.reason == "BAD_DELIMITERS"
    # a bad field separator is MSH-1, bad encoding characters are MSH-2
    assert info.value.location == ("MSH^1^1" if seg[3:4] in (b"0", b" ") else "MSH^1^2")
    # and read_header raises the same error for a message with that MSH
    with pytest.raises(HL7Error) as again:
        read_header(seg + b"\rPID|1\r", "utf-8")
    assert again.value.code == "102"


@pytest.mark.parametrize(("sep", "codec"), [(b"\xa6", "utf-8"), (b"\x80", "cp1251"), (b"\xb6", "utf-8")])
def test_non_ascii_field_separator(sep: bytes, codec: str) -> None:
    raw = b"MSH" + sep + b"^~\\&" + sep + b"APP" + sep + b"FAC" + sep + b"R" + sep + b"RF" + sep + b"2024" + sep
    raw += sep + b"ADT^A01" + sep + b"C1" + sep + b"P" + sep + b"2.5\rPID" + sep + b"1\r"
    try:
        h = read_header(raw, codec)
    except HL7Error as err:
        assert err.code == "102"
    else:
        assert h.fields[3] == "APP"
        assert h.control_id == "C1"
        assert h.problems == []


@pytest.mark.parametrize("sep", ["H", "S", "M"])
def test_field_separator_letter_from_msh(sep: str) -> None:
    values = ["^~\\&", "APP", "FAC", "R", "RF", "2024", "", "ADT^A01", "C1", "P", "2.5"]
    raw = ("MSH" + sep + sep.join(values) + "\rPID" + sep + "1\r").encode()
    try:
        h = read_header(raw, "utf-8")
    except HL7Error as err:
        assert err.code == "102"
    else:
        assert h.fields[2] == "^~\\&"
        assert h.fields[3] == "APP"
        assert h.control_id == "C1"


def test_refusal_is_not_cached() -> None:
    for _ in range(2):
        with pytest.raises(HL7Error):
            read_delimiters(b"MSH|&&&&|A")


def test_read_delimiters_values() -> None:
    assert read_delimiters(b"MSH|^~\\&|A|B") == Delimiters("|", "^", "~", "\\", "&", "^~\\&")
    assert read_delimiters(b"MSH#!@%*#A") == Delimiters("#", "!", "@", "%", "*", "!@%*")
    assert read_delimiters(b"BHS|^~\\&#|X") == Delimiters("|", "^", "~", "\\", "&", "^~\\&#")
    assert read_delimiters(b"MSH|^~\\}|A") == Delimiters("|", "^", "~", "\\", "}", "^~\\}")
    assert read_delimiters(b"MSH|^~\\&") == Delimiters()


def test_msh_without_field_separator() -> None:
    with pytest.raises(HL7Error) as info:
        read_header(b"MSH\rPID|1\r", "utf-8")
    assert info.value.code == "100"
    assert info.value.location == "MSH^1^1"


@pytest.mark.parametrize(
    "raw",
    [b"", b"\r\n", b"\xef\xbb\xbf", b"PID|1||X\r", b"FHS|^~\\&|A\rMSH|^~\\&|A\r", b"xMSH|^~\\&|",
     b"msh|^~\\&|A|B\r", b"\x0bMSH|^~\\&|A\r\x1c\r"],
)
def test_not_starting_with_msh(raw: bytes) -> None:
    with pytest.raises(HL7Error) as info:
        read_header(raw, "utf-8")
    assert info.value.code == "100"
    assert info.value.reason == "NOT_HL7"
    assert info.value.location == "MSH^1"


# -- salvage ---------------------------------------------------------------------------------------------

def test_salvage_bad_delimiters() -> None:
    raw = b"MSH|&&&&|APP|FAC|RAPP|RFAC|20240101||ORU^R01|CTL9|P|2.5.1\rOBX|1\r"
    with pytest.raises(HL7Error):
        read_header(raw, "utf-8")
    h = salvage_header(raw, "utf-8")
    assert h is not None
    assert h.salvaged is True
    assert h.charset_known is False
    assert h.delimiters == Delimiters()
    assert h.fields[:4] == ["MSH", "|", "^~\\&", "APP"]
    assert h.sending_facility == "FAC"
    assert h.receiving_application == "RAPP"
    assert (h.message_type, h.trigger_event) == ("ORU", "R01")
    assert h.control_id == "CTL9"
    assert h.version == "2.5.1"
    assert h.codec == "utf-8"


def test_salvage_short_encoding_with_custom_field_separator() -> None:
    raw = b"\xef\xbb\xbf\r\nMSH#^~#SND#SFAC#R#RF#2024##ADT^A04#ID4#T#2.3\nPID#1\n"
    with pytest.raises(HL7Error) as info:
        read_header(raw, "utf-8")
    assert info.value.code == "102"
    h = salvage_header(raw, "utf-8")
    assert h is not None
    assert h.fields[1] == "|"
    assert h.fields[3] == "SND"
    assert h.fields[12] == "2.3"
    assert h.control_id == "ID4"
    assert h.processing_id == "T"


def test_salvage_keeps_default_codec_for_text() -> None:
    raw = "MSH|^~|APP|ГКБ №1|R|RF|2024||ADT^A01|C1|P|2.5\r".encode("cp1251")
    h = salvage_header(raw, "cp1251")
    assert h is not None
    assert h.sending_facility == "ГКБ №1"
    assert h.codec == "cp1251"


@pytest.mark.parametrize("raw", [b"", b"MSH", b"MSH\rPID|1", b"PID|1|2", b"MSH1^~\\&1A", b"MSH ^~\\& A"])
def test_salvage_gives_up(raw: bytes) -> None:
    assert salvage_header(raw, "utf-8") is None


# -- properties ------------------------------------------------------------------------------------------

DELIMITER_SETS = [("|", "^~\\&"), ("#", "!@%*"), ("|", "^~\\&#"), ("!", "$r?@"), ("|", "^~\\}")]
field_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="|^~\\&#!@%*$r?}\r\n"),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(DELIMITER_SETS),
    st.lists(field_text, min_size=15, max_size=15),
    st.sampled_from(["", "UNICODE UTF-8", "UNICODE", "NOT A CHARSET"]),
    st.lists(field_text, max_size=5),
    st.sampled_from(["\r", "\n", "\r\n", ""]),
    st.sampled_from(["", "\ufeff", "\r\n"]),
)
def test_property_fields_round_trip(
    delims: tuple[str, str], values: list[str], charset: str, extra: list[str], term: str, prefix: str,
) -> None:
    assume(values[6] == "" or values[6].strip())  # a blank MSH-9: see test_whitespace_only_msh9_is_a_problem
    fs, enc = delims
    all_values = [*values, charset, *extra]  # MSH-3 .. MSH-17, MSH-18, MSH-19 ...
    rest = term + "PID" + fs + "1" + term if term else ""
    raw = (prefix + "MSH" + fs + enc + fs + fs.join(all_values) + rest).encode("utf-8")
    h = read_header(raw, "utf-8")
    assert h.delimiters.field == fs
    assert h.delimiters.encoding == enc
    assert h.fields[0] == "MSH"
    assert h.fields[1] == fs
    assert h.fields[2] == enc
    assert len(h.fields) == 3 + len(all_values)
    for n, value in enumerate(all_values, start=3):
        assert h.fields[n] == value
        assert h.get(n) == value
    assert h.charset == charset
    assert h.charset_known is (charset != "NOT A CHARSET")
    assert h.codec == "utf-8"
    assert h.control_id == values[7]
    assert h.sending_facility == values[1]
    assert h.message_type == values[6]
    expected = [f"MSH^1^{n}" for n, v in ((9, values[6]), (10, values[7]), (11, values[8]), (12, values[9]))
                if not v.strip()]
    assert [p.location for p in h.problems] == expected


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["utf-8", "latin-1", "cp1251", "ascii"]))
def test_property_only_hl7_errors_on_arbitrary_msh(tail: bytes, codec: str) -> None:
    try:
        h = read_header(b"MSH" + tail, codec)
    except HL7Error as err:
        assert err.code in ("100", "102")
        salvaged = salvage_header(b"MSH" + tail, codec)
        assert salvaged is None or salvaged.salvaged
    else:
        assert h.fields[0] == "MSH"
        assert h.fields[1] == chr(tail[0])
        if not h.charset or not h.charset_known:
            assert h.codec == codec
        if tail[0] < 128 and tail[:1] not in (b"M", b"S", b"H"):  # see test_non_ascii_field_separator and
            # test_field_separator_letter_from_msh
            # every field can be turned back into the bytes that were sent
            seg = (b"MSH" + tail).split(b"\r")[0].split(b"\n")[0]
            sent = h.delimiters.field.join(h.fields[2:]).encode(h.codec, "surrogateescape")
            assert sent == seg[4:]
