"""The published benchmarks keep running as the engine changes: each script is run on a handful of
messages and its report line is checked for form (never for speed: that is the benchmarks' job)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_worker_benchmark_processes_every_message() -> None:
    out = run("bench/worker.py", "--only", "sqlite", "--messages", "30", "--batch", "10", "--baseline-seconds", "0.1")
    assert re.search(r"^peer baseline: python-hl7 hl7\.parse alone, same message: [\d,]+ msgs/s", out, re.M), out
    assert re.search(r"^SQLite: 30 ORU\^R01 \(10 OBX\) in batches of 10: worker CPU [\d.]+ ms per message, "
                     r"wall [\d.]+ ms -> [\d,]+ msgs/s", out, re.M), out


def test_mapping_benchmark_runs() -> None:
    out = run("bench/mapping.py", "--seconds", "0.2")
    assert re.search(r"^oru_r01, 10 OBX: Mapping\.apply \d+ us/message", out, re.M), out
