"""``sam-backend worker`` and ``sam-backend precompute --project ID``: the commands of the team
setup (see :mod:`sam_backend.embeddings.precompute` for the queue and the job).

- ``worker`` loads the model once (through :mod:`sam_backend.assembly`) and runs an RQ
  :class:`~rq.worker.SimpleWorker` on the queue of its model identity; ``worker --queue train``
  trains the queued training runs instead (:func:`sam_backend.training.jobs.run_train_worker`).
- ``precompute --project ID`` lists the project's tasks through Label Studio's API
  (:class:`~sam_backend.labelstudio.api.LabelStudioAPI`; ``LABEL_STUDIO_URL``,
  ``LABEL_STUDIO_API_KEY``), newest first, and queues each image once (deduplicated by image key;
  images already in the store are skipped), with a progress bar and a summary.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Dict, Optional

from sam_backend import assembly
from sam_backend.embeddings.precompute import install_worker_context
from sam_backend.embeddings.store import EmbeddingStore
from sam_backend.errors import ConfigError, SamBackendError
from sam_backend.labelstudio.api import LabelStudioAPI
from sam_backend.labelstudio.label_config import parse_label_config
from sam_backend.settings import Settings, add_option_arguments, settings_from_args

log = logging.getLogger(__name__)


# -- `sam-backend worker` -------------------------------------------------------------------------

def run_worker(args) -> int:
    """``sam-backend worker``: load the model once, then encode queued images until stopped."""
    from rq import SimpleWorker
    from rq.serializers import JSONSerializer

    settings = settings_from_args(args)
    if getattr(args, "queue", "encode") == "video":
        return run_video_worker(settings, args)
    if getattr(args, "queue", "encode") == "train":
        from sam_backend.training.jobs import run_train_worker

        run_train_worker(settings, name=args.name, burst=args.burst,
                         maintenance_interval=args.maintenance_interval,
                         logging_level=str(getattr(args, "log_level", "INFO")).upper())
        return 0
    # the worker writes to the store and rarely reads an image twice: a small memory tier
    settings = replace(settings, embedding_cache_mb=min(settings.embedding_cache_mb, 256))
    if not settings.embedding_store:
        raise ConfigError("the worker needs embedding_store=redis://host:port/db (the store the "
                          "backend replicas use)")
    segmenter = assembly.segmenter_for(settings)
    store = segmenter.cache.tier
    queue = assembly.encode_queue(settings, store)
    install_worker_context(segmenter, assembly.image_loader(settings), store.identity)
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




def run_video_worker(settings: Settings, args) -> int:
    """``sam-backend worker --queue video``: load the tracker once, then track queued video
    requests (:mod:`sam_backend.video.jobs`), writing their results into the team's Redis."""
    from rq import SimpleWorker
    from rq.serializers import JSONSerializer

    from sam_backend.video.jobs import install_worker_context

    if not settings.embedding_store:
        raise ConfigError("the video worker needs embedding_store=redis://host:port/db (the "
                          "Redis the backend replicas queue tracking requests in)")
    settings = replace(settings, video_background="worker",
                       embedding_cache_mb=min(settings.embedding_cache_mb, 256))
    images = assembly.image_loader(settings)
    # the replicas' identity: the same model (and runtime) as theirs, without loading the
    # click model here
    jobs = assembly.tracking_jobs(settings, images)
    queue = jobs.queue
    jobs.queue = None  # a worker tracks what it takes, in its own thread
    install_worker_context(jobs, queue.results, images)
    jobs.tracker  # loaded before the first job is taken
    interval = max(1, int(args.maintenance_interval))
    worker = SimpleWorker([queue.queue], connection=queue.connection, serializer=JSONSerializer,
                          name=args.name, maintenance_interval=interval,
                          worker_ttl=interval + 15)
    log.info("video worker %s: tracker %s, queue %s, store %s", worker.name, queue.identity,
             queue.queue.name, queue.store.display_url)
    worker.work(burst=args.burst, logging_level=args.log_level.upper()
                if hasattr(args, "log_level") else "INFO", with_scheduler=False)
    return 0


# -- `sam-backend precompute --project ID` --------------------------------------------------------

def precompute_project(settings: Settings, images, project: int, progress: bool = True,
                       limit: Optional[int] = None) -> Dict[str, int]:
    """Queue every image of ``project`` (newest tasks first) once; the summary counts."""
    from tqdm import tqdm

    if not settings.embedding_store:
        raise ConfigError("precompute needs embedding_store=redis://host:port/db (the store the "
                          "backend replicas and workers use)")
    api = LabelStudioAPI(images)
    config = parse_label_config(api.label_config(project))
    identity = assembly.identity_for(settings)
    store = EmbeddingStore(settings.embedding_store, identity, ttl_s=settings.embedding_store_ttl)
    if not store.check():
        raise ConfigError(f"the embedding store {store.display_url} is unreachable")
    queue = assembly.encode_queue(settings, store)
    tasks = api.newest_tasks(project)
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

    settings = settings_from_args(args)  # --label-studio-url is the option label_studio_url
    images = assembly.image_loader(settings)
    counts = precompute_project(settings, images, args.project, progress=not args.no_progress,
                                limit=args.limit)
    print(json.dumps(counts))  # the command's output: the summary
    return 0 if counts["errors"] == 0 else 1


def register_cli(subparsers) -> None:
    worker = subparsers.add_parser(
        "worker", help="encode queued images into the shared embedding store, or train "
                       "queued training runs (--queue train) (RQ worker)")
    worker.add_argument("--queue", choices=("encode", "train", "video"), default="encode",
                        help="encode: images into the shared embedding store (default); train: "
                             "training runs (sam-backend train's work, queued by the replicas); "
                             "video: tracking requests (video_background=worker)")
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
