"""The HTTP benchmark keeps working: a minimal run (mobile_sam, torch, 2 repeats) writes the JSON
it promises. No timing is asserted: the performance targets live in the benchmark's output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process  # runs the benchmark script as a process

REPO = Path(__file__).resolve().parents[2]

MEASUREMENTS = [
    "first_click_1080p", "embedded_click_1080p", "embedded_click_1080p_3pt",
    "embedded_click_1080p_poly", "task_open_1080p", "embedded_click_after_idle_1080p",
    "precompute_click_1080p", "first_click_4k",
    "embedded_click_4k_poly", "busy_click_1080p", "busy_background_first_click",
    "reencode_click_1080p",
]


@pytest.mark.slow
def test_http_benchmark_smoke_run(tmp_path):
    out = tmp_path / "http.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_http.py"), "--variants", "mobile_sam",
         "--runtimes", "torch", "--repeats", "2", "--embedded-repeats", "3", "--out", str(out),
         "--log-dir", str(tmp_path / "logs")],
        cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| mobile_sam/vit_t | torch |" in done.stdout

    report = json.loads(out.read_text())
    for key in ("date", "machine", "versions", "load_average_before", "load_average_after",
                "server", "plan", "results", "table_markdown"):
        assert key in report, key
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu_model"]
    assert report["versions"]["torch"]
    assert len(report["results"]) == 1
    row = report["results"][0]
    assert row["status"] == "ok", row.get("reason")
    assert (row["variant"], row["runtime"]) == ("mobile_sam/vit_t", "torch")

    for name in MEASUREMENTS:
        stats = row["metrics"][name]
        assert stats["n"] >= 1, name
        assert stats["median_ms"] > 0 and stats["min_ms"] > 0, name
        assert all(t > 0 for t in stats["samples_ms"]), name
    assert row["metrics"]["first_click_1080p"]["n"] == 2
    assert row["metrics"]["embedded_click_1080p"]["server_median_ms"] > 0

    memory = row["memory"]
    assert memory["rss_bytes"] > 0 and memory["cache_images"] > 0
    assert memory["cache_bytes_per_image"] > 0
    assert row["reencode_backend"]["status"] == "ok"
    assert row["reencode_backend"]["cache_images_after"] == 0  # it really re-encoded every click
    for ratio in ("busy_over_idle", "reencode_over_embedded", "precompute_over_embedded",
                  "precompute_over_idle_control"):
        assert row["ratios"][ratio] > 0, ratio
    assert {t["metric"] for t in row["targets"]} == {
        "embedded_click_1080p", "first_click_1080p", "precompute_click_1080p",
        "embedded_click_4k_poly", "busy_over_idle"}
    assert all(isinstance(t["met"], bool) for t in row["targets"])
