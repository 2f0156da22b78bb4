"""Every ORU, OUL, ADT and VXU message of the shared corpus through the shipped mappings.

Checks: no crash; each OBX becomes exactly one observation, with a code and a status; every value
is typed by OBX-2; the result is valid facts. A few messages must be refused with a clear
MappingError (listed in EXPECTED_REFUSALS with the reason), never with another exception.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from engine.hl7.batch import _segments, is_batch, split_batch
from engine.hl7.charsets import decode
from engine.hl7.header import message_start, read_header
from engine.hl7.message import Message
from engine.mapping import MappingError, load_mappings
from engine.record.facts import MappedMessage
from tests.conftest import ROOT, CorpusFile

pytestmark = pytest.mark.corpus

# corpus file -> the text the MappingError must contain
EXPECTED_REFUSALS = {
    "cdcti-oru_r01-1.hl7": "patient.identifiers",  # PID-3 is ^^^NPI^MR: no identifier at all
    "rethink-adt_a01-5.hl7": "patient.identifiers",  # PID is empty
    "msconv-oru_r01-1.hl7": "observations[1].code",  # OBX with no OBX-3 and no OBR before it
    "msconv-adt_a40-2.hl7": "merges several patients",  # two PID/MRG pairs in one A40
}
TYPES = {"ORU", "OUL", "ADT", "VXU"}
VALUE_TYPES = {"NM": {"quantity"}, "SN": {"quantity", "ratio", "range", "sn"}, "CE": {"coded"}, "CWE": {"coded"},
               "CNE": {"coded"}, "DT": {"datetime"}, "DTM": {"datetime"}, "TS": {"datetime"}}


def split_messages(raw: bytes) -> list[bytes]:
    """One message per MSH, as engine.hl7.batch does for batches (FHS/BHS) and for streams of
    messages without a batch header."""
    raw = raw.replace(b"\x0b", b"").replace(b"\x1c", b"")
    if is_batch(raw):
        return split_batch(raw, "utf-8").messages
    out: list[bytes] = []
    start: int | None = None
    for s, _ in _segments(raw):
        if raw.startswith(b"MSH", s):
            if start is not None:
                out.append(raw[start:s])
            start = s
    if start is not None:
        out.append(raw[start:])
    return out


def mapping_for(message_type: str, event: str) -> str:
    if message_type == "ORU":
        return "oru_r01"
    if message_type == "OUL":
        return "oul_r22"
    if message_type == "VXU":
        return "vxu_v04"
    return "adt_a40" if event == "A40" else "adt"


def test_corpus_maps(corpus: list[CorpusFile]) -> None:
    mset, problems = load_mappings(ROOT)
    assert not problems, "\n".join(map(str, problems))
    mapped: Counter[str] = Counter()
    refused: dict[str, str] = {}
    failures: list[str] = []
    obx_total = 0
    for cf in corpus:
        if cf.malformed:
            continue
        for raw in split_messages(cf.data()):
            header = read_header(raw, "utf-8")
            if header.message_type not in TYPES:
                continue
            text = decode(raw[message_start(raw):], header.codec)
            msg = Message.parse(text)
            name = mapping_for(header.message_type, header.trigger_event)
            ctx = mset.context("corpus", "Europe/Minsk", control_id=header.control_id,
                               sending_facility=header.sending_facility, message_type=header.type_label)
            try:
                out = mset.get(name).apply(msg, ctx)
            except MappingError as exc:
                refused[cf.name] = str(exc)
                continue
            mapped[header.message_type] += 1
            obx = msg.all("OBX")
            obx_total += len(obx)
            where = f"{cf.name} ({header.type_label}, mapping {name})"
            if len(out.observations) != len(obx):
                failures.append(f"{where}: {len(obx)} OBX but {len(out.observations)} observations")
                continue
            for seg, ob in zip(obx, out.observations, strict=True):
                if not ob.code.codings and not ob.code.text:
                    failures.append(f"{where}: OBX #{seg.index} has no code")
                if not ob.status:
                    failures.append(f"{where}: OBX #{seg.index} has no status")
                vtype = (seg.value(2) or "").strip().upper()
                has_value = any(r.text().strip() not in ("", '""') for r in seg.reps(5))
                if has_value and ob.value is None:
                    failures.append(f"{where}: OBX #{seg.index} ({vtype}) value was dropped")
                if ob.value is not None and vtype in VALUE_TYPES and ob.value.type not in VALUE_TYPES[vtype]:
                    failures.append(f"{where}: OBX #{seg.index} is {vtype} but became {ob.value.type}")
                if ob.value is not None and vtype in ("TX", "FT", "ST") and ob.value.type != "string":
                    failures.append(f"{where}: OBX #{seg.index} is {vtype} but became {ob.value.type}")
            # the facts are valid by the contract's own rules
            MappedMessage.model_validate(out.model_dump())
    assert not failures, "\n".join(failures)
    for name, reason in EXPECTED_REFUSALS.items():
        assert name in refused, f"{name} should be refused ({reason}) but mapped"
        assert reason in refused[name], refused[name]
    unexpected = {k: v for k, v in refused.items() if k not in EXPECTED_REFUSALS}
    assert not unexpected, unexpected
    # coverage: the corpus has ORU 2.3-2.8, OUL, ADT and VXU; all of them were mapped
    assert mapped["ORU"] >= 40 and mapped["ADT"] >= 30 and mapped["OUL"] >= 3 and mapped["VXU"] >= 7, mapped
    assert obx_total > 1500


def test_expected_refusals_do_not_leak_values(corpus: list[CorpusFile]) -> None:
    """A MappingError names paths and rules, never the message's values."""
    mset, _ = load_mappings(ROOT)
    by_name = {cf.name: cf for cf in corpus}
    for name in EXPECTED_REFUSALS:
        if name not in by_name:
            continue
        raw = split_messages(by_name[name].data())[0]
        header = read_header(raw, "utf-8")
        msg = Message.parse(decode(raw[message_start(raw):], header.codec))
        with pytest.raises(MappingError) as info:
            mset.get(mapping_for(header.message_type, header.trigger_event)).apply(
                msg, mset.context("corpus", "UTC"))
        text = str(info.value)
        assert info.value.step == "map"
        for seg in msg.segments:
            if seg.name in ("PID", "OBX"):
                for f in (3, 5):
                    v = seg.value(f)
                    if v and len(v) > 3:
                        assert v not in text, (name, text)


def test_fixture_sources_are_attributed() -> None:
    """Corpus messages copied under mappings/tests/ carry their MANIFEST row and a permissive licence."""
    rows = (ROOT / "mappings" / "tests" / "ATTRIBUTION.tsv").read_text(encoding="utf-8").splitlines()
    head = rows[0].split("\t")
    for line in rows[1:]:
        cols = dict(zip(head, line.split("\t"), strict=False))
        assert Path(ROOT / "mappings" / "tests" / cols["copied_to"]).is_file()
        assert cols["license"] in ("MIT", "Apache-2.0", "BSD-3-Clause", "CC0-1.0"), cols
