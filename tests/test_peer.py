"""Cross-check against a peer: Microsoft FHIR-Converter's expected output for its own messages.

For every ``msconv-*`` corpus message our routes map, the message goes through our mapping into a
fresh record and out as FHIR R4 (``export_bundle``); the facts are compared with the peer's bundle
(../shared/peer-expected/README.md lists what is fair to compare and why, e.g. times without an
offset and OBX-11 handling differ by design). Deliberate differences are listed in
docs/mappings.md ("Compared with Microsoft FHIR-Converter").
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from engine.config.routes import RoutesConfig
from engine.hl7.charsets import decode
from engine.hl7.header import read_header
from engine.hl7.message import Message
from engine.mapping import MappingError, load_mappings
from engine.mllp.client import split_messages
from engine.record.export import export_bundle
from engine.record.writer import apply
from engine.store import db
from engine.worker.main import load_routes
from engine.worker.router import MessageKey, Router
from tests.conftest import CORPUS, ROOT, CorpusFile

PEER = CORPUS.parent / "peer-expected" / "msconv"
REAL_SYSTEMS = ("http://loinc.org", "http://snomed.info/sct", "http://unitsofmeasure.org", "http://hl7.org/fhir/sid/",
                "urn:oid:")


def resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] == kind]


def codes(concept: dict[str, Any] | None) -> set[str]:
    return {c["code"] for c in (concept or {}).get("coding", []) if c.get("code")}


def ours_for(f: CorpusFile, tmp_path: Path, router: Router, refused: list[str]) -> dict[str, Any] | None:
    mappings, problems = load_mappings(ROOT)
    assert not problems
    raw = split_messages(f.data())[0]
    h = read_header(raw, "utf-8")
    route = router.route(MessageKey("lab", h.message_type, h.trigger_event, h.structure, h.sending_facility, h.version))
    if route is None:
        return None
    msg = Message.parse(decode(raw, h.codec))
    try:
        mapped = mappings.get(route.mapping).apply(msg, mappings.context("lab"))
    except MappingError as exc:  # refused on purpose (see test_e2e); nothing to compare
        refused.append(f"{f.name}: {exc.reason}")
        return None
    url = f"sqlite:///{tmp_path / (f.name + '.db')}"
    db.upgrade(url)
    engine = db.make_engine(url, writer=True)
    try:
        with engine.begin() as conn:
            apply(conn, mapped, message_uid="u1", received_at=datetime.now(UTC))
        with engine.connect() as conn:
            return export_bundle(conn, None)
    finally:
        engine.dispose()


def peer_files(corpus: list[CorpusFile]) -> list[CorpusFile]:
    return [f for f in corpus if f.name.startswith("msconv-") and (PEER / f"{f.path.stem}.json").is_file()]


def test_same_facts_as_microsoft_fhir_converter(corpus: list[CorpusFile], tmp_path: Path) -> None:
    router = Router(load_routes(ROOT) if (ROOT / "routes.yaml").is_file() else RoutesConfig())
    compared = {"messages": 0, "patients": 0, "observations": 0, "values": 0, "immunizations": 0, "codes": 0}
    problems: list[str] = []
    refused: list[str] = []
    for f in peer_files(corpus):
        ours = ours_for(f, tmp_path, router, refused)
        if ours is None:
            continue  # a type our routes filter (orders, scheduling, billing...)
        peer = json.loads((PEER / f"{f.path.stem}.json").read_text(encoding="utf-8"))
        compared["messages"] += 1
        problems += compare_patient(f.name, peer, ours, compared)
        problems += compare_observations(f.name, peer, ours, compared)
        for kind, field in (("Immunization", "vaccineCode"), ("AllergyIntolerance", "code"), ("Condition", "code")):
            peer_codes = set().union(*(codes(r.get(field)) for r in resources(peer, kind)))
            our_codes = set().union(*(codes(r.get(field)) for r in resources(ours, kind)))
            compared["codes"] += len(peer_codes)
            if kind == "Condition":  # the peer also makes a Condition of PDA-1 (cause of death): not ours
                msg = Message.parse(decode(split_messages(f.data())[0], "utf-8"))
                peer_codes -= {pda.value(1, 1, 1) for pda in msg.all("PDA")}
            if peer_codes - our_codes:
                problems.append(f"{f.name}: {kind} codes only in the peer: {sorted(peer_codes - our_codes)}")
            compared["immunizations"] += len(resources(ours, "Immunization")) if kind == "Immunization" else 0
    print("compared with the peer:", compared, "refused by our mappings:", refused)
    assert len(refused) <= 2, refused
    assert compared["messages"] >= 12 and compared["observations"] >= 50
    assert not problems, "\n".join(problems)


def compare_patient(name: str, peer: dict[str, Any], ours: dict[str, Any], n: dict[str, int]) -> list[str]:
    out = []
    pp, op = resources(peer, "Patient"), resources(ours, "Patient")
    if not pp or not op:
        return [] if not pp else [f"{name}: no patient in our record"]
    peer_ids = {i["value"] for p in pp for i in p.get("identifier", [])}
    our_ids = {i["value"] for p in op for i in p.get("identifier", [])}
    n["patients"] += 1
    if not our_ids <= peer_ids:
        out.append(f"{name}: identifiers only ours: {sorted(our_ids - peer_ids)}")
    if not our_ids & peer_ids:
        out.append(f"{name}: no identifier in common")
    a, b = pp[0], op[0]
    for key in ("birthDate", "gender"):
        if a.get(key) and b.get(key) and a[key] != b[key]:
            out.append(f"{name}: Patient.{key} peer {a[key]!r} ours {b[key]!r}")
    fam_a = {x.get("family") for x in a.get("name", [])} - {None}
    fam_b = {x.get("family") for x in b.get("name", [])} - {None}
    if fam_a and fam_b and not fam_a & fam_b:
        out.append(f"{name}: Patient family names differ")
    return out


def _num(v: Any) -> Decimal:
    return Decimal(str(v)).normalize()


def _ws(s: str | None) -> str:
    return re.sub(r"\s+", " ", s or "").strip()


def compare_observations(name: str, peer: dict[str, Any], ours: dict[str, Any], n: dict[str, int]) -> list[str]:
    out = []
    mine = resources(ours, "Observation")
    for po in resources(peer, "Observation"):
        pcodes = codes(po.get("code"))
        if not pcodes or any(x in json.dumps(po.get("code")) for x in ("injury", "death", "autopsy", "coroner")):
            continue
        matches = [o for o in mine if codes(o.get("code")) & pcodes]
        if not matches:
            out.append(f"{name}: no Observation of ours with code {sorted(pcodes)}")
            continue
        n["observations"] += 1
        # real systems agree
        for c in po["code"].get("coding", []):
            if c.get("system", "").startswith(REAL_SYSTEMS) and not any(
                    oc.get("code") == c["code"] and oc.get("system") == c["system"]
                    for o in matches for oc in o["code"].get("coding", [])):
                out.append(f"{name}: code {c['code']} system {c['system']} not ours")
        if "valueQuantity" in po:
            pq = po["valueQuantity"]
            ok = any("valueQuantity" in o and _num(o["valueQuantity"]["value"]) == _num(pq["value"])
                     and {o["valueQuantity"].get("unit"), o["valueQuantity"].get("code")}
                     & {pq.get("unit"), pq.get("code")} - {None}
                     for o in matches) if (pq.get("unit") or pq.get("code")) else any(
                "valueQuantity" in o and _num(o["valueQuantity"]["value"]) == _num(pq["value"]) for o in matches)
            n["values"] += 1
            if not ok:
                out.append(f"{name}: {sorted(pcodes)} valueQuantity differs")
        elif "valueString" in po:
            n["values"] += 1
            if not any(_ws(o.get("valueString")) == _ws(po["valueString"]) or
                       _ws(po["valueString"]) in _ws(o.get("valueString")) for o in matches):
                out.append(f"{name}: {sorted(pcodes)} valueString differs")
        elif "valueCodeableConcept" in po:
            n["values"] += 1
            if not any(codes(o.get("valueCodeableConcept")) & codes(po["valueCodeableConcept"]) for o in matches):
                out.append(f"{name}: {sorted(pcodes)} valueCodeableConcept differs")
        status = po.get("status")
        if status in ("final", "preliminary", "corrected", "cancelled") and not any(o["status"] == status
                                                                                   for o in matches):
            out.append(f"{name}: {sorted(pcodes)} status peer {status}, ours {[o['status'] for o in matches]}")
        pint = set().union(*(codes(i) for i in po.get("interpretation", [])))
        if pint and not any(pint <= set().union(*(codes(i) for i in o.get("interpretation", []))) for o in matches):
            out.append(f"{name}: {sorted(pcodes)} interpretation peer {sorted(pint)}")
    return out


@pytest.fixture(autouse=True)
def _peer_present() -> None:
    if not PEER.is_dir():
        from tests.conftest import unavailable

        unavailable(f"peer expected outputs not found at {PEER}")
