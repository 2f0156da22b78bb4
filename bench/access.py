"""Full-message field access: python-hl7 (``hl7.parse``) versus ``engine.hl7.message``.

Both parse the same ~1.6 KB ORU^R01 with 10 OBX (a few escape sequences, repetitions and
subcomponents) and read OBX-3.1, OBX-5 and OBX-6.1 of every OBX, unescaped; the values read are
checked to be equal first. Prints microseconds per message (best of several rounds, so other
processes on the machine disturb it less).

    .venv/bin/python bench/access.py [--rounds 7] [--number 2000]
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

import hl7

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.hl7.message import Message


def oru(obx: int = 10) -> str:
    segs = [
        "MSH|^~\\&|LABSYS|CENTRAL LAB^2.16.840.1.113883.3.72.5.20^ISO|EHR|GENERAL HOSP^2.16.840.1.113883.3.72.5.21^ISO|"
        "20240517093012+0200||ORU^R01^ORU_R01|MSG0000123456|P|2.5.1|||AL|NE|||||LRI_NG_RN_Profile^^2.16.840.1.113883.9.20^ISO",
        "PID|1||PAT123456^^^GENERAL HOSP&2.16.840.1.113883.3.72.5.21&ISO^MR~"
        "987-65-4320^^^SSA&2.16.840.1.113883.4.1&ISO^SS||"
        "Doe^Jane^Q^^Mrs^^L||19700321|F||2106-3^White^HL70005|12 Main St^Apt 4^Springfield^IL^62701^USA^H||"
        "^PRN^PH^^1^217^5551234",
        "ORC|RE|ORD448811^EHR|LAB998877^LABSYS|||||||||1234567890^Smith^John^^^Dr^^^NPI&2.16.840.1.113883.4.6&ISO",
        "OBR|1|ORD448811^EHR|LAB998877^LABSYS|24331-1^Lipid panel^LN|||20240517080000+0200|||||||||"
        "1234567890^Smith^John^^^Dr||||||20240517093000+0200|||F",
    ]
    tests = [("2093-3", "Cholesterol", "196", "mg/dL"), ("2571-8", "Triglyceride", "150", "mg/dL"),
             ("2085-9", "HDL Cholesterol", "52", "mg/dL"), ("13457-7", "LDL Cholesterol calc", "114", "mg/dL"),
             ("9830-1", "Cholesterol\\S\\HDL ratio", "3.8", "{ratio}"), ("2345-7", "Glucose", "98", "mg/dL"),
             ("2160-0", "Creatinine", "0.9", "mg/dL"), ("3094-0", "Urea nitrogen", "14", "mg/dL"),
             ("2951-2", "Sodium", "140", "mmol/L"), ("2823-3", "Potassium", "4.1", "mmol/L")]
    for i in range(obx):
        code, name, value, unit = tests[i % len(tests)]
        segs.append(f"OBX|{i + 1}|NM|{code}^{name}^LN||{value}|{unit}^{unit}^UCUM|50-200|N|||F|||"
                    "20240517080000")
    segs.append("NTE|1|L|Fasting specimen\\.br\\Reviewed by lab")
    return "\r".join(segs) + "\r"


def read_python_hl7(text: str) -> list[tuple[str, str, str]]:
    msg = hl7.parse(text)
    out = []
    for seg in msg.segments("OBX"):
        out.append((seg.extract_field(1, 3, 1, 1, 1), msg.unescape(str(seg(5))), seg.extract_field(1, 6, 1, 1, 1)))
    return out


def read_engine(text: str) -> list[tuple[str | None, str | None, str | None]]:
    msg = Message.parse(text)
    return [(seg.value(3, 1, 1), seg.get("5"), seg.value(6, 1, 1)) for seg in msg.all("OBX")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--number", type=int, default=2000, help="messages per round")
    args = ap.parse_args()
    text = oru()
    assert read_engine(text) == read_python_hl7(text), "the two readers disagree"
    assert len(read_engine(text)) == 10
    print(f"message: {len(text.encode())} bytes, {text.count(chr(13))} segments, 10 OBX; "
          "reading OBX-3.1, OBX-5, OBX-6.1 of every OBX")
    results = {}
    for label, fn in (("python-hl7 hl7.parse", read_python_hl7), ("engine.hl7.message", read_engine)):
        times = timeit.repeat(lambda fn=fn: fn(text), number=args.number, repeat=args.rounds)
        results[label] = min(times) / args.number * 1e6
        print(f"{label:24s} {results[label]:8.1f} µs/message")
    ratio = results["python-hl7 hl7.parse"] / results["engine.hl7.message"]
    print(f"{'speed-up':24s} {ratio:8.1f} x")
    # parse alone, and the worst case for the lazy parser: every field of every segment split
    parse_only = min(timeit.repeat(lambda: Message.parse(text), number=args.number, repeat=args.rounds))
    print(f"{'engine parse only':24s} {parse_only / args.number * 1e6:8.1f} µs/message")

    def every_field() -> None:
        m = Message.parse(text)
        for seg in m.segments:
            for f in range(1, seg.field_count() + 1):
                seg.value(f)

    every = min(timeit.repeat(every_field, number=args.number // 4, repeat=args.rounds))
    print(f"{'engine every field':24s} {every / (args.number // 4) * 1e6:8.1f} µs/message")


if __name__ == "__main__":
    main()
