"""``sam-backend train --project ID``: one training run of a Label Studio project, here, in the
foreground (a progress bar, then the report's summary; exit 0 when a version was made, promoted
or not, 1 when the run failed: too few annotations, no images, ...). See
:mod:`sam_backend.training.runner` for what a run does.

Label Studio's address and token are taken as ``sam-backend annotate`` takes them
(``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``; ``--url`` / ``--token`` first), the training
options as ``sam-backend serve`` takes them (``--with trainer=rf_detr train_epochs=30 ...``).

- ``--force``: promote the new version whatever its held-out mAP (``promote=always``);
- ``--rollback [--to N]``: serve version N, or the one served before the current one;
- ``--status``: the project's run status and versions, as ``GET /train/status`` answers.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Dict

from sam_backend.commands.annotate import add_project_arguments
from sam_backend.errors import SamBackendError
from sam_backend.settings import add_option_arguments, settings_from_args

log = logging.getLogger(__name__)


def _figure(side: dict, metric: str, name: str) -> str:
    value = ((side or {}).get(metric) or {}).get(name)
    return "n/a" if value is None else f"{value:.3f}"


def summary(report: dict) -> str:
    """The lines ``train`` prints for a finished run."""
    metric = report.get("metric") or "segm"
    dataset = report.get("dataset") or {}
    epochs = report.get("epochs") or []
    lines = [
        f"project {report.get('project')}: {report.get('version')} ({report.get('kind')}) "
        f"{'PROMOTED' if report.get('promoted') else 'not promoted'}: "
        f"{report.get('promotion_reason')}",
        f"  data: {dataset.get('train_tasks')} training tasks, {dataset.get('held_out_tasks')} "
        f"held out; objects per label {json.dumps(dataset.get('objects_per_label'))}",
        f"  held-out {metric} mAP / mAP50: candidate {_figure(report.get('candidate'), metric, 'mAP')}"
        f" / {_figure(report.get('candidate'), metric, 'mAP50')}, baseline "
        f"({(report.get('baseline') or {}).get('source')}) "
        f"{_figure(report.get('baseline'), metric, 'mAP')} / "
        f"{_figure(report.get('baseline'), metric, 'mAP50')}",
        f"  {len(epochs)} epochs, last loss "
        f"{epochs[-1]['loss']:.4f}" if epochs else "  no epoch",
        f"  {report.get('seconds')} s",
    ]
    missing = dataset.get("missing_images") or {}
    if missing:
        lines.append(f"  {len(missing)} task(s) left out, their image could not be loaded: "
                     + ", ".join(f"{k} ({v})" for k, v in list(missing.items())[:10]))
    return "\n".join(lines)


def run(args) -> int:
    from sam_backend.training.versions import CorruptVersion, VersionStore

    settings = settings_from_args(args)
    if args.force:
        settings = dataclasses.replace(settings, promote="always")
    versions = VersionStore.from_settings(settings)
    out = sys.stdout
    if args.rollback:
        before = versions.current(args.project)
        try:
            target = versions.rollback(args.project, args.to)
        except CorruptVersion as exc:
            log.error("%s", exc)
            return 1
        out.write(f"project {args.project} now serves {target.name} (was "
                  f"{before.name if before else 'no trained version'})\n")
        return 0
    if args.to is not None:
        raise SamBackendError("--to goes with --rollback")
    if args.status:
        from sam_backend.training.jobs import TrainingJobs

        try:  # a team's status includes the queue (Redis); the files say the rest
            jobs = TrainingJobs(settings, versions)
            status = jobs.status(args.project)
        except Exception as exc:  # noqa: BLE001 - Redis unreachable: the files alone
            log.warning("the training queue cannot be read (%s): status from %s only", exc,
                        versions.root)
            jobs = TrainingJobs(dataclasses.replace(settings, embedding_store=None), versions)
            status = jobs.status(args.project)
        jobs.close()
        status.pop("last_report", None)
        out.write(json.dumps(status, indent=2, default=str) + "\n")
        return 0
    return train(settings, versions, args.project, progress=not args.no_progress)


def train(settings, versions, project: int, progress: bool = True) -> int:
    from tqdm import tqdm

    from sam_backend.training.dataset import NotEnoughData
    from sam_backend.training.runner import run_training

    bars: Dict[str, tqdm] = {}
    titles = {"images": "images", "epochs": "training", "candidate": "evaluating",
              "baseline": "baseline"}

    def on_progress(stage: str, done: int, total: int) -> None:
        if not progress:
            return
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()
            unit = "epoch" if stage == "epochs" else "image"
            bar = bars[stage] = tqdm(total=total, desc=titles.get(stage, stage), unit=unit,
                                     file=sys.stderr)
        bar.n = done
        bar.refresh()

    try:
        report = run_training(settings, project, settings.label_studio_url,
                              settings.label_studio_api_key, progress=on_progress,
                              versions=versions, reason="sam-backend train")
    except (NotEnoughData, SamBackendError, ValueError) as exc:
        log.error("project %s: no version made: %s", project, exc)
        return 1
    finally:
        for bar in bars.values():
            bar.close()
    sys.stdout.write(summary(report) + "\n")
    number = int(str(report["version"]).rsplit("-v", 1)[1])
    sys.stdout.write(f"  report: {versions.project_dir(project) / f'v{number}'}/report.json "
                     f"and report.png\n")
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model on a Label Studio project's annotations, evaluate it on "
                      "held-out tasks and serve it if it is not worse (or roll back)")
    add_project_arguments(parser)
    parser.add_argument("--force", action="store_true",
                        help="promote the new version whatever its held-out mAP")
    parser.add_argument("--rollback", action="store_true",
                        help="serve the version served before the current one (or --to N)")
    parser.add_argument("--to", type=int, default=None, help="with --rollback: version number")
    parser.add_argument("--status", action="store_true",
                        help="print the project's training status and versions (JSON)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_option_arguments(parser)
    parser.set_defaults(func=run)
