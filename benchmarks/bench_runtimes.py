"""Time the torch and onnx runtimes: image encoder, decoder, upscaling (in process, no HTTP).

Usage: python benchmarks/bench_runtimes.py [--variants mobile_sam/vit_t sam_hq/vit_tiny ...]
           [--runtimes torch onnx] [--sizes 1920x1080 3840x2160] [--embed-runs 5]
           [--decode-runs 20] [--merge]

Random-weight checkpoints (seeded, the tests' own, made on first use) of the real architectures:
same compute as the official weights. For each variant, runtime and image size it reports medians
of: ``embed`` (resize + normalise + encoder), ``decode`` (a whole single-point click: prompt ->
HxW bool mask), its parts ``decoder`` (prompt -> chosen low-res logits) and ``upscale`` (low-res
logits -> HxW bool mask), ``decode`` for three points and for a box, and the bytes of one
image's embedding (float32, as the runtime returns it). The runtimes are timed
in turn (torch, onnx, torch, onnx, ...) so that load from other processes falls on both alike.
The onnx runtime's first construction exports the graphs (included in ``load_ms``; later starts
reuse them). Writes benchmarks/results/runtimes.json (``--merge``: keeps its rows for what this
run does not measure).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sam_backend.models.base import Prompt  # noqa: E402
from tests.support.random_weights import cached_random_checkpoint, synthetic_image  # noqa: E402
from sam_backend.models.registry import get_variant  # noqa: E402


def load(variant, runtime: str):
    path = cached_random_checkpoint(variant.model_name, variant.sam_config)
    started = time.perf_counter()
    if runtime == "torch":
        from sam_backend.models.torch_runtime import TorchSamModel

        model = TorchSamModel(variant, str(path), "cpu")
    else:
        from sam_backend.models.onnx_runtime import OnnxSamModel

        model = OnnxSamModel(variant, path, "cpu")
    return model, (time.perf_counter() - started) * 1e3


def parts(model, embedding, prompt):
    """(decoder, upscale) callables for one prompt (the same decode contract on every runtime)."""

    def decoder():
        candidates = model.decode_low_res(embedding, prompt)
        best = candidates.best()
        return candidates.logits[best:best + 1]

    chosen = decoder()

    def upscale():
        return model.upscale_mask(chosen, embedding)

    return decoder, upscale


def interleaved_ms(fns, runs: int, warmup: int = 1):
    """Median ms of each callable in ``fns`` (a dict), run in turn (A B A B ...) so that load from
    other processes on the machine falls on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["mobile_sam/vit_t", "sam_hq/vit_tiny"])
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnx"])
    parser.add_argument("--sizes", nargs="+", default=["1920x1080", "3840x2160"])
    parser.add_argument("--embed-runs", type=int, default=5)
    parser.add_argument("--decode-runs", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "runtimes.json"))
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of --out that this run does not measure again")
    args = parser.parse_args()

    import torch

    rows = []
    runtimes = list(args.runtimes)
    for key in args.variants:
        variant = get_variant(*key.split("/"))
        models, load_ms = {}, {}
        for runtime in runtimes:
            models[runtime], load_ms[runtime] = load(variant, runtime)
        for size in args.sizes:
            w, h = (int(v) for v in size.split("x"))
            image = synthetic_image(h, w, seed=1)
            single = Prompt(np.array([[w * 0.4, h * 0.5]]), np.array([1]))
            three = Prompt(np.array([[w * 0.4, h * 0.5], [w * 0.6, h * 0.3],
                                     [w * 0.2, h * 0.8]]), np.array([1, 1, 0]))
            box = Prompt(box=np.array([w * 0.1, h * 0.2, w * 0.7, h * 0.9]))
            embeddings = {r: m.embed(image) for r, m in models.items()}
            split = {r: parts(m, embeddings[r], single) for r, m in models.items()}
            results = {r: {"variant": key, "runtime": r, "image": size,
                           "load_ms": round(load_ms[r]),
                           "embedding_bytes": embeddings[r].nbytes} for r in models}
            measures = {
                "embed_ms": ({r: (lambda m=m: m.embed(image)) for r, m in models.items()},
                             args.embed_runs, 0),
                "decode_ms": ({r: (lambda m=m, e=embeddings[r]: m.decode(e, single))
                               for r, m in models.items()}, args.decode_runs, 1),
                "decoder_ms": ({r: split[r][0] for r in models}, args.decode_runs, 1),
                "upscale_ms": ({r: split[r][1] for r in models}, args.decode_runs, 1),
                "decode_3_points_ms": ({r: (lambda m=m, e=embeddings[r]: m.decode(e, three))
                                        for r, m in models.items()}, args.decode_runs, 1),
                "decode_box_ms": ({r: (lambda m=m, e=embeddings[r]: m.decode(e, box))
                                   for r, m in models.items()}, args.decode_runs, 1),
            }
            for name, (fns, runs, warmup) in measures.items():
                for r, ms in interleaved_ms(fns, runs, warmup).items():
                    results[r][name] = round(ms, 1)
            for r in models:
                row = results[r]
                rows.append(row)
                print(f"{key:18s} {r:9s} {size:10s} embed {row['embed_ms']:7.0f} ms  "
                      f"decode {row['decode_ms']:6.1f} ms (decoder {row['decoder_ms']:5.1f} + "
                      f"upscale {row['upscale_ms']:5.1f})  "
                      f"3 points {row['decode_3_points_ms']:5.1f}"
                      f"  box {row['decode_box_ms']:5.1f}", flush=True)
        del models, embeddings, split

    header = ("variant", "runtime", "image", "embed ms", "decode ms", "decoder ms", "upscale ms",
              "3 points ms", "box ms")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['variant']} | {r['runtime']} | {r['image']} | {r['embed_ms']:.0f} | "
              f"{r['decode_ms']:.1f} | {r['decoder_ms']:.1f} | {r['upscale_ms']:.1f} | "
              f"{r['decode_3_points_ms']:.1f} | {r['decode_box_ms']:.1f} |")

    import onnxruntime

    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "onnxruntime": onnxruntime.__version__,
                    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "embed_runs": args.embed_runs, "decode_runs": args.decode_runs,
        "note": "medians; random-weight checkpoints; load_ms of the first size only",
        "rows": rows,
    }
    out = Path(args.out)
    if args.merge and out.is_file():
        measured = {(r["variant"], r["runtime"], r["image"]) for r in rows}
        kept = [r for r in json.loads(out.read_text(encoding="utf-8")).get("rows", [])
                if (r["variant"], r["runtime"], r["image"]) not in measured]
        result["rows"] = kept + rows
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
