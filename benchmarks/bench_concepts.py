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
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import cv2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sam_backend.concepts import concepts_of  # noqa: E402
from sam_backend.images import ImageAccessSettings, ImageLoader  # noqa: E402
from sam_backend.label_config import parse_label_config  # noqa: E402
from sam_backend.random_weights import CACHE_DIR, cached_random_checkpoint, synthetic_image  # noqa: E402
from sam_backend.service import SegmentationService, segmenter_for  # noqa: E402
from sam_backend.settings import Settings  # noqa: E402

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="car" hint="red car"/><Label value="person"/><Label value="tree"/></BrushLabels>
  <RectangleLabels name="boxes" toName="image"><Label value="car"/><Label value="person"/><Label value="tree"/></RectangleLabels>
</View>"""


def engine_options(engine: str) -> Dict[str, str]:
    if engine == "grounding_dino":
        from sam_backend.grounding_dino import make_random_grounding_dino

        directory = CACHE_DIR / "grounding-dino-full-seed0"
        if not (directory / "config.json").is_file():
            make_random_grounding_dino(directory, "full", seed=0)
        return {"model_name": "mobile_sam",
                "sam_checkpoint_file": str(cached_random_checkpoint("mobile_sam")),
                "concept_model": "grounding_dino", "concept_checkpoint": str(directory)}
    raise SystemExit(f"engine {engine!r} is not available in this version")


def make_service(engine: str, cache_dir: Path) -> SegmentationService:
    settings = Settings.load({"device": "cpu", **engine_options(engine)}, environ={})
    images = ImageLoader(ImageAccessSettings.from_env(cache_dir=str(cache_dir)))
    service = SegmentationService(settings, segmenter_for(settings), images)
    service.concept_annotator().engine  # loaded before timing
    return service


def concept_pass(service: SegmentationService, image_path: Path, runs: int) -> Dict[str, Any]:
    config = parse_label_config(CONFIG)
    concepts = concepts_of(config)
    task = {"id": 1, "data": {"image": str(image_path)}}
    url, _ = service.image_of(task, config, "image")
    key = service.images.source_key(url, 1)
    started = time.perf_counter()
    service.segmenter.embedding(key, lambda: service.images.load(url, 1))
    embed_ms = (time.perf_counter() - started) * 1e3
    times, instances = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        prediction = service.concepts.annotate_task(task, config, concepts)
        times.append((time.perf_counter() - started) * 1e3)
        instances = sum(1 for r in prediction["result"] if r["type"] == "rectanglelabels")
    return {"labels": len(concepts), "embed_ms": embed_ms, "pass_ms": statistics.median(times),
            "pass_ms_all": times, "instances": instances}


def project_run(service: SegmentationService, images: List[Path]) -> Dict[str, Any]:
    from e2e.ls_harness import LabelStudio

    from sam_backend.annotate import LabelStudioAPI, annotate_project

    ls = LabelStudio().start(legacy_tokens=True)
    try:
        project = ls.api.create_project("bench concepts", CONFIG)
        for path in images:
            ls.api.import_image(project["id"], path)
        loader = ImageLoader(ImageAccessSettings.from_env(
            label_studio_url=ls.url, api_key=ls.token,
            cache_dir=tempfile.mkdtemp(prefix="bench-concepts-")))
        service.images = loader
        report = annotate_project(service, LabelStudioAPI(loader), project["id"], progress=False)
        predictions = ls.api.get("/api/predictions", params={"project": project["id"]})
        assert len(predictions) == len(images) and not report.failed, report.failed
        return {"tasks": len(images), "total_s": report.seconds,
                "per_task_s": report.seconds / len(images), "instances": report.instances}
    finally:
        ls.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=["grounding_dino"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--project-images", type=int, default=20)
    parser.add_argument("--no-project", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "concepts.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-concepts-"))
    image_1080p = work / "scene-1080p.png"
    cv2.imwrite(str(image_1080p), synthetic_image(1080, 1920, seed=3))
    project_images = []
    for i in range(args.project_images):
        path = work / f"project-{i:02d}.jpg"
        cv2.imwrite(str(path), synthetic_image(1080, 1920, seed=100 + i))
        project_images.append(path)
    rows: Dict[str, Any] = {}
    for engine in args.engines:
        service = make_service(engine, work / "cache")
        row = {"model_version": service.model_version,
               "concept_pass": concept_pass(service, image_1080p, args.runs)}
        if not args.no_project:
            row["project"] = project_run(service, project_images)
        rows[engine] = row
    result = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                          "loadavg": os.getloadavg()},
              "date": time.strftime("%Y-%m-%d %H:%M"), "engines": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'engine':<16} {'3 labels, embedded 1080p':>26} {'instances':>10} "
          f"{'20-image project':>18} {'per task':>10}")
    for engine, row in rows.items():
        cp, pr = row["concept_pass"], row.get("project")
        total = f"{pr['total_s']:.0f} s" if pr else "-"
        per_task = f"{pr['per_task_s']:.1f} s" if pr else "-"
        print(f"{engine:<16} {cp['pass_ms'] / 1e3:>24.1f} s {cp['instances']:>10} "
              f"{total:>18} {per_task:>10}")
    print(f"(written to {args.out}; load average at the end {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
