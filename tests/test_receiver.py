"""The receiving logic without sockets: frames in, jobs to the store, answers out, in the order the
guarantees require (no AA before the store says the message is durable)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from engine.config.models import ChannelConfig
from engine.intake.receiver import Pending, Receiver
from engine.intake.runtime import ChannelRuntime
from engine.intake.watch import Processed
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


# -- ack.after: processed ---------------------------------------------------------------------------

class Watcher:
    """Records what the receiver waits for; the test reports outcomes."""

    def __init__(self) -> None:
        self.waiting: dict[tuple[str, object], list[Callable[[Processed], None]]] = {}

    def watch(self, callback: Callable[[Processed], None], *, uid: str | None = None,
              message_id: int | None = None) -> Callable[[], None]:
        key = ("uid", uid) if uid is not None else ("id", message_id)
        self.waiting.setdefault(key, []).append(callback)

        def cancel() -> None:
            if callback in self.waiting.get(key, []):
                self.waiting[key].remove(callback)
                if not self.waiting[key]:
                    del self.waiting[key]

        return cancel

    def report(self, key: tuple[str, object], status: str, step: str = "", reason: str = "") -> None:
        for callback in self.waiting.pop(key, []):
            callback(Processed(status, step, reason))


def make_processed(cfg: dict | None = None) -> tuple[Receiver, Sink, Watcher]:
    rt = ChannelRuntime.build("unit", ChannelConfig.model_validate(
        {"accept": {"processing_ids": ["P", "T"]}, "ack": {"after": "processed", "processing_timeout": 30},
         **(cfg or {})}))
    sink, watcher = Sink(), Watcher()
    return Receiver(rt, sink, ChannelEvents("unit"), watcher), sink, watcher


def stored_in_processed_mode(raw: bytes) -> tuple[Sink, Watcher, Pending, Job]:
    """A frame received on a processed-mode channel whose message the store reported accepted."""
    r, sink, watcher = make_processed()
    p = pending()
    r.frame(raw, "127.0.0.1:1", True, p)
    job = sink.answered_jobs[0]
    sink.complete(job, "accepted")
    return sink, watcher, p, job


def test_processed_mode_answers_aa_only_after_processing() -> None:
    sink, watcher, p, job = stored_in_processed_mode(msg("P1"))
    assert not p.done, "durable is not enough: the record write is awaited"
    uid = job.items[0].uid
    assert list(watcher.waiting) == [("uid", uid)]
    assert p.deadline == pytest.approx(p.t0 + 30), "the processing timeout replaces the store timeout"
    watcher.report(("uid", uid), "processed")
    assert p.done and code(p) == "AA" and b"MSA|AA|P1" in (p.data or b"")
    assert p.data == job.items[0].ack, "the AA is the one stored at receipt"
    assert not sink.records, "nothing to correct"


def test_processed_mode_filtered_is_aa() -> None:
    r, sink, watcher = make_processed()
    p = pending()
    r.frame(msg("F1"), "127.0.0.1:1", True, p)
    sink.complete(sink.answered_jobs[0], "accepted")
    watcher.report(("uid", sink.answered_jobs[0].items[0].uid), "filtered", "route", "no route matched")
    assert code(p) == "AA"


@pytest.mark.parametrize(("status", "step", "reason", "err"), [
    ("error", "map", "OBX-5: required value missing", b"207^Application internal error"),
    ("error", "route", "no route matches ORU^R01 from channel 'unit'", b"200^Unsupported message type"),
    ("held", "order", "held: an earlier message of this patient (abc) failed; replay or skip it",
     b"206^Application record locked"),
])
def test_processed_mode_failure_is_ae_with_the_reason(status: str, step: str, reason: str, err: bytes) -> None:
    sink, watcher, p, job = stored_in_processed_mode(msg("E1"))
    watcher.report(("uid", job.items[0].uid), status, step, reason)
    assert code(p) == "AE"
    data = p.data or b""
    assert b"MSA|AE|E1|message stored but not processed (" + step.encode() + b": " in data
    assert err in data and f"PROCESSING_{step.upper()}".encode() in data
    correction = sink.records[-1].ack_corrections[0]
    assert correction[:3] == (job.items[0].uid, "AE", data) and correction[3] is None, "the sent AE is recorded"


def test_processed_mode_escapes_the_reason() -> None:
    _, watcher, p, job = stored_in_processed_mode(msg("E2"))
    watcher.report(("uid", job.items[0].uid), "error", "map", "bad value 'a|b^c' in OBX-5")
    data = (p.data or b"").decode()
    assert "a\\F\\b\\S\\c" in data and data.count("\r") == 3, data


def test_processed_mode_timeout_is_ae_and_the_message_stays_queued() -> None:
    sink, watcher, p, job = stored_in_processed_mode(msg("T1"))
    assert p.processing
    p.deadline = time.monotonic()  # as the sweep sees it 30 s later
    p.expire()
    assert code(p) == "AE"
    assert b"PROCESSING_TIMEOUT" in (p.data or b"") and b"no processing outcome within 30s" in (p.data or b"")
    assert not watcher.waiting, "stopped watching"
    assert sink.records[-1].ack_corrections[0][1] == "AE"
    assert not job.expired, "the store outcome stands: the message is stored and queued"


def test_processed_mode_resend_follows_the_original() -> None:
    r, sink, watcher = make_processed()
    p = pending()
    r.frame(msg("D1"), "127.0.0.1:1", True, p)
    job = sink.answered_jobs[0]
    sink.complete(job, "duplicate")
    job.items[0].duplicate_of = 41  # what the store reports for a resend
    # (Sink.complete calls done before the test can set duplicate_of: replay the call)
    p2 = pending()
    r.frame(msg("D1"), "127.0.0.1:1", True, p2)
    job2 = sink.answered_jobs[1]
    for item in job2.items:
        item.outcome, item.duplicate_of = "duplicate", 41
    job2.done(job2)
    assert ("id", 41) in watcher.waiting and not p2.done
    watcher.report(("id", 41), "error", "map", "no OBR")
    assert code(p2) == "AE"
    assert code(p) == "AA", "a resend whose original is unknown is answered as stored"


def test_processed_mode_store_failure_is_still_ae_at_once() -> None:
    r, sink, watcher = make_processed()
    p = pending()
    r.frame(msg("S1"), "127.0.0.1:1", True, p)
    sink.complete(sink.answered_jobs[0], "failed", "database down")
    assert code(p) == "AE" and not watcher.waiting


def test_processed_mode_batch_waits_for_every_message() -> None:
    frame = batch(msg("B1"), msg("B2", version="9.9"), msg("B3"), msg("B4"))
    _, watcher, p, job = stored_in_processed_mode(frame)
    uids = [i.uid for i in job.items]
    assert sorted(watcher.waiting) == sorted(("uid", u) for u in (uids[0], uids[2], uids[3]))
    watcher.report(("uid", uids[0]), "processed")
    watcher.report(("uid", uids[2]), "error", "map", "bad OBX")
    assert not p.done, "B4 is not processed yet"
    watcher.report(("uid", uids[3]), "processed")
    text = (p.data or b"").decode()
    assert text.count("MSA|") == 2 and "MSA|AR|B2|" in text and "MSA|AE|B3|" in text
    assert "BTS|2|2 of 4 messages accepted" in text


def test_processed_mode_batch_timeout_lists_the_unprocessed() -> None:
    _, watcher, p, job = stored_in_processed_mode(batch(msg("B1"), msg("B2")))
    watcher.report(("uid", job.items[0].uid), "processed")
    assert p.processing
    p.deadline = time.monotonic()
    p.expire()
    text = (p.data or b"").decode()
    assert text.count("MSA|") == 1 and "MSA|AE|B2|" in text and "no processing outcome within 30s" in text
    assert not watcher.waiting


def test_processed_mode_engine_stop_answers_ae_at_once() -> None:
    r, sink, watcher = make_processed()
    p = pending()
    r.frame(msg("STOP1"), "127.0.0.1:1", True, p)
    sink.complete(sink.answered_jobs[0], "accepted")
    p.expire()  # what MLLPServer.stop does once its grace is over
    assert code(p) == "AE" and b"no processing outcome before the engine stopped" in (p.data or b"")
    assert not watcher.waiting


def test_processed_mode_needs_a_watcher() -> None:
    rt = ChannelRuntime.build("unit", ChannelConfig.model_validate({"ack": {"after": "processed"}}))
    with pytest.raises(ValueError, match="processing watcher"):
        Receiver(rt, Sink(), ChannelEvents("unit"))


def test_a_sender_asking_for_application_acks_that_are_not_configured_is_logged_once() -> None:
    from structlog.testing import capture_logs

    r, _ = make({"ack": {"mode": "enhanced"}})
    with capture_logs() as logs:
        for i, extra in enumerate(["|||AL|NE", "|||AL|AL", "|||AL|ER"]):
            r.frame(msg(f"C{i}", extra), "127.0.0.1:1", True, pending())
    warned = [e for e in logs if "application ACKs" in e["event"]]
    assert len(warned) == 1 and warned[0]["control_id"] == "C1" and warned[0]["msh16"] == "AL"
    assert "DOE" not in str(warned)
    configured, _ = make({"ack": {"mode": "enhanced", "application_acks": {"to": "lis:6661"}}})
    with capture_logs() as logs:
        configured.frame(msg("C9", "|||AL|AL"), "127.0.0.1:1", True, pending())
    assert not [e for e in logs if "application ACKs" in e["event"]]
