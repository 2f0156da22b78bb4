"""Mapping speed: microseconds per ORU^R01 with 10 OBX for ``Mapping.apply`` (and for parse + apply).

    .venv/bin/python bench/mapping.py [--config DIR] [--seconds 3]

The worker budget is ~3,000 ORU (10 OBX) per second on 2 cores for parse, route, map and the
record write together, so the mapping should stay well under ~300 us per message.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.hl7.message import Message  # noqa: E402
from engine.mapping import load_mappings  # noqa: E402

OBX_ROWS = [
    ("NM", "718-7^Hemoglobin [Mass/volume] in Blood^LN", "13.2", "g/dL^grams per deciliter^UCUM", "12.0-15.5", "N"),
    ("NM", "6690-2^Leukocytes [#/volume] in Blood^LN", "7.4", "10*3/uL^^UCUM", "4.5-11.0", "N"),
    ("NM", "789-8^Erythrocytes [#/volume] in Blood^LN", "4.61", "10*6/uL^^UCUM", "4.2-5.4", "N"),
    ("NM", "777-3^Platelets [#/volume] in Blood^LN", "251", "10*3/uL^^UCUM", "150-400", "N"),
    ("NM", "2345-7^Glucose [Mass/volume] in Serum or Plasma^LN", "5.4", "mmol/L^^UCUM", "3.9-6.1", "N"),
    ("SN", "2160-0^Creatinine [Mass/volume] in Serum or Plasma^LN", "<^0.5", "mg/dL^^UCUM", "<1.2", ""),
    ("CWE", "94500-6^SARS-CoV-2 RNA Resp Ql NAA+probe^LN", "260385009^Negative^SCT", "", "", "N"),
    ("ST", "5778-6^Color of Urine^LN", "Yellow", "", "", ""),
    ("TX", "11502-2^Laboratory report^LN", "Line one of the report~Line two", "", "", ""),
    ("NM", "2823-3^Potassium [Moles/volume] in Serum or Plasma^LN", "4.1", "mmol/L^^UCUM", "3.5-5.1", "N"),
]


def oru_10_obx(n: int = 0) -> str:
    """ORU^R01 number ``n``: patient, order numbers, times and numeric results differ per message
    (as in real traffic, so that caches of repeated values do not flatter the result); test codes,
    units and reference ranges repeat, as a laboratory's catalogue does."""
    minute = n % 60
    segs = [
        f"MSH|^~\\&|LIS|CENTRALLAB|HIS|CITYHOSP|2026112210{minute:02d}15+0300||ORU^R01^ORU_R01|MSG{n:08d}|P|2.5.1"
        "|||AL|NE",
        f"PID|1||{100000 + n}^^^CITYHOSP^MR~AB{1234567 + n}^^^BY-NPN^NI||Ivanova{n}^Anna^Petrovna"
        f"||1980{n % 12 + 1:02d}14|F|||ul. Lenina 1^^Minsk^^220030^BY||+375291234567",
        "PV1|1|O|LAB^^^CITYHOSP||||1234^Petrov^Ivan",
        f"ORC|RE|PL{n}^HIS|FL{n}^LIS",
        f"OBR|1|PL{n}^HIS|FL{n}^LIS|58410-2^CBC panel^LN|||2026112209{minute:02d}|||||||||1234^Petrov^Ivan||||||"
        f"2026112210{minute:02d}|||F",
    ]
    for i, (t, code, value, unit, rng, flag) in enumerate(OBX_ROWS, start=1):
        if t == "NM":
            value = f"{float(value) * (1 + (n % 17) / 100):.2f}"
        segs.append(f"OBX|{i}|{t}|{code}||{value}|{unit}|{rng}|{flag}|||F|||2026112209{minute:02d}||||||"
                    f"2026112210{(minute + 5) % 60:02d}||||Central Lab")
    segs.append("NTE|1||Sample slightly haemolysed")
    return "\r".join(segs) + "\r"


def bench(fn: object, seconds: float) -> float:
    call = fn  # type: ignore[assignment]
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(200):
            call()  # type: ignore[operator]
        n += 200
        now = time.perf_counter()
        if now >= deadline:
            return (now - start) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=ROOT)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    mset, problems = load_mappings(args.config)
    if problems:
        for p in problems:
            print(p)
        raise SystemExit(1)
    mapping = mset.get("oru_r01")
    texts = [oru_10_obx(n) for n in range(5000)]
    ctx = mset.context("lab", "Europe/Minsk", sending_facility="CENTRALLAB")
    out = mapping.apply(Message.parse(texts[0]), ctx)
    assert len(out.observations) == 10, len(out.observations)
    cycle = itertools.cycle(texts)
    apply_us = bench(lambda: mapping.apply(Message.parse(next(cycle)), ctx), args.seconds)
    parse_us = bench(lambda: Message.parse(next(cycle)), args.seconds / 2)
    dump_us = bench(lambda: out.model_dump(mode="json", exclude_defaults=True), args.seconds / 2)
    print(f"oru_r01, 10 OBX: Mapping.apply {apply_us - parse_us:.0f} us/message "
          f"(parse + apply {apply_us:.0f} us; parse alone {parse_us:.0f} us) "
          f"-> {1e6 / apply_us:.0f} messages/s on one core; model_dump(json) {dump_us:.0f} us")


if __name__ == "__main__":
    main()
