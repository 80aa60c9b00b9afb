"""Where training runs, and the rule that there is one run per project at a time.

:class:`TrainingJobs` (one per server process) takes the triggers (*Start Training*, every
``train_every`` annotations) and answers at once; the run (:func:`~.runner.run_training`) goes
on elsewhere:

* **Single machine** (no ``embedding_store``): a background **process** of the server (spawned,
  at lower priority with ``os.nice``), so the server's threads keep answering clicks while it
  trains. A trigger during a run sets one follow-up run, started when the run ends (more triggers
  keep one). The run also holds the project's run lock (a file lock in the project's directory),
  so no two runs of a project ever overlap on this machine, whichever process starts them
  (``sam-backend train`` too: it waits for the lock). A process that dies (killed) leaves the
  served version; its status says how it ended.
* **Team** (``embedding_store=redis://...``): an RQ job on the queue :data:`TRAIN_QUEUE`,
  served by ``sam-backend worker --queue train`` (:func:`run_train_worker`, a GPU machine
  sharing ``trained_dir``). The per-project lock (the project's active job id) and the
  follow-up flag live in Redis, set and cleared by Lua scripts (atomic between replicas and
  workers). A job carries an RQ ``Retry``: the worker heartbeats the job while it trains
  (every half maintenance interval), so a killed worker's job is re-queued by the next
  maintenance pass of a living worker soon after, not at the end of its timeout. A run that
  fails (too little data, a bad image set...) is not retried: its status says why.

Status (:meth:`TrainingJobs.status`) joins the run's ``status.json``, the follow-up flag and
the versions; :meth:`TrainingJobs.counters` feeds ``/metrics``.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from typing import Any, Dict, Optional

from redis.exceptions import RedisError

from sam_backend.errors import BusyError
from sam_backend.training.versions import VersionStore, now_iso

log = logging.getLogger(__name__)

#: the RQ queue of training runs (``sam-backend worker --queue train``)
TRAIN_QUEUE = "sam_backend:train"
#: the Redis keys of training (a project's active job, its follow-up, its annotation count)
KEY_ROOT = "sam_backend:train"
JOB_FUNCTION = "sam_backend.training.jobs.train_job"
#: seconds one run may take on a worker before RQ stops it
JOB_TIMEOUT = 48 * 3600
#: retries of a job whose worker was lost (a failed run is never retried)
RETRIES = 2
COUNTER_NAMES = ("runs_started", "runs_succeeded", "runs_failed", "runs_promoted",
                 "runs_queued", "annotation_events")

_REQUEST = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('SET', KEYS[2], ARGV[2], 'NX') then return 'queued' end
  redis.call('SET', KEYS[2], ARGV[2])
  return 'already_queued'
end
redis.call('SET', KEYS[1], ARGV[1])
return 'started'
"""
_FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
local follow = redis.call('GET', KEYS[2])
if follow then
  redis.call('DEL', KEYS[2])
  redis.call('SET', KEYS[1], ARGV[2])
  return follow
end
redis.call('DEL', KEYS[1])
return false
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _key(project: int, what: str) -> str:
    return f"{KEY_ROOT}:p{int(project)}:{what}"


def _job_id(project: int) -> str:
    return f"sam_backend-train-p{int(project)}-{uuid.uuid4().hex[:12]}"


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def _final_counters(status: dict) -> Counter:
    state = status.get("state")
    counts: Counter = Counter()
    if state in ("succeeded", "not_promoted"):
        counts["runs_succeeded"] += 1
        if state == "succeeded":
            counts["runs_promoted"] += 1
    else:
        counts["runs_failed"] += 1
    return counts


# -- a run in a child process (single machine) ----------------------------------------------------

def _child_main(settings, root: str, project: int, reason: str, label_studio_url, token) -> None:
    """The background process of one run: lower priority, SIGTERM asks the run to stop."""
    import sys

    try:
        os.nice(10)
    except (AttributeError, OSError):
        pass
    import torch

    # beside the server: one core stays free for clicks (nice alone does not stop the run's
    # threads from taking every core's cache and memory bandwidth)
    torch.set_num_threads(settings.train_threads or max(1, (os.cpu_count() or 2) - 1))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    from sam_backend.training.runner import run_training

    try:
        run_training(settings, project, label_studio_url, token, stop=stopping.is_set,
                     versions=VersionStore(root), reason=reason, wait_for_lock=None)
    except BaseException:  # noqa: BLE001 - run_training wrote the status and logged why
        sys.exit(1)
    sys.exit(0)


class _LocalRun:
    def __init__(self, process, job: str):
        self.process, self.job = process, job


# -- the jobs -------------------------------------------------------------------------------------

class TrainingJobs:
    """The training runs this server process starts (see the module docstring)."""

    def __init__(self, settings, versions: VersionStore):
        self.settings = settings
        self.versions = versions
        self._lock = threading.Lock()
        self._runs: Dict[int, _LocalRun] = {}
        self._follow: Dict[int, Dict[str, Any]] = {}
        self._counts: Counter = Counter()
        self._counters: Counter = Counter()
        self._closed = False
        self.redis = None
        self.queue = None
        if settings.embedding_store:
            from rq import Queue
            from rq.serializers import JSONSerializer

            from sam_backend.embeddings.store import connect

            self.redis = connect(settings.embedding_store, socket_timeout=30.0)
            self.queue = Queue(TRAIN_QUEUE, connection=self.redis, serializer=JSONSerializer)

    @property
    def team(self) -> bool:
        return self.redis is not None

    # -- triggers -----------------------------------------------------------------------------
    def request(self, project: int, reason: str, label_studio_url: Optional[str] = None,
                token: Optional[str] = None) -> Dict[str, Any]:
        """Start a run of ``project`` now, or queue one follow-up when one is running; returns
        at once ``{"status": "started"|"queued"|"already_queued", "project", "job"}``."""
        project = int(project)
        if self.team:
            try:
                return self._request_rq(project, reason, label_studio_url, token)
            except RedisError as exc:
                raise BusyError(f"the team's Redis (embedding_store) is unreachable ({exc}): the "
                                f"training run of project {project} was not queued; ask again "
                                f"when Redis is back") from None
        with self._lock:
            if self._closed:
                raise RuntimeError("the training jobs are closed")
            run = self._runs.get(project)
            if run is not None:
                status = "already_queued" if project in self._follow else "queued"
                self._follow[project] = {"reason": reason, "label_studio_url": label_studio_url,
                                         "token": token}
                if status == "queued":
                    self._counters["runs_queued"] += 1
                log.info("project %s: a run is going on (%s): follow-up %s", project, reason,
                         status.replace("_", " "))
                return {"status": status, "project": project, "job": run.job}
            job = self._start_local(project, reason, label_studio_url, token)
            return {"status": "started", "project": project, "job": job}

    def annotation_event(self, project: int, count: int, label_studio_url: Optional[str] = None,
                         token: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """``count`` new or updated annotations of ``project``: every ``train_every`` of them
        (0 = off) request a run; :meth:`request`'s answer then, else None."""
        project, count = int(project), max(0, int(count))
        every = int(self.settings.train_every or 0)
        if self.team:
            try:
                self.redis.hincrby(f"{KEY_ROOT}:counters", "annotation_events", count)
                if every <= 0 or count == 0:
                    return None
                total = int(self.redis.incrby(_key(project, "annotations"), count))
                if total < every:
                    return None
                self.redis.decrby(_key(project, "annotations"), every * (total // every))
            except RedisError as exc:
                log.warning("project %s: %d annotation event(s) not counted toward train_every: "
                            "the team's Redis is unreachable (%s)", project, count, exc)
                return None
        else:
            with self._lock:
                self._counters["annotation_events"] += count
                if every <= 0 or count == 0:
                    return None
                self._counts[project] += count
                total = self._counts[project]
                if total < every:
                    return None
                self._counts[project] = total % every
        log.info("project %s: %d annotations since the last trigger (train_every=%d): "
                 "requesting a run", project, total, every)
        return self.request(project, f"{total} new or updated annotations", label_studio_url,
                            token)

    # -- single machine -----------------------------------------------------------------------
    def _start_local(self, project: int, reason: str, label_studio_url, token) -> str:
        """Start the run's process (call with ``self._lock`` held)."""
        import multiprocessing

        job = _job_id(project)
        context = multiprocessing.get_context("spawn")
        process = context.Process(
            target=_child_main, name=f"sam_backend-train-p{project}",
            args=(self.settings, str(self.versions.root), project, reason, label_studio_url,
                  token))
        process.start()
        self._runs[project] = _LocalRun(process, job)
        self._counters["runs_started"] += 1
        log.info("project %s: training run %s started in process %s (%s)", project, job,
                 process.pid, reason)
        threading.Thread(target=self._watch, args=(project, process, job), daemon=True,
                         name=f"train-watch-p{project}").start()
        return job

    def _watch(self, project: int, process, job: str) -> None:
        process.join()
        code = process.exitcode
        status = self.versions.status(project)
        ours = status.get("pid") == process.pid
        other_running = not ours and status.get("state") == "running" and \
            _alive(status.get("pid"))
        if code != 0 and not other_running and (not ours or status.get("state") == "running"):
            # died without saying so (killed, crashed on start): the served version stays
            served = self.versions.current(project)
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            status = {**status, "project": project, "state": "failed", "stage": "failed",
                      "finished": now_iso(), "pid": process.pid,
                      "message": f"the training process ended with {how} (still served: "
                                 f"{served.name if served else 'no trained version'})"}
            self.versions.write_status(project, status)
        with self._lock:
            self._counters.update(_final_counters(status))
            if self._runs.get(project) is not None and self._runs[project].job == job:
                del self._runs[project]
            follow = self._follow.pop(project, None)
            if follow is not None and not self._closed:
                self._start_local(project, "follow-up: " + (follow["reason"] or ""),
                                  follow["label_studio_url"], follow["token"])
        log.info("project %s: training run %s ended (%s)", project, job, status.get("state"))

    # -- team (RQ) ----------------------------------------------------------------------------
    def _request_rq(self, project: int, reason: str, label_studio_url, token) -> Dict[str, Any]:
        from rq.job import Job, JobStatus
        from rq.serializers import JSONSerializer

        active_key, follow_key = _key(project, "active"), _key(project, "follow")
        active = self.redis.get(active_key)
        if active is not None:  # a job lost for good (failed, expired) holds nothing
            active = active.decode()
            try:
                job = Job.fetch(active, connection=self.redis, serializer=JSONSerializer)
                state = job.get_status(refresh=False)
            except Exception:  # noqa: BLE001 - NoSuchJobError and the like
                state = None
            if state is None or state in (JobStatus.FINISHED, JobStatus.FAILED,
                                          JobStatus.CANCELED, JobStatus.STOPPED):
                self.redis.eval(_RELEASE, 1, active_key, active)
        job_id = _job_id(project)
        payload = json.dumps({"reason": reason, "label_studio_url": label_studio_url,
                              "token": token})
        answer = self.redis.eval(_REQUEST, 2, active_key, follow_key, job_id, payload)
        answer = answer.decode() if isinstance(answer, bytes) else str(answer)
        if answer != "started":
            if answer == "queued":
                self.redis.hincrby(f"{KEY_ROOT}:counters", "runs_queued", 1)
            current = self.redis.get(active_key)
            return {"status": answer, "project": project,
                    "job": current.decode() if current else None}
        try:
            enqueue_run(self.queue, job_id, project, reason, label_studio_url, token)
        except Exception:
            self.redis.eval(_RELEASE, 1, active_key, job_id)
            raise
        return {"status": "started", "project": project, "job": job_id}

    # -- status -------------------------------------------------------------------------------
    def _follow_up(self, project: int) -> bool:
        if self.team:
            return bool(self.redis.exists(_key(project, "follow")))
        with self._lock:
            return project in self._follow

    def _active_here(self, project: int) -> bool:
        with self._lock:
            run = self._runs.get(project)
            return run is not None and run.process.is_alive()

    def status(self, project: int) -> Dict[str, Any]:
        """``{"project", "state", "progress", "message", "follow_up", "served", "versions",
        "last_report", ...}``; state one of idle, running, queued, succeeded, failed,
        not_promoted."""
        project = int(project)
        run = self.versions.status(project)
        state = run.get("state") or "idle"
        message = run.get("message") or ""
        active_here = False if self.team else self._active_here(project)
        if state == "running" and not active_here and run.get("host") == socket.gethostname() \
                and not _alive(run.get("pid")):
            state, message = "failed", (f"the run's process ({run.get('pid')}) is gone: "
                                        f"{message}")
        queued_job = follow = False
        if self.team:
            try:
                active = self.redis.get(_key(project, "active"))
                queued_job = active is not None and state != "running"
                follow = self._follow_up(project)
            except RedisError as exc:  # the files still tell the run's state
                message = (message + "; " if message else "") + \
                    f"the team's Redis is unreachable ({exc}): queue and follow-up unknown"
        else:
            if active_here and state != "running":
                state, message = "running", "starting"
            follow = self._follow_up(project)
        if state != "running" and (queued_job or follow):
            state = "queued"
        served = self.versions.current(project)
        listed = []
        for version in self.versions.versions(project):
            report = version.report
            metric = report.get("metric")
            figures = ((report.get("candidate") or {}).get(metric) or {}) if metric else {}
            baseline = ((report.get("baseline") or {}).get(metric) or {}) if metric else {}
            listed.append({"name": version.name, "kind": version.kind,
                           "promoted": bool(report.get("promoted")),
                           "served": served is not None and version.number == served.number,
                           "metric": metric, "mAP": figures.get("mAP"),
                           "mAP50": figures.get("mAP50"),
                           "baseline": (report.get("baseline") or {}).get("source"),
                           "baseline_mAP": baseline.get("mAP"),
                           "baseline_mAP50": baseline.get("mAP50"),
                           "finished": report.get("finished")})
        last = self.versions.versions(project)
        return {"project": project, "state": state,
                "progress": run.get("progress") or {"epoch": 0, "epochs": 0},
                "stage": run.get("stage"), "message": message, "follow_up": follow,
                "started": run.get("started"), "finished": run.get("finished"),
                "served": served.name if served else None, "versions": listed,
                "last_report": last[-1].report if last else None,
                "where": "rq" if self.team else "process"}

    def counters(self) -> Dict[str, Optional[int]]:
        """Counts for /metrics (team: shared by every replica and worker; None while Redis is
        unreachable)."""
        if self.team:
            try:
                raw = self.redis.hgetall(f"{KEY_ROOT}:counters")
            except RedisError:  # /metrics keeps answering; the store's state says why
                return {name: None for name in COUNTER_NAMES}
            found = {k.decode(): int(v) for k, v in raw.items()}
            return {name: found.get(name, 0) for name in COUNTER_NAMES}
        with self._lock:
            return {name: int(self._counters.get(name, 0)) for name in COUNTER_NAMES}

    def running(self) -> Dict[int, str]:
        """{project: job id} of the runs this process started and that are going on."""
        with self._lock:
            return {p: r.job for p, r in self._runs.items() if r.process.is_alive()}

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until this process's runs (and their follow-ups) ended; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                busy = bool(self._runs) or bool(self._follow)
            if not busy:
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    def close(self, timeout: float = 30.0) -> None:
        """Ask this process's runs to stop (their status says so) and wait for them."""
        with self._lock:
            self._closed = True
            self._follow.clear()
            runs = list(self._runs.values())
        for run in runs:
            if run.process.is_alive():
                run.process.terminate()  # SIGTERM: the run stops between steps
        for run in runs:
            run.process.join(timeout)
            if run.process.is_alive():
                run.process.kill()
                run.process.join(5)
        if self.redis is not None:
            self.redis.close()


# -- the RQ side ----------------------------------------------------------------------------------

def enqueue_run(queue, job_id: str, project: int, reason: str, label_studio_url, token) -> None:
    from rq import Retry

    queue.enqueue(JOB_FUNCTION, kwargs={"project": int(project), "reason": reason,
                                        "label_studio_url": label_studio_url, "token": token},
                  job_id=job_id, retry=Retry(max=RETRIES), job_timeout=JOB_TIMEOUT,
                  result_ttl=7 * 24 * 3600, failure_ttl=7 * 24 * 3600,
                  description=f"train project {project}")
    queue.connection.hincrby(f"{KEY_ROOT}:counters", "runs_started", 1)
    log.info("project %s: training run %s queued on %s (%s)", project, job_id, queue.name,
             reason)


_WORKER_SETTINGS = None


def install_train_context(settings) -> None:
    """The settings :func:`train_job` trains with in this worker (``sam-backend worker --queue
    train`` calls this once): the worker's own options (trainer, train_*, trained_dir, device)."""
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = settings


def train_job(project: int, reason: str = "", label_studio_url: Optional[str] = None,
              token: Optional[str] = None) -> Dict[str, Any]:
    """One queued run (in ``sam-backend worker --queue train``); then the follow-up, if one was
    asked for meanwhile, is queued. A failed run is reported, not retried."""
    from rq import get_current_job
    from rq.serializers import JSONSerializer

    from sam_backend.errors import SamBackendError
    from sam_backend.training.runner import run_training

    if _WORKER_SETTINGS is None:
        raise SamBackendError("train_job runs inside `sam-backend worker --queue train` only")
    settings = _WORKER_SETTINGS
    job = get_current_job()
    connection = job.connection
    versions = VersionStore.from_settings(settings)
    outcome: Dict[str, Any] = {"project": int(project)}
    try:
        report = run_training(settings, project, label_studio_url, token, versions=versions,
                              reason=reason, wait_for_lock=None)
        outcome.update(version=report.get("version"), promoted=report.get("promoted"),
                       reason=report.get("promotion_reason"))
    except Exception as exc:  # noqa: BLE001 - the status says why; not retried
        outcome.update(error=f"{type(exc).__name__}: {exc}")
    counts = _final_counters(versions.status(project))
    for name, value in counts.items():
        connection.hincrby(f"{KEY_ROOT}:counters", name, value)
    next_id = _job_id(project)
    follow = connection.eval(_FINISH, 2, _key(project, "active"), _key(project, "follow"),
                             job.id, next_id)
    if follow:
        asked = json.loads(follow)
        from rq import Queue

        queue = Queue(TRAIN_QUEUE, connection=connection, serializer=JSONSerializer)
        enqueue_run(queue, next_id, project, "follow-up: " + (asked.get("reason") or ""),
                    asked.get("label_studio_url"), asked.get("token"))
        outcome["follow_up"] = next_id
    return outcome


def run_train_worker(settings, name: Optional[str] = None, burst: bool = False,
                     maintenance_interval: int = 30, logging_level: str = "INFO") -> None:
    """``sam-backend worker --queue train``: train queued runs until stopped (``burst``: until
    the queue is empty). No model is loaded up front: each run loads what it needs."""
    from rq import SimpleWorker
    from rq.serializers import JSONSerializer

    from sam_backend.embeddings.store import connect
    from sam_backend.errors import ConfigError

    if not settings.embedding_store:
        raise ConfigError("the train worker needs embedding_store=redis://host:port/db (the "
                          "Redis the backend replicas use)")
    install_train_context(settings)
    interval = max(1, int(maintenance_interval))
    beat = max(1.0, interval / 2)

    class TrainWorker(SimpleWorker):
        """Heartbeats the job while it trains, so a killed worker's job is re-queued about
        ``2 * beat + 10`` s after its last beat (not at the end of its hours-long timeout)."""

        def get_heartbeat_ttl(self, job) -> int:
            return int(2 * beat + 10)

        def execute_job(self, job, queue):
            done = threading.Event()

            def keep_alive() -> None:
                while not done.wait(beat):
                    try:
                        if getattr(self, "execution", None) is not None:
                            self.maintain_heartbeats(job)
                    except Exception as exc:  # noqa: BLE001 - the next beat tries again
                        log.debug("heartbeat failed: %s", exc)

            thread = threading.Thread(target=keep_alive, daemon=True, name="train-heartbeat")
            thread.start()
            try:
                return super().execute_job(job, queue)
            finally:
                done.set()
                thread.join(5)

    connection = connect(settings.embedding_store, socket_timeout=30.0)
    from rq import Queue

    queue = Queue(TRAIN_QUEUE, connection=connection, serializer=JSONSerializer)
    worker = TrainWorker([queue], connection=connection, serializer=JSONSerializer, name=name,
                         maintenance_interval=interval, worker_ttl=interval + 15)
    log.info("train worker %s: queue %s, trained_dir %s, trainer %s", worker.name, queue.name,
             VersionStore.from_settings(settings).root, settings.trainer)
    worker.work(burst=burst, logging_level=logging_level, with_scheduler=False)


__all__ = ["COUNTER_NAMES", "JOB_TIMEOUT", "TRAIN_QUEUE", "TrainingJobs", "enqueue_run",
           "install_train_context", "run_train_worker", "train_job"]
