"""A team of annotators against one replica vs. two replicas + one precompute worker (Redis store).

Usage:
    python benchmarks/bench_team.py [--annotators 8] [--tasks 4] [--seed 0]
                                    [--store-variants mobile_sam,sam_hq/vit_tiny] [--store-runtimes torch,onnx]
                                    [--out benchmarks/results/team.json]

Everything runs on this machine on loopback, started the production way (``sam-backend serve``,
``sam-backend worker``, ``sam-backend precompute``, Debian's ``redis-server``), MobileSAM with
seeded random weights and every option at its default (``runtime=auto``: onnx on CPU; float16
embeddings; precompute on task open). Each annotator owns ``--tasks`` tasks, each a distinct
1920x1080 JPEG (``/data/local-files/?d=...``); per task it opens it (``/predict`` without a
prompt, as Label Studio does), looks for 1-3 s, then clicks 1-3 times (each click re-sends the
object's points, as Label Studio does) with 0.3-1 s between clicks.

Scenarios:

1. ``1 replica``: one backend, no store: the task-open precompute encodes in the process.
2. ``2 replicas + 1 worker``: Redis, one worker, two replicas with ``embedding_store``; first
   ``sam-backend precompute --project`` queues every task's image (through a loopback stand-in of
   Label Studio's API) and the worker encodes them (``precompute images/minute per worker``:
   finished jobs over first job start to last job end, RQ's timestamps); then the annotators work, every request going to the
   next replica in turn (a round-robin load balancer, no sticky sessions).

Per scenario: p50/p95 of click latency (client wall time of ``POST /predict``) for first clicks
on a task and for later clicks (embedded), and the share of first clicks that waited for an
encoder (the replicas' ``/metrics`` ``click_embeddings_waited`` over the first clicks: a click
whose embedding was neither in memory nor already in the store). Then the Redis bytes per image
(``MEMORY USAGE`` of one stored float16 entry of a 1080p image) for each of ``--store-variants``
and ``--store-runtimes``, computed in this process.

Prints a Markdown table, writes JSON (machine, versions, all samples) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import bench_http  # noqa: E402  (machine facts, processes, images, payloads)
from tests.support.redis_utils import RedisServer  # noqa: E402
from tests.support.team_utils import API_TOKEN, FakeLabelStudioAPI, WorkerProcess  # noqa: E402

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="KeyPointLabels" toName="image" smart="true">
    <Label value="object" smart="true"/>
  </KeyPointLabels>
  <BrushLabels name="BrushLabels" toName="image"><Label value="object"/></BrushLabels>
</View>"""


def percentile(values: List[float], q: float):
    return round(float(np.percentile(values, q)), 1) if values else None


class Balancer:
    """Round-robin over replica URLs (thread-safe)."""

    def __init__(self, urls: List[str]):
        self.urls, self.i, self.lock = urls, 0, threading.Lock()

    def next(self) -> str:
        with self.lock:
            self.i += 1
            return self.urls[self.i % len(self.urls)]


def annotator(index: int, tasks: List[bench_http.Image], balancer: Balancer, seed: int,
              samples: List[Dict[str, Any]], errors: List[str]) -> None:
    rng = random.Random(seed * 1000 + index)
    session = requests.Session()
    for image in tasks:
        try:
            session.post(balancer.next() + "/predict",
                         json=bench_http.payload(image, None, CONFIG), timeout=300)
            time.sleep(rng.uniform(1.0, 3.0))
            points: List = []
            for n in range(rng.randint(1, 3)):
                points.append((rng.uniform(10, 90), rng.uniform(10, 90), n != 1))
                started = time.perf_counter()
                r = session.post(balancer.next() + "/predict",
                                 json=bench_http.payload(image, points, CONFIG), timeout=300)
                ms = (time.perf_counter() - started) * 1000
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                samples.append({"annotator": index, "task": image.url, "first": n == 0,
                                "ms": round(ms, 1)})
                time.sleep(rng.uniform(0.3, 1.0))
        except requests.RequestException as exc:
            errors.append(str(exc))


def run_annotators(tasks: Dict[int, List[bench_http.Image]], urls: List[str],
                   seed: int) -> Dict[str, Any]:
    before = [requests.get(u + "/metrics", timeout=10).json() for u in urls]
    samples: List[Dict[str, Any]] = []
    errors: List[str] = []
    balancer = Balancer(urls)
    threads = [threading.Thread(target=annotator, args=(i, t, balancer, seed, samples, errors))
               for i, t in tasks.items()]
    load_before = bench_http.loadavg()
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = [requests.get(u + "/metrics", timeout=10).json() for u in urls]

    def delta(name):
        return sum(int(a.get(name) or 0) - int(b.get(name) or 0) for a, b in zip(after, before))

    first = [s["ms"] for s in samples if s["first"]]
    later = [s["ms"] for s in samples if not s["first"]]
    waited = delta("click_embeddings_waited")
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "first_clicks": len(first), "later_clicks": len(later), "errors": errors,
        "first_click_p50_ms": percentile(first, 50), "first_click_p95_ms": percentile(first, 95),
        "embedded_click_p50_ms": percentile(later, 50),
        "embedded_click_p95_ms": percentile(later, 95),
        "first_clicks_waited_for_encoder": waited,
        "share_first_clicks_waited": round(waited / len(first), 3) if first else None,
        "encodes_on_replicas": delta("encodes"), "store_hits": delta("store_hits"),
        "load_before": load_before, "load_after": bench_http.loadavg(), "samples": samples,
    }


def start_replica(options: List[str], docroot: Path, log: Path) -> bench_http.BackendProcess:
    port = bench_http.free_port()
    process = bench_http.BackendProcess(
        [sys.executable, "-m", "sam_backend.cli", "serve", "--host", "127.0.0.1", "--port",
         str(port), "--threads", "8", "--with", *options], port,
        {"LOCAL_FILES_DOCUMENT_ROOT": str(docroot), "PYTHONPATH": str(ROOT)}, log)
    return process.start(timeout=600)


def worker_throughput(client) -> Dict[str, Any]:
    """Images per minute of the worker: finished jobs over first start to last end (RQ's own
    timestamps), so the precompute command's start-up is not counted."""
    from rq import Queue
    from rq.job import Job
    from rq.serializers import JSONSerializer

    queue = next(q for q in Queue.all(connection=client, serializer=JSONSerializer)
                 if q.name.startswith("sam_backend:encode:"))
    ids = queue.finished_job_registry.get_job_ids()
    jobs = [Job.fetch(i, connection=client, serializer=JSONSerializer) for i in ids]
    seconds = (max(j.ended_at for j in jobs) - min(j.started_at for j in jobs)).total_seconds()
    encode_s = [float(j.return_value()["seconds"]) for j in jobs]
    return {"jobs": len(jobs), "seconds": round(seconds, 1),
            "job_median_s": round(float(np.median(encode_s)), 2),
            "images_per_minute_per_worker": round(len(jobs) / seconds * 60, 1)}


def store_bytes(variants: List[str], runtimes: List[str], weights_dir: Path,
                redis_url: str) -> List[Dict[str, Any]]:
    """Bytes of one stored float16 entry per variant and runtime, as Redis accounts them."""
    import redis

    from sam_backend.models.runtimes import create_model
    from sam_backend.embeddings.store import encode_embedding
    from sam_backend.models.registry import get_variant

    client = redis.Redis.from_url(redis_url)
    image = bench_http.draw_image(1920, 1080, 7)[:, :, ::-1].copy()
    rows = []
    for name, (key, path) in bench_http.ensure_checkpoints(variants, weights_dir).items():
        for runtime in runtimes:
            model = create_model(get_variant(*key.split("/")), path, "cpu", runtime)
            embedding = model.embed(image).to_float16()
            name = f"bench:{key}:{model.runtime}"
            data = encode_embedding(embedding, name)
            client.set(name, data)
            rows.append({"variant": key, "runtime": model.runtime,
                         "arrays": len(embedding.arrays()), "entry_bytes": len(data),
                         "redis_memory_usage_bytes": int(client.memory_usage(name))})
            del model
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotators", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=4, help="tasks per annotator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store-variants", default="mobile_sam,sam_hq/vit_tiny")
    parser.add_argument("--store-runtimes", default="torch,onnx")
    parser.add_argument("--cache-dir", type=Path, default=bench_http.DEFAULT_CACHE_DIR)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "team.json")
    args = parser.parse_args(argv)

    work = args.cache_dir / "team"
    logs = work / "logs" / time.strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    docroot = args.cache_dir / "docroot"
    images = bench_http.Images(docroot)
    (_, checkpoint), = bench_http.ensure_checkpoints(["mobile_sam"], args.cache_dir / "weights").values()
    run_tag = f"s{args.seed}-{int(time.time())}"  # fresh images: nothing embedded beforehand
    tasks = {i: [images.get(f"team-{run_tag}-a{i}-t{j}", 1920, 1080) for j in range(args.tasks)]
             for i in range(args.annotators)}
    base = ["model_name=mobile_sam", f"sam_checkpoint_file={checkpoint}", "device=cpu"]
    report: Dict[str, Any] = {"machine": bench_http.machine_info(),
                              "versions": bench_http.versions(), "args": vars(args) | {
                                  "cache_dir": str(args.cache_dir), "out": str(args.out)},
                              "scenarios": {}}

    # 1. one replica, no store
    bench_http.progress("1 replica")
    replica = start_replica(base, docroot, logs / "single.log")
    try:
        report["scenarios"]["1 replica"] = run_annotators(
            {i: t[:] for i, t in tasks.items()}, [replica.url], args.seed)
    finally:
        replica.stop()

    # 2. Redis + 1 worker + 2 replicas, after `precompute --project`
    bench_http.progress("2 replicas + 1 worker")
    tasks2 = {i: [images.get(f"team-{run_tag}-b{i}-t{j}", 1920, 1080) for j in range(args.tasks)]
              for i in range(args.annotators)}
    server = RedisServer(logs).start()
    options = base + [f"embedding_store={server.url}"]
    env = {"LOCAL_FILES_DOCUMENT_ROOT": str(docroot), "PYTHONPATH": str(ROOT)}
    started: List[Any] = []
    try:
        started.append(start_replica(options, docroot, logs / "replica0.log"))  # exports onnx once
        started.append(WorkerProcess(options, env, logs / "worker.log", server.client()).start())
        started.append(start_replica(options, docroot, logs / "replica1.log"))
        project = [{"id": n + 1, "data": {"image": image.url}}
                   for n, image in enumerate(i for t in tasks2.values() for i in t)]
        api = FakeLabelStudioAPI(CONFIG, project)
        t0 = time.perf_counter()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "sam_backend.cli", "precompute", "--project", "1",
                 "--no-progress", "--with", *options], cwd=ROOT, capture_output=True, text=True,
                env=dict(os.environ, **env, LABEL_STUDIO_URL=api.url,
                         LABEL_STUDIO_API_KEY=API_TOKEN))
        finally:
            api.stop()
        if done.returncode != 0:
            raise SystemExit(f"precompute failed:\n{done.stderr[-3000:]}")
        client = server.client()
        while sum(1 for k in client.scan_iter("sam_backend:emb:*") if not k.endswith(b":lock")) \
                < len(project):
            time.sleep(0.2)
        report["precompute"] = {"images": len(project), "workers": 1,
                                "command_to_last_entry_s": round(time.perf_counter() - t0, 1),
                                **worker_throughput(client),
                                "summary": json.loads(done.stdout.strip().splitlines()[-1])}
        report["scenarios"]["2 replicas + 1 worker"] = run_annotators(
            tasks2, [p.url for p in started if hasattr(p, "url")], args.seed)
        bench_http.progress("store bytes per variant")
        report["store_bytes"] = store_bytes(args.store_variants.split(","),
                                            args.store_runtimes.split(","),
                                            args.cache_dir / "weights", server.url)
    finally:
        for process in started:
            process.stop()
        server.stop()
        for path in (docroot / images.sub).glob(f"team-{run_tag}-*"):  # this run's images
            path.unlink()

    table = markdown(report)
    report["table_markdown"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(table)
    return 0


def markdown(report: Dict[str, Any]) -> str:
    lines = ["| scenario | first click p50 / p95 | embedded click p50 / p95 | first p95 / embedded "
             "p95 | first clicks that waited for an encoder | encodes on replicas |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, s in report["scenarios"].items():
        ratio = (s["first_click_p95_ms"] / s["embedded_click_p95_ms"]
                 if s["first_click_p95_ms"] and s["embedded_click_p95_ms"] else None)
        lines.append(f"| {name} | {s['first_click_p50_ms']:.0f} / {s['first_click_p95_ms']:.0f} ms "
                     f"| {s['embedded_click_p50_ms']:.0f} / {s['embedded_click_p95_ms']:.0f} ms | "
                     f"{ratio:.2f}× | {s['first_clicks_waited_for_encoder']}/{s['first_clicks']} "
                     f"({100 * s['share_first_clicks_waited']:.0f} %) | {s['encodes_on_replicas']} |")
    p = report.get("precompute")
    if p:
        lines += ["", f"Precompute: {p['jobs']} images encoded in {p['seconds']} s (first job start "
                      f"to last job end) by {p['workers']} worker, median job {p['job_median_s']} s"
                      f" = **{p['images_per_minute_per_worker']} images/minute per worker**."]
    if report.get("store_bytes"):
        lines += ["", "| variant | runtime | arrays | entry bytes | Redis MEMORY USAGE |",
                  "|---|---|---:|---:|---:|"]
        for r in report["store_bytes"]:
            lines.append(f"| {r['variant']} | {r['runtime']} | {r['arrays']} | {r['entry_bytes']:,} "
                         f"| {r['redis_memory_usage_bytes']:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
