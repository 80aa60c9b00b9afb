"""What both trackers share: frames streamed from a :class:`~sam_backend.video.base.Clip`, a
byte-bounded cache of per-frame vision features, the sessions kept per clip, and the per-object
bookkeeping of prompts and corrections.

Memory, per clip and tracker (the caps the README's Video section documents):

- frames: never all in memory. :class:`StreamedFrames` decodes a frame when the model asks for
  it (sequential reads continue one open reader) and keeps the last ``keep`` preprocessed frames
  (3x1024x1024 float32 = 12 MiB each for SAM 2.1, 3x1008x1008 = 11.6 MiB for SAM 3);
- vision features: :class:`FeatureCache`, one per tracker, bounded in bytes
  (``video_feature_cache_mb``), least recently used frames evicted first, kept on the CPU
  (offloaded from a GPU). A frame's content-independent position encodings are kept once. Per
  frame: 16 MiB for SAM 2.1 (any hiera size), 21 MiB for SAM 3. A frame still cached is never
  encoded again (a correction re-tracks without re-encoding); an evicted one is re-encoded
  when needed;
- tracking state (the library's memory bank: mask memory features, low-res masks, object
  pointers): about 1 MiB per tracked frame and object, kept while the session lives; sessions
  are bounded in number (``video_sessions``, least recently used closed first) and a track is
  bounded by the caller's ``stop`` (the service's ``max_track_frames``).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import (Any, Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple)

import numpy as np

from sam_backend.video.base import Box, BoxPrompt, Clip, ProgressFn, Tracker, TrackingSession

log = logging.getLogger(__name__)

MIB = 1024 * 1024


def mask_box(mask: np.ndarray) -> Optional[Box]:
    """``(x0, y0, x1, y1)`` float pixels bounding the on pixels of an (H, W) mask (``x1``/``y1``
    exclusive: ``mask[y0:y1, x0:x1]`` holds every on pixel), or None when the mask is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask[rows[0]:rows[-1] + 1].any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def tensor_bytes(value: Any) -> int:
    """Bytes held by a tensor, or a list/tuple/dict of them."""
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    if hasattr(value, "element_size") and hasattr(value, "nelement"):
        return int(value.element_size() * value.nelement())
    return 0


class StreamedFrames:
    """The frames of a clip as the video predictors index them (``frames[i]``, ``len(frames)``),
    decoded on demand: ``preprocess(HxWx3 uint8 RGB) -> 3xSxS float tensor`` (the model's input).

    Sequential reads (what propagation does) continue one open reader; another index reopens it
    there. The last ``keep`` preprocessed frames are kept (a prompt's frame is read twice: once to
    add the prompt, once when propagation starts from it)."""

    def __init__(self, clip: Clip, preprocess: Callable[[np.ndarray], Any], keep: int = 2):
        self.clip = clip
        self.preprocess = preprocess
        self.keep = keep
        self._recent: "OrderedDict[int, Any]" = OrderedDict()
        self._reader: Optional[Iterator[Tuple[int, np.ndarray]]] = None
        self._next = -1
        self._lock = threading.Lock()
        self.decoded = 0  # frames decoded (tests, logs)

    def __len__(self) -> int:
        return self.clip.info.frames

    def keys(self):  # transformers' session only asks len() and [i]; a mapping's keys for repr
        return range(len(self))

    def __getitem__(self, index: int):
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} is outside the clip's {len(self)} frames")
        with self._lock:
            if index in self._recent:
                self._recent.move_to_end(index)
                return self._recent[index]
            if self._reader is None or index != self._next:
                self._reader = self.clip.frames(index)
            got, frame = next(self._reader)
            if got != index:
                raise RuntimeError(f"the clip gave frame {got} when frame {index} was asked for")
            self._next = index + 1
            self.decoded += 1
            tensor = self.preprocess(frame)
            self._recent[index] = tensor
            while len(self._recent) > self.keep:
                self._recent.popitem(last=False)
            return tensor

    def reset(self, clip: Clip) -> None:
        """Read from ``clip`` (same content, e.g. a reopened reader) from now on."""
        with self._lock:
            self.clip, self._reader, self._next = clip, None, -1


class FeatureCache:
    """Per-frame vision features of every session of one tracker, bounded in bytes, least
    recently used evicted first. Keys are ``(clip key, frame)``; values whatever the model's
    feature dict is (already on the storage device). ``encoded`` counts the frames put in (one
    per encoder run)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[Hashable, Tuple[Any, int]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.encoded = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        with self._lock:
            self.encoded += 1
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            # the newest frame stays even when alone over the bound (the step needs it)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, (_, size) = self._items.popitem(last=False)
                self._bytes -= size

    def drop(self, clip_key: str) -> None:
        """Forget every frame of one clip."""
        with self._lock:
            for key in [k for k in self._items if k[0] == clip_key]:
                self._bytes -= self._items.pop(key)[1]


class ObjectState:
    """One object's tracking state in the library (one inference state/session per object, all
    sharing the clip's frame features) and the prompts it has been given, in order."""

    def __init__(self, state: Any):
        self.state = state
        self.prompts: List[BoxPrompt] = []


def group_prompts(prompts: Sequence[BoxPrompt]) -> "OrderedDict[int, List[BoxPrompt]]":
    """Prompts by object id (first appearance order), each object's in the order given."""
    grouped: "OrderedDict[int, List[BoxPrompt]]" = OrderedDict()
    for prompt in prompts:
        grouped.setdefault(int(prompt.object_id), []).append(prompt)
    return grouped


class LibrarySession(TrackingSession):
    """The shared part of both trackers' sessions: per-object states kept between calls, new
    prompts added to an object's existing state (a correction goes into the tracker's memory as a
    conditioning frame, like the first box; then the object is propagated again from its first
    box: the same track as the library given all the boxes at once), objects stepped through the
    frames together so each frame is encoded once for all of them.

    Each object has its own library state: an object's track does not depend on which other
    objects are asked for in the same call (two objects at once = two separate runs).

    Subclasses give :meth:`_new_state`, :meth:`_add_box` and :meth:`_propagate` (a generator of
    ``(frame, mask HxW bool, score or None)`` for one object's state from ``start`` to
    ``last`` inclusive)."""

    tracker_name = "tracker"
    #: called with ``(object_id, frame, mask HxW bool)`` for every tracked frame (masks for a
    #: caller that wants them, e.g. brush output or tests); None: masks are dropped after the box
    on_mask: Optional[Callable[[int, int, np.ndarray], None]] = None

    def __init__(self, clip: Clip, features: FeatureCache):
        self.clip = clip
        self.features = features
        self.objects: Dict[int, ObjectState] = {}
        self._lock = threading.Lock()

    # -- to implement --------------------------------------------------------------------------
    def _new_state(self) -> Any:
        raise NotImplementedError

    def _add_box(self, state: Any, prompt: BoxPrompt) -> None:
        raise NotImplementedError

    def _propagate(self, state: Any, start: int, last: int
                   ) -> Iterator[Tuple[int, np.ndarray, Optional[float]]]:
        raise NotImplementedError

    # -- the contract --------------------------------------------------------------------------
    def use_clip(self, clip: Clip) -> None:
        """Read frames from ``clip`` (same key) from now on."""
        self.clip = clip

    def _object_state(self, object_id: int, prompts: List[BoxPrompt]) -> ObjectState:
        known = self.objects.get(object_id)
        if known is None or known.prompts != prompts[:len(known.prompts)]:
            # new object, or prompts that are not the earlier ones plus new: start it afresh
            # (its frames' features stay cached)
            known = ObjectState(self._new_state())
            self.objects[object_id] = known
        for prompt in prompts[len(known.prompts):]:
            self._add_box(known.state, prompt)
            known.prompts.append(prompt)
        return known

    def track(self, prompts, stop=None, progress: Optional[ProgressFn] = None, scope=None):
        from sam_backend.common.deadline import UNBOUNDED

        scope = scope or UNBOUNDED
        n = self.clip.info.frames
        stop = n if stop is None else max(0, min(int(stop), n))
        grouped = group_prompts(prompts)
        for object_id, object_prompts in grouped.items():
            for prompt in object_prompts:
                if not 0 <= prompt.frame < n:
                    raise ValueError(f"object {object_id}'s box is on frame {prompt.frame}, "
                                     f"outside the clip's {n} frames (0-based)")
        from sam_backend.video.base import Track

        tracks = {object_id: Track(object_id) for object_id in grouped}
        with self._lock:
            runs = {}
            for object_id, object_prompts in grouped.items():
                scope.check(f"adding object {object_id}'s boxes")
                state = self._object_state(object_id, object_prompts)
                first = min(p.frame for p in state.prompts)
                if first < stop:
                    runs[object_id] = (first, self._propagate(state.state, first, stop - 1))
            if not runs:
                return tracks
            try:
                self._step(runs, tracks, stop, progress, scope)
            finally:  # a stopped request leaves no half-run generator behind
                for _, steps in runs.values():
                    steps.close()
        return tracks

    def _step(self, runs, tracks, stop: int, progress: Optional[ProgressFn], scope) -> None:
        """Every object's propagation, frame by frame together, up to ``stop`` (exclusive)."""
        start = min(first for first, _ in runs.values())
        total = stop - start
        started = time.perf_counter()
        for done, frame in enumerate(range(start, stop), 1):
            scope.check(f"tracking frame {frame}")
            for object_id, (first, steps) in runs.items():
                if frame < first:
                    continue
                got, mask, score = next(steps)
                if got != frame:
                    raise RuntimeError(f"the tracker gave frame {got} for frame {frame}")
                tracks[object_id].boxes[frame] = mask_box(mask)
                if self.on_mask is not None:
                    self.on_mask(object_id, frame, mask)
                if score is not None:
                    tracks[object_id].scores[frame] = score
            if progress is not None:
                progress(done, total)
            if done % 10 == 0 or done == total:
                elapsed = time.perf_counter() - started
                log.info("%s: %d/%d frames of %s tracked (%d objects), %.2f frames/s",
                         self.tracker_name, done, total, self.clip.key, len(runs),
                         done / elapsed if elapsed > 0 else float("inf"))

    def close(self) -> None:
        self.objects.clear()
        self.features.drop(self.clip.key)


class SessionTracker(Tracker):
    """A tracker keeping at most ``max_sessions`` sessions (one per clip key, least recently used
    closed first) over one :class:`FeatureCache` of ``feature_cache_bytes``."""

    name = "tracker"

    def __init__(self, feature_cache_bytes: int, max_sessions: int):
        self.features = FeatureCache(feature_cache_bytes)
        self.max_sessions = max(1, int(max_sessions))
        self._sessions: "OrderedDict[str, LibrarySession]" = OrderedDict()
        self._lock = threading.Lock()

    def _new_session(self, clip: Clip) -> LibrarySession:
        raise NotImplementedError

    def session(self, clip: Clip) -> LibrarySession:
        with self._lock:
            found = self._sessions.get(clip.key)
            if found is not None:
                self._sessions.move_to_end(clip.key)
                found.use_clip(clip)
                return found
            session = self._new_session(clip)
            self._sessions[clip.key] = session
            while len(self._sessions) > self.max_sessions:
                _, old = self._sessions.popitem(last=False)
                old.close()
            return session
