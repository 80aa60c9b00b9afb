"""The video contract: a clip's frames, the annotator's boxes, the tracks that come back.

Frame indices here are 0-based (Label Studio's ``videorectangle`` sequence counts frames from 1:
the conversion lives with the region code, nowhere else). Boxes are ``(x0, y0, x1, y1)`` float
pixels of the frame (not percent).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from sam_backend.common.deadline import UNBOUNDED, WorkScope

Box = Tuple[float, float, float, float]
ProgressFn = Callable[[int, int], None]  # (frames done, frames to do)


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
