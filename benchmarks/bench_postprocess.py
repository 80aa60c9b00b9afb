"""Time the mask -> Label Studio regions layer (sam_backend.labelstudio.rle / sam_backend.labelstudio.regions).

Usage: python benchmarks/bench_postprocess.py [--runs 20]

Masks: 1920x1080 and 3840x2160 with a few blobs (two discs, one with a hole, a rectangle, a few
specks). Reports the median of --runs calls of mask_to_rle, mask_bbox and mask_polygons, and one
call of Label Studio's reference encoder (label_studio_converter.brush.mask2rle) on the 1080p mask
for comparison, and mask_to_rle on checkerboard / random-noise masks (worst cases). Writes benchmarks/results/postprocess.json.
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

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sam_backend.labelstudio.regions import mask_bbox, mask_polygons  # noqa: E402
from sam_backend.labelstudio.rle import mask_to_rle  # noqa: E402


def blob_mask(width: int, height: int) -> np.ndarray:
    """A (height, width) bool mask with a few blobs, scaled to the image size."""
    m = np.zeros((height, width), np.uint8)
    s = width / 1920
    cv2.circle(m, (int(600 * s), int(400 * s)), int(220 * s), 1, -1)
    cv2.circle(m, (int(600 * s), int(400 * s)), int(60 * s), 0, -1)  # hole
    cv2.circle(m, (int(1400 * s), int(700 * s)), int(150 * s), 1, -1)
    cv2.rectangle(m, (int(200 * s), int(800 * s)), (int(700 * s), int(1000 * s)), 1, -1)
    for x, y in ((1700, 100), (1000, 950), (100, 100)):
        m[int(y * s):int(y * s) + 3, int(x * s):int(x * s) + 3] = 1  # specks
    return m.astype(bool)


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "postprocess.json"))
    args = parser.parse_args()

    rows = []
    for name, (w, h) in (("1080p", (1920, 1080)), ("4K", (3840, 2160))):
        mask = blob_mask(w, h)
        rle = mask_to_rle(mask)
        row = {
            "mask": name,
            "width": w,
            "height": h,
            "on_pixels": int(mask.sum()),
            "rle_bytes": len(rle),
            "mask_to_rle_ms": median_ms(lambda: mask_to_rle(mask), args.runs),
            "mask_bbox_ms": median_ms(lambda: mask_bbox(mask), args.runs),
            "mask_polygons_ms": median_ms(lambda: mask_polygons(mask, 100, 1.0), args.runs),
            "polygons": len(mask_polygons(mask, 100, 1.0)),
        }
        rows.append(row)

    # worst cases for the encoder (a run every pixel or two): few runs, only mask_to_rle
    worst = []
    rng = np.random.default_rng(0)
    for name, (w, h) in (("1080p", (1920, 1080)), ("4K", (3840, 2160))):
        for kind, mask in (
            ("checkerboard", (np.indices((h, w)).sum(0) % 2).astype(bool)),
            ("noise p=0.5", rng.random((h, w)) < 0.5),
        ):
            worst.append({
                "mask": f"{name} {kind}",
                "rle_bytes": len(mask_to_rle(mask)),
                "mask_to_rle_ms": median_ms(lambda: mask_to_rle(mask), 3),
            })

    from label_studio_converter.brush import mask2rle

    ref_mask = blob_mask(1920, 1080)
    t = time.perf_counter()
    ref = mask2rle(ref_mask.astype(np.uint8) * 255)
    ref_ms = (time.perf_counter() - t) * 1e3
    equal = ref == mask_to_rle(ref_mask)
    ours_ms = rows[0]["mask_to_rle_ms"]

    print(f"median of {args.runs} runs, milliseconds")
    print(f"{'mask':6} {'size':>10} {'rle bytes':>10} {'mask_to_rle':>12} {'mask_bbox':>10} {'polygons':>10} {'#poly':>6}")
    for r in rows:
        print(
            f"{r['mask']:6} {r['width']}x{r['height']:<5} {r['rle_bytes']:>10} {r['mask_to_rle_ms']:>12.2f}"
            f" {r['mask_bbox_ms']:>10.2f} {r['mask_polygons_ms']:>10.2f} {r['polygons']:>6}"
        )
    print("worst cases, mask_to_rle, median of 3 runs:")
    for r in worst:
        print(f"  {r['mask']:22} {r['rle_bytes']:>10} bytes {r['mask_to_rle_ms']:>9.1f} ms")
    print(
        f"label_studio_converter mask2rle, 1080p, one run: {ref_ms:.1f} ms "
        f"({ref_ms / ours_ms:.0f}x mask_to_rle); byte-for-byte equal: {equal}"
    )

    result = {
        "runs": args.runs,
        "machine": {"python": platform.python_version(), "numpy": np.__version__,
                    "opencv": cv2.__version__, "cpus": os.cpu_count()},
        "rows": rows,
        "worst_cases": worst,
        "reference_mask2rle_1080p_ms": ref_ms,
        "reference_equal": equal,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
