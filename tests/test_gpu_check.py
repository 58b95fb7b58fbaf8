"""benchmarks/gpu_check.py, the prepared bf16 check for a lent GPU, runs on the CPU with a tiny shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_on_the_cpu_with_a_tiny_shape(tmp_path):
    out = tmp_path / "check.json"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--steps", "2", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    (tiny,) = report["shapes"].values()
    assert report["dtype"] == "bfloat16" and report["failures"] == []
    assert set(tiny["train"]) == {"none", "kl", "ldifs", "steering", "inoculation", "interleave", "safelora"}
    assert all(r["finite"] and len(r["losses"]) == 2 for r in tiny["train"].values())
    assert all(r["finite"] and r["answers"] > 0 for r in tiny["eval"].values())
    assert all(r["cosine"] > 0.99 for r in tiny["gradients"].values())
