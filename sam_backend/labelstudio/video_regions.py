"""Label Studio layer for video: the video config, ``videorectangle`` regions -> box prompts, and
tracks -> ``videorectangle`` prediction regions (pure functions).

What Label Studio 1.23.2 sends and stores (measured: ``docs/video-protocol.md``, fixtures in
``tests/video/fixtures/``):

* A region is one result ``{"type": "videorectangle", "from_name": <VideoRectangle name>,
  "to_name": <Video name>, "value": {"framesCount", "duration", "sequence": [keyframe, ...],
  "labels": [label]}, "id", "origin"}``; the label sits in the region's own ``value.labels`` (no
  separate ``labels`` result). There is no ``original_width``/``original_height``: the frame
  size comes from the clip.
* A keyframe is ``{"frame": f, "enabled": bool, "rotation": deg, "x", "y", "width", "height",
  "time"}``: ``f`` counts from 1 at the ``<Video framerate>`` of the config (default 24), the
  box is percent of the frame (``x``/``y`` its top-left corner before rotation, rotation about
  that corner), ``time`` is ``f / framerate`` (one frame late: Label Studio shows frame ``f`` at
  ``(f - 1) / framerate`` s, so ``time`` is never used here).
* Between keyframes the editor interpolates linearly. A keyframe with ``enabled: false`` is shown
  at its own frame and hides the region after it, until the next enabled keyframe.

Frame numbers: Label Studio frame ``f`` shows the clip at ``(f - 1) / framerate`` seconds, which
is clip frame ``floor((f - 1) * fps / framerate)`` (``f - 1`` when the config's framerate is the
clip's, as the template asks). Boxes are ``(x0, y0, x1, y1)`` float pixels of the frame.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from sam_backend.common.limits import shown
from sam_backend.errors import RequestError
from sam_backend.labelstudio.label_config import LabelConfig, VideoTag
from sam_backend.labelstudio.regions import new_region_id
from sam_backend.video.base import Box, BoxPrompt, ClipInfo, Track, clip_frame, pixel_prompts

logger = logging.getLogger(__name__)

DEFAULT_FRAMERATE = 24.0  # Label Studio's <Video framerate> default
EPSILON = 1e-6


@dataclass(frozen=True)
class VideoControls:
    """The parts of a labeling config that video tracking needs: the ``<Video>`` object, its
    ``<VideoRectangle>`` control (``box``: its name) and the labels of its ``<Labels>``."""

    video: VideoTag
    box: str
    labels_control: Optional[str]
    labels: Tuple[str, ...]

    @property
    def to_name(self) -> str:
        return self.video.name

    def framerate(self, task: Optional[Mapping[str, Any]] = None) -> float:
        """Frames per second Label Studio counts the video's frames in: the Video tag's
        ``framerate`` (``$key`` read from the task's data), as the editor reads it: not a
        positive number -> 24; below 1 -> its inverse."""
        raw: Any = self.video.framerate
        if isinstance(raw, str) and raw.startswith("$"):
            raw = ((task or {}).get("data") or {}).get(raw[1:])
        try:
            value = float(raw)
        except (TypeError, ValueError):
            return DEFAULT_FRAMERATE
        if not math.isfinite(value) or value <= 0:
            return DEFAULT_FRAMERATE
        return 1.0 / value if value < 1 else value


def video_controls(config: LabelConfig) -> List[VideoControls]:
    """Every ``<Video>`` of ``config`` that has a ``<VideoRectangle>``: one entry per box
    control (the first ``<Labels>`` on the same video gives the labels)."""
    out = []
    for video in config.videos:
        boxes = [c for c in config.video_controls
                 if c.type == "videorectangle" and c.to_name == video.name]
        labels = [c for c in config.video_controls
                  if c.type == "labels" and c.to_name == video.name]
        for box in boxes:
            out.append(VideoControls(video, box.name, labels[0].name if labels else None,
                                     labels[0].labels if labels else ()))
    return out


def video_url(task: Mapping[str, Any], controls: VideoControls) -> str:
    """The task's video URL: ``task["data"][<the Video tag's $key>]``."""
    url = (task.get("data") or {}).get(controls.video.data_key)
    if not isinstance(url, str) or not url.strip():
        raise RequestError(f"task {shown(task.get('id'))} has no video in "
                           f"data.{shown(controls.video.data_key)}: the labeling config's Video "
                           f"tag reads ${shown(controls.video.data_key)}")
    return url


# ---- frames ------------------------------------------------------------------------------------

def clip_index(ls_frame: int, fps: float, framerate: float) -> int:
    """The 0-based clip frame Label Studio shows as its frame ``ls_frame`` (1-based, counted at
    ``framerate``) of a clip at ``fps``."""
    return clip_frame(ls_frame - 1, fps, framerate)


def ls_frames_count(info: ClipInfo, framerate: float) -> int:
    """``framesCount`` as the editor computes it: ``round(duration * framerate)``."""
    return max(1, int(round(info.frames / info.fps * framerate)))


def ls_frame(index: int, fps: float, framerate: float) -> int:
    """The first Label Studio frame (1-based) that shows clip frame ``index`` (0-based)."""
    return int(math.ceil(index * framerate / fps - EPSILON)) + 1


# ---- regions -> prompts -------------------------------------------------------------------------

@dataclass(frozen=True)
class VideoObject:
    """An annotator's region, tracked as ``object_id``: its region ``id`` and label."""

    object_id: int
    region_id: str
    label: Optional[str]


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{what} must be a number, got {shown(value)}")
    if not math.isfinite(value):
        raise RequestError(f"{what} must be a finite number, got {shown(value)}")
    return float(value)


def keyframe_prompt(keyframe: Any, object_id: int, where: str) -> Optional[BoxPrompt]:
    """One keyframe as a relative :class:`BoxPrompt`: ``frame`` = Label Studio's frame - 1 (its
    frames counted at the ``<Video framerate>``: :func:`clip_index` maps them to the clip's),
    ``box`` = ``(x0, y0, x1, y1)`` as fractions of the frame before ``rotation`` (degrees about
    the top-left corner; :func:`~sam_backend.video.base.pixel_prompts` rotates and clips it in
    pixels). None for a box without area (a click without a drag); a RequestError naming
    ``where`` for a broken keyframe."""
    if not isinstance(keyframe, Mapping):
        raise RequestError(f"{where} is not a keyframe object: {shown(keyframe)}")
    frame = keyframe.get("frame")
    if isinstance(frame, bool) or not isinstance(frame, (int, float)) \
            or not math.isfinite(frame) or frame < 1 or frame != int(frame):
        raise RequestError(f"{where}.frame {shown(frame)} is not a frame number (1, 2, ...)")
    x, y = _number(keyframe.get("x"), f"{where}.x"), _number(keyframe.get("y"), f"{where}.y")
    w = _number(keyframe.get("width"), f"{where}.width")
    h = _number(keyframe.get("height"), f"{where}.height")
    rotation = _number(keyframe.get("rotation") or 0, f"{where}.rotation")
    if w == 0 or h == 0:
        return None
    x0, x1 = sorted((x / 100.0, (x + w) / 100.0))
    y0, y1 = sorted((y / 100.0, (y + h) / 100.0))
    return BoxPrompt(object_id, int(frame) - 1, (x0, y0, x1, y1), rotation)


def keyframe_box(keyframe: Mapping[str, Any], width: int, height: int) -> Optional[Box]:
    """A keyframe's box in pixels ``(x0, y0, x1, y1)`` of a ``width`` x ``height`` frame: the
    axis-aligned bounds of the rectangle rotated about its top-left corner, clipped to the
    frame; None when it covers less than a pixel either way."""
    prompt = keyframe_prompt(dict(keyframe, frame=1), 0, "a videorectangle keyframe")
    if prompt is None:
        return None
    (pixel,) = pixel_prompts([prompt], width, height) or [None]
    return pixel.box if pixel is not None else None


def box_regions(results: Iterable[Mapping[str, Any]], controls: VideoControls
                ) -> List[Mapping[str, Any]]:
    """The ``videorectangle`` regions of ``controls``' box control among ``results``."""
    return [r for r in results if isinstance(r, Mapping) and r.get("type") == "videorectangle"
            and r.get("from_name") == controls.box and r.get("to_name") == controls.to_name]


def region_prompts(regions: Sequence[Mapping[str, Any]], where: str = "videorectangle region"
                   ) -> Tuple[List[BoxPrompt], List[VideoObject]]:
    """Relative box prompts of the annotator's ``videorectangle`` regions
    (:func:`keyframe_prompt`: no clip needed), and the object each region became. One object
    per region (``object_id`` in region order); each keyframe is a prompt on its frame (the first
    the object's box, later ones corrections); keyframes without area are left out, and so is a
    region without any other. A RequestError names a broken region (``where`` + its id)."""
    prompts: List[BoxPrompt] = []
    objects: List[VideoObject] = []
    for region in regions:
        at = f"{where} {shown(region.get('id'))}"
        value = region.get("value")
        sequence = value.get("sequence") if isinstance(value, Mapping) else None
        if not isinstance(sequence, list) or not sequence:
            raise RequestError(f"{at}: a videorectangle needs value.sequence, a list of "
                               f"keyframes")
        object_id = len(objects)
        found: Dict[int, BoxPrompt] = {}
        for i, keyframe in enumerate(sequence):
            prompt = keyframe_prompt(keyframe, object_id, f"{at}.value.sequence[{i}]")
            if prompt is None:
                logger.info("%s: keyframe %d has an empty box; left out", at, i)
                continue
            found[prompt.frame] = prompt  # a later keyframe on the same frame wins
        if not found:
            logger.info("%s has no box to track; left out", at)
            continue
        labels = value.get("labels")
        label = labels[0] if isinstance(labels, list) and labels and isinstance(labels[0], str) \
            else None
        objects.append(VideoObject(object_id, str(region.get("id") or ""), label))
        prompts.extend(found[f] for f in sorted(found))
    return prompts, objects


def prompts_from_regions(regions: Sequence[Mapping[str, Any]], info: ClipInfo,
                         framerate: float) -> Tuple[List[BoxPrompt], List[VideoObject]]:
    """:func:`region_prompts` on a clip (``info``): pixel prompts on clip frames, as the
    tracking pass makes them (:func:`~sam_backend.video.base.pixel_prompts`). A keyframe past
    the clip's end is a 400."""
    relative, objects = region_prompts(regions)
    for p in relative:
        index = clip_index(p.frame + 1, info.fps, framerate)
        if index >= info.frames:
            raise RequestError(
                f"videorectangle object {p.object_id}: keyframe {p.frame + 1} is past the "
                f"clip's end ({info.frames} frames at {info.fps:g} fps; the Video tag's "
                f"framerate is {framerate:g}): set framerate to the video's frame rate")
    return pixel_prompts(relative, info.width, info.height, info.fps, framerate), objects


def task_box_regions(task: Mapping[str, Any], controls: VideoControls
                     ) -> List[Mapping[str, Any]]:
    """The boxes to track in a task as Label Studio sends it (task open / *Retrieve
    predictions*: the whole task, no context): those of its most recent annotation that has
    any (not cancelled; ``updated_at``, then ``id``), else of its most recent draft."""
    def newest(items):
        usable = [a for a in items or [] if isinstance(a, Mapping)
                  and not a.get("was_cancelled") and box_regions(a.get("result") or [], controls)]
        usable.sort(key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""),
                                   a.get("id") or 0))
        return box_regions(usable[-1].get("result") or [], controls) if usable else []

    return newest(task.get("annotations")) or newest(task.get("drafts"))


# ---- tracks -> regions --------------------------------------------------------------------------

def _percent(box: Box, width: int, height: int) -> Dict[str, float]:
    x0, y0, x1, y1 = box
    return {"x": x0 / width * 100.0, "y": y0 / height * 100.0,
            "width": (x1 - x0) / width * 100.0, "height": (y1 - y0) / height * 100.0}


def track_sequence(track: Track, info: ClipInfo, framerate: float) -> List[Dict[str, Any]]:
    """A track as a ``videorectangle`` keyframe sequence: one keyframe per Label Studio frame
    whose clip frame was tracked and holds the object. Where the object is gone (a tracked frame
    without a box) the last keyframe before the gap is ``enabled: false`` (the editor shows it
    there and hides the region after it) and the next frame that holds the object again starts
    with an enabled keyframe; frames not tracked get none."""
    total = ls_frames_count(info, framerate)
    sequence: List[Dict[str, Any]] = []
    for frame in range(1, total + 1):
        index = clip_index(frame, info.fps, framerate)
        if index >= info.frames or index not in track.boxes:
            continue
        box = track.boxes[index]
        if box is None:
            if sequence and sequence[-1]["enabled"]:
                sequence[-1]["enabled"] = False
            continue
        sequence.append({"frame": frame, "enabled": True, "rotation": 0,
                         **_percent(box, info.width, info.height), "time": frame / framerate})
    # the track ends where tracking stopped, not where the object left: the last keyframe keeps
    # the region shown after it only if the clip was tracked to its end
    if sequence and max(track.boxes, default=-1) < info.frames - 1:
        sequence[-1]["enabled"] = False
    return sequence


def track_regions(tracks: Mapping[int, Track], objects: Sequence[VideoObject],
                  controls: VideoControls, info: ClipInfo, framerate: float
                  ) -> List[Dict[str, Any]]:
    """Prediction regions of ``tracks`` (by object id) under each object's label, as Label
    Studio draws them: one ``videorectangle`` result per object with a keyframe per tracked
    frame (:func:`track_sequence`) and ``score`` the mean of the track's scores when it has
    any. Objects whose track holds no box are left out."""
    regions = []
    for obj in objects:
        track = tracks.get(obj.object_id)
        if track is None:
            continue
        sequence = track_sequence(track, info, framerate)
        if not sequence:
            continue
        value: Dict[str, Any] = {"framesCount": ls_frames_count(info, framerate),
                                 "duration": info.frames / info.fps, "sequence": sequence}
        if obj.label is not None:
            value["labels"] = [obj.label]
        region: Dict[str, Any] = {"id": new_region_id(), "from_name": controls.box,
                                  "to_name": controls.to_name, "type": "videorectangle",
                                  "value": value}
        scores = [float(s) for s in track.scores.values() if math.isfinite(s)]
        if scores:
            region["score"] = sum(scores) / len(scores)
        regions.append(region)
    return regions


__all__ = ["DEFAULT_FRAMERATE", "VideoControls", "VideoObject", "box_regions", "clip_index",
           "keyframe_box", "keyframe_prompt", "ls_frame", "ls_frames_count", "prompts_from_regions",
           "region_prompts",
           "task_box_regions", "track_regions", "track_sequence", "video_controls", "video_url"]
