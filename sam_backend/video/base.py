"""The video contract: a clip's frames, the annotator's boxes, the tracks that come back.

Frame indices here are 0-based (Label Studio's ``videorectangle`` sequence counts frames from 1:
the conversion lives with the region code, nowhere else). Boxes are ``(x0, y0, x1, y1)`` float
pixels of the frame (not percent).
"""
from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from sam_backend.common.deadline import UNBOUNDED, WorkScope

Box = Tuple[float, float, float, float]
ProgressFn = Callable[[int, int], None]  # (frames done, frames to do)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipInfo:
    """What a clip is: ``frames`` decodable frames of ``width`` x ``height`` pixels at ``fps``."""

    frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        """Seconds (``frames / fps``)."""
        return self.frames / self.fps if self.fps > 0 else 0.0


class Clip(ABC):
    """A decoded-on-demand video: frames are read as they are asked for, never all at once.

    ``key`` identifies the clip's content (like an image's embedding key): two clips with the same
    key have the same frames, so a tracker may reuse features it cached under it."""

    key: str
    info: ClipInfo

    @abstractmethod
    def frames(self, start: int = 0, stop: Optional[int] = None
               ) -> Iterator[Tuple[int, np.ndarray]]:
        """``(index, frame)`` for ``start <= index < stop`` (default: to the end), in order;
        ``frame`` is HxWx3 uint8 RGB."""

    def frame(self, index: int) -> np.ndarray:
        """One frame (HxWx3 uint8 RGB)."""
        for _, frame in self.frames(index, index + 1):
            return frame
        raise IndexError(f"frame {index} is past the clip's {self.info.frames} frames")

    def close(self) -> None:
        """Release the reader (files, decoders)."""


@dataclass(frozen=True)
class BoxPrompt:
    """The annotator's box for object ``object_id`` on ``frame`` (0-based). Several prompts of
    one object on different frames are a first box and its corrections; the tracker keeps them
    all in the object's memory."""

    object_id: int
    frame: int
    box: Box
    #: degrees clockwise about the box's top-left corner ``(x0, y0)``, as Label Studio rotates a
    #: rectangle; only a relative prompt (:func:`pixel_prompts`) carries one, a tracker's prompts
    #: are axis-aligned (0)
    rotation: float = 0.0


def rotated_bounds(x0: float, y0: float, dx: float, dy: float, rotation: float, width: float,
                   height: float, min_size: float = 1.0) -> Optional[Box]:
    """The pixel box ``(x0, y0, x1, y1)`` of a ``dx`` x ``dy`` pixel rectangle whose top-left
    corner is ``(x0, y0)``, rotated by ``rotation`` degrees about that corner: the bounds of its
    corners, clipped to the ``width`` x ``height`` frame; None when under ``min_size`` pixels
    either way (a click without a drag leaves a zero-size box)."""
    if rotation % 360:
        a = math.radians(rotation)
        cos, sin = math.cos(a), math.sin(a)
        corners = [(x0 + px * cos - py * sin, y0 + px * sin + py * cos)
                   for px, py in ((0, 0), (dx, 0), (dx, dy), (0, dy))]
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    else:
        xs, ys = [x0, x0 + dx], [y0, y0 + dy]
    box = (min(max(min(xs), 0.0), width), min(max(min(ys), 0.0), height),
           min(max(max(xs), 0.0), width), min(max(max(ys), 0.0), height))
    if box[2] - box[0] < min_size or box[3] - box[1] < min_size:
        return None
    return box


def clip_frame(frame: int, fps: float, framerate: float) -> int:
    """The clip frame (0-based) shown at frame ``frame`` (0-based) of a count at ``framerate``
    frames per second (0: the clip's own ``fps``): ``floor(frame * fps / framerate)``, as Label
    Studio's player shows its frame ``frame + 1`` at ``frame / framerate`` seconds."""
    if framerate <= 0 or abs(framerate - fps) < 1e-9:
        return frame
    return int(math.floor(frame * fps / framerate + 1e-6))


def pixel_prompts(prompts: Sequence[BoxPrompt], width: int, height: int, fps: float = 0.0,
                  framerate: float = 0.0) -> List[BoxPrompt]:
    """Relative prompts (``box`` as fractions 0..1 of the frame before ``rotation``, frames
    counted at ``framerate``) -> axis-aligned pixel prompts of a ``width`` x ``height`` frame on
    clip frames (a clip at ``fps``): rotated in pixels, clipped to the frame; a box under a pixel
    is left out; of two on one clip frame, the later wins. In object, then frame order."""
    out: Dict[Tuple[int, int], BoxPrompt] = {}
    for p in sorted(prompts, key=lambda p: (p.object_id, p.frame)):
        frame = clip_frame(p.frame, fps, framerate)
        box = rotated_bounds(p.box[0] * width, p.box[1] * height,
                             (p.box[2] - p.box[0]) * width, (p.box[3] - p.box[1]) * height,
                             p.rotation, width, height)
        if box is None:
            log.info("object %d: the box on frame %d is under a pixel; left out", p.object_id,
                     frame)
            continue
        out[(p.object_id, frame)] = BoxPrompt(p.object_id, frame, box)
    return list(out.values())


@dataclass
class Track:
    """One object through the clip: ``boxes[frame]`` is its ``(x0, y0, x1, y1)`` float pixels,
    or None where its mask is empty (the object is not visible); ``scores[frame]`` the tracker's
    confidence there when it gives one. Frames not in ``boxes`` were not tracked (yet)."""

    object_id: int
    boxes: Dict[int, Optional[Box]] = field(default_factory=dict)
    scores: Dict[int, float] = field(default_factory=dict)


class TrackingSession(ABC):
    """One clip open in one tracker: its frame features are computed once and kept (bounded), so
    tracking again with a correction does not re-encode the frames."""

    clip: Clip

    @abstractmethod
    def track(self, prompts: Sequence[BoxPrompt], stop: Optional[int] = None,
              progress: Optional[ProgressFn] = None,
              scope: WorkScope = UNBOUNDED) -> Dict[int, Track]:
        """Every object of ``prompts`` at once, from its first prompted frame forward to ``stop``
        (exclusive; default the clip's end): ``{object_id: Track}``. ``scope`` is checked between
        frames (a request's deadline / client); ``progress`` is called as frames are done."""

    def close(self) -> None:
        """Drop the cached features."""


class Tracker(ABC):
    """A model family's video tracker (SAM 2.1's video predictor, SAM 3's tracker)."""

    name: str

    @abstractmethod
    def session(self, clip: Clip) -> TrackingSession:
        """A session on ``clip`` (reusing the cached one for ``clip.key`` when there is one)."""
