"""Precompute for a team: an RQ queue of images to encode, the worker that encodes them into the
shared embedding store, and the command that queues a whole Label Studio project.

- ``sam-backend worker --with <the backend's model options> embedding_store=redis://...``
  loads the model once and runs an RQ :class:`~rq.worker.SimpleWorker` (jobs run in the loaded
  process, no fork per job) on the queue of its model identity, writing each embedding into the
  store. Jobs are JSON-serialised (never pickle). Each job carries a :class:`~rq.Retry`: a job
  whose worker was killed stays in RQ's StartedJobRegistry until its heartbeat lapses
  (``precompute_job_timeout`` + 60 s after it started); the next maintenance pass of any
  living worker (every ``--maintenance-interval`` s) then re-queues it.
- With a store configured, a ``/predict`` without a prompt (task opened) queues the image at the
  front of this queue instead of encoding it in the web process.
- ``sam-backend precompute --project ID`` lists the project's tasks through Label Studio's API
  (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``), newest first, and queues each image once
  (deduplicated by image key; images already in the store are skipped), with a progress bar and a
  summary.

Queue names and job ids derive from the model identity (see :mod:`sam_backend.embeddings.store`), so a
worker only takes images for the model it has loaded, and an image queued twice is one job.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional

from sam_backend.errors import ConfigError, SamBackendError
from sam_backend.settings import Settings
from sam_backend.embeddings.store import KEY_ROOT, EmbeddingStore, StoreUnavailable, connect, model_identity

log = logging.getLogger(__name__)

JOB_FUNCTION = "sam_backend.embeddings.precompute.encode_job"
RETRIES = 3


# -- identity and store ---------------------------------------------------------------------------

def identity_for(settings: Settings, model=None) -> str:
    """The store's model identity for ``settings`` (of the loaded ``model`` when given: its
    actual runtime; else the runtime ``settings`` resolve to), without loading anything else."""
    from sam_backend.models.checkpoints import ensure_checkpoint, infer_variant
    from sam_backend.models.families import choose_runtime

    variant = infer_variant(settings.model_name, settings.sam_config, settings.sam_checkpoint_file)
    sha = getattr(model, "sha256", None)
    if not sha:
        from sam_backend.models.onnx_export import HASH_SIDECAR, checkpoint_sha256, onnx_dir_for

        checkpoint = ensure_checkpoint(variant, settings.sam_checkpoint_file,
                                       offline=settings.offline)
        sha = checkpoint_sha256(checkpoint, onnx_dir_for(checkpoint) / HASH_SIDECAR)
    # the loaded model's runtime (it may have fallen back to torch), else the family table's choice
    runtime = model.runtime if model is not None else \
        choose_runtime(variant, settings.device, settings.runtime)
    identity = model_identity(variant.key, sha, runtime, settings.embedding_dtype)
    from sam_backend.labelstudio.service import keeps_vision_state

    # entries with SAM 3's backbone output (concept_model=sam3) are not mixed with click-only ones
    return identity + ":vision" if keeps_vision_state(settings) else identity


def store_for(settings: Settings, identity: str) -> EmbeddingStore:
    store = EmbeddingStore(settings.embedding_store, identity, ttl_s=settings.embedding_store_ttl,
                           wait_s=settings.embedding_store_wait)
    if not store.check():
        log.warning("embedding store %s is not reachable at start: the backend works from memory "
                    "and its own encoder until it is", store.display_url)
    return store


# -- the queue ------------------------------------------------------------------------------------

def queue_name(identity: str) -> str:
    return f"{KEY_ROOT}:encode:{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


class EncodeQueue:
    """The RQ queue of images to encode for one model identity (thread-safe)."""

    def __init__(self, store: EmbeddingStore, job_timeout: int = 120):
        from rq import Queue
        from rq.serializers import JSONSerializer

        self.store = store
        self.job_timeout = int(job_timeout)
        # RQ raises the socket timeout of its connection for blocking pops: its own client.
        self.connection = connect(store.url, socket_timeout=30.0)
        self.queue = Queue(queue_name(store.identity), connection=self.connection,
                           serializer=JSONSerializer)
        self.enqueued = 0

    def job_id(self, image_key: str) -> str:
        return "sam_backend-encode-" + self.store.key_for(image_key).rsplit(":", 1)[-1][:40]

    def submit(self, image_key: str, url: str, task_id: Any = None,
               label_studio_url: Optional[str] = None, at_front: bool = False) -> str:
        """Queue one image; "stored" when the store has it, "queued" when it is already
        queued or running, "enqueued" when queued now. :class:`StoreUnavailable` when Redis is
        unreachable."""
        if self.store.contains(image_key):
            return "stored"
        job_id = self.job_id(image_key)
        return self.store._call(lambda: self._enqueue(job_id, image_key, url, task_id,
                                                      label_studio_url, at_front))

    def _enqueue(self, job_id, image_key, url, task_id, label_studio_url, at_front) -> str:
        from rq import Retry
        from rq.job import JobStatus

        job = self.queue.fetch_job(job_id)
        if job is not None and job.get_status(refresh=False) in (
                JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
            return "queued"
        self.queue.enqueue(JOB_FUNCTION, kwargs={"image_key": image_key, "url": url,
                                                 "task_id": task_id,
                                                 "label_studio_url": label_studio_url},
                           job_id=job_id, retry=Retry(max=RETRIES), at_front=at_front,
                           job_timeout=self.job_timeout, result_ttl=600, failure_ttl=24 * 3600,
                           description=f"encode {image_key}")
        self.enqueued += 1
        return "enqueued"

    def length(self) -> Optional[int]:
        """Jobs waiting (None when Redis is unreachable)."""
        try:
            return int(self.store._call(lambda: self.queue.count))
        except StoreUnavailable:
            return None


# -- the job (runs in `sam-backend worker`) -------------------------------------------------------

@dataclass
class _WorkerContext:
    segmenter: Any
    images: Any
    identity: str


_CONTEXT: Optional[_WorkerContext] = None


def encode_job(image_key: str, url: str, task_id: Any = None,
               label_studio_url: Optional[str] = None) -> Dict[str, Any]:
    """Encode one queued image into the store (skipped when some process stored it already)."""
    if _CONTEXT is None:
        raise SamBackendError("encode_job runs inside `sam-backend worker` only")
    segmenter, images = _CONTEXT.segmenter, _CONTEXT.images
    if label_studio_url:
        images.update_from_setup(label_studio_url, None)  # only where the env gives none
    started = time.perf_counter()
    before = segmenter.encodes
    segmenter.embedding(image_key, lambda: images.load(url, task_id), interactive=False)
    encoded = segmenter.encodes > before
    seconds = time.perf_counter() - started
    log.info("%s %s in %.2f s", "encoded" if encoded else "already stored:", image_key, seconds)
    return {"image_key": image_key, "encoded": encoded, "seconds": round(seconds, 3)}


def run_worker(args) -> int:
    """``sam-backend worker``: load the model once, then encode queued images until stopped."""
    from rq import SimpleWorker
    from rq.serializers import JSONSerializer

    from sam_backend.images.config import ImageAccessSettings
    from sam_backend.images.loader import ImageLoader
    from sam_backend.labelstudio.service import segmenter_for
    from sam_backend.settings import settings_from_args

    global _CONTEXT
    settings = settings_from_args(args)
    # the worker writes to the store and rarely reads an image twice: a small memory tier
    settings = replace(settings, embedding_cache_mb=min(settings.embedding_cache_mb, 256))
    if not settings.embedding_store:
        raise ConfigError("the worker needs embedding_store=redis://host:port/db (the store the "
                          "backend replicas use)")
    segmenter = segmenter_for(settings)
    store = segmenter.cache.tier
    queue = EncodeQueue(store, settings.precompute_job_timeout)
    _CONTEXT = _WorkerContext(segmenter, ImageLoader(ImageAccessSettings.from_settings(settings)),
                              store.identity)
    interval = max(1, int(args.maintenance_interval))
    worker = SimpleWorker([queue.queue], connection=queue.connection, serializer=JSONSerializer,
                          name=args.name, maintenance_interval=interval,
                          # the blocking pop returns every `interval` s, so maintenance (which
                          # re-queues a killed worker's job) runs that often
                          worker_ttl=interval + 15)
    log.info("worker %s: model %s, queue %s, store %s", worker.name, store.identity,
             queue.queue.name, store.display_url)
    worker.work(burst=args.burst, logging_level=args.log_level.upper()
                if hasattr(args, "log_level") else "INFO", with_scheduler=False)
    return 0


# -- `sam-backend precompute --project ID` --------------------------------------------------------

def project_tasks(images, project: int, page_size: int = 100) -> List[Dict[str, Any]]:
    """Every task of a Label Studio project, newest (highest id) first."""
    tasks: List[Dict[str, Any]] = []
    page = 1
    while True:
        body = images.api_get("/api/tasks", {"project": project, "page": page,
                                             "page_size": page_size})
        batch = body.get("tasks", []) if isinstance(body, dict) else body
        if not isinstance(batch, list):
            raise SamBackendError(f"Label Studio's /api/tasks answered {type(body).__name__}, "
                                  "expected {\"tasks\": [...]}")
        tasks.extend(t for t in batch if isinstance(t, dict))
        total = body.get("total") if isinstance(body, dict) else None
        if not batch or len(batch) < page_size or (total is not None and len(tasks) >= total):
            break
        page += 1
    tasks.sort(key=lambda t: int(t.get("id") or 0), reverse=True)
    return tasks


def precompute_project(settings: Settings, images, project: int, progress: bool = True,
                       limit: Optional[int] = None) -> Dict[str, int]:
    """Queue every image of ``project`` (newest tasks first) once; the summary counts."""
    from tqdm import tqdm

    from sam_backend.labelstudio.label_config import parse_label_config

    if not settings.embedding_store:
        raise ConfigError("precompute needs embedding_store=redis://host:port/db (the store the "
                          "backend replicas and workers use)")
    config = parse_label_config(images.api_get(f"/api/projects/{project}").get("label_config")
                                or "")
    identity = identity_for(settings)
    store = EmbeddingStore(settings.embedding_store, identity, ttl_s=settings.embedding_store_ttl)
    if not store.check():
        raise ConfigError(f"the embedding store {store.display_url} is unreachable")
    queue = EncodeQueue(store, settings.precompute_job_timeout)
    tasks = project_tasks(images, project)
    if limit:
        tasks = tasks[:limit]
    counts = {"tasks": len(tasks), "images": 0, "enqueued": 0, "stored": 0, "queued": 0,
              "duplicates": 0, "errors": 0}
    seen = set()
    targets = [name for name in config.images if any(c.to_name == name for c in config.controls)]
    for task in tqdm(tasks, desc=f"project {project}", unit="task", disable=not progress):
        data = task.get("data") or {}
        for to_name in targets:
            values = data.get(config.data_key(to_name))
            for url in values if isinstance(values, list) else [values]:
                if not isinstance(url, str) or not url.strip():
                    continue
                try:
                    image_key = images.source_key(url, task.get("id"))
                except SamBackendError as exc:
                    counts["errors"] += 1
                    log.warning("task %s: %s", task.get("id"), exc)
                    continue
                if image_key in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(image_key)
                counts["images"] += 1
                counts[queue.submit(image_key, url, task.get("id"), images.label_studio_url)] += 1
    log.info("project %s: %d tasks, %d distinct images: %d queued now, %d already stored, %d "
             "already queued, %d duplicate references, %d errors; queue %s holds %s jobs",
             project, counts["tasks"], counts["images"], counts["enqueued"], counts["stored"],
             counts["queued"], counts["duplicates"], counts["errors"], queue.queue.name,
             queue.length())
    return counts


def run_precompute(args) -> int:
    import json

    from sam_backend.images.config import ImageAccessSettings
    from sam_backend.images.loader import ImageLoader
    from sam_backend.settings import settings_from_args

    settings = settings_from_args(args)  # --label-studio-url is the option label_studio_url
    images = ImageLoader(ImageAccessSettings.from_settings(settings))
    counts = precompute_project(settings, images, args.project, progress=not args.no_progress,
                                limit=args.limit)
    print(json.dumps(counts))  # the command's output: the summary
    return 0 if counts["errors"] == 0 else 1


def register_cli(subparsers) -> None:
    from sam_backend.settings import add_option_arguments

    worker = subparsers.add_parser(
        "worker", help="encode queued images into the shared embedding store (RQ worker)")
    worker.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    worker.add_argument("--name", default=None, help="worker name (default: RQ's)")
    worker.add_argument("--maintenance-interval", type=int, default=30,
                        help="seconds between RQ maintenance passes, which re-queue the jobs of "
                             "killed workers (default 30)")
    add_option_arguments(worker)
    worker.set_defaults(func=run_worker)

    pre = subparsers.add_parser(
        "precompute", help="queue every image of a Label Studio project for the workers")
    pre.add_argument("--project", type=int, required=True, help="Label Studio project id")
    pre.add_argument("--label-studio-url", dest="label_studio_url", default=None,
                     help="Label Studio's address (the option label_studio_url; default: "
                          "LABEL_STUDIO_URL); the API key comes from LABEL_STUDIO_API_KEY")
    pre.add_argument("--limit", type=int, default=None, help="only the newest N tasks")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_option_arguments(pre)
    pre.set_defaults(func=run_precompute)
