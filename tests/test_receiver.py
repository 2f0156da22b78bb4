"""The receiving logic without sockets: frames in, jobs to the store, answers out, in the order the
guarantees require (no AA before the store says the message is durable)."""

from __future__ import annotations

import time

import pytest

from engine.config.models import ChannelConfig
from engine.intake.receiver import Pending, Receiver
from engine.intake.runtime import ChannelRuntime
from engine.intake.writer import Job
from engine.observe import ChannelEvents


class Sink:
    """Collects jobs; the test completes them with the outcome it wants."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def submit(self, job: Job) -> None:
        self.jobs.append(job)

    def complete(self, job: Job, outcome: str, failure: str = "", service: str = "store") -> None:
        for item in job.items:
            item.outcome = outcome if item.status == "queued" else ("recorded" if outcome != "failed" else outcome)
            item.failure, item.failure_service = failure, service
        job.done(job)

    @property
    def answered_jobs(self) -> list[Job]:
        return [j for j in self.jobs if not j.record_only]

    @property
    def records(self) -> list[Job]:
        return [j for j in self.jobs if j.record_only]


def make(cfg: dict | None = None) -> tuple[Receiver, Sink]:
    rt = ChannelRuntime.build("unit", ChannelConfig.model_validate({"accept": {"processing_ids": ["P", "T"]},
                                                                      **(cfg or {})}))
    sink = Sink()
    return Receiver(rt, sink, ChannelEvents("unit")), sink


def pending(timeout: float = 10) -> Pending:
    now = time.monotonic()
    return Pending(now, now + timeout, lambda: None)


def msg(cid: str = "C1", extra: str = "", version: str = "2.5.1") -> bytes:
    return (f"MSH|^~\\&|LIS|UNITLAB|HL7ENGINE|CENTRAL|20261122101500||ORU^R01^ORU_R01|{cid}|P|{version}{extra}\r"
            "PID|1||99^^^UNITLAB^MR||DOE^JANE\r").encode()


def code(p: Pending) -> str:
    assert p.data is not None
    return p.data.split(b"MSA|")[1][:2].decode()


def test_no_aa_before_the_store_confirms() -> None:
    r, sink = make()
    p = pending()
    r.frame(msg(), "127.0.0.1:1", True, p)
    assert not p.done, "nothing is sent while the message is not durable"
    assert len(sink.answered_jobs) == 1
    sink.complete(sink.answered_jobs[0], "accepted")
    assert p.done and code(p) == "AA"


def test_duplicate_is_answered_aa() -> None:
    r, sink = make()
    p = pending()
    r.frame(msg(), "127.0.0.1:1", True, p)
    sink.complete(sink.answered_jobs[0], "duplicate")
    assert code(p) == "AA"


def test_store_failure_is_answered_ae_and_recorded() -> None:
    r, sink = make()
    p = pending()
    r.frame(msg("FAIL-1"), "127.0.0.1:1", True, p)
    sink.complete(sink.answered_jobs[0], "failed", "connection refused", "store")
    assert code(p) == "AE"
    assert p.data is not None and b"207^Application internal error^HL70357" in p.data
    assert b"send it again" in p.data
    record = sink.records[-1].items[0]
    assert record.status == "error" and record.error_step == "store" and record.ack_code == "AE"


def test_broker_failure_records_step_enqueue() -> None:
    r, sink = make()
    p = pending()
    r.frame(msg(), "127.0.0.1:1", True, p)
    sink.complete(sink.answered_jobs[0], "failed", "no publisher confirm", "broker")
    assert code(p) == "AE"
    assert sink.records[-1].items[0].error_step == "enqueue"


def test_ack_timeout_answers_ae_and_corrects_the_record_if_the_store_commits_later() -> None:
    r, sink = make()
    p = pending(timeout=0)
    r.frame(msg("LATE-1"), "127.0.0.1:1", True, p)
    job = sink.answered_jobs[0]
    p.expire()
    assert p.done and code(p) == "AE" and job.expired
    sink.complete(job, "accepted")  # the store committed after all
    correction = sink.records[-1]
    assert correction.ack_corrections and correction.ack_corrections[0][1] == "AE"
    assert "ACK timeout" in correction.ack_corrections[0][3]


@pytest.mark.parametrize(("raw", "err"), [
    (b"GARBAGE", b"100^Segment sequence error"),
    (msg(version="2.9.9"), b"203^Unsupported version id"),
    (msg().replace(b"|P|2.5.1", b"|X|2.5.1"), b"202^Unsupported processing id"),
    (b"MSH|^~\\&|LIS|UNITLAB|||20261122||ORU^R01||P|2.5.1\r", b"101^Required field missing"),
    (msg() + msg("SECOND"), b"MULTIPLE_MESSAGES"),
    (b"MSH|^|LIS\r", b"102^Data type error"),
])
def test_refusals_are_immediate_ar_and_recorded(raw: bytes, err: bytes) -> None:
    r, sink = make()
    p = pending()
    r.frame(raw, "127.0.0.1:1", True, p)
    assert p.done and code(p) == "AR"
    assert p.data is not None and err in p.data
    assert not sink.answered_jobs, "a refused message is never queued"
    assert sink.records[0].items[0].status == "error" and sink.records[0].items[0].error_step == "receive"


def test_sender_not_allowed_is_refused_and_not_recorded() -> None:
    r, sink = make()
    p = pending()
    r.frame(msg(), "10.9.9.9:5000", False, p)
    assert code(p) == "AR" and p.data is not None and b"10.9.9.9 is not allowed" in p.data
    assert not sink.jobs


def test_oversize_is_refused_with_the_control_id() -> None:
    r, sink = make()
    p = pending()
    r.oversize(msg("BIG")[:200], 5_000_000, "127.0.0.1:1", True, p)
    assert code(p) == "AR" and p.data is not None
    assert b"MSA|AR|BIG|" in p.data and b"104^Value too long" in p.data
    assert sink.records[0].items[0].size == 5_000_000


@pytest.mark.parametrize(("msh15", "result", "sent"), [
    ("AL", "accepted", "CA"), ("NE", "accepted", None), ("ER", "accepted", None), ("SU", "accepted", "CA"),
    ("ER", "failed", "CE"), ("SU", "failed", None),
])
def test_enhanced_mode(msh15: str, result: str, sent: str | None) -> None:
    r, sink = make({"ack": {"mode": "enhanced"}})
    p = pending()
    r.frame(msg(extra=f"|||{msh15}|NE"), "127.0.0.1:1", True, p)
    sink.complete(sink.answered_jobs[0], result, "down")
    assert p.done
    assert (code(p) if p.data else None) == sent


def test_original_mode_ignores_msh15() -> None:
    r, sink = make()
    p = pending()
    r.frame(msg(extra="|||NE|NE"), "127.0.0.1:1", True, p)
    sink.complete(sink.answered_jobs[0], "accepted")
    assert code(p) == "AA"


def batch(*messages: bytes, count: int | None = None) -> bytes:
    n = len(messages) if count is None else count
    return (b"FHS|^~\\&|LIS|UNITLAB\rBHS|^~\\&|LIS|UNITLAB|||||||B-77\r" + b"".join(messages)
            + f"BTS|{n}\rFTS|1\r".encode())


def test_batch_is_one_job_and_one_answer_listing_refusals() -> None:
    r, sink = make()
    p = pending()
    r.frame(batch(msg("B1"), msg("B2", version="9.9"), msg("B3")), "127.0.0.1:1", True, p)
    assert not p.done
    job = sink.answered_jobs[0]
    assert [i.status for i in job.items] == ["queued", "error", "queued"]
    assert len({i.batch_uid for i in job.items}) == 1
    sink.complete(job, "accepted")
    text = p.data.decode() if p.data else ""
    assert text.startswith("FHS|") and "\rBHS|" in text
    assert text.count("MSA|") == 1 and "MSA|AR|B2|" in text
    assert "BTS|1|2 of 3 messages accepted" in text
    assert text.split("\rBHS|")[1].split("\r")[0].split("|")[10] == "B-77", "BHS-12 names the batch answered"


def test_batch_count_mismatch_is_accepted_and_noted() -> None:
    r, sink = make()
    p = pending()
    r.frame(batch(msg("B1"), count=5), "127.0.0.1:1", True, p)
    sink.complete(sink.answered_jobs[0], "accepted")
    assert p.data is not None and b"BTS-1 says 5 messages, the batch holds 1" in p.data
    assert b"MSA|" not in p.data


def test_batch_store_failure_lists_every_message_ae() -> None:
    r, sink = make()
    p = pending()
    r.frame(batch(msg("B1"), msg("B2")), "127.0.0.1:1", True, p)
    sink.complete(sink.answered_jobs[0], "failed", "disk full")
    assert p.data is not None and p.data.count(b"MSA|AE|") == 2


def test_empty_batch_claiming_messages_is_refused() -> None:
    r, _ = make()
    p = pending()
    r.frame(b"BHS|^~\\&|LIS|UNITLAB|||||||B-0\rBTS|3\r", "127.0.0.1:1", True, p)
    assert p.done and p.data is not None and b"MSA|AR|B-0|" in p.data


def test_pending_answers_only_once() -> None:
    p = pending()
    assert p.resolve(b"first")
    assert not p.resolve(b"second")
    assert p.data == b"first"
