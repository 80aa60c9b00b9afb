"""Grounding DINO concept passes before and after joined captions, in one run: one detector pass
per label (``concept_passes=per_label``, the way before) against every label in one caption
(``joined``, the default), 1 label and 3 labels, on an embedded 1080p image, and what a smaller
detector input (``concept_image_size``) buys.

Usage: python benchmarks/bench_concept_passes.py [--runs 3] [--max-instances 10]
           [--sizes 640 512 400] [--tiny] [--out benchmarks/results/concept_passes.json]

Random weights of the real architecture at full size: ``grounding-dino-tiny`` (Swin-T + BERT-base)
made by the project's own random-init code (``tests/support/random_weights.py``, a word-level
tokenizer laid out like BERT's so the model sees the caption's periods as delimiters), seeded,
made once into the tests' weight cache; MobileSAM (default runtime) makes the masks. The image
(1920x1080) is embedded before timing. Each row, ``--runs`` times (median; the variants take
turns within a run so a change of load hits them all):

- **detector**: the engine's detector calls for the row's phrases (processor, model,
  post-processing, attribution to phrases: ``ConceptEngine.find_all``), no masks;
- **whole pass**: ``ConceptAnnotator.annotate_task`` on the task (detector, NMS and
  ``max_instances`` per label, one click-model decode per kept box, brush + box regions).

Labels: ``car`` (``hint="red car"``), ``person``, ``tree``; 1 label is ``car``. With random
weights the number of boxes above ``concept_threshold`` (0.5) is arbitrary and differs between
the modes (the joined caption changes what the model sees): the kept instances are reported with
each row, as each costs a mask decode. ``--tiny``: a reduced model and a small image (smoke run).
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
from typing import Any, Dict, List, Optional, Sequence

import cv2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sam_backend.assembly import prediction_service  # noqa: E402
from sam_backend.concepts.base import ConceptAnnotator  # noqa: E402
from sam_backend.concepts.grounding_dino import GroundingDinoEngine, image_size_kwargs  # noqa: E402
from sam_backend.concepts.phrases import concepts_of  # noqa: E402
from sam_backend.images.config import ImageAccessSettings  # noqa: E402
from sam_backend.images.loader import ImageLoader  # noqa: E402
from sam_backend.labelstudio.label_config import parse_label_config  # noqa: E402
from sam_backend.labelstudio.service import PredictionService  # noqa: E402
from sam_backend.settings import Settings  # noqa: E402
from tests.support.random_weights import (CACHE_DIR, cached_random_checkpoint,  # noqa: E402
                                          make_random_grounding_dino, synthetic_image)

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="car" hint="red car"/><Label value="person"/><Label value="tree"/></BrushLabels>
  <RectangleLabels name="boxes" toName="image"><Label value="car"/><Label value="person"/><Label value="tree"/></RectangleLabels>
</View>"""
FULL_HW, TINY_HW = (1080, 1920), (180, 320)


def detector_dir(tiny: bool) -> Path:
    """The seeded random Grounding DINO directory (made on first use)."""
    size = "tiny" if tiny else "full"
    directory = CACHE_DIR / f"grounding-dino-{size}-bert-seed0"
    if not (directory / "config.json").is_file():
        make_random_grounding_dino(directory, size, seed=0, bert_layout=True)
    return directory


def make_service(tiny: bool, max_instances: int, work: Path) -> PredictionService:
    """The service the backend builds (joined captions, default input size), MobileSAM masks;
    local files are read under ``work``."""
    settings = Settings.load({"device": "cpu", "model_name": "mobile_sam",
                              "sam_checkpoint_file": str(cached_random_checkpoint("mobile_sam")),
                              "concept_model": "grounding_dino",
                              "concept_checkpoint": str(detector_dir(tiny)),
                              "max_instances": max_instances}, environ={})
    images = ImageLoader(ImageAccessSettings.from_settings(
        settings, cache_dir=str(work / "cache"), local_files_document_root=str(work)))
    service = prediction_service(settings, images=images)
    service.concept_annotator().engine  # loaded before timing
    return service


def input_size(engine: GroundingDinoEngine, height: int, width: int) -> List[int]:
    """(height, width) of the detector's input for an image of that size."""
    import numpy as np

    pixels = engine.processor.image_processor(np.zeros((height, width, 3), np.uint8),
                                              return_tensors="pt", **engine.image_kwargs)
    return [int(v) for v in pixels["pixel_values"].shape[-2:]]


def measure(service: PredictionService, variants: Dict[str, GroundingDinoEngine],
            image_path: Path, label_counts: Sequence[int], runs: int) -> List[Dict[str, Any]]:
    config = parse_label_config(CONFIG)
    concepts = concepts_of(config)
    task = {"id": 1, "data": {"image": str(image_path)}}
    image = service.images.locate(config.image_url(task, "image"), 1)
    annotators = {name: ConceptAnnotator(service, lambda engine=engine: engine)
                  for name, engine in variants.items()}
    samples: Dict[tuple, Dict[str, list]] = {}
    for run in range(runs):
        for name, engine in variants.items():
            for count in label_counts:
                chosen = concepts[:count]
                phrases = [c.phrase for c in chosen]
                state, _ = engine.image_state(image.key, image.load)  # embedded: no encode
                started = time.perf_counter()
                found = dict(engine.find_all(state, phrases, service.settings.concept_threshold))
                detector_ms = (time.perf_counter() - started) * 1e3
                started = time.perf_counter()
                prediction = annotators[name].annotate_task(task, config, chosen)
                pass_ms = (time.perf_counter() - started) * 1e3
                row = samples.setdefault((name, count), {"detector_ms": [], "pass_ms": []})
                row["detector_ms"].append(detector_ms)
                row["pass_ms"].append(pass_ms)
                row["boxes"] = {p: len(i) for p, i in found.items()}
                row["kept"] = sum(1 for r in prediction["result"]
                                  if r["type"] == "rectanglelabels")
                print(f"  run {run + 1}: {name}, {count} label(s): detector "
                      f"{detector_ms / 1e3:.1f} s, pass {pass_ms / 1e3:.1f} s", flush=True)
    rows = []
    for (name, count), row in samples.items():
        engine = variants[name]
        rows.append({"variant": name, "passes": engine.passes,
                     "input_hw": input_size(engine, *image.load().shape[:2]),
                     "labels": count, "detector_ms": statistics.median(row["detector_ms"]),
                     "pass_ms": statistics.median(row["pass_ms"]),
                     "detector_ms_all": row["detector_ms"], "pass_ms_all": row["pass_ms"],
                     "boxes_per_phrase": row["boxes"], "kept_instances": row["kept"]})
    return rows


def ratio(rows: List[Dict[str, Any]], variant: str) -> Optional[float]:
    """Detector time of 3 labels over 1 label, for ``variant``."""
    by = {r["labels"]: r["detector_ms"] for r in rows if r["variant"] == variant}
    return by[3] / by[1] if 1 in by and 3 in by and by[1] > 0 else None


def table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| passes | detector input | labels | detector | x 1 label | whole pass | "
             "instances kept |", "|---|---|---:|---:|---:|---:|---:|"]
    one = {r["variant"]: r["detector_ms"] for r in rows if r["labels"] == 1}
    for r in rows:
        times = (f"{r['detector_ms'] / one[r['variant']]:.2f}"
                 if r["variant"] in one and one[r["variant"]] > 0 else "-")
        lines.append(f"| {r['passes']} | {r['input_hw'][0]}x{r['input_hw'][1]} | {r['labels']} | "
                     f"{r['detector_ms'] / 1e3:.2f} s | {times} | {r['pass_ms'] / 1e3:.2f} s | "
                     f"{r['kept_instances']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-instances", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="*", default=None,
                        help="smaller detector inputs (concept_image_size) to add, joined "
                             "(default 640 512 400; --tiny 96)")
    parser.add_argument("--tiny", action="store_true",
                        help="a reduced model and a 320x180 image (smoke run, no figures)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                             "concept_passes.json"))
    args = parser.parse_args()
    sizes = args.sizes if args.sizes is not None else ([96] if args.tiny else [640, 512, 400])
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-concept-passes-"))
    height, width = TINY_HW if args.tiny else FULL_HW
    image_path = work / f"scene-{height}p.png"
    cv2.imwrite(str(image_path), cv2.cvtColor(synthetic_image(height, width, seed=3),
                                              cv2.COLOR_RGB2BGR))
    service = make_service(args.tiny, args.max_instances, work)
    base = service.concept_annotator().engine
    url = str(image_path)
    started = time.perf_counter()
    service.segmenter.embedding(service.images.source_key(url, 1),
                                lambda: service.images.load(url, 1))
    embed_ms = (time.perf_counter() - started) * 1e3

    def variant(passes: str, size: int) -> GroundingDinoEngine:
        return GroundingDinoEngine(base.model, base.processor, service.segmenter, size, passes)

    variants = {"per_label": variant("per_label", 0), "joined": variant("joined", 0)}
    for size in sizes:
        variants[f"joined@{size}"] = variant("joined", size)
    rows = measure(service, variants, image_path, (1, 3), args.runs)
    joined, before = ratio(rows, "joined"), ratio(rows, "per_label")
    whole = {r["variant"]: r["pass_ms"] for r in rows if r["labels"] == 3}
    import torch
    import transformers

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads()},
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": "grounding-dino-full" if not args.tiny else "grounding-dino-reduced",
        "image_hw": [height, width], "embed_ms": embed_ms, "runs": args.runs,
        "max_instances": args.max_instances,
        "concept_threshold": service.settings.concept_threshold,
        "sizes": {name: engine.image_kwargs.get("size") for name, engine in variants.items()},
        "rows": rows,
        "targets": {"detector_3_over_1_joined": joined, "detector_3_over_1_per_label": before,
                    "detector_3_over_1_max": 1.3,
                    "whole_pass_3_labels_joined_s": whole.get("joined", 0) / 1e3,
                    "whole_pass_3_labels_per_label_s": whole.get("per_label", 0) / 1e3,
                    "whole_pass_max_s": 15.0},
        "table_markdown": table(rows),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(result["table_markdown"])
    print(f"detector, 3 labels over 1: joined {joined:.2f}x, per_label {before:.2f}x "
          f"(target <= 1.3x); whole 3-label pass: joined {whole['joined'] / 1e3:.1f} s, "
          f"per_label {whole['per_label'] / 1e3:.1f} s (target <= 15 s at the default input)")
    print(f"image {width}x{height} embedded in {embed_ms / 1e3:.1f} s; load average "
          f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
