"""Tracking off the request path: a clip's tracks are computed once per :class:`TrackRequest`
(clip, prompts, tracker, frames), the first frames first, and kept where the next ask finds them.

    /predict ──► TrackingJobs.answer(request, wait) ──► a result: "partial" (the first frames),
                        │                                "done" (every frame), or None (not yet)
                        └─► run_tracking (a thread of this process, or `sam-backend worker
                            --queue video` through RQ) ──► results (memory, or Redis)

:func:`run_tracking` is the one way a request is tracked (by the thread, the RQ job and
``sam-backend track``): it opens a :class:`~sam_backend.video.base.TrackingSession`, tracks every
object up to ``answer_frames`` past the first prompt and publishes that (``"partial"``), then
tracks to ``stop`` in the same session (the frames' features are cached: the first frames are not
encoded again) and publishes ``"done"``.

* **This process** (``video_background=thread``): one worker thread (a tracking pass already
  uses every core), passes deduplicated by request key, finished results kept in memory
  (least recently used first out, :data:`MAX_RESULTS`).
* **A team** (``video_background=worker``): the request is an RQ job on the queue of the tracker's
  model identity in ``embedding_store``'s Redis (JSON-serialised, job id = the request key, so
  a request asked twice is one job), run by ``sam-backend worker --queue video``; results are
  JSON in Redis (``embedding_store_ttl``), so every replica answers from them. When Redis is
  unreachable the pass runs in this process instead (logged), so tracking keeps working; when no
  worker serves the queue, the ask gets a clear :class:`~sam_backend.errors.BusyError` naming
  the command to start.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from sam_backend.common.deadline import UNBOUNDED, WorkScope
from sam_backend.errors import BusyError, SamBackendError
from sam_backend.video.base import BoxPrompt, Clip, Track, Tracker, pixel_prompts

log = logging.getLogger(__name__)

KEY_ROOT = "sam_backend:video"
JOB_FUNCTION = "sam_backend.video.jobs.track_job"
#: finished results kept in memory by a process (each is a few boxes per object and frame)
MAX_RESULTS = 256
#: seconds a failed pass answers for its request (its error); then the next ask tries again
FAILED_TTL = 60.0

ClipOpener = Callable[[str, Optional[int]], Clip]  # (url, task id) -> an open clip


# -- what is asked, and what comes back -----------------------------------------------------------

@dataclass(frozen=True)
class TrackRequest:
    """Track ``prompts`` on the video at ``url`` (task ``task_id``; ``clip_key``: its identity
    without downloading it, e.g. :meth:`ImageLoader.source_key`) from the first prompted frame
    up to ``max_frames`` frames (0: to the clip's end; never short of the last prompt), the first
    ``answer_frames`` first. ``tracker``: the tracker's model identity.

    The prompts' boxes are **relative**: ``(x0, y0, x1, y1)`` as fractions (0..1) of the frame's
    width and height before their ``rotation``, so that a request is made without opening the
    clip (:func:`run_tracking` turns them into pixels); frames are 0-based, counted at
    ``framerate`` frames per second (Label Studio's ``<Video framerate>``; 0: the clip's own
    rate), turned into clip frames by :func:`~sam_backend.video.base.clip_frame`."""

    url: str
    task_id: Optional[int]
    clip_key: str
    prompts: Tuple[BoxPrompt, ...]
    tracker: str
    max_frames: int = 0
    answer_frames: int = 0
    label_studio_url: Optional[str] = None
    framerate: float = 0.0

    @property
    def key(self) -> str:
        """The request's identity (what is tracked, not where the video is fetched from)."""
        text = json.dumps([self.clip_key, self.tracker, self.max_frames, self.answer_frames,
                           round(self.framerate, 6),
                           [[p.object_id, p.frame, [round(v, 3) for v in p.box], round(p.rotation, 3)]
                            for p in sorted(self.prompts, key=lambda p: (p.object_id, p.frame))]])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def to_json(self) -> Dict[str, Any]:
        return {"url": self.url, "task_id": self.task_id, "clip_key": self.clip_key,
                "prompts": [[p.object_id, p.frame, list(p.box), p.rotation]
                            for p in self.prompts],
                "tracker": self.tracker, "max_frames": self.max_frames,
                "answer_frames": self.answer_frames, "label_studio_url": self.label_studio_url,
                "framerate": self.framerate}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "TrackRequest":
        prompts = tuple(BoxPrompt(int(o), int(f), tuple(float(v) for v in box),
                                  float(rest[0]) if rest else 0.0)
                        for o, f, box, *rest in data["prompts"])
        return cls(data["url"], data.get("task_id"), data["clip_key"], prompts,
                   data["tracker"], int(data.get("max_frames") or 0),
                   int(data.get("answer_frames") or 0), data.get("label_studio_url"),
                   float(data.get("framerate") or 0.0))


@dataclass
class TrackResult:
    """``state``: ``"partial"`` (frames up to ``stop`` tracked, of ``total`` to track),
    ``"done"`` or ``"failed"`` (``error`` says why). ``tracks``: ``{object_id: Track}`` (boxes in
    pixels); ``frames``, ``fps``: the clip's frame count and rate; ``size``: (width, height) of
    its frames."""

    state: str
    tracks: Dict[int, Track]
    stop: int = 0
    total: int = 0
    frames: int = 0
    size: Tuple[int, int] = (0, 0)
    error: str = ""
    seconds: float = 0.0
    at: float = 0.0
    fps: float = 0.0  # when it was made (time.time())

    def __post_init__(self) -> None:
        self.at = self.at or time.time()

    @property
    def done(self) -> bool:
        return self.state == "done"

    @property
    def stale(self) -> bool:
        """A failure older than FAILED_TTL: no longer the answer (the request is tried again)."""
        return self.state == "failed" and time.time() - self.at > FAILED_TTL

    def to_json(self) -> Dict[str, Any]:
        return {"state": self.state, "stop": self.stop, "total": self.total,
                "frames": self.frames, "size": list(self.size), "error": self.error,
                "seconds": round(self.seconds, 3), "at": self.at, "fps": self.fps,
                "tracks": [{"object_id": t.object_id,
                            "boxes": [[f, None if b is None else [float(v) for v in b]]
                                      for f, b in sorted(t.boxes.items())],
                            "scores": [[f, float(s)] for f, s in sorted(t.scores.items())]}
                           for t in self.tracks.values()]}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "TrackResult":
        tracks = {}
        for item in data.get("tracks", []):
            track = Track(int(item["object_id"]),
                          {int(f): None if b is None else tuple(b) for f, b in item["boxes"]},
                          {int(f): float(s) for f, s in item["scores"]})
            tracks[track.object_id] = track
        return cls(data["state"], tracks, int(data.get("stop", 0)), int(data.get("total", 0)),
                   int(data.get("frames", 0)), tuple(data.get("size") or (0, 0)),
                   data.get("error", ""), float(data.get("seconds", 0.0)),
                   float(data.get("at", 0.0)), float(data.get("fps", 0.0)))


def tracking_range(prompts: Sequence[BoxPrompt], frames: int, max_frames: int = 0
                   ) -> Tuple[int, int]:
    """(first, stop): from the first prompted frame, ``max_frames`` frames (0: to the clip's
    end), never short of the last prompt, never past the clip."""
    first = min(p.frame for p in prompts)
    last = max(p.frame for p in prompts)
    stop = frames if max_frames <= 0 else max(first + max_frames, last + 1)
    return first, min(stop, frames)


def run_tracking(tracker: Tracker, clip: Clip, request: TrackRequest,
                 publish: Callable[[TrackResult], None], scope: WorkScope = UNBOUNDED) -> TrackResult:
    """Track ``request`` on ``clip`` (module docstring): ``publish`` gets the partial result
    (the first ``answer_frames`` frames) and then the final one, which is returned."""
    if not request.prompts:
        raise SamBackendError("nothing to track: the request has no box")
    info = clip.info
    prompts = pixel_prompts(request.prompts, info.width, info.height, info.fps,
                            request.framerate)
    bad = [p for p in prompts if not 0 <= p.frame < info.frames]
    if bad:
        rate = f" (frames counted at {request.framerate:g} fps, the clip's rate is " \
            f"{info.fps:g}: set the Video tag's framerate to it)" \
            if request.framerate and abs(request.framerate - info.fps) > 1e-9 else ""
        raise SamBackendError(f"a box is on a frame past the clip's {info.frames} frames{rate}")
    first, stop = tracking_range(prompts, info.frames, request.max_frames)
    started = time.perf_counter()
    session = tracker.session(clip)
    total = stop - first

    def progress(done: int, todo: int) -> None:
        if done and (done % 25 == 0 or done == todo):
            log.info("tracking %s: %d/%d frames (%.1f s)", request.url, done, todo,
                     time.perf_counter() - started)

    quick = min(stop, first + request.answer_frames) if request.answer_frames > 0 else stop
    if quick < stop:
        tracks = session.track([p for p in prompts if p.frame < quick], stop=quick,
                               progress=progress, scope=scope)
        publish(TrackResult("partial", tracks, quick, total, info.frames,
                            (info.width, info.height), seconds=time.perf_counter() - started,
                            fps=info.fps))
    tracks = session.track(prompts, stop=stop, progress=progress, scope=scope)
    result = TrackResult("done", tracks, stop, total, info.frames, (info.width, info.height),
                         seconds=time.perf_counter() - started, fps=info.fps)
    publish(result)
    log.info("tracked %d object(s) of %s over %d frames in %.1f s", len(tracks), request.url,
             total, result.seconds)
    return result


# -- where results are kept ------------------------------------------------------------------------

class MemoryResults:
    """Results in this process, least recently used first out."""

    def __init__(self, max_items: int = MAX_RESULTS):
        self.max_items = max_items
        self._items: "OrderedDict[str, TrackResult]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Optional[TrackResult]:
        with self._lock:
            result = self._items.get(key)
            if result is not None:
                self._items.move_to_end(key)
            return result

    def put(self, key: str, result: TrackResult) -> None:
        with self._lock:
            self._items[key] = result
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)


class RedisResults:
    """Results as JSON in Redis under ``sam_backend:video:result:<key>`` (``ttl_s``: seconds,
    0 = until Redis evicts them); raises StoreUnavailable through ``call`` when Redis is down."""

    def __init__(self, connection, call: Callable[[Callable[[], Any]], Any], ttl_s: int = 0):
        self.connection = connection
        self.call = call
        self.ttl_s = int(ttl_s)

    @staticmethod
    def redis_key(key: str) -> str:
        return f"{KEY_ROOT}:result:{key}"

    def get(self, key: str) -> Optional[TrackResult]:
        data = self.call(lambda: self.connection.get(self.redis_key(key)))
        return None if data is None else TrackResult.from_json(json.loads(data))

    def put(self, key: str, result: TrackResult) -> None:
        data = json.dumps(result.to_json())
        ttl = int(FAILED_TTL) if result.state == "failed" else (self.ttl_s or None)
        self.call(lambda: self.connection.set(self.redis_key(key), data, ex=ttl))


# -- the jobs ---------------------------------------------------------------------------------------

class TrackingJobs:
    """Background tracking for one process (module docstring). ``tracker``: what loads the
    tracker on first use; ``open_clip``: opens a request's clip; ``queue``: a
    :class:`VideoQueue` (team) or None (this process only); ``timeout``: seconds one pass may
    take (a background pass has nobody's deadline but its own)."""

    def __init__(self, tracker: Callable[[], Tracker], open_clip: ClipOpener,
                 queue: Optional["VideoQueue"] = None, timeout: float = 3600.0,
                 max_pending: int = 64):
        self._tracker_factory = tracker
        self._tracker: Optional[Tracker] = None
        self._tracker_lock = threading.Lock()
        self.open_clip = open_clip
        self.queue = queue
        self.timeout = float(timeout)
        self.max_pending = max_pending
        self.results = MemoryResults()
        self._pending: Dict[str, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tracking")

    @property
    def tracker(self) -> Tracker:
        """Loaded on first use (a failure is reported to that ask and retried by the next)."""
        with self._tracker_lock:
            if self._tracker is None:
                started = time.perf_counter()
                self._tracker = self._tracker_factory()
                log.info("video tracker %s ready in %.1f s", self._tracker.name,
                         time.perf_counter() - started)
            return self._tracker

    # -- asking ------------------------------------------------------------------------------------
    def result(self, request: TrackRequest) -> Optional[TrackResult]:
        """The best result there is for ``request`` now (done, else partial), or None."""
        key = request.key
        local = self.results.get(key)
        if local is not None and local.stale:
            local = None
        if local is not None and local.done or self.queue is None:
            return local
        try:
            shared = self.queue.results.get(key)
        except SamBackendError:  # Redis down: what this process has
            return local
        if shared is not None and shared.stale:
            shared = None
        return shared or local

    def submit(self, request: TrackRequest) -> str:
        """Start tracking ``request`` unless it is done, running or queued: "done", "running",
        "queued" (on the team's queue) or "started" (a thread of this process)."""
        found = self.result(request)
        if found is not None and (found.done or found.state == "failed"):
            return "done"
        if self.queue is not None:
            from sam_backend.embeddings.store import StoreUnavailable

            try:
                return self.queue.submit(request)
            except StoreUnavailable as exc:
                log.warning("%s: tracking %s in this process instead", exc, request.url)
        return self._submit_local(request)

    def _submit_local(self, request: TrackRequest) -> str:
        key = request.key
        with self._lock:
            if key in self._pending:
                return "running"
            if len(self._pending) >= self.max_pending:
                raise BusyError(f"{self.max_pending} tracking passes are already waiting: "
                                "ask again later")

            def run() -> TrackResult:
                try:
                    return self.track_now(request)
                finally:
                    with self._lock:
                        self._pending.pop(key, None)

            self._pending[key] = self._worker.submit(run)
            return "started"

    def track_now(self, request: TrackRequest, scope: Optional[WorkScope] = None,
                  publish: Optional[Callable[[TrackResult], None]] = None) -> TrackResult:
        """Track ``request`` in this thread, publishing to this process's results (and to
        ``publish``); a failure is published as a ``"failed"`` result and raised."""
        scope = scope or WorkScope(self.timeout, None, "the video tracking bound")

        def keep(result: TrackResult) -> None:
            self.results.put(request.key, result)
            if publish is not None:
                publish(result)

        try:
            clip = self.open_clip(request.url, request.task_id)
            try:
                return run_tracking(self.tracker, clip, request, keep, scope)
            finally:
                clip.close()
        except Exception as exc:
            message = str(exc) if isinstance(exc, SamBackendError) else \
                f"{type(exc).__name__}: {exc}"
            log.warning("tracking %s failed: %s", request.url, message)
            keep(TrackResult("failed", {}, error=message))
            raise

    def answer(self, request: TrackRequest, wait: float, scope: WorkScope = UNBOUNDED
               ) -> Optional[TrackResult]:
        """Start ``request`` (if needed) and wait up to ``wait`` seconds (and ``scope``'s time)
        for its first result: done, or partial (the first ``answer_frames`` frames) as soon as
        there is one; None when neither came in time (it goes on in the background). A failed pass raises its error; a team's queue that no worker serves
        raises BusyError."""
        self.submit(request)
        until = time.monotonic() + max(0.0, min(wait, scope.remaining()))
        checked_workers = False
        while True:
            found = self.result(request)
            if found is not None and found.state == "failed":
                raise SamBackendError(f"tracking failed: {found.error}")
            if found is not None:  # the first frames (or all of them) are there
                return found
            if time.monotonic() >= until:
                break
            if scope.client_gone():
                scope.check("waiting for the tracking pass")
            if self.queue is not None and not checked_workers and request.key not in \
                    self._pending:
                checked_workers = True
                self.queue.check_workers()
            with self._lock:
                future = self._pending.get(request.key)
            if future is not None:
                concurrent.futures.wait([future], timeout=min(0.2, until - time.monotonic()))
            else:
                time.sleep(min(0.2, max(0.0, until - time.monotonic())))
        return self.result(request)

    def wait(self, timeout: Optional[float] = None) -> None:
        """Wait for this process's running passes (tests, shutdown)."""
        with self._lock:
            futures = list(self._pending.values())
        concurrent.futures.wait(futures, timeout=timeout)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


# -- a team: the RQ queue ------------------------------------------------------------------------

def queue_name(tracker_identity: str) -> str:
    return f"{KEY_ROOT}:track:{hashlib.sha256(tracker_identity.encode()).hexdigest()[:16]}"


class VideoQueue:
    """The RQ queue of tracking requests for one tracker identity, and the results in the same
    Redis. ``store``: the team's :class:`~sam_backend.embeddings.store.EmbeddingStore` (its
    Redis and its down/up bookkeeping)."""

    def __init__(self, store, tracker_identity: str, job_timeout: int = 3600):
        from rq import Queue
        from rq.serializers import JSONSerializer

        from sam_backend.embeddings.store import connect

        self.store = store
        self.identity = tracker_identity
        self.job_timeout = int(job_timeout)
        self.connection = connect(store.url, socket_timeout=30.0)
        self.queue = Queue(queue_name(tracker_identity), connection=self.connection,
                           serializer=JSONSerializer)
        self.results = RedisResults(self.connection, store._call, store.ttl_s)

    def submit(self, request: TrackRequest) -> str:
        """"queued" (already queued or running) or "enqueued"; StoreUnavailable when Redis is
        unreachable."""
        return self.store._call(lambda: self._enqueue(request))

    def _enqueue(self, request: TrackRequest) -> str:
        from rq import Retry
        from rq.job import JobStatus

        job_id = f"sam_backend-track-{request.key}"
        job = self.queue.fetch_job(job_id)
        if job is not None and job.get_status(refresh=False) in (
                JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
            return "queued"
        # a killed worker's job is re-queued by RQ's maintenance once its heartbeat lapses
        self.queue.enqueue(JOB_FUNCTION, kwargs={"request": request.to_json()}, job_id=job_id,
                           retry=Retry(max=2), job_timeout=self.job_timeout, result_ttl=600,
                           failure_ttl=24 * 3600, description=f"track {request.url}")
        return "enqueued"

    def check_workers(self) -> None:
        """BusyError naming the command to start when no worker serves this queue."""
        from rq import Worker

        from sam_backend.embeddings.store import StoreUnavailable

        try:
            workers = self.store._call(lambda: Worker.all(queue=self.queue))
        except StoreUnavailable:
            return
        if not workers:
            raise BusyError(
                f"no `sam-backend worker --queue video` serves the video queue of {self.identity} "
                f"(Redis {self.store.display_url}): the tracking request waits there. Start one "
                f"with this backend's model options, or set video_background=thread")


@dataclass
class _WorkerContext:
    jobs: TrackingJobs
    results: RedisResults
    images: Any  # the ImageLoader the clips are fetched with


_CONTEXT: Optional[_WorkerContext] = None


def install_worker_context(jobs: TrackingJobs, results: RedisResults, images: Any) -> None:
    """What :func:`track_job` works with in this process (``sam-backend worker --queue video``
    calls this once): the tracker and clip opener (``jobs``), the team's results and the image
    loader the clips come through."""
    global _CONTEXT
    _CONTEXT = _WorkerContext(jobs, results, images)


def track_job(request: Dict[str, Any]) -> Dict[str, Any]:
    """One queued tracking request, its results written to Redis as they come."""
    if _CONTEXT is None:
        raise SamBackendError("track_job runs inside `sam-backend worker --queue video` only")
    parsed = TrackRequest.from_json(request)
    if parsed.label_studio_url:  # only where the environment gives none
        _CONTEXT.images.update_from_setup(parsed.label_studio_url, None)
    result = _CONTEXT.jobs.track_now(
        parsed, publish=lambda r: _CONTEXT.results.put(parsed.key, r))
    return {"key": parsed.key, "state": result.state, "objects": len(result.tracks),
            "frames": result.total, "seconds": round(result.seconds, 3)}


__all__ = ["JOB_FUNCTION", "MemoryResults", "RedisResults", "TrackRequest", "TrackResult",
           "TrackingJobs", "VideoQueue", "install_worker_context", "queue_name",
           "run_tracking", "track_job", "tracking_range"]
