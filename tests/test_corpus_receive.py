"""Every message of ../shared/corpus over a real socket: each ACK (code, MSA-2, swapped MSH fields)
checked with python-hl7 as an independent parser, each stored row checked, the queue checked
(exactly once per accepted message), and a second send of everything answered as duplicates.

Runs on the embedded defaults and on PostgreSQL + RabbitMQ.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter

import pytest

from engine.mllp.client import MLLPClient, split_messages
from tests.conftest import Backend, CorpusFile, store_url
from tests.support import drain_rabbit, parse, python_codec, queue_rows, read_ack, store_rows

# Quirks with which a message cannot be accepted at receipt: its MSH is unusable. Other malformed
# content (a bad segment ID, a bad XAD) is accepted here and is a processing error later.
REFUSED_QUIRKS = {
    "malformed:no-msh9", "malformed:no-msh10", "malformed:no-version", "malformed:short-msh",
    "malformed:msh-empty", "malformed:bad-delimiters", "malformed:msh2-5-chars", "malformed:fuzzed",
    "malformed:no-msh", "malformed:bare-msh", "malformed:batch-without-msh",
}
VERSIONS = {"2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2"}


def expected_code(f: CorpusFile, piece: bytes | None = None) -> str:
    """AR when the MSH is unusable (by the manifest's quirks) or, read with python-hl7, a required MSH
    field (9, 10, 11, 12) is empty or the version is not a known HL7 v2 version; else AA."""
    if f.quirks & REFUSED_QUIRKS:
        return "AR"
    if piece is None or piece.lstrip(b"\xef\xbb\xbf\r\n ").startswith((b"FHS", b"BHS")):
        return "AA"
    msg = parse(piece)
    required = [msh_text(msg, n).strip() for n in (9, 10, 11, 12)]
    if not all(required) or required[3].split(msg.separators[1])[0] not in VERSIONS:
        return "AR"
    return "AA"


def send_all(corpus: list[CorpusFile], address: tuple[str, int]) -> list[tuple[CorpusFile, bytes, bytes]]:
    sent = []
    with MLLPClient(*address, timeout=30) as client:
        for f in corpus:
            for piece in split_messages(f.data()):
                answer = client.send(piece)
                assert answer is not None, f"no answer for {f.name}"
                sent.append((f, piece, answer))
    return sent


def check_single(f: CorpusFile, piece: bytes, answer: bytes) -> None:
    codec = python_codec(piece)
    ack = read_ack(answer, codec)
    want = expected_code(f, piece)
    assert ack.code == want, f"{f.name}: expected {want}, got {ack.code} ({answer[:300]!r})"
    if want == "AR":
        assert ack.err_codes, f"{f.name}: AR without ERR segment"
        assert all(c in {"100", "101", "102", "103", "104", "200", "201", "202", "203", "207"}
                   for c in ack.err_codes), ack.err_codes
        return
    orig = parse(piece, codec)
    assert ack.control_id == msh_text(orig, 10), f"{f.name}: MSA-2"
    assert ack.msh[5] == msh_text(orig, 3), f"{f.name}: ACK MSH-5 must be the sender's MSH-3"
    assert ack.msh[6] == msh_text(orig, 4), f"{f.name}: ACK MSH-6 must be the sender's MSH-4"
    assert ack.msh[3] == (msh_text(orig, 5) or "HL7ENGINE"), f"{f.name}: ACK MSH-3"
    assert ack.msh[4] == msh_text(orig, 6), f"{f.name}: ACK MSH-4"
    assert ack.msh[11] == msh_text(orig, 11), f"{f.name}: MSH-11 echoed"
    assert ack.msh[12] == msh_text(orig, 12), f"{f.name}: MSH-12 echoed"
    assert ack.msh[9].startswith("ACK"), f"{f.name}: MSH-9"
    assert ack.msh[10] and ack.msh[10] != msh_text(orig, 10), f"{f.name}: the ACK has its own control ID"
    assert ack.msh[7], f"{f.name}: ACK timestamp"


def msh_text(msg: object, n: int) -> str:
    from tests.support import msh_field

    return msh_field(msg, n)  # type: ignore[arg-type]


def check_batch(f: CorpusFile, piece: bytes, answer: bytes) -> None:
    text = answer.decode("utf-8", "replace")
    segs = [s for s in text.split("\r") if s]
    assert segs[0][:3] in ("FHS", "BHS"), f"{f.name}: batch answered with a batch"
    bts = next(s for s in segs if s.startswith("BTS"))
    listed = [s for s in segs if s.startswith("MSA")]
    assert int(bts.split("|")[1]) == len(listed)
    if expected_code(f) == "AR":
        assert listed and all(s.split("|")[1] == "AR" for s in listed), f"{f.name}: {segs}"
    else:
        assert not listed, f"{f.name}: every message of a valid batch is accepted ({listed})"
    bhs = next(s for s in segs if s.startswith("BHS"))
    orig_bhs = next((s for s in piece.decode("utf-8", "replace").replace("\n", "\r").split("\r")
                     if s.startswith("BHS")), None)
    if orig_bhs is not None and len(orig_bhs.split("|")) > 11 and orig_bhs.split("|")[10]:
        assert bhs.split("|")[11] == orig_bhs.split("|")[10], "BHS-12 names the sender's BHS-11"


def msa_codes(answer: bytes) -> list[str]:
    segs = answer.decode("utf-8", "replace").split("\r")
    return [seg[4:6] for seg in segs if seg.startswith("MSA")]


def batch_members(piece: bytes) -> list[bytes]:
    from engine.hl7.batch import split_batch

    return split_batch(piece, "utf-8").messages


@pytest.mark.corpus
def test_every_corpus_message_over_a_socket(corpus: list[CorpusFile], backend: Backend, engine_factory) -> None:
    engine = engine_factory(backend)
    sent = send_all(corpus, engine.address)
    assert len(sent) >= len(corpus)

    accepted: dict[bytes, int] = Counter()  # raw -> times it should have been accepted (1) or duplicated
    refused = 0
    for f, piece, answer in sent:
        if piece.lstrip(b"\xef\xbb\xbf\r\n ").startswith((b"FHS", b"BHS")):
            check_batch(f, piece, answer)
            if expected_code(f) == "AA":
                for m in batch_members(piece):
                    accepted[m] += 1
            else:
                refused += 1
        else:
            check_single(f, piece, answer)
            if expected_code(f, piece) == "AA":
                accepted[piece] += 1
            else:
                refused += 1

    url = store_url(engine)
    rows = store_rows(url)
    by_raw: dict[bytes, list[dict]] = {}
    for r in rows:
        by_raw.setdefault(bytes(r["raw"]), []).append(r)
    answers: dict[bytes, list[bytes]] = {}
    for _, piece, answer in sent:
        answers.setdefault(piece, []).append(answer)
    first_of_key: set[tuple[str, str, str]] = set()
    queued_uids = set()
    for raw, times in accepted.items():
        stored = by_raw.get(raw)
        assert stored, f"accepted message not stored: {raw[:80]!r}"
        assert len(stored) == times, "one row per receipt"
        for i, row in enumerate(stored):
            assert row["ack_code"] == "AA"
            assert row["size"] == len(raw)
            assert row["sha256"] == hashlib.sha256(raw).hexdigest()
            if raw in answers:
                assert bytes(row["ack"]) == answers[raw][i], "the ACK stored is the ACK sent"
            key = (row["sending_facility"], row["control_id"], row["sha256"])
            if key in first_of_key:
                assert row["status"] == "duplicate" and row["duplicate_of"], "identical resend is a duplicate"
            else:
                first_of_key.add(key)
                assert row["status"] == "queued" and row["accepted"]
                queued_uids.add(row["uid"])
    error_rows = [r for r in rows if r["status"] == "error"]
    assert len(error_rows) == refused, "every refused message is recorded for the operators"
    assert all(r["ack_code"] == "AR" and r["error_step"] == "receive" and r["error"] for r in error_rows)

    # a second send of everything: accepted ones are duplicates, nothing new is queued
    again = send_all(corpus, engine.address)
    for (f, piece, answer), (_, _, first) in zip(again, sent, strict=True):
        assert msa_codes(answer) == msa_codes(first), f"{f.name}: a resend gets the same answer"
    rows2 = store_rows(url)
    new = rows2[len(rows):]
    assert all(r["status"] in ("duplicate", "error") for r in new), Counter(r["status"] for r in new)

    engine.stop()
    if backend.services:
        messages = drain_rabbit(backend.env["HL7ENGINE_BROKER_URL"], backend.env["HL7ENGINE_QUEUE_NAME"], 4)
        ids = Counter(m[0] for m in messages)
    else:
        ids = Counter(q["message_uid"] for q in queue_rows(url))
    assert set(ids) == queued_uids, "the queue holds exactly the accepted messages"
    assert max(ids.values()) == 1, "each accepted message is queued exactly once"


@pytest.mark.corpus
def test_python_hl7_mllp_send_as_peer(corpus: list[CorpusFile], engine_factory, tmp_path) -> None:
    """python-hl7's own client (mllp_send) against the engine: an independent implementation of MLLP."""
    engine = engine_factory()
    picks = [f for f in corpus if expected_code(f) == "AA" and "batch" not in f.quirks
             and "mllp-framing" not in f.quirks and f.license in ("MIT", "Apache-2.0", "BSD-3-Clause", "CC0-1.0")]
    picks = picks[:25]
    stream = b"".join(b"\x0b" + piece + b"\x1c\x0d" for f in picks for piece in split_messages(f.data()))
    path = tmp_path / "stream.mllp"
    path.write_bytes(stream)
    out = subprocess.run([sys.executable, "-c", "from hl7.client import mllp_send; mllp_send()",
                          "--port", str(engine.port), "--file", str(path), "127.0.0.1"],
                         capture_output=True, timeout=120, check=True)
    # mllp_send prints each answer as received, MLLP block included
    acks = [a.strip(b"\x0b\r\n") for a in out.stdout.split(b"\x1c") if a.strip(b"\x0b\r\n")]
    expected = [piece for f in picks for piece in split_messages(f.data())]
    assert len(acks) == len(expected)
    for ack_text, piece in zip(acks, expected, strict=True):
        ack = read_ack(ack_text)
        assert ack.code == "AA"
        assert ack.control_id == msh_text(parse(piece), 10)
