"""The team benchmark keeps working: a minimal run (2 annotators x 1 task, one store variant)
writes the JSON it promises. No timing is asserted: the targets live in the benchmark's output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process  # runs the benchmark script as a process

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_team_benchmark_smoke_run(tmp_path):
    out = tmp_path / "team.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_team.py"), "--annotators", "2",
         "--tasks", "1", "--store-variants", "mobile_sam", "--store-runtimes", "onnx",
         "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| 2 replicas + 1 worker |" in done.stdout
    report = json.loads(out.read_text())
    assert set(report["scenarios"]) == {"1 replica", "2 replicas + 1 worker"}
    for scenario in report["scenarios"].values():
        assert scenario["first_clicks"] == 2 and not scenario["errors"]
    team = report["scenarios"]["2 replicas + 1 worker"]
    assert team["encodes_on_replicas"] == 0  # the worker encoded the precomputed project
    assert report["precompute"]["jobs"] == 2 and report["precompute"]["images_per_minute_per_worker"] > 0
    assert report["store_bytes"][0]["variant"] == "mobile_sam/vit_t"
    assert report["store_bytes"][0]["entry_bytes"] > 2 * 1024 * 1024  # 1x256x64x64 float16 + header
