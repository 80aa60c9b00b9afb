"""Label Studio tasks -> one COCO dict and an :class:`~.report.ExportReport`: the first step of
every export (``export-coco`` writes the dict, ``export-yolo`` turns it into label files).

One object, one annotation: the regions of each annotation that describe the same object (a
brush mask, the polygons traced from it, its tight box, the smart rectangle that prompted it) are
grouped by :func:`sam_backend.export.objects.group_objects` and become one COCO annotation: the
mask when there is one, else the polygons (one COCO polygon per part), else the box
(:mod:`.geometry`). ``keep_all_regions`` exports every region on its own.

A task labelled by two annotators gets both sets of regions (the report counts such tasks). A
task without any submitted annotation is not labelled and is left out; a task whose annotations
have no region is exported as an image without objects (a negative example). Regions of one task
that disagree on the image size are reported and skipped, and when the image is fetched its
header size must agree too.

Categories: ids 1..N for the labels of the export sorted by name (``sorted()``, so ids do not
depend on the order of the tasks and are stable between exports with the same label set), or
``classes`` exactly, in that order; labels not in ``classes`` are reported and their regions
skipped.

Problems never stop the export: a task whose image cannot be fetched is skipped with its
annotations; a region that cannot be read (bad RLE, missing size, unknown type, degenerate
polygon) is skipped. Each is logged as a warning naming the task id and collected in the report.
"""
from __future__ import annotations

import ast
import contextlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from sam_backend.common.files import atomic_write
from sam_backend.common.text import redact_url
from sam_backend.errors import ImageError
from sam_backend.export.geometry import (IGNORED_TYPES, SUPPORTED_TYPES, RegionError,
                                         convert_region, region_labels, task_image_size)
from sam_backend.export.objects import Shape, group_objects, one_object_per_shape, summarize
from sam_backend.export.report import ExportError, ExportReport, TaskProblems, id_list, plural
from sam_backend.export.source import (ImageFetcher, TaskSource, check_upload_dir, header_size,
                                       make_image_fetcher, open_source, task_image_url,
                                       unique_name, used_annotations)

logger = logging.getLogger(__name__)

IMAGES_SUBDIR = "images"

# (file name under images/, bytes) -> None; stores an exported image
ImageSink = Callable[[str, bytes], None]


@dataclass
class _PendingAnnotation:
    label: str
    kind: str
    fields: dict


def convert(tasks: Sequence[dict], classes: Optional[Sequence[str]] = None,
            image_fetcher: Optional[ImageFetcher] = None, *,
            on_image: Optional[ImageSink] = None,
            progress: bool = False,
            keep_all_regions: bool = False) -> Tuple[dict, ExportReport]:
    """Convert Label Studio export tasks into a COCO dict (see the module docstring).

    ``tasks``: the parsed JSON export (a list of task dicts). ``classes``: fixes the categories and
    their order (ids 1..N); None: the export's labels, sorted. ``image_fetcher(url, task_id) ->
    bytes``: fetches each task's image (an ``ImageError`` skips the task, reported); None: images
    are not fetched, sizes come from the regions only, and tasks whose regions give none are
    reported and skipped. ``on_image(file_name, data)``: called with each exported image (its
    ``file_name`` relative to ``images/``). The regions of each annotation are grouped into
    objects (:mod:`sam_backend.export.objects`), one COCO annotation per object;
    ``keep_all_regions``: one per region instead. Returns ``(coco, report)``.
    """
    if not isinstance(tasks, list):
        raise ExportError("the export must be a list of tasks (Label Studio 'JSON' export format)")
    if tasks and not any(isinstance(t, dict) and ("annotations" in t or "completions" in t)
                         for t in tasks):
        raise ExportError(
            "the export's tasks have no 'annotations': export the project from Label Studio in "
            "the 'JSON' format (not JSON-MIN, CSV or COCO)")
    class_list = _check_classes(classes) if classes is not None else None
    class_set = set(class_list) if class_list is not None else None

    report = ExportReport(tasks=len(tasks), keep_all_regions=keep_all_regions)
    images: List[dict] = []
    pending: List[Tuple[int, _PendingAnnotation]] = []  # (image id, annotation)
    seen_labels: Dict[str, None] = {}
    used_names: set = set()

    with contextlib.ExitStack() as stack:
        iterator: Iterable = enumerate(tasks)
        if progress:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            stack.enter_context(logging_redirect_tqdm())  # warnings do not break the bar
            iterator = stack.enter_context(
                tqdm(iterator, total=len(tasks), desc="export", unit="task"))
        for position, task in iterator:
            _convert_task(task, position, class_set, image_fetcher, on_image, report, images,
                          pending, seen_labels, used_names, keep_all_regions)

    names = class_list if class_list is not None else sorted(seen_labels)
    categories = [{"id": i, "name": name} for i, name in enumerate(names, start=1)]
    cat_id = {c["name"]: c["id"] for c in categories}
    annotations = []
    for image_id, ann in pending:
        annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                            "category_id": cat_id[ann.label], "iscrowd": 0, **ann.fields})
        report.annotations[ann.kind] += 1
        report.annotation_kinds[annotations[-1]["id"]] = ann.kind
    report.images = len(images)
    report.categories = categories
    for label, ids in report.skipped_labels.items():
        logger.warning("label %r is not in --classes: %s skipped (tasks %s)", label,
                       plural(len(ids), "region"), id_list(sorted(set(ids), key=str)))
    if class_list is not None:
        unused = [c for c in class_list if c not in seen_labels]
        if unused:
            logger.info("classes without any region in the export: %s", ", ".join(unused))
    coco = {
        "info": {"description": "Label Studio export converted by sam-backend export-coco"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    return coco, report


def _convert_task(task: Any, position: int, class_set: Optional[set],
                  image_fetcher: Optional[ImageFetcher], on_image: Optional[ImageSink],
                  report: ExportReport, images: List[dict],
                  pending: List[Tuple[int, _PendingAnnotation]], seen_labels: Dict[str, None],
                  used_names: set, keep_all_regions: bool = False) -> None:
    task_id = task.get("id") if isinstance(task, dict) else None

    problems = TaskProblems(report, task_id, position)
    problem, skip_task = problems.problem, problems.skip

    if not isinstance(task, dict):
        skip_task(f"is not a task object ({type(task).__name__})")
        return
    used = used_annotations(task)
    if not used:
        report.unlabelled_tasks.append(task_id if task_id is not None else f"#{position}")
        logger.debug("task %s: no submitted annotation, left out", task_id)
        return
    if len(used) > 1:
        report.multi_annotation_tasks.append(task_id)
    results = [(index, a.get("id"), r) for index, a in enumerate(used)
               for r in (a.get("result") or []) if isinstance(r, dict)]
    try:
        url = task_image_url(task, (r for _, _, r in results))
    except RegionError as exc:
        skip_task(str(exc))
        return

    size: Optional[Tuple[int, int]] = None  # (width, height) from the first sized region
    shapes: Dict[int, List[Shape]] = {}  # annotation index -> its shapes, in order
    for ann_index, ann_id, region in results:
        rtype = region.get("type")
        region_id = region.get("id")
        if rtype in IGNORED_TYPES:
            report.ignored_results[rtype] += 1
            continue
        if rtype not in SUPPORTED_TYPES:
            problem(f"unsupported region type {rtype!r}; region skipped", ann_id, region_id)
            continue
        try:
            labels = region_labels(region, rtype)
            for label in labels:
                seen_labels.setdefault(label)
            size = task_image_size(region, size)
            kind, fields = convert_region(region, *size)
        except RegionError as exc:
            problem(f"{exc}; region skipped", ann_id, region_id)
            continue
        for label in labels:
            if class_set is not None and label not in class_set:
                report.skipped_labels.setdefault(label, []).append(task_id)
                continue
            shapes.setdefault(ann_index, []).append(Shape(kind, label, fields, region_id))

    # one object, one annotation: the regions of each annotation grouped by object
    objects: List[_PendingAnnotation] = []
    counts = [0, 0, 0, 0]  # regions, objects, merged regions, merged objects
    for group in shapes.values():
        found = one_object_per_shape(group) if keep_all_regions else group_objects(group, *size)
        counts = [a + b for a, b in zip(counts, summarize(found))]
        objects.extend(_PendingAnnotation(o.label, o.kind, o.fields) for o in found)

    data: Optional[bytes] = None
    n_lost = f" ({plural(len(objects), 'annotation')} not exported)" if objects else ""
    if image_fetcher is not None:
        try:
            data = image_fetcher(url, task_id if isinstance(task_id, int) else None)
        except ImageError as exc:
            skip_task(f"image cannot be fetched{n_lost}: {exc}")
            return
        header = header_size(data)
        if header is None:
            skip_task(f"image {redact_url(url)} is not an image Pillow can read ({len(data)} "
                      f"bytes){n_lost}")
            return
        fmt, width, height = header
        if width < 0:  # too large for Pillow to open: the regions' size has to do
            if size is None:
                skip_task(f"image {redact_url(url)} is too large to read its size")
                return
        elif size is None:
            size = (width, height)
        elif size != (width, height):
            skip_task(f"image {redact_url(url)} is {width}x{height} pixels but its regions were "
                      f"drawn on a {size[0]}x{size[1]} image (was the file replaced?){n_lost}")
            return
    else:
        fmt = ""
        if size is None:
            skip_task("no region gives the image size and images are not fetched (--no_images)")
            return

    file_name = unique_name(url, task_id, position, fmt, used_names)
    if on_image is not None and data is not None:
        on_image(file_name, data)
    image_id = len(images) + 1
    entry = {"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]}
    if task_id is not None:
        entry["ls_task_id"] = task_id
    images.append(entry)
    pending.extend((image_id, obj) for obj in objects)
    report.regions += counts[0]
    report.objects += counts[1]
    report.merged_regions += counts[2]
    report.merged_objects += counts[3]


# -- classes --------------------------------------------------------------------------------------

def _check_classes(classes: Sequence[str]) -> List[str]:
    if isinstance(classes, str):
        classes = parse_classes(classes)
    out = [str(c) for c in classes]
    if not out:
        raise ExportError("--classes is empty: give the labels in order, e.g. --classes cat,dog")
    dup = [c for c, n in Counter(out).items() if n > 1]
    if dup:
        raise ExportError(f"--classes names {', '.join(map(repr, dup))} more than once")
    return out


def parse_classes(text: str) -> List[str]:
    """``"a,b,c"`` (or a pasted Python tuple/list such as ``"('a', 'b')"``) -> a list of names."""
    text = text.strip()
    if text[:1] in "([":
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ExportError(f"--classes {text!r} is not a valid Python tuple/list of names; "
                              "or give them as a,b,c") from None
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ExportError(f"--classes {text!r} must hold label names (strings)")
        names = [v.strip() for v in value]
    else:
        names = [v.strip() for v in text.split(",")]
    return _check_classes([n for n in names if n])


# -- train/val split ------------------------------------------------------------------------------

def check_val_fraction(val_fraction: float) -> float:
    value = float(val_fraction)
    if not 0.0 <= value < 1.0:
        raise ExportError(f"--val-fraction {val_fraction} must be at least 0 and below 1 "
                          "(e.g. 0.2: a fifth of the images for validation)")
    return value


def split_images(image_ids: Sequence[int], val_fraction: float, seed: int = 0
                 ) -> Tuple[List[int], List[int]]:
    """(train ids, val ids): ``round(n * val_fraction)`` images for validation (at least 1 when
    the fraction is > 0 and there are 2 images or more; never all), chosen by a seeded random
    permutation (``numpy.random.default_rng(seed)``), so the same export and seed give the same
    split. Both lists keep the input order."""
    ids = list(image_ids)
    n_val = int(round(len(ids) * check_val_fraction(val_fraction)))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    else:
        n_val = 0
    chosen = set(np.random.default_rng(seed).permutation(len(ids))[:n_val].tolist())
    train = [i for k, i in enumerate(ids) if k not in chosen]
    val = [i for k, i in enumerate(ids) if k in chosen]
    return train, val


def subset(coco: dict, image_ids: Iterable[int]) -> dict:
    """The COCO dict restricted to ``image_ids`` (annotation and image ids kept)."""
    keep = set(image_ids)
    return dict(coco, images=[i for i in coco["images"] if i["id"] in keep],
                annotations=[a for a in coco["annotations"] if a["image_id"] in keep])


# -- from the export file to a dataset folder -----------------------------------------------------

def write_file(path: Path, data: Any) -> None:
    """:func:`~sam_backend.common.files.atomic_write`; a failure is an ExportError naming the
    file."""
    try:
        atomic_write(path, data)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from None


def prepare_output(out_dir: str, subdirs: Sequence[str]) -> Path:
    """``out_dir`` (``~`` expanded) with ``subdirs`` created."""
    out = Path(os.path.expanduser(out_dir))
    try:
        for sub in subdirs:
            (out / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {out}: {exc.strerror or exc}") from None
    return out


def convert_export(source: TaskSource, images_dir: Optional[Path],
                   classes: Optional[Sequence[str]] = None, image_loader=None,
                   upload_dir: Optional[str] = None, progress: bool = True,
                   keep_all_regions: bool = False) -> Tuple[dict, ExportReport]:
    """Read the tasks of ``source`` (an export file's path or a
    :class:`~.source.ProjectSource`) and :func:`convert` them, storing the images in
    ``images_dir`` (None: images are not fetched). ``image_loader``: an
    :class:`~sam_backend.images.loader.ImageLoader` (default: one configured from the
    environment). Shared by export-coco and export-yolo."""
    class_list = None
    if classes is not None:
        class_list = parse_classes(classes) if isinstance(classes, str) else _check_classes(classes)
    check_upload_dir(upload_dir)
    with open_source(source, image_loader, images=images_dir is not None) as (tasks, loader):
        logger.info("exporting %d tasks of %s", len(tasks), source)
        if images_dir is None:
            return convert(tasks, class_list, None, progress=progress,
                           keep_all_regions=keep_all_regions)
        return convert(tasks, class_list, make_image_fetcher(loader, upload_dir),
                       on_image=lambda name, data: write_file(images_dir / name, data),
                       progress=progress, keep_all_regions=keep_all_regions)


__all__ = ["IMAGES_SUBDIR", "ImageSink", "check_val_fraction", "convert", "convert_export",
           "parse_classes", "prepare_output", "split_images", "subset", "write_file"]
