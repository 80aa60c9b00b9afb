"""What learning from the labels costs on this machine: training throughput of both trainers,
inference of a trained model against the zero-shot engines, and clicks while a run trains.

Usage:
    python benchmarks/bench_training.py [--trainers rf_detr,grounding_dino] [--images 8]
        [--epochs 2] [--batch-size 4] [--image-size 0] [--runs 3] [--clicks 15]
        [--skip-train] [--skip-inference] [--skip-clicks] [--tiny]
        [--out benchmarks/results/training.json]

Everything at full size unless ``--tiny``: each trainer's default configuration (RF-DETR
segmentation's default ``RfDetrConfig``; Grounding DINO with the architecture of
``grounding-dino-tiny``, Swin-T + BERT-base) from seeded random weights written once into
``~/.cache/sam_backend/bench-training/`` as a hub-format starting directory (``TrainOptions.start``:
the same path a downloaded pretrained model takes; the hubs are unreachable here). Images are the
synthetic shapes project (``tests/support/shapes.py``) drawn at 1920x1080.

1. **Training**: ``--epochs`` epochs over ``--images`` images at the trainer's default training
   size (``--image-size``), batch ``--batch-size``, through the trainer's own ``train()``; images
   per second and seconds per epoch from the last epoch (the first one carries warm-up), and the
   seconds an epoch of a 100-image project would take at that rate. Model build + save are
   reported apart.
2. **Inference per 1080p image**: the model the training phase wrote, loaded as the server loads
   a version (``Trainer.load``), ``Detector.predict`` on a 1080p image (median of ``--runs``,
   after one warm-up); against the zero-shot concept engine a project has before it is trained
   (Grounding DINO + MobileSAM masks on the default runtime, random weights; ``--zero-shot
   grounding_dino,sam3`` adds SAM 3, ~5 GB): the image encode plus one concept pass for the two
   labels. The number of instances is reported: random and barely trained weights find an
   arbitrary number, and every instance costs a mask.
3. **Clicks while a run trains**: ``sam-backend serve`` (MobileSAM, default runtime, random
   weights) with a training project served by a loopback stand-in of Label Studio's API; embedded
   1080p clicks idle, then *Start Training* (``POST /webhook``, as Label Studio 1.23.2 sends it)
   and the same clicks while the server's background training process runs the first trainer at
   full size; the ratio of the medians. The run is stopped with the server.

Prints a Markdown table and writes JSON (machine, versions, load average before/after, CPU used
by other processes, every sample) to ``--out``. ``--tiny`` runs the reduced configurations on
small images with a few samples: a smoke run for CI (tests/benchmarks/test_bench_training.py),
its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import bench_http  # noqa: E402  (machine facts, the server process, click payloads)

CACHE = Path(os.environ.get("SAM_BACKEND_BENCH_TRAINING_DIR",
                            Path.home() / ".cache" / "sam_backend" / "bench-training"))
FULL_W, FULL_H = 1920, 1080
TINY_W, TINY_H = 160, 120
PROJECT_IMAGES = 100  # the project size seconds per epoch are projected to


def progress(message: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {message}", flush=True)


# -- starting points -------------------------------------------------------------------------
def full_start(kind: str) -> Path:
    """A hub-format directory of the trainer's default (full-size) architecture with seeded
    random weights, written once (atomically) into the cache."""
    directory = CACHE / f"{kind}-full-random-seed0"
    if (directory / "config.json").is_file():
        return directory
    progress(f"writing a full-size random {kind} starting point to {directory}")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=CACHE))  # renamed when complete
    if kind == "rf_detr":
        import torch
        from transformers import (RfDetrConfig, RfDetrForInstanceSegmentation,
                                  RfDetrImageProcessor)

        torch.manual_seed(0)
        RfDetrForInstanceSegmentation(RfDetrConfig()).save_pretrained(tmp)
        RfDetrImageProcessor().save_pretrained(tmp)
    elif kind == "grounding_dino":
        full_grounding_dino(tmp)
    else:
        raise SystemExit(f"unknown trainer {kind!r}")
    os.replace(tmp, directory)
    return directory


def full_grounding_dino(directory: Path) -> None:
    """The ``grounding-dino-tiny`` architecture (Swin-T, BERT-base text encoder, 6+6 layers,
    900 queries) with seeded random weights and a word-level tokenizer laid out like BERT's
    where Grounding DINO finds its delimiters (the trainer's :func:`reduced_vocabulary`: the
    token-aware loss splits phrases at the ids of ``.``); its vocabulary of ~1030 words instead
    of BERT's 30522 makes the embedding table smaller, not a step slower."""
    import torch
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig,
                              GroundingDinoForObjectDetection, GroundingDinoImageProcessor,
                              GroundingDinoProcessor, SwinConfig)

    from sam_backend.models.random_init import seeded_random_model
    from sam_backend.training.grounding_dino import reduced_vocabulary

    vocab = reduced_vocabulary(["circle", "square"])
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(directory / "vocab.txt"), do_lower_case=True)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                                   window_size=7, out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(vocab)))
    with torch.no_grad():
        model = seeded_random_model(lambda: GroundingDinoForObjectDetection(config).eval(), 0)
    model.save_pretrained(str(directory))
    GroundingDinoProcessor(GroundingDinoImageProcessor(), tokenizer).save_pretrained(
        str(directory))


# -- the training set --------------------------------------------------------------------------
def training_samples(folder: Path, n: int, width: int, height: int):
    """(ImageSample list, classes, phrases) of a shapes project of ``n`` images."""
    from sam_backend.training.base import ImageSample
    from sam_backend.training.dataset import build_dataset
    from tests.support.shapes import SHAPES_CONFIG, shapes_project

    tasks = shapes_project(folder, n, seed=11, width=width, height=height)
    dataset = build_dataset(tasks, SHAPES_CONFIG, min_tasks=1)
    paths = {t["id"]: Path(t["data"]["image"]) for t in tasks}
    samples = [ImageSample(s, paths[s.task_id]) for s in dataset.samples]
    return samples, list(dataset.classes), list(dataset.classes)


def train_phase(kind: str, samples, classes, phrases, args, work: Path) -> Dict[str, Any]:
    from sam_backend.training.base import TrainOptions, trainer_for

    options = TrainOptions(epochs=args.epochs, batch_size=args.batch_size,
                           image_size=args.image_size, seed=0, device="cpu",
                           reduced=args.tiny, start=None if args.tiny else full_start(kind))
    trainer = trainer_for(kind, options)
    out = work / f"{kind}-model"
    epochs: List[Dict[str, Any]] = []
    progress(f"{kind}: {args.epochs} epoch(s) over {len(samples)} images, batch "
             f"{args.batch_size}")
    started = time.perf_counter()
    logs = trainer.train(samples, classes, phrases, out,
                         on_epoch=lambda log: (epochs.append(log.as_dict()),
                                               progress(f"{kind}: epoch {log.epoch}/{log.epochs} "
                                                        f"{log.seconds:.1f} s, loss "
                                                        f"{log.loss:.3f}")))
    total = time.perf_counter() - started
    last = logs[-1]
    ips = last.images / last.seconds if last.seconds > 0 else None
    return {"kind": kind, "images": len(samples), "batch_size": args.batch_size,
            "image_size": args.image_size or "default", "epochs": epochs,
            "seconds_per_epoch": last.seconds, "images_per_second": ips,
            "projected_seconds_per_epoch_100_images": PROJECT_IMAGES / ips if ips else None,
            "build_and_save_seconds": total - sum(e["seconds"] for e in epochs),
            "model_dir": str(out), "reduced": args.tiny}


# -- inference ---------------------------------------------------------------------------------
def trained_inference(kind: str, model_dir: Path, image: np.ndarray, runs: int) -> Dict[str, Any]:
    from sam_backend.training.base import TrainOptions, trainer_for

    started = time.perf_counter()
    detector = trainer_for(kind, TrainOptions()).load(model_dir, "cpu")
    load_s = time.perf_counter() - started
    detector.predict(image)  # warm-up
    times, found = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        prediction = detector.predict(image)
        times.append((time.perf_counter() - started) * 1e3)
        found = len(prediction.scores)
    return {"engine": f"trained {kind}", "load_s": load_s, "median_ms": statistics.median(times),
            "samples_ms": times, "instances": found,
            "masks": "own" if detector.segments else "boxes only (masks by the click model)"}


def zero_shot_inference(engine: str, image_path: Path, runs: int, tiny: bool,
                        work: Path) -> Dict[str, Any]:
    """The zero-shot concept engine on an image it has not seen: encode + one pass, the two
    labels of the shapes project."""
    from sam_backend.assembly import prediction_service
    from sam_backend.images.config import ImageAccessSettings
    from sam_backend.images.loader import ImageLoader
    from sam_backend.settings import Settings
    from tests.support.random_weights import cached_random_checkpoint

    # a smoke run keeps random weights from finding dozens of instances (each one a mask)
    options = {"device": "cpu", **({"max_instances": "2"} if tiny else {})}
    if engine == "grounding_dino":
        from tests.support.random_weights import make_random_grounding_dino

        size = "tiny" if tiny else "full"
        directory = CACHE / f"grounding-dino-{size}-zero-shot-seed0"
        if not (directory / "config.json").is_file():
            make_random_grounding_dino(directory, size, seed=0)
        options.update(model_name="mobile_sam",
                       sam_checkpoint_file=str(cached_random_checkpoint("mobile_sam")),
                       concept_model="grounding_dino", concept_checkpoint=str(directory))
    elif engine == "sam3":
        import bench_concepts

        options.update(bench_concepts.engine_options("sam3"))
    else:
        raise SystemExit(f"unknown zero-shot engine {engine!r}")
    settings = Settings.load(options, environ={})
    images = ImageLoader(ImageAccessSettings.from_settings(
        settings, cache_dir=str(work / "zero-shot-cache"),
        local_files_document_root=str(image_path.parent)))
    service = prediction_service(settings, images=images)
    engine_obj = service.concept_annotator().engine
    pixels = images.load(str(image_path), 1)
    times, found = [], 0
    for run in range(runs + 1):  # the first is a warm-up
        key = f"bench-zero-shot-{run}"  # a new key each time: the encode is part of the cost
        started = time.perf_counter()
        results = engine_obj.detect(key, lambda: pixels, ["circle", "square"],
                                    settings.concept_threshold, service.concepts.selection)
        if run:
            times.append((time.perf_counter() - started) * 1e3)
            found = sum(len(r) for r in results)
    return {"engine": f"zero-shot {engine} + {settings.model_name} masks",
            "median_ms": statistics.median(times), "samples_ms": times, "instances": found,
            "masks": "click model"}


# -- clicks while training ---------------------------------------------------------------------
def clicks_phase(kind: str, args, work: Path) -> Dict[str, Any]:
    """Embedded 1080p clicks on a server idle, then while its background run trains."""
    from tests.support.shapes import SHAPES_CONFIG, shapes_project
    from tests.support.team_utils import API_TOKEN, FakeLabelStudioAPI

    doc_root = work / "docroot"
    width, height = (TINY_W, TINY_H) if args.tiny else (FULL_W, FULL_H)
    tasks = shapes_project(doc_root / "train", max(12, args.images), seed=3, width=width,
                           height=height,
                           url_for=lambda p: f"/data/local-files/?d=train/{p.name}")
    api = FakeLabelStudioAPI(SHAPES_CONFIG, tasks, project=1)
    os.environ.update(LABEL_STUDIO_URL=api.url, LABEL_STUDIO_API_KEY=API_TOKEN)
    checkpoint = bench_http.ensure_checkpoints(["mobile_sam"], bench_http.DEFAULT_CACHE_DIR /
                                               "weights")["mobile_sam"][1]
    start = ["train_random_init=true"] if args.tiny else [f"train_start={full_start(kind)}"]
    extra = [f"trainer={kind}", f"trained_dir={work / 'trained'}", "train_epochs=1000",
             f"train_batch_size={args.batch_size}", f"train_image_size={args.image_size}",
             *start]
    log_path = work / "server.log"
    server, _ = bench_http.start_backend(checkpoint, "auto", doc_root, log_path, timeout=300,
                                         extra=extra)
    images = bench_http.Images(doc_root)
    emb = images.get("clicks", FULL_W, FULL_H)
    client = bench_http.Client(server.url, log_path)
    rng = np.random.default_rng(0)
    try:
        client.click(emb, [(50.0, 50.0, True)])  # encodes the image
        progress(f"clicks: {args.clicks} idle")
        idle = [client.click(emb, [(x, y, True)])
                for x, y in bench_http.points_for(rng, args.clicks)]
        answer = requests.post(server.url + "/webhook", timeout=60,
                               json={"action": "START_TRAINING", "project": {"id": 1}}).json()
        status_url = f"{server.url}/train/status"
        deadline = time.monotonic() + 600
        while requests.get(status_url, params={"project": 1}, timeout=30).json()["state"] \
                != "running":
            if time.monotonic() > deadline:
                raise RuntimeError("the run did not start")
            time.sleep(0.5)
        time.sleep(args.warm_up)  # past the model build: the run is training
        now = requests.get(status_url, params={"project": 1}, timeout=30).json()
        if now["state"] != "running":
            raise RuntimeError(f"the run is not running: {now}")
        progress(f"clicks: {args.clicks} while {kind} trains")
        pids = [server.process.pid] + bench_http.child_pids(server.process.pid)
        share = bench_http.CpuShare(pids)
        busy, states = [], []
        for x, y in bench_http.points_for(rng, args.clicks):
            busy.append(client.click(emb, [(x, y, True)]))
            states.append(requests.get(status_url, params={"project": 1}, timeout=30)
                          .json()["state"])
        cpu = share.result()
    finally:
        server.stop()
        api.stop()
    idle_ms = statistics.median(s.ms for s in idle)
    busy_ms = statistics.median(s.ms for s in busy)
    return {"trainer": kind, "webhook_answer": answer, "idle": bench_http.summarise(idle),
            "while_training": bench_http.summarise(busy), "ratio": busy_ms / idle_ms,
            "states_during_clicks": states, "cpu_while_training": cpu}


# -- report ------------------------------------------------------------------------------------
def fmt(value: Optional[float], unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def markdown(report: Dict[str, Any]) -> str:
    lines = []
    if report.get("training"):
        lines += ["| trainer | images | batch | s/epoch | images/s | s/epoch, 100 images | "
                  "build + save |", "|---|---:|---:|---:|---:|---:|---:|"]
        for row in report["training"]:
            lines.append(f"| {row['kind']}{' (tiny)' if row['reduced'] else ''} | "
                         f"{row['images']} | {row['batch_size']} | "
                         f"{fmt(row['seconds_per_epoch'], ' s')} | "
                         f"{fmt(row['images_per_second'], '', 2)} | "
                         f"{fmt(row['projected_seconds_per_epoch_100_images'], ' s', 0)} | "
                         f"{fmt(row['build_and_save_seconds'], ' s')} |")
        lines.append("")
    if report.get("inference"):
        size = report.get("inference_image", "1920x1080")
        lines += [f"| auto-annotation of one {size} image | median | instances | masks |",
                  "|---|---:|---:|---|"]
        for row in report["inference"]:
            lines.append(f"| {row['engine']} | {fmt(row['median_ms'], ' ms', 0)} | "
                         f"{row['instances']} | {row['masks']} |")
        lines.append("")
    if report.get("clicks"):
        c = report["clicks"]
        lines += ["| embedded 1080p click | idle | while training | ratio |",
                  "|---|---:|---:|---:|",
                  f"| {c['trainer']} training beside it | {fmt(c['idle']['median_ms'], ' ms', 0)} "
                  f"| {fmt(c['while_training']['median_ms'], ' ms', 0)} | "
                  f"{fmt(c['ratio'], 'x', 2)} |", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", default="rf_detr,grounding_dino")
    parser.add_argument("--images", type=int, default=8, help="images per training epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=0, help="0: the trainer's default")
    parser.add_argument("--runs", type=int, default=3, help="inference runs per engine")
    parser.add_argument("--zero-shot", default="grounding_dino",
                        help="zero-shot engines to compare (grounding_dino, sam3)")
    parser.add_argument("--clicks", type=int, default=15)
    parser.add_argument("--warm-up", type=float, default=None,
                        help="seconds between Start Training and the clicks (default 60, tiny 5)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--skip-clicks", action="store_true")
    parser.add_argument("--tiny", action="store_true",
                        help="reduced configurations, small images, few samples (smoke run)")
    parser.add_argument("--out", default=str(HERE / "results" / "training.json"))
    args = parser.parse_args(argv)
    trainers = [t for t in args.trainers.split(",") if t]
    if args.warm_up is None:
        args.warm_up = 5.0 if args.tiny else 60.0
    work = Path(tempfile.mkdtemp(prefix="bench-training-"))
    width, height = (TINY_W, TINY_H) if args.tiny else (FULL_W, FULL_H)
    report: Dict[str, Any] = {"machine": bench_http.machine_info(),
                              "versions": bench_http.versions(),
                              "date": time.strftime("%Y-%m-%d %H:%M"),
                              "loadavg_before": bench_http.loadavg(),
                              "args": vars(args), "training": [], "inference": []}
    share = bench_http.CpuShare([])
    samples, classes, phrases = training_samples(work / "project", args.images, width, height)
    models: Dict[str, Path] = {}
    if not args.skip_train or not args.skip_inference:
        for kind in trainers:
            row = train_phase(kind, samples, classes, phrases, args, work)
            models[kind] = Path(row["model_dir"])
            if not args.skip_train:
                report["training"].append(row)
    if not args.skip_inference:
        import cv2

        from tests.support.shapes import shapes_image

        picture, _ = shapes_image(77, width, height)
        report["inference_image"] = f"{width}x{height}"
        image_path = work / "inference.png"
        cv2.imwrite(str(image_path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        for kind in trainers:
            progress(f"inference: trained {kind}")
            report["inference"].append(trained_inference(kind, models[kind], picture, args.runs))
        for engine in [e for e in args.zero_shot.split(",") if e]:
            progress(f"inference: zero-shot {engine}")
            report["inference"].append(zero_shot_inference(engine, image_path, args.runs,
                                                            args.tiny, work))
    if not args.skip_clicks:
        report["clicks"] = clicks_phase(trainers[0], args, work)
    report["cpu"] = share.result()
    report["loadavg_after"] = bench_http.loadavg()
    report["table_markdown"] = markdown(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(report["table_markdown"])
    print(f"load average {report['loadavg_before']} before, {report['loadavg_after']} after; "
          f"other processes used {report['cpu'].get('other_processes_cores')} cores; "
          f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
