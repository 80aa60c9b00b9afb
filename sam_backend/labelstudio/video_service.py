"""The Label Studio layer's video side: a video task reaching /predict -> the boxes it holds ->
one tracking request -> every object's track as a ``videorectangle`` region (:class:`VideoPredictions`).

    task (+ context) ──► boxes (keyframes of the task's videorectangle regions) ──► BoxPrompts
        ──► TrackingJobs.answer (first ``video_answer_frames`` frames within
            ``video_answer_timeout`` s, the rest in the background) ──► videorectangle regions

**Which boxes.** An interactive request's ``context.result`` when it holds ``videorectangle``
regions; else (task opened, *Retrieve predictions*) the regions of the task's most recently
updated annotation or draft that has any. Each region is one object; each of its keyframes is a
box of that object (the first box and its corrections), in pixels of the clip's frames (Label
Studio's frame ``n`` is the clip's frame ``n - 1``). At most ``max_points`` boxes in all.

**The answer.** One ``videorectangle`` region per object, under the object's label, control and
video: a keyframe on every tracked frame (``enabled``; the frame before the object is lost, and
the last tracked frame, are ``enabled: false`` so that Label Studio does not draw the box on past
them), ``framesCount`` and ``duration`` of the clip. While only the first frames are tracked the
answer holds those (Label Studio keeps a prediction: the next ask, once the pass is done, gets
the whole track); before that, ``[]`` for the task (Label Studio stores nothing and asks again).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from defusedxml.ElementTree import fromstring as defused_fromstring

from sam_backend.common.deadline import UNBOUNDED, WorkScope
from sam_backend.common.limits import shown
from sam_backend.errors import ImageError, RequestError
from sam_backend.labelstudio.regions import new_region_id
from sam_backend.video.base import BoxPrompt, Track
from sam_backend.video.jobs import TrackRequest, TrackResult

if TYPE_CHECKING:
    from sam_backend.images.loader import ImageLoader
    from sam_backend.settings import Settings
    from sam_backend.video.jobs import TrackingJobs

log = logging.getLogger(__name__)

#: Label Studio's frame rate when the Video tag names none (its editor's default)
DEFAULT_FRAMERATE = 24.0


@dataclass(frozen=True)
class VideoControls:
    """The video parts of a labeling config: ``videos`` (Video name -> task data key and its
    ``framerate`` attribute, if a number), ``rectangles`` (VideoRectangle name -> the Video it
    labels), ``labels`` (Labels name -> (the Video it labels, its label values))."""

    videos: Dict[str, Tuple[str, Optional[float]]]
    rectangles: Dict[str, str]
    labels: Dict[str, Tuple[str, Tuple[str, ...]]]

    @property
    def tracks(self) -> bool:
        """Whether the config can hold tracks: a VideoRectangle on a Video."""
        return any(to in self.videos for to in self.rectangles.values())

    def rectangle_for(self, to_name: str) -> Optional[str]:
        return next((n for n, to in self.rectangles.items() if to == to_name), None)


def video_controls(text: str) -> VideoControls:
    """The :class:`VideoControls` of a labeling config's XML (already checked by the config
    parser: this one only reads it)."""
    root = defused_fromstring(text, forbid_dtd=True)
    videos: Dict[str, Tuple[str, Optional[float]]] = {}
    rectangles: Dict[str, str] = {}
    labels: Dict[str, Tuple[str, Tuple[str, ...]]] = {}
    for element in root.iter():
        tag = element.tag.lower() if isinstance(element.tag, str) else ""
        name = element.get("name") or ""
        if tag == "video" and name:
            rate = element.get("framerate")
            try:
                fps = float(rate) if rate and not rate.startswith("$") else None
            except ValueError:
                fps = None
            videos[name] = ((element.get("value") or "").lstrip("$"),
                            fps if fps and math.isfinite(fps) and fps > 0 else None)
        elif tag == "videorectangle" and name:
            rectangles[name] = element.get("toName") or ""
        elif tag == "labels" and name:
            values = tuple(c.get("value") for c in element
                           if isinstance(c.tag, str) and c.tag.lower() == "label"
                           and c.get("value") is not None)
            labels[name] = (element.get("toName") or "", values)
    return VideoControls(videos, rectangles, labels)


@dataclass(frozen=True)
class VideoObject:
    """One object of a request: its region (id, VideoRectangle, Video), its label and boxes."""

    object_id: int
    region_id: str
    from_name: str
    to_name: str
    label: Optional[str]
    prompts: Tuple[BoxPrompt, ...]


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{what} must be a number, got {shown(value)}")
    return float(value)


def region_prompts(region: dict, object_id: int, where: str) -> List[BoxPrompt]:
    """The boxes of one ``videorectangle`` region: one :class:`BoxPrompt` per keyframe (frame
    0-based, ``(x0, y0, x1, y1)`` as fractions 0..1 of the frame, as a
    :class:`~sam_backend.video.jobs.TrackRequest` takes them; a rotated box is its corners'
    bounds), clipped to the frame. A RequestError names what is wrong."""
    value = region.get("value")
    sequence = value.get("sequence") if isinstance(value, dict) else None
    if not isinstance(sequence, list) or not sequence:
        raise RequestError(f"{where}: a videorectangle needs value.sequence, a list of keyframes")
    prompts: Dict[int, BoxPrompt] = {}
    for i, item in enumerate(sequence):
        at = f"{where}.value.sequence[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"{at} is not a keyframe object")
        frame = item.get("frame")
        if isinstance(frame, bool) or not isinstance(frame, int) or frame < 1:
            raise RequestError(f"{at}.frame must be a frame number >= 1, got {shown(frame)}")
        x, y = _number(item.get("x"), f"{at}.x"), _number(item.get("y"), f"{at}.y")
        w, h = _number(item.get("width"), f"{at}.width"), _number(item.get("height"),
                                                                    f"{at}.height")
        angle = math.radians(_number(item.get("rotation") or 0, f"{at}.rotation"))
        # Label Studio rotates around the top-left corner, clockwise (y down)
        c, s = math.cos(angle), math.sin(angle)
        xs = [x, x + w * c, x + w * c - h * s, x - h * s]
        ys = [y, y + w * s, y + w * s + h * c, y + h * c]
        x0, x1 = (min(max(v / 100.0, 0.0), 1.0) for v in (min(xs), max(xs)))
        y0, y1 = (min(max(v / 100.0, 0.0), 1.0) for v in (min(ys), max(ys)))
        if x1 <= x0 or y1 <= y0:
            raise RequestError(f"{at}: the box has no area inside the frame")
        prompts.setdefault(frame - 1, BoxPrompt(object_id, frame - 1, (x0, y0, x1, y1)))
    return [prompts[f] for f in sorted(prompts)]


def _updated(item: dict) -> str:
    return str(item.get("updated_at") or item.get("created_at") or "")


def task_regions(task: dict, context: Any) -> List[dict]:
    """The ``videorectangle`` regions the boxes come from (module docstring)."""
    if isinstance(context, dict) and isinstance(context.get("result"), list):
        found = [r for r in context["result"] if isinstance(r, dict)
                 and r.get("type") == "videorectangle"]
        if found:
            return found
    candidates = []
    for kind in ("annotations", "drafts"):
        for item in task.get(kind) or []:
            if not isinstance(item, dict) or item.get("was_cancelled"):
                continue
            regions = [r for r in item.get("result") or []
                       if isinstance(r, dict) and r.get("type") == "videorectangle"]
            if regions:
                candidates.append((_updated(item), len(candidates), regions))
    if not candidates:
        return []
    return max(candidates)[2]


def track_region(track: Track, obj: VideoObject, frames: int, fps: float, width: int,
                 height: int, stop: int, score: Optional[float] = None) -> Optional[dict]:
    """The ``videorectangle`` region of one object's ``track`` (module docstring); None when it
    has no box. ``stop``: the frame the tracking stopped before (0-based, exclusive)."""
    sequence: List[dict] = []
    tracked = sorted(f for f in track.boxes if f < stop)
    for index, frame in enumerate(tracked):
        box = track.boxes[frame]
        if box is None:
            continue
        x0, y0, x1, y1 = (float(v) for v in box)
        nxt = tracked[index + 1] if index + 1 < len(tracked) else None
        last = nxt is None or nxt != frame + 1 or track.boxes[nxt] is None
        sequence.append({"frame": frame + 1, "enabled": not (last and frame + 1 < frames),
                         "rotation": 0, "x": 100.0 * x0 / width, "y": 100.0 * y0 / height,
                         "width": 100.0 * (x1 - x0) / width,
                         "height": 100.0 * (y1 - y0) / height, "time": (frame + 1) / fps})
    if not sequence:
        return None
    value: Dict[str, Any] = {"framesCount": frames, "duration": frames / fps,
                             "sequence": sequence}
    if obj.label is not None:
        value["labels"] = [obj.label]
    region = {"id": new_region_id(), "type": "videorectangle", "from_name": obj.from_name,
              "to_name": obj.to_name, "origin": "prediction", "value": value}
    if score is not None:
        region["score"] = score
    return region


class VideoPredictions:
    """Answers /predict for video tasks (module docstring) with the :class:`TrackingJobs` it is
    handed (its tracker is loaded on first use)."""

    def __init__(self, settings: "Settings", images: "ImageLoader", jobs: "TrackingJobs",
                 tracker_identity: str, model_version: str):
        self.settings = settings
        self.images = images
        self.jobs = jobs
        self.tracker_identity = tracker_identity
        self.model_version = model_version

    def controls(self, text: str) -> VideoControls:
        """The config's video controls (memoised by the config's text, a few dozen configs)."""
        cache = self.__dict__.setdefault("_controls", {})
        found = cache.get(text)
        if found is None:
            found = video_controls(text)
            if len(cache) >= 64:
                cache.clear()
            cache[text] = found
        return found

    def handles(self, config_text: str) -> bool:
        """Whether the config holds tracks (a VideoRectangle on a Video): its tasks are
        answered here."""
        return isinstance(config_text, str) and "video" in config_text.lower() and \
            self.controls(config_text).tracks

    # -- from the task to one tracking request ---------------------------------------------------
    def objects(self, task: dict, controls: VideoControls, context: Any) -> List[VideoObject]:
        """The objects (and their boxes) of ``task``; a RequestError names a broken region."""
        objects: List[VideoObject] = []
        count = 0
        for index, region in enumerate(task_regions(task, context)):
            where = f"task {shown(task.get('id'))} region {shown(region.get('id') or index)}"
            to_name = region.get("to_name") or next(iter(controls.videos), "")
            from_name = region.get("from_name") or controls.rectangle_for(to_name) or ""
            if to_name not in controls.videos:
                raise RequestError(f"{where}: to_name {shown(to_name)} is no <Video> of the "
                                   f"labeling config")
            value = region.get("value") if isinstance(region.get("value"), dict) else {}
            labels = value.get("labels") or value.get("videorectangle")
            label = labels[0] if isinstance(labels, list) and labels and \
                isinstance(labels[0], str) else None
            prompts = region_prompts(region, len(objects), where)
            count += len(prompts)
            if count > self.settings.max_points:
                raise RequestError(
                    f"task {shown(task.get('id'))} holds more than {self.settings.max_points} "
                    f"boxes (keyframes) to track from (max_points): delete the keyframes that "
                    f"are not corrections, or raise max_points")
            objects.append(VideoObject(len(objects), str(region.get("id") or new_region_id()),
                                       from_name, to_name, label, tuple(prompts)))
        return objects

    def request(self, task: dict, url: str, prompts: Sequence[BoxPrompt]) -> TrackRequest:
        task_id = task.get("id") if isinstance(task.get("id"), int) else None
        return TrackRequest(url, task_id, self.images.source_key(url, task_id), tuple(prompts),
                            self.tracker_identity, self.settings.max_track_frames,
                            self.settings.video_answer_frames, self.images.label_studio_url)

    def video_url(self, task: dict, controls: VideoControls, to_name: str) -> str:
        key = controls.videos[to_name][0]
        url = (task.get("data") or {}).get(key)
        if not isinstance(url, str) or not url.strip():
            raise ImageError(f"task {shown(task.get('id'))} has no video in data.{shown(key)}: "
                             f"the labeling config's Video tag reads ${shown(key)}")
        return url

    # -- /predict --------------------------------------------------------------------------------
    def predict(self, tasks: List[dict], config_text: str, context: Any,
                scope: WorkScope = UNBOUNDED) -> List[Any]:
        """One entry per task: its tracks as a prediction, or ``[]`` (no box in the task, or
        the pass has not tracked its first frames within ``video_answer_timeout``)."""
        controls = self.controls(config_text)
        return [self.predict_task(task, controls, context, scope) for task in tasks]

    def predict_task(self, task: dict, controls: VideoControls, context: Any,
                     scope: WorkScope = UNBOUNDED, wait: Optional[float] = None) -> Any:
        regions = task_regions(task, context)
        if not regions:
            log.info("task %s: no videorectangle to track from", task.get("id"))
            return []
        to_name = regions[0].get("to_name") or next(iter(controls.videos), "")
        if to_name not in controls.videos:
            raise RequestError(f"task {shown(task.get('id'))}: to_name {shown(to_name)} is no "
                               f"<Video> of the labeling config")
        url = self.video_url(task, controls, to_name)
        objects = self.objects(task, controls, context)
        prompts = [p for o in objects for p in o.prompts]
        request = self.request(task, url, prompts)
        wait = self.settings.video_answer_timeout if wait is None else wait
        result = self.jobs.answer(request, wait, scope)
        if result is None:
            log.info("task %s: tracking still on its first frames after %.0f s; it goes on in "
                     "the background", task.get("id"), wait)
            return []
        framerate = controls.videos[to_name][1] or result.fps or DEFAULT_FRAMERATE
        return self.prediction(result, objects, framerate)

    def prediction(self, result: TrackResult, objects: Sequence[VideoObject],
                   fps: float) -> Dict[str, Any]:
        width, height = result.size
        out, scores = [], []
        for obj in objects:
            track = result.tracks.get(obj.object_id)
            if track is None:
                continue
            score = float(sum(track.scores.values()) / len(track.scores)) if track.scores \
                else None
            region = track_region(track, obj, result.frames, fps, width, height, result.stop,
                                  score)
            if region is not None:
                out.append(region)
                if score is not None:
                    scores.append(score)
        log.info("%d track(s) over %d frames (%s)", len(out), result.total, result.state)
        return {"result": out, "score": float(sum(scores) / len(scores)) if scores else 0.0,
                "model_version": self.model_version}


__all__ = ["VideoControls", "VideoObject", "VideoPredictions", "region_prompts",
           "task_regions", "track_region", "video_controls"]
