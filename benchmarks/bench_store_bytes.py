"""Redis bytes per 1080p image in the shared embedding store, for any variant.

    .venv/bin/python benchmarks/bench_store_bytes.py --variants sam2/hiera_tiny,sam3 \
        [--weights-dir DIR] [--out benchmarks/results/store_bytes.json]

Each variant's model is loaded from ``--weights-dir`` (``sam-backend weights random`` files with
seeded random weights, made there when missing; embedding shapes do not depend on the weights),
one 1920x1080 image is encoded, and its float16 embedding (the backend's default
``embedding_dtype``) is saved with :class:`~sam_backend.embeddings.store.EmbeddingStore` into a real
``redis-server`` started on a loopback port; the figure is Redis's ``MEMORY USAGE`` of that key.
For ``sam3`` the image is encoded once with ``keep_vision_state`` (what ``concept_model=sam3``
sets) and stored twice: with the backbone output, and without it (exactly the embedding a
click-only SAM 3 makes). Prints a Markdown table, writes JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import bench_http  # noqa: E402  (machine facts, checkpoints, images)
from tests.support.redis_utils import RedisServer  # noqa: E402


def main(argv=None) -> int:
    import dataclasses
    from sam_backend.models.registry import get_variant
    from sam_backend.models.runtimes import create_model
    from sam_backend.embeddings.store import EmbeddingStore, encode_embedding

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="sam2/hiera_tiny,sam3")
    parser.add_argument("--weights-dir", type=Path, default=bench_http.DEFAULT_CACHE_DIR / "weights")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "store_bytes.json")
    args = parser.parse_args(argv)

    image = bench_http.draw_image(1920, 1080, 7)[:, :, ::-1].copy()  # RGB
    rows = []
    logs = bench_http.DEFAULT_CACHE_DIR / "store-bytes-logs"
    logs.mkdir(parents=True, exist_ok=True)
    server = RedisServer(logs).start()
    try:
        client = server.client()
        for name, (key, path) in bench_http.ensure_checkpoints(args.variants.split(","),
                                                               args.weights_dir).items():
            model = create_model(get_variant(*key.split("/")), path, "cpu", "torch")
            if hasattr(model, "keep_vision_state"):
                model.keep_vision_state = True
            bench_http.progress(f"encoding a 1920x1080 image with {key}")
            t0 = time.perf_counter()
            embedding = model.embed(image).to_float16()
            seconds = time.perf_counter() - t0
            cases = [(key, embedding)]
            if hasattr(model, "keep_vision_state"):
                cases = [(f"{key} (keep_vision_state)", embedding),
                         (key, dataclasses.replace(embedding, vision_state=None))]
            for label, emb in cases:
                store = EmbeddingStore(server.url, f"{label}:torch:float16:bench")
                assert store.save("image-1080p", emb)
                redis_key = store.key_for("image-1080p")
                rows.append({"variant": label, "runtime": model.runtime,
                             "shapes": [list(a.shape) for a in emb.arrays()],
                             "arrays": len(emb.arrays()), "array_bytes": emb.nbytes,
                             "entry_bytes": len(encode_embedding(emb, redis_key)),
                             "redis_memory_usage_bytes": int(client.memory_usage(redis_key)),
                             "encode_s": round(seconds, 1)})
            del model, embedding, cases
    finally:
        server.stop()

    lines = ["| variant | arrays (float16) | entry bytes | Redis MEMORY USAGE |",
             "|---|---|---:|---:|"]
    for r in rows:
        shapes = ", ".join("×".join(map(str, s)) for s in r["shapes"])
        lines.append(f"| {r['variant']} | {shapes} | {r['entry_bytes']:,} | "
                     f"{r['redis_memory_usage_bytes']:,} ({r['redis_memory_usage_bytes'] / 2**20:.1f} MiB) |")
    table = "\n".join(lines)
    report = {"machine": bench_http.machine_info(), "versions": bench_http.versions(),
              "args": {"variants": args.variants, "weights_dir": str(args.weights_dir)},
              "rows": rows, "table_markdown": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
