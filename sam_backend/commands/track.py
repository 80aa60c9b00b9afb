"""``sam-backend track --project ID``: pre-track every video of a Label Studio project.

Each task's boxes (the ``videorectangle`` regions of its most recently updated annotation or
draft: the first box of each object and its corrections, as the server reads them,
:mod:`sam_backend.labelstudio.video_service`) are tracked through the clip (up to
``max_track_frames``) by the tracker of ``model_name`` (``sam2`` or ``sam3``), in this process,
and posted as a prediction (``POST /api/predictions``) under the tracker's ``model_version``
(the one the server's video answers carry). The options are the backend's own (``--with
key=value``, ``--option value``, the environment), and so are Label Studio's address and token
(``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``; ``--url`` / ``--token`` first).

Tasks that already have a prediction of this model_version are skipped, so an interrupted run
resumes where it stopped; a task without boxes is skipped (listed); a task that fails is
reported at the end and never stops the run (exit code 1 when any failed). A progress bar counts
tasks; the tracker logs its frames as it goes.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple

from sam_backend import __version__, assembly
from sam_backend.common.deadline import WorkScope
from sam_backend.errors import ConfigError, SamBackendError
from sam_backend.labelstudio.api import LabelStudioAPI
from sam_backend.labelstudio.label_config import parse_label_config
from sam_backend.labelstudio.video_service import VideoPredictions
from sam_backend.settings import add_option_arguments, settings_from_args

log = logging.getLogger(__name__)


@dataclass
class Report:
    done: List[int] = field(default_factory=list)
    skipped: List[int] = field(default_factory=list)  # already predicted
    no_boxes: List[int] = field(default_factory=list)
    failed: List[Tuple[int, str]] = field(default_factory=list)
    tracks: int = 0
    frames: int = 0
    seconds: float = 0.0
    model_version: str = ""


def video_model_version(settings) -> str:
    """The model_version of tracks: the server's (what its /setup gives Label Studio, so that
    Label Studio does not ask the server again for a task this command tracked)."""
    from sam_backend.models.checkpoints import infer_variant

    variant = infer_variant(settings.model_name, settings.sam_config, settings.sam_checkpoint_file)
    version = f"sam_backend-{__version__}:{variant.key}"
    return version if settings.concept_model == "none" else f"{version}+{settings.concept_model}"


def track_project(videos: VideoPredictions, api: LabelStudioAPI, project_id: int,
                  task_ids: Optional[Iterable[int]] = None, limit: Optional[int] = None,
                  progress: bool = True) -> Report:
    """Track the project's tasks (those in ``task_ids`` if given, at most ``limit`` new ones)
    and post each one's tracks as a prediction of ``videos.model_version``."""
    from tqdm import tqdm

    started = time.perf_counter()
    project = api.project(project_id)
    config = parse_label_config(project.get("label_config") or "")
    if not videos.handles(config):
        raise ConfigError(f"project {project_id}'s labeling config has no VideoRectangle on a "
                          f"Video: nothing to track")
    tasks = api.tasks(project_id, annotations=True)
    if task_ids is not None:
        wanted = set(task_ids)
        tasks = [t for t in tasks if t.get("id") in wanted]
    done_before = api.predicted_tasks(project_id, videos.model_version)
    report = Report(skipped=[t["id"] for t in tasks if t["id"] in done_before],
                    model_version=videos.model_version)
    todo = []
    for task in tasks:
        if task["id"] in done_before:
            continue
        try:
            ask = videos.ask(task, config)
        except SamBackendError as exc:
            report.failed.append((task["id"], str(exc)))
            continue
        if ask is None:
            report.no_boxes.append(task["id"])
        else:
            todo.append((task, ask))
    todo = todo[:limit]
    log.info("project %s: %d video task(s) to track, %d already have %s, %d without boxes",
             project_id, len(todo), len(report.skipped), videos.model_version,
             len(report.no_boxes))
    for task, ask in tqdm(todo, desc=f"project {project_id}", unit="video",
                          disable=not progress):
        try:
            # nobody waits: the whole range at once
            request = videos.request(task, ask, answer_frames=0)
            result = videos.jobs.track_now(
                request, WorkScope(videos.settings.video_job_timeout, None, "video_job_timeout"))
            prediction = videos.prediction(result, ask)
            api.add_prediction(task["id"], prediction)
        except Exception as exc:  # reported at the end; the run goes on
            log.debug("task %s failed", task["id"], exc_info=True)
            report.failed.append((task["id"], str(exc) if isinstance(exc, SamBackendError)
                                  else f"{type(exc).__name__}: {exc}"))
            continue
        report.done.append(task["id"])
        report.tracks += len(prediction["result"])
        report.frames += result.total
    report.seconds = time.perf_counter() - started
    return report


def run(args) -> int:
    # the backend's own settings; this command tracks in its own process
    settings = dataclasses.replace(settings_from_args(args), video_background="thread")
    images = assembly.image_loader(settings)
    jobs = assembly.tracking_jobs(settings, images)
    model_version = video_model_version(settings)
    videos = VideoPredictions(settings, images, jobs, "track:" + model_version, model_version)
    api = LabelStudioAPI(images)
    task_ids = [int(t) for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    try:
        report = track_project(videos, api, args.project, task_ids, args.limit,
                               progress=not args.no_progress)
    finally:
        api.close()
        jobs.close()
    out = sys.stdout
    out.write(f"project {args.project} ({report.model_version}): {len(report.done)} video(s) "
              f"tracked, {report.tracks} track(s) over {report.frames} frame(s), "
              f"{len(report.skipped)} skipped (already predicted), {len(report.no_boxes)} "
              f"without boxes, {len(report.failed)} failed, {report.seconds:.1f} s\n")
    for task_id, message in report.failed:
        out.write(f"  task {task_id}: {message}\n")
    return 1 if report.failed else 0


def register_cli(subparsers) -> None:
    from sam_backend.commands.annotate import add_project_arguments

    parser = subparsers.add_parser(
        "track", help="pre-track a Label Studio project's videos from their boxes, as "
                      "predictions (model_name=sam2 or sam3)")
    add_project_arguments(parser)
    parser.add_argument("--tasks", default=None, help="only these task ids (comma-separated)")
    parser.add_argument("--limit", type=int, default=None,
                        help="track at most this many tasks (those not done yet)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_option_arguments(parser)
    parser.set_defaults(func=run)
