"""The Label Studio layer's video side: a video task reaching /predict -> the boxes it holds ->
one tracking request -> every object's track as a ``videorectangle`` region (:class:`VideoPredictions`).

    task ──► boxes (the keyframes of its latest annotation's, else draft's, videorectangle
             regions: :func:`~.video_regions.task_box_regions`) ──► relative BoxPrompts
         ──► TrackingJobs.answer (the first ``video_answer_frames`` frames within
             ``video_answer_timeout`` s, the rest in the background)
         ──► videorectangle regions (:func:`~.video_regions.track_regions`)

Label Studio's video editor sends no interactive request (``docs/video-protocol.md``): tracks
answer *task open* and *Retrieve predictions*. A request's ``context.result`` holding
``videorectangle`` regions is used first all the same (a custom frontend may send one).

**No clip on the request path.** The request is made without opening the clip: each keyframe
becomes a box in fractions of the frame (:func:`region_prompts`) on Label Studio's frame counted
at the ``<Video framerate>``; the tracking pass (:func:`~sam_backend.video.jobs.run_tracking`),
which opens the clip anyway, turns them into pixels and clip frames. The answer is built from the
result's clip size, frame count and rate.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from sam_backend.common.deadline import UNBOUNDED, WorkScope
from sam_backend.common.limits import shown
from sam_backend.errors import RequestError
from sam_backend.labelstudio.label_config import LabelConfig
from sam_backend.labelstudio.video_regions import (VideoControls, VideoObject, box_regions,
                                                   task_box_regions, track_regions,
                                                   video_controls, video_url)
from sam_backend.video.base import BoxPrompt, ClipInfo
from sam_backend.video.jobs import TrackRequest, TrackResult

if TYPE_CHECKING:
    from sam_backend.images.loader import ImageLoader
    from sam_backend.settings import Settings
    from sam_backend.video.jobs import TrackingJobs

log = logging.getLogger(__name__)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{what} must be a number, got {shown(value)}")
    return float(value)


def region_prompts(region: dict, object_id: int, where: str) -> List[BoxPrompt]:
    """The boxes of one ``videorectangle`` region, one :class:`BoxPrompt` per keyframe: ``frame``
    = Label Studio's frame - 1 (its frames counted at the ``<Video framerate>``), ``box`` =
    ``(x0, y0, x1, y1)`` as fractions 0..1 of the frame (a rotated box: the bounds of its corners,
    rotated about its top-left corner as Label Studio does), clipped to the frame. A keyframe
    with no area inside the frame is left out (a click without a drag); a RequestError names a
    broken one."""
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
        if isinstance(frame, bool) or not isinstance(frame, (int, float)) \
                or not math.isfinite(frame) or frame < 1 or frame != int(frame):
            raise RequestError(f"{at}.frame must be a frame number (1, 2, ...), got "
                               f"{shown(frame)}")
        x, y = _number(item.get("x"), f"{at}.x"), _number(item.get("y"), f"{at}.y")
        w = _number(item.get("width"), f"{at}.width")
        h = _number(item.get("height"), f"{at}.height")
        angle = math.radians(_number(item.get("rotation") or 0, f"{at}.rotation"))
        c, s = math.cos(angle), math.sin(angle)
        xs = [x, x + w * c, x + w * c - h * s, x - h * s]
        ys = [y, y + w * s, y + w * s + h * c, y + h * c]
        x0, x1 = (min(max(v / 100.0, 0.0), 1.0) for v in (min(xs), max(xs)))
        y0, y1 = (min(max(v / 100.0, 0.0), 1.0) for v in (min(ys), max(ys)))
        if x1 <= x0 or y1 <= y0:
            log.info("%s: the box has no area inside the frame; left out", at)
            continue
        prompts[int(frame) - 1] = BoxPrompt(object_id, int(frame) - 1, (x0, y0, x1, y1))
    return [prompts[f] for f in sorted(prompts)]


@dataclass(frozen=True)
class VideoAsk:
    """What one task asks: its video, the controls it is labelled with, the objects and their
    boxes (relative), and Label Studio's frame rate for it."""

    url: str
    controls: VideoControls
    objects: Tuple[VideoObject, ...]
    prompts: Tuple[BoxPrompt, ...]
    framerate: float


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

    @staticmethod
    def handles(config: LabelConfig) -> bool:
        """Whether the config holds tracks (a VideoRectangle on a Video): its tasks are
        answered here."""
        return bool(config.videos) and bool(video_controls(config))

    # -- from the task to one tracking request ---------------------------------------------------
    def ask(self, task: dict, config: LabelConfig, context: Any = None) -> Optional[VideoAsk]:
        """The task's boxes as one request's parts; None when it holds none. A RequestError
        names a broken region, or more boxes than ``max_points``."""
        for controls in video_controls(config):
            regions: Sequence[Any] = []
            if isinstance(context, dict) and isinstance(context.get("result"), list):
                regions = box_regions(context["result"], controls)
            regions = regions or task_box_regions(task, controls)
            if not regions:
                continue
            objects, prompts = [], []
            for region in regions:
                where = f"task {shown(task.get('id'))} region {shown(region.get('id'))}"
                found = region_prompts(dict(region), len(objects), where)
                if not found:
                    continue
                labels = (region.get("value") or {}).get("labels")
                label = labels[0] if isinstance(labels, list) and labels and \
                    isinstance(labels[0], str) else None
                objects.append(VideoObject(len(objects), str(region.get("id") or ""), label))
                prompts.extend(found)
            if len(prompts) > self.settings.max_points:
                raise RequestError(
                    f"task {shown(task.get('id'))} holds {len(prompts)} boxes (keyframes) to track "
                    f"from, more than max_points={self.settings.max_points}: delete the keyframes "
                    f"that are not corrections, or raise max_points")
            if not prompts:
                continue
            return VideoAsk(video_url(task, controls), controls, tuple(objects), tuple(prompts),
                            controls.framerate(task))
        return None

    def request(self, task: dict, ask: VideoAsk, answer_frames: Optional[int] = None
                ) -> TrackRequest:
        task_id = task.get("id") if isinstance(task.get("id"), int) else None
        return TrackRequest(
            ask.url, task_id, self.images.source_key(ask.url, task_id), ask.prompts,
            self.tracker_identity, self.settings.max_track_frames,
            self.settings.video_answer_frames if answer_frames is None else answer_frames,
            self.images.label_studio_url, ask.framerate)

    # -- /predict --------------------------------------------------------------------------------
    def predict(self, tasks: List[dict], config: LabelConfig, context: Any,
                scope: WorkScope = UNBOUNDED) -> List[Any]:
        """One entry per task: its tracks as a prediction, or ``[]`` (no box in the task, or
        the pass has not tracked its first frames within ``video_answer_timeout``)."""
        return [self.predict_task(task, config, context, scope) for task in tasks]

    def predict_task(self, task: dict, config: LabelConfig, context: Any = None,
                     scope: WorkScope = UNBOUNDED) -> Any:
        scope.check("the video prediction")
        ask = self.ask(task, config, context)
        if ask is None:
            log.info("task %s: no videorectangle to track from", task.get("id"))
            return []
        request = self.request(task, ask)
        result = self.jobs.answer(request, self.settings.video_answer_timeout, scope)
        if result is None:
            log.info("task %s: tracking has not reached its first frames after %.0f s; it goes "
                     "on in the background", task.get("id"), self.settings.video_answer_timeout)
            return []
        return self.prediction(result, ask)

    def prediction(self, result: TrackResult, ask: VideoAsk) -> Dict[str, Any]:
        """The prediction of a tracking result: one region per object (module docstring).
        Finished tracks carry :attr:`model_version` (the one /setup gives Label Studio: a task
        holding such a prediction is not asked for again); a partial one carries
        ``<model_version>:partial``, so the task is asked for again on its next open and then
        gets the whole track."""
        info = ClipInfo(result.frames, result.fps, *result.size)
        regions = track_regions(result.tracks, ask.objects, ask.controls, info, ask.framerate)
        scores = [r["score"] for r in regions if "score" in r]
        log.info("%d track(s) over %d frames (%s)", len(regions), result.total, result.state)
        return {"result": regions, "score": float(sum(scores) / len(scores)) if scores else 0.0,
                "model_version": self.model_version if result.done
                else f"{self.model_version}:partial"}


__all__ = ["VideoAsk", "VideoPredictions", "region_prompts"]
