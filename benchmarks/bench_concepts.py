"""Time label by concept, per engine: a concept pass for 3 labels on an embedded 1080p image, and
a whole project of 20 images through ``sam-backend annotate`` against a real Label Studio.

Usage: python benchmarks/bench_concepts.py [--engines grounding_dino sam3] [--runs 3]
           [--project-images 20] [--no-project] [--out benchmarks/results/concepts.json]

Random weights of the real architectures at full size (Grounding DINO: the architecture of
``grounding-dino-tiny``, Swin-T + BERT-base, with a small word-level tokenizer; masks by MobileSAM
on the default runtime), seeded and made on first use into the tests' weight cache. With random
weights the number of instances above the threshold is arbitrary: it is reported with each row,
because every instance costs one mask decode and its regions. Medians of one run on this machine.
The project row starts Label Studio 1.23.2 (tests/e2e/ls_harness.py), imports the images, runs
``annotate`` in this process (model loading excluded) and checks that every task got a prediction.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import cv2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sam_backend.concepts.base import concepts_of  # noqa: E402
from sam_backend.images.config import ImageAccessSettings  # noqa: E402
from sam_backend.images.loader import ImageLoader  # noqa: E402
from sam_backend.labelstudio.label_config import parse_label_config  # noqa: E402
from tests.support.random_weights import CACHE_DIR, cached_random_checkpoint, synthetic_image  # noqa: E402
from sam_backend.assembly import prediction_service  # noqa: E402
from sam_backend.labelstudio.service import PredictionService  # noqa: E402
from sam_backend.settings import Settings  # noqa: E402

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="car" hint="red car"/><Label value="person"/><Label value="tree"/></BrushLabels>
  <RectangleLabels name="boxes" toName="image"><Label value="car"/><Label value="person"/><Label value="tree"/></RectangleLabels>
</View>"""


def engine_options(engine: str) -> Dict[str, str]:
    if engine == "grounding_dino":
        from tests.support.random_weights import make_random_grounding_dino

        directory = CACHE_DIR / "grounding-dino-full-v2-seed0"
        if not (directory / "config.json").is_file():
            make_random_grounding_dino(directory, "full", seed=0)
        return {"model_name": "mobile_sam",
                "sam_checkpoint_file": str(cached_random_checkpoint("mobile_sam")),
                "concept_model": "grounding_dino", "concept_checkpoint": str(directory)}
    if engine == "sam3":
        from tests.support.random_weights import cached_random_sam3
        from tests.support.random_weights import write_test_tokenizer

        source = cached_random_sam3(reduced=False)  # 3.4 GB, built once (~5 GB of memory)
        directory = CACHE_DIR / "sam3-full-with-tokenizer"
        if not (directory / "tokenizer.json").is_file():
            directory.mkdir(parents=True, exist_ok=True)
            for item in source.iterdir():  # the weights are linked, not copied
                if not (directory / item.name).exists():
                    (directory / item.name).symlink_to(item)
            write_test_tokenizer(directory)
        return {"model_name": "sam3", "sam_checkpoint_file": str(directory),
                "concept_model": "sam3"}
    raise SystemExit(f"engine {engine!r} is not available in this version")


def make_service(engine: str, cache_dir: Path, labels: str = "",
                 image_root: Optional[Path] = None) -> PredictionService:
    """The service the backend builds; local image files are read from inside ``image_root``
    (the backend reads local paths only under LOCAL_FILES_DOCUMENT_ROOT)."""
    options = {"device": "cpu", **engine_options(engine)}
    if labels:
        options["concept_labels"] = labels
    settings = Settings.load(options, environ={})
    images = ImageLoader(ImageAccessSettings.from_settings(
        settings, cache_dir=str(cache_dir),
        local_files_document_root=str(image_root) if image_root else None))
    service = prediction_service(settings, images=images)
    service.concept_annotator().engine  # loaded before timing
    return service


def concept_pass(service: PredictionService, image_path: Path, runs: int) -> Dict[str, Any]:
    config = parse_label_config(CONFIG)
    concepts = concepts_of(config)
    task = {"id": 1, "data": {"image": str(image_path)}}
    url = config.image_url(task, "image")
    key = service.images.source_key(url, 1)
    started = time.perf_counter()
    service.segmenter.embedding(key, lambda: service.images.load(url, 1))
    embed_ms = (time.perf_counter() - started) * 1e3
    image = service.images.load(url, 1)
    started = time.perf_counter()
    found = service.concepts.engine.detect(key, lambda: image, [concepts[0].phrase],
                                           service.settings.concept_threshold,
                                           service.concepts.selection)[0]
    one_label_ms = (time.perf_counter() - started) * 1e3
    started = time.perf_counter()
    for mask, box, score in zip(found.masks, found.boxes, found.scores):
        service.mask_regions(mask, float(score), config, concepts[0].label, "image", bbox=box)
    regions_ms = (time.perf_counter() - started) * 1e3 / max(len(found), 1)
    times, instances = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        prediction = service.concepts.annotate_task(task, config, concepts)
        times.append((time.perf_counter() - started) * 1e3)
        instances = sum(1 for r in prediction["result"] if r["type"] == "rectanglelabels")
    return {"labels": len(concepts), "embed_ms": embed_ms, "pass_ms": statistics.median(times),
            "pass_ms_all": times, "instances": instances,
            "one_label_detect_ms": one_label_ms, "one_label_instances": len(found),
            "regions_ms_per_instance": regions_ms}


def profile_pass(service: PredictionService, image_path: Path, out: Path,
                 top: int = 30) -> Dict[str, Any]:
    """One 3-label pass on the embedded image under cProfile: writes ``out`` (open it with
    ``python -m pstats`` or snakeviz) and prints the ``top`` entries by cumulative time."""
    import cProfile
    import pstats

    config = parse_label_config(CONFIG)
    concepts = concepts_of(config)
    task = {"id": 1, "data": {"image": str(image_path)}}
    image = service.images.locate(config.image_url(task, "image"), 1)
    service.segmenter.embedding(image.key, image.load)  # embedded, as the row
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.runcall(service.concepts.annotate_task, task, config, concepts)
    seconds = time.perf_counter() - started
    profiler.dump_stats(str(out))
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)
    return {"pass_s": seconds, "profile": str(out)}


def project_run(service: PredictionService, images: List[Path], labels: str) -> Dict[str, Any]:
    from tests.support.ls_harness import LabelStudio

    from sam_backend.commands.annotate import annotate_project
    from sam_backend.labelstudio.api import LabelStudioAPI

    ls = LabelStudio().start(legacy_tokens=True)
    try:
        project = ls.api.create_project("bench concepts", CONFIG)
        for path in images:
            ls.api.import_image(project["id"], path)
        loader = ImageLoader(ImageAccessSettings.from_settings(
            service.settings, label_studio_url=ls.url, api_key=ls.token,
            cache_dir=tempfile.mkdtemp(prefix="bench-concepts-")))
        service.images = loader
        service.settings = dataclasses.replace(service.settings, concept_labels=labels or None)
        service.concepts.settings = service.settings
        report = annotate_project(service, LabelStudioAPI(loader), project["id"], progress=False)
        predictions = ls.api.get("/api/predictions", params={"project": project["id"]})
        assert len(predictions) == len(images) and not report.failed, report.failed
        return {"tasks": len(images), "labels": labels or "all 3", "total_s": report.seconds,
                "per_task_s": report.seconds / len(images), "instances": report.instances}
    finally:
        ls.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=["grounding_dino"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--project-images", type=int, default=20)
    parser.add_argument("--no-project", action="store_true")
    parser.add_argument("--project-labels", default="",
                        help="comma-separated labels that take part in the project run (default all)")
    parser.add_argument("--profile", action="store_true",
                        help="only profile one 3-label pass per engine (cProfile; the .prof "
                             "file goes to a temporary directory); writes no results")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "concepts.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-concepts-"))
    image_1080p = work / "scene-1080p.png"
    cv2.imwrite(str(image_1080p), synthetic_image(1080, 1920, seed=3))
    project_images = []
    for i in range(0 if args.profile else args.project_images):
        path = work / f"project-{i:02d}.jpg"
        cv2.imwrite(str(path), synthetic_image(1080, 1920, seed=100 + i))
        project_images.append(path)
    rows: Dict[str, Any] = {}
    for engine in args.engines:
        service = make_service(engine, work / "cache", image_root=work)
        if args.profile:
            done = profile_pass(service, image_1080p, work / f"concepts-{engine}.prof")
            print(f"{engine}: one pass {done['pass_s']:.1f} s, profile in {done['profile']}")
            continue
        row = {"model_version": service.model_version,
               "concept_pass": concept_pass(service, image_1080p, args.runs)}
        if not args.no_project:
            row["project"] = project_run(service, project_images, args.project_labels)
        rows[engine] = row
    if args.profile:
        return 0
    result = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                          "loadavg": os.getloadavg()},
              "date": time.strftime("%Y-%m-%d %H:%M"), "engines": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'engine':<16} {'3 labels, embedded 1080p':>26} {'instances':>10} "
          f"{'1 label: detect+masks':>22} {'project':>10} {'per task':>10}")
    for engine, row in rows.items():
        cp, pr = row["concept_pass"], row.get("project")
        total = f"{pr['total_s']:.0f} s" if pr else "-"
        per_task = f"{pr['per_task_s']:.1f} s" if pr else "-"
        one = f"{cp['one_label_detect_ms'] / 1e3:.1f} s ({cp['one_label_instances']})"
        print(f"{engine:<16} {cp['pass_ms'] / 1e3:>24.1f} s {cp['instances']:>10} "
              f"{one:>22} {total:>10} {per_task:>10}")
        if pr:
            print(f"{'':<16} project: {pr['tasks']} images of 1920x1080, labels: {pr['labels']}")
    print(f"(written to {args.out}; load average at the end {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
