"""Precompute for a team: an RQ queue of images to encode and the job the workers run to encode
them into the shared embedding store. The commands (``worker``, ``precompute``) are in
:mod:`sam_backend.commands.precompute`; the store's model identity comes from
:func:`sam_backend.assembly.identity_for`.

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
from dataclasses import dataclass
from typing import Any, Dict, Optional

from sam_backend.errors import SamBackendError
from sam_backend.embeddings.store import KEY_ROOT, EmbeddingStore, StoreUnavailable, connect

log = logging.getLogger(__name__)

JOB_FUNCTION = "sam_backend.embeddings.precompute.encode_job"
RETRIES = 3


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


def install_worker_context(segmenter, images, identity: str) -> None:
    """What :func:`encode_job` works with in this process: the loaded segmenter (its cache's
    tier is the store) and an image loader (``sam-backend worker`` calls this once)."""
    global _CONTEXT
    _CONTEXT = _WorkerContext(segmenter, images, identity)


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


