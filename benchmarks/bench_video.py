"""Video tracking speed: frames per second tracked by SAM 2.1 (hiera_tiny) and SAM 3 (full size),
1 and 4 objects, on a synthetic 720p clip; peak memory.

Usage:
    python benchmarks/bench_video.py [--models sam2,sam3] [--objects 1,4] [--seconds 10]
                                     [--fps 25] [--height 720] [--width 1280] [--frames N]
                                     [--device cpu] [--threads 2] [--sam3-reduced]
                                     [--out benchmarks/results/video.json]

The clip: moving shapes on a textured background written with OpenCV (mp4v) and read back with
OpenCV's reader, one frame at a time (decoding is part of the figure). Each object gets a box on
frame 0; the tracker (built by ``assembly.create_tracker`` from seeded random weights, the
published architectures; masks meaningless, compute identical) tracks from there. ``--frames N``
tracks the first N frames only and reports frames/s over those (full-size SAM 3 takes a minute or
more per frame on a 2-core CPU). Each (model, objects) run is its own process, so its peak RSS
(``ru_maxrss``) is its own: model + features cache + tracking state.

Reported per run: load seconds, tracking seconds, frames/s (frames tracked / tracking seconds,
all objects at once), frames encoded, peak RSS MiB. Prints a Markdown table, writes JSON to
``--out``. Don't run it for figures on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))


def shape_box(object_id: int, t: int, height: int, width: int):
    """Object ``object_id``'s box on frame ``t`` (xyxy pixels): four shapes crossing the frame."""
    x0 = (0.05 + 0.2 * object_id + 0.004 * t) % 0.8
    y0 = 0.1 + 0.18 * object_id
    return (x0 * width, y0 * height, (x0 + 0.15) * width, (y0 + 0.2) * height)


def write_clip(path: Path, frames: int, fps: float, height: int, width: int) -> Path:
    import cv2

    rng = np.random.default_rng(0)
    background = cv2.GaussianBlur(rng.integers(60, 200, (height, width, 3), dtype=np.uint8),
                                  (0, 0), 3)
    colours = [(230, 40, 40), (40, 60, 220), (40, 200, 60), (220, 200, 40)]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for t in range(frames):
        image = background.copy()
        for k, colour in enumerate(colours):
            x0, y0, x1, y1 = map(int, shape_box(k, t, height, width))
            cv2.rectangle(image, (x0, y0), (x1, y1), colour[::-1], -1)
        writer.write(image)
    writer.release()
    return path


def opencv_clip(path: Path):
    """A Clip over an OpenCV video reader (frames decoded as asked; RGB)."""
    import cv2

    from sam_backend.video.base import Clip, ClipInfo

    class VideoFileClip(Clip):
        def __init__(self):
            capture = cv2.VideoCapture(str(path))
            self.info = ClipInfo(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)),
                                 float(capture.get(cv2.CAP_PROP_FPS)),
                                 int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                                 int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
            capture.release()
            self.key = f"bench:{path.name}"

        def frames(self, start: int = 0, stop: Optional[int] = None
                   ) -> Iterator[Tuple[int, np.ndarray]]:
            capture = cv2.VideoCapture(str(path))
            try:
                capture.set(cv2.CAP_PROP_POS_FRAMES, start)
                for index in range(start, self.info.frames if stop is None else stop):
                    ok, frame = capture.read()
                    if not ok:
                        return
                    yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            finally:
                capture.release()

    return VideoFileClip()


def run_one(args) -> dict:
    """One (model, objects) run in this process; returns its figures."""
    import torch

    torch.set_num_threads(args.threads)
    from sam_backend.assembly import create_tracker
    from sam_backend.settings import Settings
    from sam_backend.video.base import BoxPrompt
    from tests.support.random_weights import cached_random_checkpoint, cached_random_sam3

    if args.model == "sam2":
        checkpoint = cached_random_checkpoint("sam2", "hiera_tiny")
        settings = Settings(model_name="sam2", sam_config="hiera_tiny",
                            sam_checkpoint_file=str(checkpoint), device=args.device, offline=True)
    else:
        checkpoint = cached_random_sam3(reduced=args.sam3_reduced)
        settings = Settings(model_name="sam3", sam_checkpoint_file=str(checkpoint),
                            device=args.device, offline=True)
    clip = opencv_clip(Path(args.clip))
    started = time.perf_counter()
    tracker = create_tracker(settings)
    loaded = time.perf_counter() - started
    frames = min(args.frames or clip.info.frames, clip.info.frames)
    prompts = [BoxPrompt(k, 0, shape_box(k, 0, clip.info.height, clip.info.width))
               for k in range(args.objects)]
    started = time.perf_counter()
    tracks = tracker.session(clip).track(prompts, stop=frames)
    seconds = time.perf_counter() - started
    assert all(len(t.boxes) == frames for t in tracks.values())
    return {"model": args.model, "objects": args.objects, "frames": frames,
            "load_s": round(loaded, 2), "track_s": round(seconds, 2),
            "fps": round(frames / seconds, 4), "frames_encoded": tracker.features.encoded,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "device": args.device, "sam3_reduced": bool(args.sam3_reduced)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sam2,sam3")
    parser.add_argument("--objects", default="1,4")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--frames", type=int, default=None, help="track only the first N frames")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sam3-reduced", action="store_true",
                        help="the reduced SAM 3 of the tests (smoke runs), not the full size")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "video.json")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "OBJECTS"), help=argparse.SUPPRESS)
    parser.add_argument("--clip", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        args.model, args.objects = args.one[0], int(args.one[1])
        print(json.dumps(run_one(args)))
        return 0

    import tempfile

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        total = int(round(args.seconds * args.fps))
        clip = write_clip(Path(tmp) / "clip.mp4", total, args.fps, args.height, args.width)
        for model in args.models.split(","):
            for objects in [int(n) for n in args.objects.split(",")]:
                command = [sys.executable, __file__, "--one", model, str(objects),
                           "--clip", str(clip), "--device", args.device,
                           "--threads", str(args.threads)]
                if args.frames:
                    command += ["--frames", str(args.frames)]
                if args.sam3_reduced:
                    command.append("--sam3-reduced")
                done = subprocess.run(command, capture_output=True, text=True,
                                      env=dict(os.environ, PYTHONPATH=str(REPO)))
                if done.returncode != 0:
                    sys.stderr.write(done.stderr[-4000:])
                    return 1
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"| model | objects | frames | frames/s | load s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['model']} | {r['objects']} | {r['frames']} | {r['fps']} | {r['load_s']} | "
              f"{r['peak_rss_mib']} |")
    report = {"clip": {"seconds": args.seconds, "fps": args.fps, "height": args.height,
                       "width": args.width}, "threads": args.threads,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
