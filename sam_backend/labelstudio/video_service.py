"""The Label Studio layer's video side: a video task reaching /predict -> the boxes it holds ->
one tracking request -> every object's track as a ``videorectangle`` region (:class:`VideoPredictions`).

    task ──► boxes (the keyframes of its latest annotation's, else draft's, videorectangle
             regions: :func:`~.video_regions.task_box_regions`) ──► relative BoxPrompts
         ──► TrackingJobs.answer (the first ``video_answer_frames`` frames within
             ``video_answer_timeout`` s, the rest in the background)
         ──► videorectangle regions (:func:`~.video_regions.track_regions`)
         ──► a partial answer: the whole tracks written to the task when they are done
             (:class:`~.deliveries.TrackDeliveries`, ``video_deliver``)

Label Studio's video editor sends no interactive request (``docs/video-protocol.md``): tracks
answer *task open* and *Retrieve predictions*. A request's ``context.result`` holding
``videorectangle`` regions is used first all the same (a custom frontend may send one).

**No clip on the request path.** The request is made without opening the clip: each keyframe
becomes a box in fractions of the frame (:func:`~.video_regions.region_prompts`) on Label Studio's frame counted
at the ``<Video framerate>``; the tracking pass (:func:`~sam_backend.video.jobs.run_tracking`),
which opens the clip anyway, turns them into pixels and clip frames. The answer is built from the
result's clip size, frame count and rate.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from sam_backend.common.deadline import UNBOUNDED, WorkScope
from sam_backend.common.limits import shown
from sam_backend.errors import RequestError, SamBackendError
from sam_backend.labelstudio.label_config import LabelConfig, parse_label_config
from sam_backend.labelstudio.video_regions import (VideoControls, VideoObject, box_regions,
                                                   region_prompts, task_box_regions,
                                                   track_regions, video_controls, video_url)
from sam_backend.video.base import BoxPrompt, ClipInfo
from sam_backend.video.jobs import TrackRequest, TrackResult

if TYPE_CHECKING:
    from sam_backend.images.loader import ImageLoader
    from sam_backend.labelstudio.deliveries import TrackDeliveries
    from sam_backend.settings import Settings
    from sam_backend.video.jobs import TrackingJobs

log = logging.getLogger(__name__)


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
                 tracker_identity: str, model_version: str,
                 deliveries: Optional["TrackDeliveries"] = None):
        self.settings = settings
        self.images = images
        self.jobs = jobs
        self.tracker_identity = tracker_identity
        self.model_version = model_version
        self.deliveries = deliveries

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
            prompts, objects = region_prompts(regions, f"task {shown(task.get('id'))} region")
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
        if self.deliveries is not None and request.task_id is not None and \
                (result is None or not result.done):
            self.deliver_when_done(request, ask)
        if result is None:
            log.info("task %s: tracking has not reached its first frames after %.0f s; it goes "
                     "on in the background", task.get("id"), self.settings.video_answer_timeout)
            return []
        return self.prediction(result, ask)

    # -- tracks written to Label Studio by the backend (video_deliver) ---------------------------
    def deliver_when_done(self, request: TrackRequest, ask: VideoAsk) -> None:
        """Have ``request``'s tracks written to its task once done, if it is still the task's."""
        self.deliveries.watch(request.task_id, request, lambda done: self.prediction(done, ask),
                              self.still_asked(request))

    def still_asked(self, request: TrackRequest) -> Callable[[Any], Optional[str]]:
        """What :class:`~.deliveries.TrackDeliveries` asks before writing ``request``'s tracks
        to its task: the task as Label Studio holds it now (its project's config, its latest
        boxes) must make the very same request. So a track is written only to the task whose
        video and boxes it was made from (not to a task id someone put in a request), and never
        over boxes changed since. The reason not to write, or None."""
        def check(api: Any) -> Optional[str]:
            task = api.get(f"/api/tasks/{int(request.task_id)}")
            if not isinstance(task, dict) or not isinstance(task.get("project"), int):
                return "Label Studio's task answer names no project"
            config = parse_label_config(api.label_config(task["project"]))
            try:
                ask = self.ask(task, config) if self.handles(config) else None
            except RequestError as exc:
                return f"the task's boxes are not trackable now ({exc})"
            if ask is None:
                return "the task holds no boxes to track now"
            if self.request(task, ask).key != request.key:
                return "the task's video or boxes are not the ones tracked (changed since)"
            return None

        return check

    def track_annotation(self, body: Dict[str, Any]) -> Optional[str]:
        """An ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` webhook (Label Studio sends the
        project with its config, the task and the annotation): a video task's boxes are tracked
        in the background and the tracks written to the task when done, replacing this backend's
        earlier ones, so a correction needs no Delete/Retrieve Predictions. What was done (for
        the webhook's answer and the log), or None when the event is not a video task's or
        ``video_deliver`` is off. An annotation copied from a prediction (``parent_prediction``,
        or regions of ``origin`` prediction*) is not tracked: its keyframes are a track, not an
        annotator's boxes."""
        project, task, annotation = (body.get(k) for k in ("project", "task", "annotation"))
        if self.deliveries is None or not all(isinstance(v, dict)
                                              for v in (project, task, annotation)):
            return None
        text = project.get("label_config")
        if not isinstance(text, str) or not isinstance(task.get("id"), int):
            return None
        try:
            config = parse_label_config(text)
        except SamBackendError:
            return None
        if not self.handles(config):
            return None
        if annotation.get("was_cancelled"):
            return "not tracked: the task was skipped"
        regions = [r for r in annotation.get("result") or [] if isinstance(r, dict)
                   and r.get("type") == "videorectangle"]
        if annotation.get("parent_prediction") is not None or any(
                str(r.get("origin") or "").startswith("prediction") for r in regions):
            return "not tracked: the annotation comes from a prediction (its keyframes are a " \
                   "track, not boxes to track from)"
        whole = {**task, "annotations": [annotation], "drafts": []}
        try:
            ask = self.ask(whole, config)
            if ask is None:
                return "not tracked: no videorectangle boxes"
            request = self.request(whole, ask)
            state = self.jobs.submit(request)
        except SamBackendError as exc:
            log.warning("task %s: annotation not tracked: %s", task["id"], exc)
            return f"not tracked: {exc}"
        self.deliver_when_done(request, ask)
        log.info("task %s: tracking the annotation's %d box(es) (%s); the tracks are written "
                 "to the task when done", task["id"], len(ask.prompts), state)
        return f"tracking ({state})"

    def prediction(self, result: TrackResult, ask: VideoAsk) -> Dict[str, Any]:
        """The prediction of a tracking result: one region per object (module docstring).
        Finished tracks carry :attr:`model_version` (the one /setup gives Label Studio: a task
        holding such a prediction is not asked for again); a partial one carries
        ``<model_version>:partial``: the whole track replaces it when the pass is done
        (``video_deliver``), else *Retrieve Predictions* asks for the task again and gets it."""
        info = ClipInfo(result.frames, result.fps, *result.size)
        regions = track_regions(result.tracks, ask.objects, ask.controls, info, ask.framerate)
        scores = [r["score"] for r in regions if "score" in r]
        log.info("%d track(s) over %d frames (%s)", len(regions), result.total, result.state)
        return {"result": regions, "score": float(sum(scores) / len(scores)) if scores else 0.0,
                "model_version": self.model_version if result.done
                else f"{self.model_version}:partial"}


__all__ = ["VideoAsk", "VideoPredictions"]
