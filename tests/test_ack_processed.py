"""``ack.after: processed`` over real sockets, on both backends: the sender's AA means the facts are
in the record; a message that fails processing (or whose patient is parked) is answered AE with the
reason, a resend of it gets the same answer, and a message not processed in time gets AE while it
stays stored and queued."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select

from engine.mllp.client import MLLPClient
from engine.record.models import rec_observations
from engine.store.schema import messages
from tests.conftest import Backend, store_url
from tests.test_e2e import lab, project

PROCESSED = "ack:\n  after: processed\n  processing_timeout: 60s\n"


def msa(answer: bytes | None) -> list[str]:
    assert answer is not None
    line = next(seg for seg in answer.decode().split("\r") if seg.startswith("MSA|"))
    return line.split("|")


def stored(url: str, control_id: str, *, want_ack: str | None = None, timeout: float = 10) -> list[Any]:
    """The store rows of ``control_id`` (waiting until every one has ACK code ``want_ack``)."""
    engine = create_engine(url)
    try:
        deadline = time.time() + timeout
        while True:
            with engine.connect() as conn:
                rows = conn.execute(select(messages.c.id, messages.c.status, messages.c.ack_code, messages.c.ack,
                                           messages.c.error_step, messages.c.error)
                                    .where(messages.c.control_id == control_id).order_by(messages.c.id)).all()
            if want_ack is None or all(r.ack_code == want_ack for r in rows) or time.time() > deadline:
                return rows
            time.sleep(0.1)
    finally:
        engine.dispose()


def observations(url: str, control_id: str) -> int:
    """Observations in the record written by the message ``control_id``."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(
                select(func.count()).select_from(rec_observations)
                .join(messages, messages.c.uid == rec_observations.c.message_uid)
                .where(messages.c.control_id == control_id)).scalar_one())
    finally:
        engine.dispose()


def test_aa_after_the_record_commit_ae_with_the_reason(backend: Backend, engine_factory: Any,
                                                       tmp_path: Path) -> None:
    project(tmp_path)
    eng = engine_factory(backend, channel_extra=PROCESSED, HL7ENGINE_WORKERS="1")
    url = store_url(eng)
    poisoned = lab("PR2", "20261122081000", "BY-9", "DOE^JOHN", "F", "5.5").replace(
        "PID|1||BY-9", "PID|1||BY-9^^^MINSKLAB^MR||DOE^JOHN\rPID|2||BY-10", 1)
    with MLLPClient("127.0.0.1", eng.port, timeout=90) as client:
        answer = client.send(lab("PR1", "20261122080000", "BY-8", "ROE^JANE", "F", "4.25").encode())
        assert msa(answer)[1:3] == ["AA", "PR1"]
        # the AA came after the commit: the fact is already there, and the row says processed
        assert [r.status for r in stored(url, "PR1")] == ["processed"]
        assert observations(url, "PR1") == 1

        answer = client.send(poisoned.encode())
        fields = msa(answer)
        assert fields[1:3] == ["AE", "PR2"], fields
        assert "message stored but not processed (map: " in fields[3] and "several patients" in fields[3]
        assert answer is not None and b"PROCESSING_MAP" in answer
        rows = stored(url, "PR2", want_ack="AE")
        assert [(r.status, r.ack_code, r.error_step) for r in rows] == [("error", "AE", "map")]
        assert rows[0].ack == answer, "the store keeps the ACK that was sent"
        assert "several patients" in (rows[0].error or ""), "the worker's error is kept"

        # a resend is answered with its original's outcome, and is not processed again
        again = client.send(poisoned.encode())
        assert msa(again)[1] == "AE" and "several patients" in msa(again)[3]
        rows = stored(url, "PR2", want_ack="AE")
        assert [(r.status, r.ack_code) for r in rows] == [("error", "AE"), ("duplicate", "AE")]

        # the patient's stream is parked: the next message is held, and the sender is told
        answer = client.send(lab("PR3", "20261122082000", "BY-9", "DOE^JOHN", "F", "6.5").encode())
        fields = msa(answer)
        assert fields[1] == "AE" and "(order: held: an earlier message of this patient" in fields[3], fields
        assert answer is not None and b"206^Application record locked" in answer

        # another patient flows on; a message no route takes is filtered: AA
        assert msa(client.send(lab("PR4", "20261122083000", "BY-11", "ROE^JIM", "F", "7.75").encode()))[1] == "AA"
        orm = "MSH|^~\\&|HIS|MINSKHOSP|HL7ENGINE|CENTRAL|20261122090000||ORM^O01|PR5|P|2.5.1\rPID|1||BY-12\r"
        assert msa(client.send(orm.encode()))[1] == "AA"
        assert [r.status for r in stored(url, "PR5")] == ["filtered"]

        # a batch is answered once every message is processed, listing those that failed
        batch = ("FHS|^~\\&|LIS|MINSKLAB\rBHS|^~\\&|LIS|MINSKLAB|||||||BAT-1\r"
                 + lab("PR6", "20261122084000", "BY-13", "ROE^ANN", "F", "8.5")
                 + poisoned.replace("PR2", "PR7").replace("BY-9", "BY-14")
                 + "BTS|2\rFTS|1\r")
        answer = client.send(batch.encode())
        assert answer is not None
        text = answer.decode()
        assert text.count("MSA|") == 1 and "MSA|AE|PR7|" in text and "BTS|1|1 of 2 messages accepted" in text
        assert [r.status for r in stored(url, "PR6")] == ["processed"]
    assert observations(url, "PR6") == 1


def test_not_processed_in_time_is_ae_and_stays_queued(backend: Backend, engine_factory: Any,
                                                      tmp_path: Path) -> None:
    project(tmp_path)
    eng = engine_factory(backend, channel_extra="ack:\n  after: processed\n  timeout: 1s\n"
                                                "  processing_timeout: 1s\n", HL7ENGINE_WORKERS="0")
    url = store_url(eng)
    with MLLPClient("127.0.0.1", eng.port, timeout=30) as client:
        t0 = time.monotonic()
        answer = client.send(lab("SLOW1", "20261122080000", "BY-20", "ROE^JANE", "F", "4.0").encode())
        waited = time.monotonic() - t0
    fields = msa(answer)
    assert fields[1:3] == ["AE", "SLOW1"] and "no processing outcome within 1s (it will be processed" in fields[3]
    assert waited >= 0.9
    rows = stored(url, "SLOW1", want_ack="AE")
    assert [(r.status, r.ack_code) for r in rows] == [("queued", "AE")], "stored and queued, the AE recorded"
    assert rows[0].error is None


def test_engine_stop_answers_the_waiting_sender(backend: Backend, engine_factory: Any, tmp_path: Path) -> None:
    """SIGTERM while a sender waits for processing: it gets AE within the grace period (not after the
    processing timeout) and its message stays stored and queued for the next start."""
    project(tmp_path)
    eng = engine_factory(backend, channel_extra="ack:\n  after: processed\n  timeout: 1s\n"
                                                "  processing_timeout: 120s\n", HL7ENGINE_WORKERS="0")
    answers: list[bytes | None] = []
    with MLLPClient("127.0.0.1", eng.port, timeout=60) as client:
        t = threading.Thread(target=lambda: answers.append(
            client.send(lab("STOP1", "20261122080000", "BY-30", "ROE^JANE", "F", "4.0").encode())))
        t.start()
        deadline = time.time() + 10
        while not stored(store_url(eng), "STOP1") and time.time() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        assert eng.stop(signal.SIGTERM) == 0
        t.join(10)
    assert time.monotonic() - t0 < 10
    fields = msa(answers[0])
    assert fields[1:3] == ["AE", "STOP1"] and "no processing outcome before the engine stopped" in fields[3], fields
    assert [(r.status, r.ack_code) for r in stored(store_url(eng), "STOP1", want_ack="AE")] == [("queued", "AE")]
