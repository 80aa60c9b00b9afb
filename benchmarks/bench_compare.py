"""Click latency of this tree against another revision, measured in one run.

    .venv/bin/python benchmarks/bench_compare.py --base e4fb749 [--clicks 60] [--out FILE]

A change that touches the request path (limits, checks, auth) must not make a click slower. A
before/after measured in two separate runs on a shared 2-core machine says little (load changes
between them), so this benchmark runs both at once: the base revision is checked out into a
temporary git worktree, and both trees are started as ``sam-backend serve`` with the same
random-weight MobileSAM checkpoint, the same options and the same 1920x1080 JPEG (through
``/data/local-files/``). After one warm-up click each (the image encode), the same embedded
single-point clicks go to both servers in turn, alternating which one goes first in each round,
so load drifts hit both alike. Prints a table and writes JSON (medians, p95, the ratio).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_http import (DEFAULT_CACHE_DIR, ROOT, BackendProcess, Client, Images,  # noqa: E402
                        ensure_checkpoints, free_port, loadavg, machine_info, summarise)


class TreeBackend(BackendProcess):
    """``sam-backend serve`` run from ``tree`` (its own code: ``-m`` puts the working directory
    first on the import path)."""

    def __init__(self, tree: Path, checkpoint: Path, runtime: str, doc_root: Path, log_path: Path):
        port = free_port()
        cmd = [sys.executable, "-m", "sam_backend.cli", "serve", "--host", "127.0.0.1", "-p",
               str(port), "--with", f"sam_checkpoint_file={checkpoint}", "device=cpu",
               f"runtime={runtime}"]
        self.image_cache = Path(tempfile.mkdtemp(prefix="sam-compare-imgcache-"))
        env = {"LOCAL_FILES_DOCUMENT_ROOT": str(doc_root), "PYTHONPATH": str(tree),
               "SAM_BACKEND_IMAGE_CACHE_DIR": str(self.image_cache), "SAM_BACKEND_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1"}
        super().__init__(cmd, port, env, log_path)
        self.cwd = tree
        self.cleanup.append(self.image_cache)


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--clicks", type=int, default=60, help="embedded clicks per server")
    parser.add_argument("--runtime", default="auto", help="runtime of both servers")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/compare.json")
    args = parser.parse_args(argv)

    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    (key, checkpoint), = ensure_checkpoints(["mobile_sam"], args.cache_dir / "weights").values()
    images = Images(args.cache_dir / "images")
    image = images.get("compare", 1920, 1080)
    work = Path(tempfile.mkdtemp(prefix="sam-compare-"))
    base_tree = work / "base"
    subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), base_rev], cwd=ROOT,
                   check=True, capture_output=True)
    backends: Dict[str, TreeBackend] = {}
    started_load = loadavg()
    try:
        for name, tree in (("base", base_tree), ("head", ROOT)):
            backends[name] = TreeBackend(tree, checkpoint, args.runtime, images.root,
                                         work / f"{name}.log").start(timeout=600)
        clients = {name: Client(b.url, b.log_path) for name, b in backends.items()}
        rng = np.random.default_rng(0)
        for client in clients.values():  # the encode, then one click to warm the decoder
            client.click(image, [(50.0, 50.0, True)])
            client.click(image, [(40.0, 60.0, True)])
        samples: Dict[str, list] = {name: [] for name in clients}
        order = list(clients)
        for i in range(args.clicks):
            x, y = (float(v) for v in rng.uniform(8, 92, size=2))
            for name in (order if i % 2 == 0 else order[::-1]):
                samples[name].append(clients[name].click(image, [(x, y, True)]))
        results = {name: summarise(s) for name, s in samples.items()}
    finally:
        for backend in backends.values():
            backend.stop()
        subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT,
                       capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    ratio = results["head"]["median_ms"] / results["base"]["median_ms"]
    report: Dict[str, Any] = {
        "benchmark": "bench_compare", "variant": key, "runtime": args.runtime,
        "image": f"{image.width}x{image.height}", "clicks": args.clicks,
        "base": base_rev, "head": head_rev, "machine": machine_info(),
        "load_average_start": started_load, "load_average_end": loadavg(),
        "results": results, "head_over_base_median": ratio,
    }
    print(f"| tree | revision | embedded click median | p95 | server median |")
    print(f"|---|---|---:|---:|---:|")
    for name, rev in (("base", base_rev), ("head", head_rev)):
        r = results[name]
        cells = [r["median_ms"], r["p95_ms"], r["server_median_ms"]]  # p95: 10 clicks and up
        print(f"| {name} | {rev} | "
              + " | ".join("-" if v is None else f"{v:.1f} ms" for v in cells) + " |")
    print(f"\nhead / base (medians): {ratio:.3f}; load average {started_load} -> {loadavg()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
