"""MLLP to the central record, over real sockets, with workers, on both backends.

Every ORU, OUL, ADT and VXU message of ../shared/corpus is sent to a running engine (listener,
store, queue, workers, record); each accepted one must end ``processed`` with every observation its
mapping produces present in the record, readable over the FHIR API. A second send of the same
files changes nothing in the record.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select

from engine.config.project import load_project
from engine.hl7.charsets import decode
from engine.hl7.message import Message
from engine.mapping import load_mappings
from engine.mllp.client import MLLPClient, split_messages
from engine.record.models import rec_observations, rec_patients, record_metadata
from engine.store.schema import messages
from engine.worker.router import MessageKey, Router
from tests.conftest import ROOT, Backend, CorpusFile, free_port, store_url

TYPES = ("ORU", "OUL", "ADT", "VXU")


def project(tmp_path: Path) -> None:
    shutil.copy(ROOT / "routes.yaml", tmp_path / "routes.yaml")
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")


def send(files: list[CorpusFile], port: int) -> int:
    n = 0
    with MLLPClient("127.0.0.1", port, timeout=30) as client:
        for f in files:
            for piece in split_messages(f.data()):
                assert client.send(piece) is not None, f.name
                n += 1
    return n


def wait_processed(url: str, timeout: float = 120) -> list[Any]:
    engine = create_engine(url)
    try:
        deadline = time.time() + timeout
        while True:
            with engine.connect() as conn:
                rows = conn.execute(select(messages.c.uid, messages.c.control_id, messages.c.status, messages.c.raw,
                                           messages.c.charset, messages.c.channel, messages.c.message_type,
                                           messages.c.trigger_event, messages.c.error)
                                    .order_by(messages.c.id)).all()
            if all(r.status not in ("queued", "replayed") for r in rows) or time.time() > deadline:
                return rows
            time.sleep(0.2)
    finally:
        engine.dispose()


def record_counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
                    for t in record_metadata.sorted_tables}
    finally:
        engine.dispose()


def test_corpus_into_the_record(backend: Backend, engine_factory: Any, corpus: list[CorpusFile],
                                tmp_path: Path) -> None:
    project(tmp_path)
    http = free_port()
    eng = engine_factory(backend, HL7ENGINE_WORKERS="2", HL7ENGINE_HTTP_PORT=str(http))
    files = [f for f in corpus if f.message_type.split("^")[0] in TYPES and not f.malformed]
    sent = send(files, eng.port)
    url = store_url(eng)
    rows = wait_processed(url)
    first = len(rows)
    assert first >= sent  # a batch frame holds several messages
    router = Router(load_project(tmp_path).routes)
    ours = [r for r in rows
            if router.route(MessageKey(r.channel, r.message_type or "", r.trigger_event or "", "", "", "")) is not None]
    assert all(r.status in ("filtered", "duplicate") for r in rows if r not in ours)
    failed = [r for r in ours if r.status not in ("processed", "duplicate")]
    # the only failures allowed (docs/mappings.md): a message that names no patient at all cannot go
    # into a patient record, a result that does not say what was measured (no OBX-3, no OBR-4) is
    # not a fact, and an A40 merging several patient pairs is refused (one merge per message); they
    # are marked error (step map) for the operators, and nothing else is
    for r in failed:
        msg = Message.parse(decode(r.raw, r.charset or "utf-8"))
        assert r.status == "error", (r.control_id, r.status)
        if "patient.identifiers" in (r.error or ""):
            pid = msg.first("PID")
            assert pid is None or not any(pid.value(n) for n in (2, 3, 4)), r.control_id
        elif "required value is empty (OBX-3 or OBR-4)" in (r.error or ""):  # an OBX that says what it is not
            assert any(not obx.value(3) for obx in msg.all("OBX")), r.control_id
        else:
            assert "one merge per message" in (r.error or "") and len(msg.all("MRG")) > 1, (r.control_id, r.error)
    assert len(failed) <= 4, [(r.control_id, r.error) for r in failed]
    assert sum(1 for r in ours if r.status == "processed") >= 40

    # every observation the mapping produces is in the record
    mappings, problems = load_mappings(tmp_path)
    assert not problems
    engine = create_engine(url)
    with engine.connect() as conn:
        stored = set(conn.execute(select(rec_observations.c.key)).scalars())
        patients = conn.execute(select(func.count()).select_from(rec_patients)).scalar_one()
    engine.dispose()
    expected = 0
    for r in ours:
        if r.status != "processed" or r.message_type not in ("ORU", "OUL"):
            continue
        name = "oru_r01" if r.message_type == "ORU" else "oul_r22"
        mapped = mappings.get(name).apply(Message.parse(decode(r.raw, r.charset or "utf-8")),
                                          mappings.context(r.channel))
        keys = {o.key for o in mapped.observations}
        expected += len(keys)
        assert keys <= stored, (r.control_id, sorted(keys - stored)[:5])
    assert expected > 100 and patients > 10

    # the workers' metrics, on the engine's /metrics, agree with the store
    by_status = {status: sum(1 for r in rows if r.status == status) for status in ("processed", "filtered", "error")}
    deadline = time.time() + 30  # workers report once a second; allow for a busy machine
    while True:
        samples = scrape(http)
        counted = {status: samples.get(("hl7engine_worker_messages_total", status), 0)
                   for status in ("processed", "filtered", "error")}
        # (a worker that started late, with nothing to do, may not have reported yet)
        if (counted == by_status and samples.get(("hl7engine_workers", "")) == 2) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert counted == by_status
    assert samples[("hl7engine_workers", "")] == 2
    assert samples[("hl7engine_worker_facts_total", "")] >= expected
    assert samples[("hl7engine_worker_commit_latency_seconds_count", "")] == by_status["processed"]

    # readable as FHIR R4 over HTTP
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/fhir/Observation?_count=5", timeout=10) as resp:
        bundle = json.loads(resp.read())
        assert resp.headers["Content-Type"].startswith("application/fhir+json")
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset" and bundle["total"] >= expected // 2

    # a second send of the same files changes nothing in the record
    before = record_counts(url)
    assert send(files, eng.port) == sent
    rows = wait_processed(url)
    assert len(rows) == 2 * first
    assert record_counts(url) == before


def lab(cid: str, when: str, patient: str, name: str, status: str, value: str, msh18: str = "") -> str:
    return (f"MSH|^~\\&|LIS|MINSKLAB|HL7ENGINE|CENTRAL|{when}+0300||ORU^R01^ORU_R01|{cid}|P|2.5.1|||||BY|{msh18}\r"
            f"PID|1||{patient}^^^MINSKLAB^MR||{name}||19800101|F\r"
            f"OBR|1|ORD77|FIL77^MINSKLAB|2345-7^Glucose^LN|||{when}+0300||||||||||||||||||{status}\r"
            f"OBX|1|NM|2345-7^Glucose^LN||{value}|mmol/L^mmol/L^UCUM|3.9-6.1|N|||{status}|||{when}+0300\r")


def scrape(http: int) -> dict[tuple[str, str], float]:
    """The engine's /metrics as {(sample name, status label or ""): value}, summed over other labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, sample.labels.get("status", ""))
            out[key] = out.get(key, 0) + sample.value
    return out


def get(http: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{http}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def test_cyrillic_names_and_a_correction_reach_the_record(backend: Backend, engine_factory: Any,
                                                          tmp_path: Path) -> None:
    """windows-1251 without MSH-18 (the channel's charset) and UTF-8 with MSH-18 both keep their
    Cyrillic names; a corrected result (OBX-11 C) replaces its preliminary one and keeps history."""
    project(tmp_path)
    http = free_port()
    eng = engine_factory(backend, channel_extra="charset: windows-1251\n", HL7ENGINE_WORKERS="1",
                         HL7ENGINE_HTTP_PORT=str(http))
    with MLLPClient("127.0.0.1", eng.port, timeout=30) as client:
        for raw in (lab("CY1", "20261122080000", "BY-1", "ИВАНОВА^АННА^ПЕТРОВНА", "P", "7.2").encode("cp1251"),
                    lab("CY2", "20261122081000", "BY-2", "ПЕТРОВ^ПЁТР", "F", "5.0", "UNICODE UTF-8").encode("utf-8"),
                    lab("CY3", "20261122090000", "BY-1", "ИВАНОВА^АННА^ПЕТРОВНА", "C", "6.8").encode("cp1251")):
            answer = client.send(raw)
            assert answer is not None and b"MSA|AA|" in answer
    rows = wait_processed(store_url(eng))
    assert [r.status for r in rows] == ["processed"] * 3, [(r.control_id, r.status, r.error) for r in rows]

    anna = get(http, "/fhir/Patient?identifier=BY-1")["entry"][0]["resource"]
    assert anna["name"][0]["family"] == "ИВАНОВА" and anna["name"][0]["given"][:2] == ["АННА", "ПЕТРОВНА"]
    petr = get(http, "/fhir/Patient?identifier=BY-2")["entry"][0]["resource"]
    assert petr["name"][0]["family"] == "ПЕТРОВ" and petr["name"][0]["given"] == ["ПЁТР"]

    obs = get(http, f"/fhir/Observation?patient={anna['id']}")
    assert obs["total"] == 1, "the correction replaced the preliminary result"
    o = obs["entry"][0]["resource"]
    assert o["status"] == "corrected" and o["valueQuantity"]["value"] == 6.8
    engine = create_engine(store_url(eng))
    with engine.connect() as conn:
        from engine.record.models import rec_history

        assert conn.execute(select(func.count()).select_from(rec_history)
                            .where(rec_history.c.kind == "observation")).scalar_one() == 1
    engine.dispose()
