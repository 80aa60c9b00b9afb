"""``sam-backend annotate --project ID``: pre-annotate every task of a Label Studio project.

Each task's image gets every instance of every label (label by concept, see
:mod:`sam_backend.concepts.base`), posted as a prediction (``POST /api/predictions``, through
:class:`~sam_backend.labelstudio.api.LabelStudioAPI`) under the backend's ``model_version``. The options are the backend's own (``--with key=value``, ``--option
value``, the environment: :class:`sam_backend.settings.Settings`, read as ``sam-backend serve``
reads them; ``concept_model`` defaults to ``grounding_dino``), and so are Label Studio's address
and token (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``; ``--url`` / ``--token`` first). Tasks
that already have a prediction of this model_version are skipped, so an interrupted run resumes
where it stopped; a task that fails is reported at the end and never stops the run.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple

from sam_backend import assembly
from sam_backend.errors import ConfigError, SamBackendError
from sam_backend.labelstudio.api import LabelStudioAPI
from sam_backend.labelstudio.label_config import parse_label_config
from sam_backend.settings import add_option_arguments, settings_from_args
from sam_backend.training import serving

log = logging.getLogger(__name__)


@dataclass
class Report:
    done: List[int] = field(default_factory=list)
    skipped: List[int] = field(default_factory=list)
    failed: List[Tuple[int, str]] = field(default_factory=list)
    instances: int = 0
    seconds: float = 0.0
    model_version: str = ""


def annotate_project(service, api: LabelStudioAPI, project_id: int,
                     task_ids: Optional[Iterable[int]] = None, limit: Optional[int] = None,
                     progress: bool = True) -> Report:
    """Pre-annotate the project's tasks (those in ``task_ids`` if given, at most ``limit`` new
    ones) as predictions of the project's promoted trained version when the service serves one
    (``service.trained``), else of the concept engine (``service.model_version``)."""
    from tqdm import tqdm

    started = time.perf_counter()
    trained = service.trained_annotator(project_id)
    annotator, model_version = trained if trained is not None else \
        (service.concept_annotator(), service.model_version)
    project = api.project(project_id)
    config = parse_label_config(project.get("label_config") or "")
    concepts = annotator.configured_concepts(config)
    if not concepts:
        raise ConfigError(f"project {project_id}'s labeling config has no labels to annotate "
                          f"(BrushLabels/PolygonLabels/RectangleLabels on an Image; "
                          f"concept_labels={service.settings.concept_labels!r})")
    tasks = api.tasks(project_id)
    if task_ids is not None:
        wanted = set(task_ids)
        tasks = [t for t in tasks if t["id"] in wanted]
    done_before = api.predicted_tasks(project_id, model_version)
    report = Report(skipped=[t["id"] for t in tasks if t["id"] in done_before],
                    model_version=model_version)
    todo = [t for t in tasks if t["id"] not in done_before][:limit]
    log.info("project %s: %d task(s) to annotate, %d already have %s; labels: %s", project_id,
             len(todo), len(report.skipped), model_version,
             ", ".join(f"{c.label} ({c.phrase!r})" for c in concepts))
    for task in tqdm(todo, desc=f"project {project_id}", unit="task", disable=not progress):
        try:
            prediction = annotator.annotate_task(task, config, concepts)
            api.add_prediction(task["id"], prediction)
        except Exception as exc:  # reported at the end; the run goes on
            log.debug("task %s failed", task["id"], exc_info=True)
            report.failed.append((task["id"], f"{type(exc).__name__}: {exc}"
                                  if not isinstance(exc, SamBackendError) else str(exc)))
            continue
        report.done.append(task["id"])
        kinds = Counter(region["type"] for region in prediction["result"])
        report.instances += (kinds.get("brushlabels") or kinds.get("rectanglelabels")
                             or kinds.get("polygonlabels", 0))
    report.seconds = time.perf_counter() - started
    return report


def run(args) -> int:
    # the backend's own settings: --with / --option flags over the environment over defaults
    settings = settings_from_args(args)
    if settings.concept_model == "none":  # this command needs a concept model: the default one
        settings = dataclasses.replace(settings, concept_model="grounding_dino")
    # Label Studio's address and token are the backend's label_studio_url / label_studio_api_key
    # (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY); --url / --token are those options' flags
    service = assembly.prediction_service(settings)
    trained = serving.attach(service)  # a project's promoted trained version, when it has one
    api = LabelStudioAPI(service.images)
    task_ids = [int(t) for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    try:
        report = annotate_project(service, api, args.project, task_ids, args.limit,
                                  progress=not args.no_progress)
    finally:
        if trained is not None:
            trained.close()
    out = sys.stdout
    out.write(f"project {args.project} ({report.model_version}): {len(report.done)} task(s) "
              f"annotated, {report.instances} instance(s), {len(report.skipped)} skipped (already "
              f"predicted), {len(report.failed)} failed, {report.seconds:.1f} s\n")
    for task_id, message in report.failed:
        out.write(f"  task {task_id}: {message}\n")
    return 1 if report.failed else 0


def add_project_arguments(parser) -> None:
    """``--project ID`` and Label Studio's address and token (``--url`` / ``--token``, default
    LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY), as the commands that read a project take them."""
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument("--url", dest="label_studio_url", default=None,
                        help="Label Studio's address (the option label_studio_url; default: "
                             "LABEL_STUDIO_URL)")
    parser.add_argument("--token", dest="label_studio_api_key", default=None,
                        help="a legacy or personal access token (default: LABEL_STUDIO_API_KEY; "
                             "prefer the variable: a flag shows in the process list)")


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "annotate", help="pre-annotate a Label Studio project: every instance of every label, "
                         "as predictions")
    add_project_arguments(parser)
    parser.add_argument("--tasks", default=None, help="only these task ids (comma-separated)")
    parser.add_argument("--limit", type=int, default=None,
                        help="annotate at most this many tasks (those not done yet)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    # the backend's options (model_name=..., concept_model=grounding_dino, concept_checkpoint=...,
    # concept_threshold=...), as `sam-backend serve` takes them
    add_option_arguments(parser)
    parser.set_defaults(func=run)
