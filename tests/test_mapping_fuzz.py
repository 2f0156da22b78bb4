"""Property: whatever a sender puts in a message, parsing and every shipped mapping either give facts
or refuse the message with the engine's own errors (HL7Error, MappingError): never another exception,
which would stop a worker on the same message again and again instead of parking one patient.

Seeds are the fixture messages beside the shipped mappings; hypothesis mutates them the way senders
do: a field emptied, replaced by junk or by a delimiter-heavy value, a segment repeated or dropped,
escape sequences, odd lengths."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import EngineError, HL7Error
from engine.hl7.charsets import decode
from engine.hl7.message import Message
from engine.mapping import load_mappings
from tests.conftest import ROOT

MAPPINGS, PROBLEMS = load_mappings(ROOT)
SEEDS = sorted((ROOT / "mappings" / "tests").rglob("*.hl7"))


def seed_text(path: Path) -> str:
    raw = path.read_bytes()
    codec = "cp1251" if b"8859/5" in raw or "cp1251" in path.name else "utf-8"
    return decode(raw, codec).replace("\r\n", "\r").replace("\n", "\r")


SEED_TEXTS = [seed_text(p) for p in SEEDS]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "600"))  # 20,000 found nothing either (2026-12-06)

JUNK = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30),
    st.sampled_from(["", '""', "^", "^^^", "~", "~~", "&", "\\", "\\E\\", "\\X0D\\", "\\H\\x\\N\\", "9" * 40,
                     "-1", "1e999", "NaN", "20261322", "2026113025", "202611221015+99", "<>", ">=5", "^^L^",
                     "1^2^3^4^5^6^7^8^9^10", "x" * 300, "0.000000000000000000001", "F", "C", "X", "D"]),
)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(SEED_TEXTS))
    segments = [s for s in text.split("\r") if s]
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(1, len(segments) - 1)) if len(segments) > 1 else 0
        action = draw(st.sampled_from(["field", "field", "field", "dup", "drop", "component"]))
        if action == "dup":
            segments.insert(i, segments[i])
        elif action == "drop" and i > 0:
            del segments[i]
        else:
            fields = segments[i].split("|")
            j = draw(st.integers(1, max(1, len(fields) + 2)))
            fields += [""] * (j + 1 - len(fields))
            value = draw(JUNK)
            if action == "component" and fields[j]:
                comps = fields[j].split("^")
                comps[draw(st.integers(0, len(comps) - 1))] = value.replace("|", "")
                fields[j] = "^".join(comps)
            else:
                fields[j] = value.replace("|", "") if i == 0 and j <= 2 else value.replace("\r", "")
            segments[i] = "|".join(fields)
    return "\r".join(segments) + "\r"


def test_seeds_present_and_mappings_load() -> None:
    assert not PROBLEMS
    assert len(SEEDS) >= 5


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_messages_map_or_fail_with_engine_errors(text: str) -> None:
    try:
        msg = Message.parse(text)
    except HL7Error:
        return
    for name in MAPPINGS.names:
        ctx = MAPPINGS.context("lab", "Europe/Minsk", control_id="C1", sending_facility="LAB",
                               message_type="ORU^R01")
        try:
            MAPPINGS.get(name).apply(msg, ctx)
        except EngineError:
            pass
