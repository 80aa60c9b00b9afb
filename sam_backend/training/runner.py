"""One training run of a project, start to finish (:func:`run_training`):

1. the labeling config and every task with its annotations, through Label Studio's API
   (:class:`~sam_backend.labelstudio.api.LabelStudioAPI`, the address and token given or the
   settings');
2. the training set (:func:`~.dataset.build_dataset`; fewer than ``train_min_tasks`` usable
   tasks -> :class:`~.dataset.NotEnoughData`, no run);
3. each task's image downloaded once into the run's work directory through the project's image
   loader (a missing or undecodable image, or one whose size differs from its annotation's:
   the task is left out and counted by id in the report, ``dataset.missing_images``);
4. the held-out split by task (:mod:`.split`: ``train_held_out``, at least 2 tasks, seeded by
   ``train_seed``);
5. the trainer (``trainer``), starting from the served version's model when it is of the same
   kind and (rf_detr, a closed-set class head) the same classes, else ``train_start``, else the trainer's default (the pretrained model;
   random weights of a reduced configuration with ``train_random_init``);
6. the candidate and the **baseline** evaluated on the same held-out tasks (COCO mAP,
   :mod:`.evaluate`): the baseline is the served version, else the zero-shot concept engine
   (``concept_model``, asked for each label's phrase), else none (0);
7. the decision: promoted when the candidate's held-out mAP (IoU .50:.95; the trainer's
   ``metric``: segm for rf_detr, bbox for grounding_dino) is not below the baseline's, or
   always with ``promote=always``;
8. the version published with its report (:mod:`.versions`, :mod:`.report`), then promoted.

The run holds the project's run lock throughout (one run per project at a time, across the
processes of this machine and of machines sharing ``trained_dir``) and writes its status
(``status.json``: state, stage, epoch k/n, message) as it goes; one log line per epoch. A failed
or stopped run writes nothing but its status: the served version stays.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from sam_backend import assembly
from sam_backend.errors import SamBackendError
from sam_backend.labelstudio.api import LabelStudioAPI
from sam_backend.labelstudio.label_config import parse_label_config
from sam_backend.training.base import (EpochLog, ImageSample, TrainOptions, TrainingStopped,
                                       read_model_file, trainer_for)
from sam_backend.training.dataset import NotEnoughData, Sample, TrainingSet, build_dataset
from sam_backend.training.evaluate import Prediction, evaluate
from sam_backend.training.split import MIN_HELD_OUT, split
from sam_backend.training.versions import (REPORT_PNG, CorruptVersion, Version, VersionStore,
                                           now_iso)

log = logging.getLogger(__name__)

#: detections scoring above this count in the held-out mAP (COCO ranks them: a low threshold
#: measures the whole precision-recall curve); the same for candidate and baseline
EVAL_THRESHOLD = 0.05
#: held-out images drawn in report.png
EXAMPLES = 4
#: predictions drawn on an example image score at least this
DRAW_THRESHOLD = 0.3

Progress = Callable[[str, int, int], None]


class RunInProgress(SamBackendError):
    """Another run of the project holds its run lock."""


class RunFailed(SamBackendError):
    """A run that could not finish; the message says why (the served version stays)."""


def promotion_figure(figures: Optional[dict], metric: str) -> Optional[float]:
    """The figure a promotion compares: ``figures[metric]["mAP"]`` (None when unmeasured)."""
    if not figures or not figures.get(metric):
        return None
    return figures[metric].get("mAP")


def decide(candidate: Optional[float], baseline: Optional[float], force: bool
           ) -> Tuple[bool, str]:
    """(promoted, why): not worse than the baseline, or forced."""
    cand = candidate or 0.0
    if baseline is None:
        return True, f"no baseline to compare with (candidate {cand:.3f})"
    if force:
        return True, f"promote=always (candidate {cand:.3f}, baseline {baseline:.3f})"
    if cand >= baseline:
        return True, f"candidate {cand:.3f} >= baseline {baseline:.3f}"
    return False, f"candidate {cand:.3f} < baseline {baseline:.3f}: kept, not served"


class _Status:
    """The run's status.json: merged updates, written atomically each time."""

    def __init__(self, versions: VersionStore, project: int, base: Dict[str, Any]):
        self.versions, self.project = versions, project
        self.data = dict(base)

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.data["updated"] = now_iso()
        try:
            self.versions.write_status(self.project, self.data)
        except OSError as exc:  # the run goes on; status is advisory
            log.warning("project %s: status not written: %s", self.project, exc)


def _phrases(label_config: str, classes: Sequence[str]) -> List[str]:
    """Each class's phrase: its ``hint`` in the config, else its value."""
    from sam_backend.concepts.phrases import concepts_of

    phrase_of: Dict[str, str] = {}
    for concept in concepts_of(parse_label_config(label_config)):
        if concept.label not in phrase_of or phrase_of[concept.label] == concept.label:
            phrase_of[concept.label] = concept.phrase
    return [phrase_of.get(c, c) for c in classes]


def _device(settings) -> str:
    name = settings.train_device or settings.device or "auto"
    if name == "auto":
        from sam_backend.models.loading import resolve_device

        return str(resolve_device("auto"))
    return name


def _download(images, samples: Sequence[Sample], directory: Path,
              check: Callable[[], None], progress: Progress
              ) -> Tuple[List[ImageSample], Dict[Any, str]]:
    """Each sample's image as a PNG in ``directory`` (``<task id>.png``), the samples whose image
    could be had, and {task id: why} for the others."""
    import cv2

    directory.mkdir(parents=True, exist_ok=True)
    kept: List[ImageSample] = []
    missing: Dict[Any, str] = {}
    for i, sample in enumerate(samples):
        check()
        try:
            pixels = images.load(sample.image, sample.task_id)
            height, width = pixels.shape[:2]
            if sample.width is not None and (width, height) != (sample.width, sample.height):
                raise ValueError(f"the image is {width}x{height}, its annotation was made on "
                                 f"{sample.width}x{sample.height}")
            path = directory / f"{i:06d}.png"
            if not cv2.imwrite(str(path), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)):
                raise OSError(f"cannot write {path}")
            if sample.width is None:  # a negative image: its size is the image's
                sample.width, sample.height = width, height
        except TrainingStopped:
            raise
        except Exception as exc:  # noqa: BLE001 - counted by task id, the run goes on
            missing[sample.task_id] = str(exc) if isinstance(exc, SamBackendError) else \
                f"{type(exc).__name__}: {exc}"
            log.warning("task %s: image left out: %s", sample.task_id, missing[sample.task_id])
        else:
            kept.append(ImageSample(sample, path))
        progress("images", i + 1, len(samples))
    return kept, missing


def _remap(prediction: Prediction, mapping: Dict[int, int]) -> Prediction:
    """``prediction`` with its labels mapped into another class list (labels without a
    counterpart dropped)."""
    labels = np.asarray(prediction.labels).reshape(-1)
    keep = np.array([int(l) in mapping for l in labels], bool)
    masks = None if prediction.masks is None else np.asarray(prediction.masks)[keep]
    return Prediction(np.asarray(prediction.boxes).reshape(-1, 4)[keep],
                      np.asarray(prediction.scores).reshape(-1)[keep],
                      np.array([mapping[int(l)] for l in labels[keep]], np.int64), masks)


def _predict_all(predict: Callable[[ImageSample], Prediction], held_out: Sequence[ImageSample],
                 check: Callable[[], None], progress: Progress, stage: str
                 ) -> Dict[Any, Prediction]:
    out: Dict[Any, Prediction] = {}
    for i, item in enumerate(held_out):
        check()
        out[item.sample.task_id] = predict(item)
        progress(stage, i + 1, len(held_out))
    return out


def _zero_shot_predictor(settings, images, phrases: Sequence[str], masks: bool
                         ) -> Tuple[Callable[[ImageSample], Prediction], str]:
    """The zero-shot concept engine as a held-out predictor: every class's phrase asked on the
    image as a concept pass asks them (score above :data:`EVAL_THRESHOLD`, duplicates
    suppressed, at most ``max_instances`` per label, as it serves), with the click model's masks when ``masks``
    (a segm comparison; a bbox one decodes none)."""
    from sam_backend.concepts.base import Selection

    segmenter = assembly.segmenter_for(settings)
    engine = assembly.create_concept_engine(settings, segmenter)
    selection = Selection(settings.concept_nms_iou, settings.max_instances)

    def predict(item: ImageSample) -> Prediction:
        try:
            key = images.source_key(item.sample.image, item.sample.task_id)
        except SamBackendError:
            key = f"training:{item.path}"
        state, (height, width) = engine.image_state(key, item.load)
        boxes, scores, labels, found_masks = [], [], [], []
        # asked as the engine serves a pass (Grounding DINO: every phrase in one caption)
        found = dict(engine.find_all(state, list(dict.fromkeys(phrases)), EVAL_THRESHOLD))
        for index, phrase in enumerate(phrases):
            instances = found[phrase]
            instances = instances.take(selection.keep(instances.boxes, instances.scores))
            if masks:
                instances = engine.with_masks(state, instances)
                found_masks.append(np.asarray(instances.masks, bool).reshape(-1, height, width))
            boxes.append(np.asarray(instances.boxes, np.float32).reshape(-1, 4))
            scores.append(np.asarray(instances.scores, np.float32).reshape(-1))
            labels.append(np.full(len(instances), index, np.int64))
        return Prediction(np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels),
                          np.concatenate(found_masks) if masks else None)

    return predict, f"zero-shot {settings.concept_model}"


def _baseline(settings, versions: VersionStore, served: Optional[Version], images,
              classes: Sequence[str], phrases: Sequence[str], device: str, metric: str
              ) -> Tuple[Optional[Callable[[ImageSample], Prediction]], str, Optional[str]]:
    """(predictor or None, its source's name, why it is missing)."""
    if served is not None:
        try:
            detector = versions.load_detector(served, device)
        except CorruptVersion as exc:
            return None, served.name, str(exc)
        mapping = {i: classes.index(c) for i, c in enumerate(detector.classes) if c in classes}
        same = list(detector.classes) == list(classes)

        def predict(item: ImageSample) -> Prediction:
            found = detector.predict(item.load(), EVAL_THRESHOLD)
            return found if same else _remap(found, mapping)

        return predict, served.name, None
    if settings.concept_model != "none":
        try:
            predict, source = _zero_shot_predictor(settings, images, phrases,
                                                   masks=metric == "segm")
        except Exception as exc:  # noqa: BLE001 - the run goes on, compared with nothing
            log.warning("the zero-shot baseline cannot be built: %s", exc)
            return None, f"zero-shot {settings.concept_model}", f"{type(exc).__name__}: {exc}"
        return predict, source, None
    return None, "none", None


def _examples(held_out: Sequence[ImageSample], predictions: Dict[Any, Prediction]):
    from sam_backend.training.report import Example

    examples = []
    for item in held_out[:EXAMPLES]:
        pred = predictions.get(item.sample.task_id)
        if pred is None:
            continue
        scores = np.asarray(pred.scores).reshape(-1)
        keep = np.flatnonzero(scores >= DRAW_THRESHOLD)[:20]
        masks = None if pred.masks is None else np.asarray(pred.masks)[keep]
        examples.append(Example(
            f"task {item.sample.task_id}", item.load(),
            np.asarray(pred.boxes).reshape(-1, 4)[keep], scores[keep],
            np.asarray(pred.labels).reshape(-1)[keep], masks,
            [(obj.label, obj.mask()) for obj in item.sample.objects]))
    return examples


def _figures_only(result: Dict[str, Any]) -> Dict[str, Any]:
    return {k: result.get(k) for k in ("bbox", "segm", "images", "objects", "predictions")}


def run_training(settings, project: int, label_studio_url: Optional[str] = None,
                 token: Optional[str] = None, progress: Optional[Progress] = None,
                 stop: Optional[Callable[[], bool]] = None, *,
                 versions: Optional[VersionStore] = None, reason: str = "",
                 wait_for_lock: Optional[float] = 0.0) -> Dict[str, Any]:
    """Train, evaluate, publish and (maybe) promote one version of ``project`` (see the module
    docstring); the report (as written to report.json). ``progress(stage, done, total)``:
    stages ``images``, ``epochs``, ``candidate``, ``baseline``. ``stop()`` true ends the run
    with :class:`~.base.TrainingStopped`. ``wait_for_lock``: seconds to wait for another run of
    the project to end (None: as long as it takes; 0: :class:`RunInProgress` at once).

    Raises :class:`~.dataset.NotEnoughData` (too few usable tasks), :class:`RunInProgress`, or
    whatever stopped the run; the status then says ``failed`` and why."""
    from sam_backend.common.files import Timeout, file_lock

    versions = versions or VersionStore.from_settings(settings)
    progress = progress or (lambda stage, done, total: None)
    stop = stop or (lambda: False)
    project = int(project)

    def check() -> None:
        if stop():
            raise TrainingStopped(f"the run of project {project} was asked to stop")

    try:
        lock = file_lock(versions.run_lock_path(project), timeout=wait_for_lock)
        lock.__enter__()
    except Timeout:
        raise RunInProgress(
            f"a training run of project {project} is already running (on this machine, or on "
            f"one that shares {versions.root}); see sam-backend train --project {project} "
            f"--status") from None
    started = time.time()
    status = _Status(versions, project, {
        "project": project, "state": "running", "stage": "starting", "reason": reason,
        "started": now_iso(), "finished": None, "pid": os.getpid(),
        "host": socket.gethostname(), "progress": {"epoch": 0, "epochs": settings.train_epochs},
        "message": "starting", "version": None})
    status.update()
    work: Optional[Path] = None
    try:
        versions.clean_work_dirs(project)
        work = versions.work_dir(project)
        report = _run(settings, project, label_studio_url, token, progress, check, versions,
                      status, work, started)
        work = None  # published: renamed to v<N>
        return report
    except BaseException as exc:
        message = str(exc) if isinstance(exc, (SamBackendError, NotEnoughData, TrainingStopped,
                                               ValueError, FloatingPointError)) \
            else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, KeyboardInterrupt):
            message = "interrupted"
        served = versions.current(project)
        status.update(state="failed", stage="failed", finished=now_iso(),
                      message=f"{message} (still served: "
                              f"{served.name if served else 'no trained version'})",
                      error=type(exc).__name__)
        log.error("project %s: training run failed: %s", project, message)
        raise
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        lock.__exit__(None, None, None)


def _run(settings, project: int, label_studio_url, token, progress: Progress, check,
         versions: VersionStore, status: _Status, work: Path, started: float) -> Dict[str, Any]:
    images = assembly.image_loader(settings, label_studio_url=label_studio_url, api_key=token)
    api = LabelStudioAPI(images)
    try:
        status.update(stage="reading the project", message="reading the project's annotations")
        label_config = api.label_config(project)
        tasks = api.tasks(project, annotations=True)
    finally:
        api.close()
    dataset: TrainingSet = build_dataset(tasks, label_config, min_tasks=settings.train_min_tasks)
    classes = list(dataset.classes)
    phrases = _phrases(label_config, classes)
    check()

    status.update(stage="images", message=f"downloading {len(dataset.samples)} images")
    usable, missing = _download(images, dataset.samples, work / "images", check, progress)
    if len(usable) < max(settings.train_min_tasks, MIN_HELD_OUT + 1):
        raise NotEnoughData(
            f"{len(usable)} annotated tasks have an image that can be loaded, "
            f"{settings.train_min_tasks} are needed; {len(missing)} images could not be "
            f"loaded (tasks {', '.join(map(str, list(missing)[:10]))}: "
            f"{next(iter(missing.values()), '')})")
    train, held_out = split(usable, seed=settings.train_seed, fraction=settings.train_held_out,
                            task_id=lambda item: item.sample.task_id)
    served = versions.current(project)
    device = _device(settings)
    start, parent = None, None
    if served is not None and served.kind == settings.trainer:
        try:
            # a closed-set model continues only with the same classes (its class head); the
            # open-vocabulary one reads labels as text, so a new label changes nothing
            if settings.trainer == "grounding_dino" or \
                    list(read_model_file(served.model_dir).get("classes") or []) == classes:
                versions.verify(served)
                start, parent = served.model_dir, served.name
        except (ValueError, OSError) as exc:
            log.warning("project %s: not starting from %s: %s", project, served.name, exc)
    if start is None and settings.train_start:
        start = Path(settings.train_start).expanduser()
    options = TrainOptions(epochs=settings.train_epochs, batch_size=settings.train_batch_size,
                           learning_rate=settings.train_learning_rate,
                           image_size=settings.train_image_size, seed=settings.train_seed,
                           device=device, reduced=settings.train_random_init, start=start)
    trainer = trainer_for(settings.trainer, options)
    log.info("project %s: training %s on %d tasks (%d held out), classes %s, from %s, on %s",
             project, trainer.kind, len(train), len(held_out), ", ".join(classes),
             start or ("random weights (reduced)" if options.reduced else "the pretrained model"),
             device)

    epochs: List[EpochLog] = []

    def on_epoch(entry: EpochLog) -> None:
        epochs.append(entry)
        log.info("project %s: epoch %d/%d loss %.4f (%.1f s, %.2f images/s)", project,
                 entry.epoch, entry.epochs, entry.loss, entry.seconds, entry.images_per_second)
        status.update(stage="training", progress={"epoch": entry.epoch, "epochs": entry.epochs},
                      message=f"epoch {entry.epoch}/{entry.epochs}, loss {entry.loss:.4f}")
        progress("epochs", entry.epoch, entry.epochs)

    status.update(stage="training", message=f"training on {len(train)} tasks",
                  progress={"epoch": 0, "epochs": options.epochs})
    model_dir = work / "model"
    model_dir.mkdir()
    trainer.train(train, classes, phrases, model_dir, on_epoch=on_epoch,
                  stop=lambda: _stopped(check))
    check()

    status.update(stage="evaluating", message=f"evaluating on {len(held_out)} held-out tasks")
    candidate = trainer.load(model_dir, device)
    predictions = _predict_all(lambda item: candidate.predict(item.load(), EVAL_THRESHOLD),
                               held_out, check, progress, "candidate")
    held_samples = [item.sample for item in held_out]
    candidate_result = evaluate(held_samples, predictions, classes)
    metric = trainer.metric
    baseline_predict, source, baseline_error = _baseline(settings, versions, served, images,
                                                         classes, phrases, device, metric)
    if baseline_predict is not None:
        baseline_result = _figures_only(evaluate(
            held_samples, _predict_all(baseline_predict, held_out, check, progress, "baseline"),
            classes))
    else:
        baseline_result = {}
    baseline_figure = promotion_figure(baseline_result, metric) if baseline_predict else None
    if baseline_predict is None and source == "none":
        baseline_figure = 0.0
    elif baseline_predict is not None and baseline_figure is None:
        baseline_figure = 0.0
    candidate_figure = promotion_figure(candidate_result, metric) or 0.0
    promoted, why = decide(candidate_figure, baseline_figure, settings.promote == "always")
    if baseline_error:
        why += f" (baseline {source} unavailable: {baseline_error})"

    report: Dict[str, Any] = {
        "project": project, "version": None, "kind": trainer.kind, "parent": parent,
        "promoted": promoted, "promotion_reason": why, "metric": metric,
        "promotion_figure": "mAP", "candidate": _figures_only(candidate_result),
        "baseline": {"source": source, "error": baseline_error, **baseline_result},
        "dataset": {
            "classes": classes, "phrases": phrases, "train_tasks": len(train),
            "held_out_tasks": len(held_out),
            "held_out_ids": [item.sample.task_id for item in held_out],
            "objects_per_label": dict(dataset.report.objects_per_label),
            "missing_images": {str(k): v for k, v in missing.items()},
            "build": dataset.report.as_dict()},
        "options": options.as_dict(), "epochs": [e.as_dict() for e in epochs],
        "served_before": served.name if served else None,
        "seconds": round(time.time() - started, 2), "checksums": {},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished": now_iso(), "host": socket.gethostname(),
        "label_studio_url": images.label_studio_url,
    }
    examples = _examples(held_out, predictions)
    shutil.rmtree(work / "images", ignore_errors=True)  # downloaded for this run only

    def draw(directory: Path, final: Dict[str, Any]) -> None:
        from sam_backend.training.report import draw_report_png

        try:
            draw_report_png(directory / REPORT_PNG, final, examples, classes)
        except Exception as exc:  # noqa: BLE001 - a chart never costs a version
            log.warning("project %s: report.png not drawn: %s", project, exc)

    check()
    version = versions.publish(project, work, trainer.kind, report, before_manifest=draw)
    if promoted:
        versions.promote(project, version, why)
    state = "succeeded" if promoted else "not_promoted"
    status.update(state=state, stage="done", finished=now_iso(), version=version.name,
                  served=(version.name if promoted else (served.name if served else None)),
                  message=f"{version.name}: {why}",
                  progress={"epoch": len(epochs), "epochs": options.epochs})
    log.info("project %s: %s %s (%s)", project, version.name,
             "promoted" if promoted else "not promoted", why)
    return report


def _stopped(check: Callable[[], None]) -> bool:
    try:
        check()
    except TrainingStopped:
        return True
    return False


__all__ = ["EVAL_THRESHOLD", "RunFailed", "RunInProgress", "decide", "promotion_figure",
           "run_training"]
