"""A project's tasks -> the training set: one sample per annotated task, one object per
instance, classes from the labeling config (pure functions, no I/O; images are not fetched).

**Which annotation.** Only ``annotations`` (``completions`` of very old exports) are read;
``predictions`` and drafts never are. Of a task's annotations the **latest** one is used
(:func:`latest_annotation`): the one with the latest ``updated_at``, else ``created_at`` (ISO 8601
as Label Studio writes them; no zone = UTC), ties and annotations with neither broken by the
larger ``id`` (an annotation with a time is later than one without). A task whose latest
annotation was skipped or cancelled (``was_cancelled``) is left out, even when an older
annotation was submitted: the annotator's last word is that the task is not to be learnt from.

**Objects.** The latest annotation's regions are read as the exporters read them
(:mod:`sam_backend.export.geometry`: brush RLE, polygons, rectangles; keypoint prompts and
non-spatial results ignored) and grouped into objects by
:func:`sam_backend.export.objects.group_objects`: a brush mask, the polygons traced from it, its
tight box and the smart rectangle that prompted it are one object, exactly as in a COCO export.
Each object has its label's index in :attr:`TrainingSet.classes`, a mask (compressed COCO RLE of
the image size, :meth:`TrainObject.mask` decodes it: the brush mask; else its polygons filled;
else its box filled, ``kind`` says which) and its box ``[x0, y0, x1, y1]`` in pixels (the mask's
bounds; the polygons' or the rectangle's bounds).

**Classes** are the labels of the config's brush, polygon and rectangle controls
(:func:`classes_from_config`), in the order they first appear in the config, so a label keeps its
index as tasks are added. An object whose label is not among them is skipped and counted
(:attr:`DatasetReport.unknown_labels`).

**Problems never stop the build; they are counted by task id** (:class:`DatasetReport`): a region
that cannot be read (corrupt or empty brush RLE, degenerate polygon, missing image size, a size
that differs from the task's other regions) is skipped; a task without an id (``#position`` in the
report), a task whose image URL cannot be told, or
whose regions were all skipped, is left out (an object missing from a sample would teach the model
that it is background). A task annotated with no region at all is a sample without objects (a
negative image; ``width``/``height`` are then None: no region gives them).

**Too little data.** :func:`build_dataset` raises :class:`NotEnoughData` when fewer than
``min_tasks`` tasks (default :data:`MIN_TASKS`) are usable, or no object is: the message says how
many there are, how many are needed, and what was left out.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from sam_backend.export.geometry import (IGNORED_TYPES, SUPPORTED_TYPES, RegionError,
                                         convert_region, region_labels, task_image_size)
from sam_backend.export.objects import ExportObject, Shape, group_objects
from sam_backend.export.source import task_image_url
from sam_backend.labelstudio.label_config import OUTPUT_TYPES, parse_label_config

logger = logging.getLogger(__name__)

#: the fewest usable annotated tasks a run trains on (the held-out split takes at least 2)
MIN_TASKS = 10


class NotEnoughData(Exception):
    """Too few annotated tasks (or no object) to train on; the message says how many."""


@dataclass
class TrainObject:
    """One object (instance) of a sample. ``label``: its index in the classes. ``rle``: its mask
    as compressed COCO RLE (``size`` = [height, width], ``counts`` a str). ``box``: ``(x0, y0,
    x1, y1)`` pixels. ``kind``: what the mask was made from, ``"mask"`` (a brush mask),
    ``"polygon"`` (its polygons filled) or ``"box"`` (a rectangle filled: a box-only object).
    ``area``: the object's area in pixels, as its COCO export gives it."""

    label: int
    rle: dict
    box: Tuple[float, float, float, float]
    kind: str
    area: float

    def mask(self) -> np.ndarray:
        """The mask, (H, W) bool."""
        from pycocotools import mask as mask_utils

        return mask_utils.decode(self.rle).astype(bool)


@dataclass
class Sample:
    """One annotated task: its id, the image URL (as the exporters resolve it), the image size
    (None for a task without regions) and its objects, from annotation ``annotation_id``."""

    task_id: Any
    image: str
    width: Optional[int]
    height: Optional[int]
    objects: List[TrainObject]
    annotation_id: Any = None


@dataclass
class DatasetReport:
    """What the build used and left out, by task id."""

    tasks: int = 0  # tasks given
    used: List[Any] = field(default_factory=list)  # task ids in the training set
    unlabelled: List[Any] = field(default_factory=list)  # no annotation
    cancelled: List[Any] = field(default_factory=list)  # latest annotation skipped / cancelled
    skipped_tasks: Dict[Any, str] = field(default_factory=dict)  # task id -> why left out
    skipped_regions: Dict[Any, List[str]] = field(default_factory=dict)  # task id -> problems
    unknown_labels: Dict[str, List[Any]] = field(default_factory=dict)  # label -> task ids
    objects_per_label: Dict[str, int] = field(default_factory=dict)

    @property
    def objects(self) -> int:
        return sum(self.objects_per_label.values())

    def as_dict(self) -> dict:
        """The report as JSON-ready data (task ids as given)."""
        return {"tasks": self.tasks, "used": list(self.used), "unlabelled": list(self.unlabelled),
                "cancelled": list(self.cancelled),
                "skipped_tasks": [{"task": t, "reason": r} for t, r in self.skipped_tasks.items()],
                "skipped_regions": [{"task": t, "problems": list(p)}
                                    for t, p in self.skipped_regions.items()],
                "unknown_labels": {k: list(v) for k, v in self.unknown_labels.items()},
                "objects_per_label": dict(self.objects_per_label), "objects": self.objects}

    def left_out(self) -> str:
        """One line: what was left out, for messages."""
        parts = []
        for what, ids in (("without annotation", self.unlabelled),
                          ("skipped or cancelled", self.cancelled),
                          ("unreadable", list(self.skipped_tasks))):
            if ids:
                parts.append(f"{len(ids)} {what} (tasks {_ids(ids)})")
        return "; ".join(parts) or "nothing left out"


@dataclass
class TrainingSet:
    """The classes (label values, index = the objects' ``label``), the samples in task order and
    the report."""

    classes: List[str]
    samples: List[Sample]
    report: DatasetReport


def classes_from_config(label_config: str) -> List[str]:
    """The labels of the config's brush, polygon and rectangle controls, unique, in the order
    they first appear. Raises ValueError when there is none."""
    config = parse_label_config(label_config)
    labels: Dict[str, None] = {}
    for control in config.controls:
        if control.type in OUTPUT_TYPES:
            for label in control.labels:
                labels.setdefault(label)
    if not labels:
        raise ValueError("the labeling config has no BrushLabels, PolygonLabels or "
                         "RectangleLabels label: there is nothing to train")
    return list(labels)


def _time(value: Any) -> Optional[datetime]:
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _id_key(value: Any) -> Tuple[int, float, str]:
    if isinstance(value, bool) or value is None:
        return (0, 0.0, "")
    if isinstance(value, (int, float)) and math.isfinite(value):
        return (1, float(value), "")
    return (1, 0.0, str(value))


def _annotation_key(annotation: dict):
    when = _time(annotation.get("updated_at")) or _time(annotation.get("created_at"))
    return (when is not None, when or datetime.min.replace(tzinfo=timezone.utc),
            _id_key(annotation.get("id")))


def latest_annotation(task: dict) -> Optional[dict]:
    """The task's latest annotation, cancelled or not (see the module docstring); None when it
    has none. Predictions and drafts are never annotations."""
    anns = task.get("annotations")
    if anns is None:
        anns = task.get("completions")
    if not isinstance(anns, list):
        return None
    anns = [a for a in anns if isinstance(a, dict)]
    if not anns:
        return None
    # max() keeps the first of equal keys: the order of the export breaks a complete tie
    return max(anns, key=_annotation_key)


def _ids(ids: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in list(ids)[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _object_rle(obj: ExportObject, width: int, height: int) -> Tuple[dict, float]:
    """The object's mask as compressed RLE (its brush mask; else its COCO polygons filled, a box
    being its 4 corners) and its pixel count."""
    from pycocotools import mask as mask_utils

    seg = obj.fields["segmentation"]
    if isinstance(seg, dict):
        rle = {"size": list(seg["size"]), "counts": seg["counts"]}
    else:
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        rle = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    as_bytes = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return rle, float(mask_utils.area(as_bytes))


def _task_sample(task: dict, annotation: dict, index: Dict[str, int],
                 report: DatasetReport) -> Optional[Sample]:
    task_id = task.get("id")
    results = [r for r in (annotation.get("result") or []) if isinstance(r, dict)]

    def region_problem(message: str, region: dict) -> None:
        text = f"region {region.get('id')}: {message}"
        report.skipped_regions.setdefault(task_id, []).append(text)
        logger.warning("task %s: %s; region skipped", task_id, text)

    try:
        url = task_image_url(task, results)
    except RegionError as exc:
        report.skipped_tasks[task_id] = str(exc)
        logger.warning("task %s: %s; task left out", task_id, exc)
        return None

    size: Optional[Tuple[int, int]] = None
    shapes: List[Shape] = []
    regions = 0
    for region in results:  # as sam_backend.export.convert reads them
        rtype = region.get("type")
        if rtype in IGNORED_TYPES:
            continue
        regions += 1
        if rtype not in SUPPORTED_TYPES:
            region_problem(f"unsupported region type {rtype!r}", region)
            continue
        try:
            labels = region_labels(region, rtype)
            size = task_image_size(region, size)
            kind, fields = convert_region(region, *size)
        except RegionError as exc:
            region_problem(str(exc), region)
            continue
        for label in labels:
            if label not in index:
                report.unknown_labels.setdefault(label, []).append(task_id)
                continue
            shapes.append(Shape(kind, label, fields, region.get("id")))

    objects: List[TrainObject] = []
    if shapes:
        width, height = size
        for obj in group_objects(shapes, width, height):
            rle, pixels = _object_rle(obj, width, height)
            if pixels == 0:
                region_problem(f"the {obj.label!r} object covers no pixel",
                               {"id": obj.shapes[0].ref})
                continue
            x, y, w, h = obj.fields["bbox"]
            objects.append(TrainObject(index[obj.label], rle, (x, y, x + w, y + h), obj.kind,
                                       float(obj.fields["area"])))
    if regions and not objects:
        why = "none of its regions could be used"
        if task_id in report.skipped_regions:
            why += f" ({'; '.join(report.skipped_regions[task_id])})"
        elif any(task_id in ids for ids in report.unknown_labels.values()):
            why += " (their labels are not in the labeling config)"
        report.skipped_tasks[task_id] = why
        logger.warning("task %s: %s; task left out", task_id, why)
        return None
    width, height = size if size is not None else (None, None)
    return Sample(task_id, url, width, height, objects, annotation.get("id"))


def build_dataset(tasks: Sequence[dict], label_config: str, *,
                  min_tasks: int = MIN_TASKS) -> TrainingSet:
    """The training set of a project's ``tasks`` (Label Studio's JSON export, or its API's task
    list) under its ``label_config`` (the XML); see the module docstring. Raises
    :class:`NotEnoughData` when fewer than ``min_tasks`` tasks are usable or no object is, and
    ValueError when the config has no labels or ``tasks`` is not a list."""
    if not isinstance(tasks, (list, tuple)):
        raise ValueError("tasks must be a list of Label Studio tasks (the 'JSON' export format)")
    classes = classes_from_config(label_config)
    index = {label: i for i, label in enumerate(classes)}
    report = DatasetReport(tasks=len(tasks))
    samples: List[Sample] = []
    for position, task in enumerate(tasks):
        if not isinstance(task, dict):
            report.skipped_tasks[f"#{position}"] = f"not a task object ({type(task).__name__})"
            continue
        if task.get("id") is None:
            report.skipped_tasks[f"#{position}"] = ("has no id (samples are split and reported "
                                                    "by task id)")
            continue
        annotation = latest_annotation(task)
        if annotation is None:
            report.unlabelled.append(task.get("id"))
            continue
        if annotation.get("was_cancelled"):
            report.cancelled.append(task.get("id"))
            continue
        sample = _task_sample(task, annotation, index, report)
        if sample is not None:
            samples.append(sample)
            report.used.append(sample.task_id)
    for sample in samples:
        for obj in sample.objects:
            label = classes[obj.label]
            report.objects_per_label[label] = report.objects_per_label.get(label, 0) + 1
    for label, ids in report.unknown_labels.items():
        logger.warning("label %r is not in the labeling config: %d objects' regions skipped "
                       "(tasks %s)", label, len(ids), _ids(list(dict.fromkeys(ids))))
    if len(samples) < min_tasks:
        raise NotEnoughData(
            f"{len(samples)} annotated task{'s' if len(samples) != 1 else ''} can be trained on, "
            f"{min_tasks} are needed (of {len(tasks)} tasks: {report.left_out()}); annotate "
            f"{min_tasks - len(samples)} more")
    if not report.objects:
        raise NotEnoughData(f"the {len(samples)} annotated tasks have no object of the labeling "
                            f"config's labels ({', '.join(classes)}): nothing to learn")
    return TrainingSet(classes, samples, report)


__all__ = ["MIN_TASKS", "DatasetReport", "NotEnoughData", "Sample", "TrainObject", "TrainingSet",
           "build_dataset", "classes_from_config", "latest_annotation"]
