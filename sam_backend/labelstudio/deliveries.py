"""Finished tracks written to Label Studio by the backend itself (``video_deliver``).

Label Studio asks the backend for a task only when it holds no prediction at all (task open) or
none of the backend's model version (*Retrieve Predictions*): docs/video-protocol.md. A video
``/predict`` answers the first frames of each track as ``<model_version>:partial`` (or ``[]``
when they were not tracked in time) while the pass goes on, and an annotation webhook (boxes
submitted or corrected) starts a pass nobody waits for. :class:`TrackDeliveries` watches those
passes and, once one is done, writes it where the annotator looks:

    /predict answered partial or [],  ──► watch(task, request, build, verify)
    or ANNOTATION_CREATED / UPDATED          │ (poll the results: this process's, or the team's
                                             │  in Redis; a newer request for the task replaces
                                             ▼  an older one)
    done ──► verify: the task and config read back from Label Studio make the same request?
         ──► GET /api/predictions?task=<id> ──► DELETE this backend's (``<version>`` and
             ``:partial``) ──► POST the whole tracks under ``<version>`` (nothing when an equal
             one is there already; other models' predictions are left alone)

It uses the image loader's Label Studio address and token (``LABEL_STUDIO_URL`` /
``LABEL_STUDIO_API_KEY``, else what ``/setup`` sent). Without them, or when Label Studio refuses,
the failure is logged and *Retrieve Predictions* still fetches the track. A pass that fails is
logged and dropped (the next ask reports its error). The replica that answered is the one that
delivers (it reads the team's results when tracking runs on a worker).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

from sam_backend.errors import ConfigError, SamBackendError
from sam_backend.video.jobs import TrackingJobs, TrackRequest, TrackResult

log = logging.getLogger(__name__)

#: seconds between looks at the watched passes' results
POLL_S = 2.0
#: a done pass is delivered no sooner than this after the answer it follows, so Label Studio
#: has stored the partial prediction that the delivery replaces
SETTLE_S = 3.0
#: attempts at writing one delivery (Label Studio down, refusing): then it is dropped
ATTEMPTS = 3
#: passes watched at once; more are not delivered (logged: Retrieve Predictions fetches them)
MAX_WATCHED = 256

Build = Callable[[TrackResult], Dict[str, Any]]  # a done result -> its prediction
#: (the Label Studio API) -> why the track must not be written to the task now, or None
Verify = Callable[[Any], Optional[str]]


@dataclass
class _Watch:
    task_id: int
    request: TrackRequest
    build: Build
    verify: Optional[Verify]
    since: float
    until: float
    failures: int = 0
    next_try: float = field(default=0.0)


class TrackDeliveries:
    """Watches tracking passes and writes each finished one to its Label Studio task (module
    docstring). ``api``: makes the :class:`~sam_backend.labelstudio.api.LabelStudioAPI` (called
    per delivery, so an address or token that arrives later with ``/setup`` is used);
    ``model_version``: the version finished tracks carry (partial ones carry
    ``<model_version>:partial``)."""

    def __init__(self, jobs: TrackingJobs, api: Callable[[], Any], model_version: str,
                 poll_s: float = POLL_S, settle_s: float = SETTLE_S,
                 max_watched: int = MAX_WATCHED):
        self.jobs = jobs
        self._api_factory = api
        self.model_version = model_version
        self.partial_version = f"{model_version}:partial"
        self.poll_s = float(poll_s)
        self.settle_s = float(settle_s)
        self.max_watched = int(max_watched)
        self.delivered = 0  # deliveries written (tests, /metrics)
        self._watched: Dict[Tuple[int, str], _Watch] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    def watch(self, task_id: int, request: TrackRequest, build: Build,
              verify: Optional[Verify] = None) -> None:
        """Deliver ``request``'s tracks to task ``task_id`` once they are done (``build`` turns
        the result into the prediction; ``verify``, asked just before writing, may refuse: the
        task's boxes changed since). A newer request for the same task replaces an older one
        still watched (the latest boxes win)."""
        now = time.monotonic()
        with self._lock:
            key = (int(task_id), request.key)
            if key in self._watched:
                return
            for older in [k for k in self._watched if k[0] == key[0]]:
                log.info("task %s: newer boxes to track; the older pass's track will not be "
                         "written", task_id)
                del self._watched[older]
            if len(self._watched) >= self.max_watched:
                log.warning("task %s: %d finished tracks are already waiting to be written to "
                            "Label Studio; this one is not (Retrieve Predictions fetches it)",
                            task_id, self.max_watched)
                return
            self._watched[key] = _Watch(int(task_id), request, build, verify, now,
                                        now + self.jobs.timeout + 60.0)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="track-deliveries",
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    @property
    def watching(self) -> int:
        with self._lock:
            return len(self._watched)

    def wait(self, timeout: float) -> bool:
        """Wait until nothing is watched (tests, shutdown): whether that happened in time."""
        until = time.monotonic() + timeout
        while self.watching and time.monotonic() < until:
            time.sleep(0.1)
        return not self.watching

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait(self.poll_s)
            self._wake.clear()
            with self._lock:
                watched = list(self._watched.items())
            for key, watch in watched:
                try:
                    finished = self._step(watch)
                except Exception:  # never let one delivery stop the others
                    log.exception("task %s: writing the finished track failed", watch.task_id)
                    finished = True
                if finished:
                    with self._lock:
                        self._watched.pop(key, None)

    def _step(self, watch: _Watch) -> bool:
        """One look at ``watch``: whether it is over (delivered, failed, dropped)."""
        now = time.monotonic()
        if now < watch.next_try:
            return False
        try:
            result = self.jobs.result(watch.request)
        except SamBackendError as exc:
            log.debug("task %s: tracking result not readable now (%s)", watch.task_id, exc)
            result = None
        if result is None or not (result.done or result.state == "failed"):
            if now > watch.until:
                log.warning("task %s: the tracking pass did not finish in %.0f s; its track is "
                            "not written to Label Studio", watch.task_id, now - watch.since)
                return True
            return False
        if result.state == "failed":
            log.warning("task %s: tracking failed (%s); nothing written to Label Studio",
                        watch.task_id, result.error)
            return True
        if now < watch.since + self.settle_s:
            watch.next_try = watch.since + self.settle_s
            return False
        try:
            outcome = self.deliver(watch.task_id, watch.build(result), watch.verify)
        except ConfigError as exc:  # no address or token: nothing to retry
            log.warning("task %s: the finished track is not written to Label Studio (%s); "
                        "Retrieve Predictions fetches it", watch.task_id, exc)
            return True
        except SamBackendError as exc:
            watch.failures += 1
            if watch.failures >= ATTEMPTS:
                log.warning("task %s: the finished track could not be written to Label Studio "
                            "(%s); Retrieve Predictions fetches it", watch.task_id, exc)
                return True
            watch.next_try = now + self.poll_s * 2 ** watch.failures
            return False
        log.info("task %s: finished track %s (model version %s)", watch.task_id, outcome,
                 self.model_version)
        return True

    def deliver(self, task_id: int, prediction: Dict[str, Any],
                verify: Optional[Verify] = None) -> str:
        """Write ``prediction`` (the whole tracks) to task ``task_id`` in place of this
        backend's predictions there (its version and ``:partial``; other models' stay), unless
        ``verify`` refuses or an equal one is already there. What happened, for the log."""
        api = self._api_factory()
        try:
            reason = verify(api) if verify is not None else None
            if reason:
                return f"not written to Label Studio: {reason}"
            ours = [p for p in api.task_predictions(task_id)
                    if p.get("model_version") in (self.model_version, self.partial_version)]
            same = [p for p in ours if p.get("model_version") == self.model_version
                    and p.get("result") == prediction.get("result")]
            for found in ours:
                if found not in same[:1] and "id" in found:
                    api.delete_prediction(found["id"])
            if same:
                return "already in Label Studio"
            api.add_prediction(task_id, prediction)
            self.delivered += 1
            return "written in Label Studio"
        finally:
            api.close()


__all__ = ["TrackDeliveries"]
