"""The training benchmark keeps working: a tiny run (reduced configurations of both trainers on
small images, a few samples) writes the JSON and the table it promises. No timing is asserted:
the figures live in the benchmark's output (benchmarks/bench_training.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process  # runs the benchmark script as a process

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_training_benchmark_smoke_run(tmp_path):
    out = tmp_path / "training.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_training.py"), "--tiny",
         "--images", "4", "--epochs", "1", "--batch-size", "2", "--runs", "1", "--clicks", "3",
         "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [row["kind"] for row in report["training"]] == ["rf_detr", "grounding_dino"]
    for row in report["training"]:
        assert row["images"] == 4 and len(row["epochs"]) == 1 and row["images_per_second"] > 0
    engines = [row["engine"] for row in report["inference"]]
    assert engines[:2] == ["trained rf_detr", "trained grounding_dino"]
    assert engines[2].startswith("zero-shot grounding_dino")
    assert all(row["median_ms"] > 0 for row in report["inference"])
    clicks = report["clicks"]
    assert clicks["webhook_answer"].get("job")
    assert clicks["idle"]["n"] == clicks["while_training"]["n"] == 3
    assert clicks["states_during_clicks"][0] == "running" and clicks["ratio"] > 0
    assert "| rf_detr (tiny) | 4 | 2 |" in done.stdout
    assert report["loadavg_before"] and report["loadavg_after"]
