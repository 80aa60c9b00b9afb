"""The video benchmark keeps working: a tiny run (a 3-frame 64x96 clip, SAM 2.1 hiera_tiny and
the reduced SAM 3, 2 objects, 2 frames tracked: one process per model, not four) writes the table
and the JSON it promises. No timing is asserted."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process  # runs the benchmark script as a process

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_video_benchmark_smoke_run(tmp_path):
    out = tmp_path / "video.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_video.py"), "--objects", "2",
         "--seconds", "0.12", "--fps", "25", "--height", "64", "--width", "96", "--frames", "2",
         "--sam3-reduced", "--threads", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| sam3 | 2 | 2 |" in done.stdout
    runs = json.loads(out.read_text())["runs"]
    assert [(r["model"], r["objects"]) for r in runs] == [("sam2", 2), ("sam3", 2)]
    for run in runs:
        assert run["frames"] == 2 and run["fps"] > 0 and run["peak_rss_mib"] > 0
        assert run["frames_encoded"] == 2  # each frame once, whatever the number of objects
