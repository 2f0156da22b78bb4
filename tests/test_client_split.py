"""The sending side's file handling (engine.mllp.client): split_messages, read_acks and to_cr.
No sockets: only the pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import HL7Error
from engine.hl7.ack import AckBuilder
from engine.hl7.batch import batch_response, split_batch
from engine.hl7.header import read_header
from engine.mllp.client import AckSummary, read_acks, split_messages, to_cr
from engine.mllp.framing import frame

M1 = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|ID1|P|2.5\rEVN|A01\rPID|1||111\r"
M2 = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A08|ID2|P|2.5\rPID|1||222\r"
M3 = b"MSH|^~\\&|A|B|C|D|20240101||ORU^R01|ID3|P|2.5.1\rOBX|1|ST|X||y\r"


# -- split_messages: MLLP-framed files ------------------------------------------------------------------

def test_framed_blocks_are_split_per_block() -> None:
    data = frame(M1) + frame(M2) + frame(M3)
    assert split_messages(data) == [M1, M2, M3]


def test_framed_blocks_with_line_ends_between() -> None:
    data = frame(M1) + b"\r\n" + frame(M2) + b"\n\n" + frame(M3) + b"\r\n"
    assert split_messages(data) == [M1, M2, M3]


def test_framed_block_without_cr_after_fs() -> None:
    assert split_messages(b"\x0b" + M1 + b"\x1c\x0b" + M2 + b"\x1c") == [M1, M2]


def test_only_trailing_fs() -> None:
    assert split_messages(M1 + b"\x1c") == [M1]
    assert split_messages(M1 + b"\x1c\r") == [M1]


def test_empty_blocks_are_dropped() -> None:
    assert split_messages(b"\x0b\x1c\r" + frame(M1) + b"\x0b\r\n\x1c\r") == [M1]


def test_leading_line_ends_in_a_block_are_removed() -> None:
    assert split_messages(b"\x0b\r\n" + M1 + b"\x1c\r") == [M1]


def test_framed_content_bytes_unchanged() -> None:
    m = "MSH|^~\\&|ЛИС|ГКБ №1|C|D|2024||ADT^A01|Z|P|2.5\nPID|1\r\n".encode("cp1251")
    assert split_messages(frame(m)) == [m]


@pytest.mark.corpus
def test_ssmix2_file_with_only_a_trailing_fs(corpus) -> None:
    files = {f.name: f for f in corpus}
    raw = files["ssmix2-adt_a01-1.hl7"].data()
    assert raw.endswith(b"\r\x1c")
    assert b"\x0b" not in raw
    pieces = split_messages(raw)
    assert pieces == [raw[:-1]]
    h = read_header(pieces[0], "utf-8")
    assert h.codec == "iso2022_jp_ext"
    assert h.control_id == "20111220000001"


# -- split_messages: batches ----------------------------------------------------------------------------

def test_batch_is_kept_whole() -> None:
    data = b"FHS|^~\\&|A\rBHS|^~\\&|A\r" + M1 + M2 + b"BTS|2\rFTS|1\r"
    assert split_messages(data) == [data]


@pytest.mark.parametrize("prefix", [b"\xef\xbb\xbf", b"\r\n", b"\n\n"])
def test_batch_with_leading_bom_or_blank_lines_kept_whole(prefix: bytes) -> None:
    data = prefix + b"BHS|^~\\&|A\n" + M1.replace(b"\r", b"\n") + M2.replace(b"\r", b"\n") + b"BTS|2\n"
    assert split_messages(data) == [data]


@pytest.mark.corpus
def test_corpus_batch_files_are_kept_whole(corpus) -> None:
    files = {f.name: f for f in corpus}
    for name in ("pyhl7-batch_adt_a04-3.hl7", "prs-batch_oru_r01-2.hl7", "prs-batch_oru_r01-4.hl7"):
        raw = files[name].data()
        assert split_messages(raw) == [raw], name


# -- split_messages: plain files ------------------------------------------------------------------------

@pytest.mark.parametrize("term", [b"\r", b"\n", b"\r\n"])
def test_messages_split_at_each_msh_line(term: bytes) -> None:
    msgs = [m.replace(b"\r", term) for m in (M1, M2, M3)]
    data = b"".join(msgs)
    assert split_messages(data) == msgs


def test_mixed_terminators_kept() -> None:
    m1 = b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5\r\nPID|1\n"
    m2 = b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|2|P|2.5\nPID|2\r"
    m3 = b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|3|P|2.5\rPID|3"  # no final terminator
    assert split_messages(m1 + m2 + m3) == [m1, m2, m3]


def test_blank_pieces_dropped_and_blank_lines_kept_inside() -> None:
    data = b"\r\n\r\n" + M1 + b"\r\n\r\n" + M2 + b"\n \n"
    assert split_messages(data) == [M1 + b"\r\n\r\n", M2 + b"\n \n"]


def test_single_message_without_terminator() -> None:
    assert split_messages(M1[:-1]) == [M1[:-1]]


@pytest.mark.parametrize("data", [b"", b"\r\n", b" \t\r\n\x00", b"\n\n\n"])
def test_nothing_to_send(data: bytes) -> None:
    assert split_messages(data) == []


def test_msh_inside_a_field_does_not_split() -> None:
    m = b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5\rNTE|1||see MSH|x\r"
    assert split_messages(m + M2) == [m, M2]


segment_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x0b\x1c"), max_size=20,
).filter(lambda s: not s.startswith("MSH"))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.text(alphabet="ABC0123|^", max_size=10), st.lists(segment_text, max_size=4)),
             min_size=1, max_size=6),
    st.sampled_from([b"\r", b"\n", b"\r\n"]),
)
def test_property_split_then_join_gives_the_messages(messages: list[tuple[str, list[str]]], term: bytes) -> None:
    msgs = []
    for head, segs in messages:
        lines = [f"MSH|^~\\&|{head}".encode(), *(s.encode("utf-8") for s in segs)]
        msgs.append(term.join(lines) + term)
    data = b"".join(msgs)
    expected = [m for m in msgs if m.strip(b"\r\n \t\x00")]
    assert split_messages(data) == expected
    assert b"".join(split_messages(data)) == data


# -- read_acks ------------------------------------------------------------------------------------------

def builder() -> AckBuilder:
    return AckBuilder(application="E", facility="F", clock=lambda: "20240101000000", control_ids=lambda: "X1")


def test_read_single_positive_ack() -> None:
    ack = builder().build(read_header(M1, "utf-8"), "AA")
    assert read_acks(ack) == [AckSummary("AA", "ID1", "")]


def test_read_error_ack_from_ack_builder() -> None:
    err = HL7Error("101", "MISSING_FIELD", "MSH-11 processing ID is empty", "MSH^1^11")
    ack = builder().build(read_header(M1, "utf-8"), "AR", [err])
    assert read_acks(ack) == [AckSummary("AR", "ID1", "MSH-11 processing ID is empty")]


def test_read_ack_with_err8_only() -> None:
    ack = b"MSH|^~\\&|E|F|A|B|2024||ACK|1|P|2.5\rMSA|AE|ID9\rERR||||E||||store failed\r"
    assert read_acks(ack) == [AckSummary("AE", "ID9", "store failed")]


def test_read_ack_with_msa3_only() -> None:
    ack = b"MSH|^~\\&|E|F|A|B|2024||ACK|1|P|2.3\rMSA|AR|ID9|bad version\r"
    assert read_acks(ack) == [AckSummary("AR", "ID9", "bad version")]


def test_read_ack_prefers_err8_over_msa3() -> None:
    ack = b"MSH|^~\\&|E|F|A|B|2024||ACK|1|P|2.5\rMSA|AE|ID9|short\rERR||||E||||the detailed error text\r"
    assert read_acks(ack) == [AckSummary("AE", "ID9", "the detailed error text")]


def test_read_ack_first_err8_wins() -> None:
    ack = b"MSH|^~\\&|E|F|A|B|2024||ACK|1|P|2.5\rMSA|AE|ID9\rERR||||E|||||\rERR||||E||||first\rERR||||E||||second\r"
    assert read_acks(ack) == [AckSummary("AE", "ID9", "first")]


@pytest.mark.parametrize("term", [b"\r", b"\n", b"\r\n"])
def test_read_ack_with_any_terminator(term: bytes) -> None:
    ack = b"MSH|^~\\&|E|F|A|B|2024||ACK|1|P|2.5\rMSA|CA|ID7\r".replace(b"\r", term)
    assert read_acks(ack) == [AckSummary("CA", "ID7", "")]


def test_read_ack_with_custom_field_separator() -> None:
    raw = b"MSH#!@%*#SENDER#FAC#RECV#FAC#20260301##ADT!A01#MSG007#P#2.5\rPID#1\r"
    ack = builder().build(read_header(raw, "utf-8"), "AE", [HL7Error("207", "X", "store | failed")])
    assert read_acks(ack) == [AckSummary("AE", "MSG007", "store | failed")]


def test_read_ack_short_msa() -> None:
    assert read_acks(b"MSH|^~\\&|E\rMSA|AA\r") == [AckSummary("AA", "", "")]


def test_read_no_ack() -> None:
    assert read_acks(b"") == []
    assert read_acks(b"MSH|^~\\&|E|F\rPID|1\r") == []


def test_read_batch_response_with_several_acks() -> None:
    request = b"FHS|^~\\&|A\rBHS|^~\\&|A|B|C|D|2024||||B1\r" + M1 + M2 + M3 + b"BTS|3\rFTS|1\r"
    batch = split_batch(request, "utf-8")
    b = builder()
    acks = [
        b.build_text(read_header(M1, "utf-8"), "AE", [HL7Error("207", "STORE", "store failed")]),
        b.build_text(read_header(M3, "utf-8"), "AR", [HL7Error("203", "VERSION", "version 2.5.1 refused")],
                     text="refused"),
    ]
    answer = batch_response(batch, acks, comment="2 of 3", clock=lambda: "2024", control_ids=lambda: "R",
                            application="E", facility="F").encode()
    assert read_acks(answer) == [
        AckSummary("AE", "ID1", "store failed"),
        AckSummary("AR", "ID3", "version 2.5.1 refused"),  # ERR-8 over MSA-3
    ]


def test_read_acks_from_separate_acks_with_different_separators() -> None:
    answer = (b"MSH|^~\\&|E|F|A|B|2024||ACK|1|P|2.5\rMSA|AA|ONE\r"
              b"MSH#!@%*#E#F#A#B#2024##ACK#2#P#2.5\rMSA#AE#TWO#bad#thing\r")
    assert read_acks(answer) == [AckSummary("AA", "ONE", ""), AckSummary("AE", "TWO", "bad")]


# -- to_cr ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"A\r\nB\r\nC\r\n", b"A\rB\rC\r"),
        (b"A\nB\nC", b"A\rB\rC"),
        (b"A\rB\rC\r", b"A\rB\rC\r"),
        (b"A\r\nB\nC\rD", b"A\rB\rC\rD"),
        (b"A\n\rB", b"A\r\rB"),
        (b"\r\n\r\n", b"\r\r"),
        (b"", b""),
    ],
)
def test_to_cr(data: bytes, expected: bytes) -> None:
    assert to_cr(data) == expected


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100))
def test_property_to_cr_leaves_no_lf(data: bytes) -> None:
    out = to_cr(data)
    assert b"\n" not in out
    assert out.replace(b"\r", b"") == data.replace(b"\r", b"").replace(b"\n", b"")
    assert len(out) == len(data) - data.count(b"\r\n")
