"""The concept-pass benchmark keeps working: a tiny run (the reduced Grounding DINO on a small
image, one run) writes the JSON and the table it promises, before (per_label) and after (joined)
in one run, plus a smaller detector input. No timing is asserted: the figures live in the
benchmark's output (benchmarks/bench_concept_passes.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process  # runs the benchmark script as a process

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_concept_passes_benchmark_smoke_run(tmp_path):
    out = tmp_path / "concept_passes.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_concept_passes.py"), "--tiny",
         "--runs", "1", "--max-instances", "2", "--sizes", "96", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["variant"], r["labels"]): r for r in report["rows"]}
    assert set(rows) == {(v, n) for v in ("per_label", "joined", "joined@96") for n in (1, 3)}
    for row in rows.values():
        assert row["detector_ms"] > 0 and row["pass_ms"] > 0
        assert 0 <= row["kept_instances"] <= 2 * row["labels"]  # max_instances per label
        assert len(row["boxes_per_phrase"]) == row["labels"]
    assert rows[("joined@96", 3)]["input_hw"] == [90, 160]  # 96 on the shorter side
    assert rows[("joined", 3)]["input_hw"] == [750, 1333]  # the processor's own: 800 / 1333
    targets = report["targets"]
    assert targets["detector_3_over_1_joined"] > 0 and targets["detector_3_over_1_per_label"] > 0
    assert "| per_label | 750x1333 | 3 |" in done.stdout
    assert "| joined | 90x160 | 3 |" in report["table_markdown"]
    assert report["load_average_before"] and report["load_average_after"]
