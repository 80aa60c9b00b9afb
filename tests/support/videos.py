"""Synthetic clips for the video tests: moving shapes written with OpenCV's ``VideoWriter``.

VP8 in WebM (``VP80``) is what both sides here handle: OpenCV's wheel writes and reads it, and
Label Studio's video player (Chromium's ``<video>``) plays it. OpenCV's wheel cannot write H.264
(``avc1``: no encoder); ``mp4v`` (MPEG-4 Part 2 in .mp4) is written and read by OpenCV but not
played by Chromium.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np

Box = Tuple[int, int, int, int]

# (codec fourcc, file suffix)
WEBM_VP8 = ("VP80", ".webm")
MP4_MPEG4 = ("mp4v", ".mp4")
AVI_MJPEG = ("MJPG", ".avi")


def shapes_frame(index: int, width: int = 320, height: int = 240) -> Tuple[np.ndarray,
                                                                           Dict[str, Box]]:
    """Frame ``index`` (HxWx3 uint8 RGB) of the shapes clip and each shape's box
    ``(x0, y0, x1, y1)`` (pixels, x1/y1 exclusive): a red square moving right, a blue disc moving
    down, on a grey background."""
    frame = np.full((height, width, 3), 128, np.uint8)
    side = max(8, height // 6)
    sx = (8 + 4 * index) % max(1, width - side - 8)
    sy = height // 5
    frame[sy:sy + side, sx:sx + side] = (220, 30, 30)
    radius = max(6, height // 10)
    cx = (3 * width) // 4
    cy = radius + 4 + (3 * index) % max(1, height - 2 * radius - 8)
    cv2.circle(frame, (cx, cy), radius, (30, 30, 220), -1)
    return frame, {"square": (sx, sy, sx + side, sy + side),
                   "disc": (cx - radius, cy - radius, cx + radius + 1, cy + radius + 1)}


def write_shapes_clip(path: Path, frames: int = 24, fps: float = 12.0, width: int = 320,
                      height: int = 240, codec: Tuple[str, str] = WEBM_VP8
                      ) -> List[Dict[str, Box]]:
    """Write the shapes clip to ``path`` (its suffix should be ``codec``'s); the boxes of each
    frame, in order."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec[0]), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {codec[0]} to {path}")
    boxes = []
    try:
        for index in range(frames):
            frame, shown = shapes_frame(index, width, height)
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            boxes.append(shown)
    finally:
        writer.release()
    return boxes


def shapes_clip_bytes(tmp: Path, **kw) -> bytes:
    """The bytes of :func:`write_shapes_clip` (written to ``tmp`` first)."""
    codec = kw.get("codec", WEBM_VP8)
    path = Path(tmp) / f"shapes{codec[1]}"
    write_shapes_clip(path, **kw)
    return path.read_bytes()
