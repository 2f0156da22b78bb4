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


def test_end_to_end_benchmark_configurations_pass_check() -> None:
    """bench/e2e.py rewrites this repository's channel and routes for its options (ack after
    processed, application ACKs, forwards): each variant must be a configuration the engine accepts
    (the example channel once gained an explicit ``after: stored`` and --ack-after processed then
    wrote the key twice, which the engine refused)."""
    import importlib
    import shutil

    from engine.config.project import load_project

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        e2e = importlib.import_module("e2e")
    finally:
        sys.path.remove(str(ROOT / "bench"))
    variants = [{}, {"ack_after": "processed"}, {"app_acks_port": 6661}, {"forward_port": 6662},
                {"ack_after": "processed", "forward_port": 6662}]
    for options in variants:
        d = e2e.config_dir(25999, **options)
        try:
            project = load_project(d)  # raises ConfigError naming every problem
            (lab,) = [ch for ch in project.channels if ch.name == "lab"]
            assert lab.config.listen.port == 25999
            assert lab.config.ack.after == options.get("ack_after", "stored")
            assert (lab.config.ack.mode == "enhanced") == ("app_acks_port" in options)
            assert ("downstream" in (d / "routes.yaml").read_text()) == ("forward_port" in options)
        finally:
            shutil.rmtree(d)
