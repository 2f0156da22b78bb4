"""HL7 batches (engine.hl7.batch): splitting FHS/BHS ... BTS/FTS into messages byte for byte, and the
batch response, checked with python-hl7 as an independent parser."""

from __future__ import annotations

import re
from collections.abc import Callable

import hl7
import pytest

from engine.errors import HL7Error
from engine.hl7.ack import AckBuilder
from engine.hl7.batch import Batch, Envelope, batch_response, is_batch, split_batch
from engine.hl7.header import Delimiters, read_header

CLOCK = "20240102030405+0000"

M1 = b"MSH|^~\\&|LAB|HOSP|EHR|CLINIC|20240101||ORU^R01^ORU_R01|MSG1|P|2.5.1\rPID|1||111\rOBX|1|ST|A||x\r"
M2 = b"MSH|^~\\&|LAB|HOSP|EHR|CLINIC|20240101||ORU^R01^ORU_R01|MSG2|P|2.5.1\rPID|1||222\r"
M3 = b"MSH|^~\\&|LAB|HOSP|EHR|CLINIC|20240101||ADT^A01|MSG3|P|2.5.1\rPID|1||333\rPV1|1|I\r"
FHS = b"FHS|^~\\&|LAB|HOSP|EHR|CLINIC|20240101||results.hl7|file comment|FILE77\r"
BHS = b"BHS|^~\\&|LAB|HOSP|EHR|CLINIC|20240101||||BATCH42\r"


def full_batch(term: bytes = b"\r") -> bytes:
    data = FHS + BHS + M1 + M2 + M3 + b"BTS|3|three messages\rFTS|1\r"
    return data.replace(b"\r", term)


def fixed_ids() -> Callable[[], str]:
    counter = iter(range(1, 1000))
    return lambda: f"RESP{next(counter)}"


def response(batch: Batch, acks: list[str], comment: str = "") -> str:
    return batch_response(batch, acks, comment=comment, clock=lambda: CLOCK, control_ids=fixed_ids(),
                          application="HL7ENGINE", facility="CENTRAL")


def fields(segment: str, fs: str = "|") -> list[str]:
    """Fields numbered as in the standard for FHS/BHS (``out[3]`` is xHS-3)."""
    values = segment.split(fs)
    return [values[0], fs, *values[1:]]


# -- is_batch -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (FHS + M1, True),
        (BHS + M1, True),
        (b"\xef\xbb\xbf" + FHS, True),
        (b"\r\n  " + BHS, True),
        (M1, False),
        (b"", False),
        (b"PID|1\rFHS|^~\\&\r", False),
    ],
)
def test_is_batch(raw: bytes, expected: bool) -> None:
    assert is_batch(raw) is expected


# -- split_batch ----------------------------------------------------------------------------------------

def test_split_full_batch() -> None:
    batch = split_batch(full_batch(), "utf-8")
    assert batch.messages == [M1, M2, M3]
    assert batch.declared_count == 3
    assert batch.stray_segments == 0
    assert batch.file_header is not None
    assert batch.batch_header is not None
    assert batch.file_header.fields[0] == "FHS"
    assert batch.file_header.get(1) == "|"
    assert batch.file_header.get(2) == "^~\\&"
    assert batch.file_header.get(3) == "LAB"
    assert batch.file_header.get(9) == "results.hl7"
    assert batch.file_header.get(11) == "FILE77"
    assert batch.file_header.get(40) == ""
    assert batch.batch_header.get(11) == "BATCH42"
    assert batch.control_id == "BATCH42"
    assert [read_header(m, "utf-8").control_id for m in batch.messages] == ["MSG1", "MSG2", "MSG3"]


@pytest.mark.parametrize("term", [b"\n", b"\r\n"])
def test_split_keeps_original_terminators(term: bytes) -> None:
    batch = split_batch(full_batch(term), "utf-8")
    assert batch.messages == [M1.replace(b"\r", term), M2.replace(b"\r", term), M3.replace(b"\r", term)]
    assert batch.declared_count == 3


def test_split_mixed_terminators_and_blank_lines() -> None:
    m1 = b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|X1|P|2.5\r\nPID|1\n"
    m2 = b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|X2|P|2.5\rPID|2\r\r\n"
    raw = b"\xef\xbb\xbf\r\nBHS|^~\\&|A|B|C|D|2024||||B1\n\n" + m1 + m2 + b"BTS|2\n"
    batch = split_batch(raw, "utf-8")
    assert batch.messages == [m1, m2]
    assert batch.file_header is None
    assert batch.batch_header is not None
    assert batch.control_id == "B1"
    assert batch.declared_count == 2


def test_last_message_without_trailer_keeps_its_bytes() -> None:
    raw = FHS + M1 + M2[:-1]  # no BTS/FTS, no final CR
    batch = split_batch(raw, "utf-8")
    assert batch.messages == [M1, M2[:-1]]
    assert batch.declared_count is None
    assert batch.batch_header is None
    assert batch.control_id == "FILE77"


def test_bhs_without_fhs() -> None:
    batch = split_batch(BHS + M1 + b"BTS|1\r", "utf-8")
    assert batch.file_header is None
    assert batch.batch_header is not None
    assert batch.batch_header.get(11) == "BATCH42"
    assert batch.messages == [M1]
    assert batch.declared_count == 1


def test_count_is_read_but_not_enforced() -> None:
    batch = split_batch(BHS + M1 + b"BTS|5\r", "utf-8")
    assert batch.declared_count == 5
    assert len(batch.messages) == 1


@pytest.mark.parametrize("bts", [b"BTS\r", b"BTS|\r", b"BTS||comment\r", b"BTS| \r"])
def test_empty_bts1_gives_no_count(bts: bytes) -> None:
    assert split_batch(BHS + M1 + bts, "utf-8").declared_count is None


@pytest.mark.parametrize("count", [b"two", b"2a", b"-1", b"1.0", b"0x2"])
def test_non_numeric_bts1_is_an_error(count: bytes) -> None:
    with pytest.raises(HL7Error) as info:
        split_batch(BHS + M1 + b"BTS|" + count + b"\r", "utf-8")
    assert info.value.code == "102"
    assert info.value.reason == "BAD_BATCH"
    assert info.value.location == "BTS^1^1"
    assert count.decode() in info.value.text


@pytest.mark.parametrize("count", [b"\xb2", b"1\xb9"])
def test_bts1_with_superscript_digit_is_an_hl7_error(count: bytes) -> None:
    with pytest.raises(HL7Error) as info:
        split_batch(BHS + M1 + b"BTS|" + count + b"\r", "utf-8")
    assert info.value.code == "102"
    assert info.value.location == "BTS^1^1"


@pytest.mark.parametrize("raw", [M1 + M2, M1 + b"BTS|1\rFTS|1\r", b"", b"\r\n", b"PID|1\r"])
def test_batch_without_fhs_or_bhs_is_an_error(raw: bytes) -> None:
    with pytest.raises(HL7Error) as info:
        split_batch(raw, "utf-8")
    assert info.value.code == "100"
    assert info.value.reason == "BAD_BATCH"
    assert info.value.location == "BHS^1"


def test_bad_envelope_delimiters_are_an_error() -> None:
    with pytest.raises(HL7Error) as info:
        split_batch(b"BHS|^~|A\r" + M1, "utf-8")
    assert info.value.code == "102"


def test_custom_delimiters_in_envelope() -> None:
    m = b"MSH#!@%*#A#B#C#D#2024##ADT!A01#C1#P#2.5\rPID#1\r"
    raw = b"FHS#!@%*#A#B#C#D#2024####F1\rBHS#!@%*#A#B#C#D#2024####B9\r" + m + b"BTS#1#x\rFTS#1\r"
    batch = split_batch(raw, "utf-8")
    assert batch.messages == [m]
    assert batch.declared_count == 1
    assert batch.batch_header is not None
    assert batch.batch_header.delimiters == Delimiters("#", "!", "@", "%", "*", "!@%*")
    assert batch.batch_header.get(11) == "B9"
    assert batch.file_header is not None
    assert batch.file_header.get(11) == "F1"


def test_segments_before_first_message_are_stray() -> None:
    raw = BHS + b"ZZZ|1\rNTE|1||note\r" + M1 + b"BTS|1\r"
    batch = split_batch(raw, "utf-8")
    assert batch.stray_segments == 2
    assert batch.messages == [M1]


def test_empty_batch() -> None:
    batch = split_batch(FHS + BHS + b"BTS|0\rFTS|1\r", "utf-8")
    assert batch.messages == []
    assert batch.declared_count == 0


def test_envelope_text_decoded_with_codec() -> None:
    raw = "BHS|^~\\&|ЛИС|ГКБ №1|C|D|2024||||Б1\r".encode("cp1251") + M1
    batch = split_batch(raw, "cp1251")
    assert batch.batch_header is not None
    assert batch.batch_header.get(4) == "ГКБ №1"
    assert batch.control_id == "Б1"


# -- batch_response -------------------------------------------------------------------------------------

def acks_for(messages: list[bytes], code: str = "AE") -> list[str]:
    b = AckBuilder(application="HL7ENGINE", facility="CENTRAL", clock=lambda: CLOCK, control_ids=fixed_ids())
    out = []
    for m in messages:
        h = read_header(m, "utf-8")
        out.append(b.build_text(h, code, [HL7Error("207", "STORE", "store failed")]))
    return out


def test_response_with_fhs() -> None:
    batch = split_batch(full_batch(), "utf-8")
    acks = acks_for(batch.messages[:2])
    text = response(batch, acks, comment="2 of 3 refused | see ERR")
    segs = text.split("\r")
    assert segs[-1] == ""
    fhs, bhs = fields(segs[0]), fields(segs[1])
    assert fhs[0] == "FHS"
    assert fhs[2] == "^~\\&"
    assert fhs[3:7] == ["EHR", "CLINIC", "LAB", "HOSP"]
    assert fhs[7] == CLOCK
    assert fhs[10] == ""  # the comment goes in BHS-10, not FHS-10
    assert fhs[11] == "RESP1"
    assert fhs[12] == "FILE77"
    assert bhs[0] == "BHS"
    assert bhs[3:7] == ["EHR", "CLINIC", "LAB", "HOSP"]
    assert bhs[10] == "2 of 3 refused \\F\\ see ERR"
    assert bhs[11] == "RESP2"
    assert bhs[12] == "BATCH42"
    assert len(bhs) == 13
    body = "\r".join(segs[2:-3]) + "\r"
    assert body == "".join(acks)
    assert segs[-3] == "BTS|2|2 of 3 refused \\F\\ see ERR"
    assert segs[-2] == "FTS|1"
    assert text.count("MSA|AE|") == 2


def test_response_without_fhs_has_no_fhs_or_fts() -> None:
    batch = split_batch(BHS + M1 + M2 + b"BTS|2\r", "utf-8")
    acks = acks_for([M2])
    text = response(batch, acks, comment="")
    segs = text.split("\r")
    assert segs[0].startswith("BHS|")
    assert "FHS" not in text
    assert "FTS" not in text
    assert fields(segs[0])[12] == "BATCH42"
    assert segs[-2] == "BTS|1|"
    assert "MSA|AE|MSG2|store failed" in segs


def test_response_with_only_fhs_takes_its_control_id() -> None:
    batch = split_batch(FHS + M1 + b"FTS|1\r", "utf-8")
    text = response(batch, [], comment="ok")
    segs = text.split("\r")
    assert segs[0].startswith("FHS|")
    assert segs[1].startswith("BHS|")
    assert fields(segs[0])[12] == "FILE77"
    assert fields(segs[1])[12] == "FILE77"
    assert segs[2:] == ["BTS|0|ok", "FTS|1", ""]


def test_response_all_accepted_is_an_empty_batch() -> None:
    batch = split_batch(full_batch(), "utf-8")
    text = response(batch, [], comment="")
    assert text.split("\r")[2:] == ["BTS|0|", "FTS|1", ""]
    assert "MSH" not in text


def test_response_uses_channel_names_when_request_leaves_them_empty() -> None:
    batch = split_batch(b"BHS|^~\\&|SND||||2024||||B5\r" + M1, "utf-8")
    segs = response(batch, [], comment="").split("\r")
    assert fields(segs[0])[3:7] == ["HL7ENGINE", "CENTRAL", "SND", ""]


def test_response_uses_senders_delimiters() -> None:
    m = b"MSH#!@%*#A#B#C#D#2024##ADT!A01#C1#P#2.5\rPID#1\r"
    raw = b"BHS#!@%*#A#B#C#D#2024####B9\r" + m + b"BTS#1\r"
    batch = split_batch(raw, "utf-8")
    h = read_header(m, "utf-8")
    ack = AckBuilder(application="E", facility="F", clock=lambda: CLOCK, control_ids=lambda: "X").build_text(h, "AE")
    text = response(batch, [ack], comment="a#b!c")
    segs = text.split("\r")
    assert segs[0] == "BHS#!@%*#C#D#A#B#" + CLOCK + "###a%F%b%S%c#RESP1#B9"
    assert segs[-2] == "BTS#1#a%F%b%S%c"
    parsed = hl7.parse_batch(text)
    assert str(parsed.header[12]) == "B9"


def test_response_parses_with_python_hl7() -> None:
    batch = split_batch(full_batch(), "utf-8")
    acks = acks_for(batch.messages)
    text = response(batch, acks, comment="three refused")
    parsed = hl7.parse_file(text)
    assert str(parsed.header[0]) == "FHS"
    assert str(parsed.header[12]) == "FILE77"
    assert str(parsed.trailer[1]) == "1"
    assert len(parsed) == 1
    inner = parsed[0]
    assert str(inner.header[12]) == "BATCH42"
    assert str(inner.trailer[1]) == "3"
    assert len(inner) == 3
    assert [str(m.segment("MSA")(2)) for m in inner] == ["MSG1", "MSG2", "MSG3"]
    assert [str(m.segment("MSA")(1)) for m in inner] == ["AE", "AE", "AE"]


# -- the corpus -----------------------------------------------------------------------------------------

CORPUS_BATCHES = {
    # file: (messages, BTS-1, has FHS, has BHS)
    "pyhl7-batch_adt_a04-3.hl7": (2, None, True, False),
    "cdcti-batch_oru_r01-1.hl7": (1, None, True, True),
    "oie-batch_orm_o01-1.hl7": (1, None, True, True),
    "prs-batch_oru_r01-1.hl7": (1, 1, True, True),
    "prs-batch_oru_r01-2.hl7": (2, 2, True, True),
    "prs-batch_oru_r01-4.hl7": (20, 25, True, True),
}


def independent_split(raw: bytes) -> list[bytes]:
    """Messages of a batch by regular expression: from each MSH line to the next MSH/BTS/FTS line."""
    starts = [m.start() for m in re.finditer(rb"(?m)(?<=[\r\n])MSH|^MSH", raw)]
    ends = [m.start() for m in re.finditer(rb"(?<=[\r\n])(?:MSH|BTS|FTS|BHS|FHS)", raw)]
    out = []
    for s in starts:
        following = [e for e in ends if e > s]
        out.append(raw[s:following[0]] if following else raw[s:])
    return out


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(CORPUS_BATCHES))
def test_corpus_batches(corpus, name: str) -> None:
    files = {f.name: f for f in corpus}
    assert name in files, f"{name} missing from the corpus manifest"
    raw = files[name].data()
    count, declared, has_fhs, has_bhs = CORPUS_BATCHES[name]
    assert is_batch(raw)
    batch = split_batch(raw, "utf-8")
    assert len(batch.messages) == count
    assert batch.declared_count == declared
    assert (batch.file_header is not None) is has_fhs
    assert (batch.batch_header is not None) is has_bhs
    assert batch.messages == independent_split(raw)
    for m in batch.messages:
        assert m.startswith(b"MSH")
        assert m in raw
        h = read_header(m, "utf-8")
        assert h.problems == []
        assert hl7.parse(m.decode("utf-8")).segment("MSH")(10)
    acks = acks_for(batch.messages[:1])
    text = response(batch, acks, comment=f"{name} checked")
    assert text.count("\rMSA|AE|") == 1
    segs = text.split("\r")
    bhs = fields(segs[1] if has_fhs else segs[0])
    assert bhs[0] == "BHS"
    assert bhs[12] == batch.control_id
    assert segs[-3 if has_fhs else -2] == f"BTS|1|{name} checked"
    if has_fhs:
        parsed = hl7.parse_file(text)
        assert len(parsed) == 1
        assert len(parsed[0]) == 1


def test_envelope_get() -> None:
    env = Envelope(Delimiters(), ["BHS", "|", "^~\\&", "A"])
    assert env.get(3) == "A"
    assert env.get(4) == ""
