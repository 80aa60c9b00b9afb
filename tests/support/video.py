"""Synthetic clips for the video tests: moving shapes written with OpenCV, and a
:class:`~sam_backend.video.base.Clip` over a folder of JPEG frames (the form SAM 2's own
``init_state`` reads), so the library and the trackers see the very same pixels."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from sam_backend.video.base import Clip, ClipInfo

# two shapes: (colour RGB, start xyxy as fractions of the frame, velocity in fractions per frame)
SHAPES = {1: ((230, 40, 40), (0.10, 0.20, 0.35, 0.55), (0.04, 0.01)),
          2: ((40, 60, 220), (0.60, 0.50, 0.85, 0.90), (-0.03, -0.02))}


def moving_shapes(frames: int, height: int, width: int) -> Tuple[List[np.ndarray],
                                                                 Dict[int, List[Tuple[float, ...]]]]:
    """``frames`` HxWx3 uint8 RGB frames of a textured background with a red rectangle and a blue
    disc moving across it, and each shape's true box per frame (xyxy pixels) by object id."""
    import cv2

    rng = np.random.default_rng(7)
    background = cv2.GaussianBlur(rng.integers(60, 200, (height, width, 3), dtype=np.uint8),
                                  (0, 0), 3)
    images, boxes = [], {k: [] for k in SHAPES}
    for t in range(frames):
        image = background.copy()
        for object_id, (colour, (x0, y0, x1, y1), (vx, vy)) in SHAPES.items():
            box = ((x0 + vx * t) * width, (y0 + vy * t) * height,
                   (x1 + vx * t) * width, (y1 + vy * t) * height)
            p0, p1 = (int(box[0]), int(box[1])), (int(box[2]), int(box[3]))
            if object_id == 1:
                cv2.rectangle(image, p0, p1, colour, -1)
            else:
                centre = ((p0[0] + p1[0]) // 2, (p0[1] + p1[1]) // 2)
                cv2.ellipse(image, centre, ((p1[0] - p0[0]) // 2, (p1[1] - p0[1]) // 2), 0, 0,
                            360, colour, -1)
            boxes[object_id].append(box)
        images.append(image)
    return images, boxes


def write_mp4(path: Path, frames: List[np.ndarray], fps: float = 25.0) -> Path:
    """The frames as an mp4v video written with OpenCV."""
    import cv2

    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def write_jpeg_folder(folder: Path, frames: List[np.ndarray]) -> Path:
    """``folder/00000.jpg`` ... (the layout SAM2VideoPredictor.init_state reads)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{index:05d}.jpg", quality=95)
    return folder


class JpegFolderClip(Clip):
    """A clip over a JPEG folder, decoded with PIL one frame at a time (as sam2 decodes it);
    ``reads`` counts decoded frames."""

    def __init__(self, folder: Path, fps: float = 25.0):
        from PIL import Image

        self.paths = sorted(Path(folder).glob("*.jpg"))
        with Image.open(self.paths[0]) as first:
            width, height = first.size
        self.info = ClipInfo(len(self.paths), fps, width, height)
        digest = hashlib.sha256()
        for path in self.paths:
            digest.update(path.read_bytes())
        self.key = digest.hexdigest()[:16]
        self.reads = 0

    def frames(self, start: int = 0, stop: Optional[int] = None) -> Iterator[Tuple[int, np.ndarray]]:
        from PIL import Image

        stop = self.info.frames if stop is None else min(stop, self.info.frames)
        for index in range(start, stop):
            with Image.open(self.paths[index]) as image:
                self.reads += 1
                yield index, np.array(image.convert("RGB"))


def box_iou(a, b) -> float:
    """IoU of two xyxy boxes; 1.0 when both are None (both masks empty), 0.0 when one is."""
    if a is None or b is None:
        return 1.0 if a is None and b is None else 0.0
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 1.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def assert_same_tracks(ours_masks, ours_tracks, library, what: str) -> None:
    """Every frame the library tracked: our mask and box IoU >= 0.99 against the library's
    mask and its box, our score within 1e-3 of its score. ``library``: ``(masks, scores)`` by
    ``(object_id, frame)`` (HxW bool; float)."""
    from sam_backend.video.streaming import mask_box

    library_masks, library_scores = library
    for (object_id, frame), score in library_scores.items():
        assert abs(ours_tracks[object_id].scores[frame] - score) <= 1e-3, \
            f"{what}: object {object_id} frame {frame} score"

    assert library_masks, "the library tracked nothing"
    for (object_id, frame), expected in library_masks.items():
        got = ours_masks[(object_id, frame)]
        assert mask_iou(got, expected) >= 0.99, f"{what}: object {object_id} frame {frame} mask"
        box = ours_tracks[object_id].boxes[frame]
        assert box_iou(box, mask_box(expected)) >= 0.99, \
            f"{what}: object {object_id} frame {frame}: box {box} vs {mask_box(expected)}"
    frames = {f for (_, f) in library_masks}
    for object_id in {o for (o, _) in library_masks}:
        assert set(ours_tracks[object_id].boxes) == frames, f"{what}: frames of {object_id}"
