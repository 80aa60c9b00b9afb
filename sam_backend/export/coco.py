"""``sam-backend export-coco``: a Label Studio JSON export -> a COCO instance-segmentation dataset.

Writes ``<out_dir>/annotations/ann.json`` and the task images into ``<out_dir>/images/`` (the bytes
as fetched, never re-encoded), ready for MMDetection (Mask R-CNN, RTMDet-Ins) and other COCO tools::

    sam-backend export-coco --json_file_path project.json --out_dir dataset [--classes cat,dog]
                            [--upload_dir ~/.local/share/label-studio/media/upload] [--no_images]
                            [--keep-all-regions] [--val-fraction 0.2 --seed 0]
                            [--mmdet-config mask-rcnn_r50_fpn|rtmdet-ins_s]

One object, one annotation: the regions of each annotation that describe the same object (a
brush mask, the polygons traced from it, its tight box, the smart rectangle that prompted it) are
grouped by :func:`sam_backend.export.objects.group_objects` (the matching rule is documented
there) and become one COCO annotation: the mask when there is one, else the polygons (one COCO
polygon per part), else the box. ``--keep-all-regions`` exports every region on its own.
``--val-fraction`` also writes ``annotations/train.json`` and ``annotations/val.json`` (split by
image, seeded); ``--mmdet-config`` writes a ready MMDetection config
(:mod:`sam_backend.export.mmdet_config`) next to the dataset.

What is read. The export must be Label Studio's "JSON" format: a list of tasks with
``data`` (the image URL, under ``data["image"]``, else the key named by the regions' ``to_name``,
else the task's only string value) and ``annotations[].result[]``. Every annotation that is not
cancelled (``was_cancelled``) is used, so a task labelled by two annotators gets both sets of
regions (the report counts such tasks). Predictions and drafts are ignored. A task without any
submitted annotation is not labelled and is left out; a task whose annotations have no region is
exported as an image without objects (a negative example).

How regions become COCO geometry (pixel coordinates, ``iscrowd`` 0; a region with several labels
counts once per label):

* ``brushlabels`` (``value.format == "rle"``): decoded with :func:`sam_backend.labelstudio.rle.rle_to_mask` at
  the region's ``original_height x original_width``, written as compressed COCO RLE
  (``pycocotools.mask.encode``, ``counts`` as a str); ``area`` is the mask's pixel count and
  ``bbox`` its tight box (``pycocotools.mask.area`` / ``toBbox``). Holes, several parts and
  one-pixel-thin parts come through exactly.
* ``polygonlabels``: percent points -> pixels, flattened ``[x1, y1, x2, y2, ...]`` as one COCO
  polygon; ``area`` is the polygon's geometric (shoelace) area, as in the COCO dataset itself;
  ``bbox`` the polygon's bounds.
* ``rectanglelabels``: ``bbox`` is the box (for a rotated rectangle, the bounds of its rotated
  corners; Label Studio rotates around the top-left corner), ``area`` the rectangle's area
  (``w * h``), and ``segmentation`` the rectangle as a 4-point polygon, so that tools which need a
  segmentation on every annotation (COCOeval 'segm', Mask R-CNN loaders) still work. Note that an
  instance-segmentation model then learns box-shaped masks for those objects.
* Points are clipped to the image. ``keypointlabels`` (the smart-tool prompts of this backend)
  and non-spatial results (choices, text, ratings, relations, ...) are ignored silently (counted in
  the report); any other region type is reported.

Image sizes come from the regions' ``original_width``/``original_height`` (the size after EXIF
orientation, as browsers show the image); regions of one task that disagree are reported and
skipped, and when the image is fetched its header size (orientation applied) must agree too.

Categories: ids 1..N for the labels of the export sorted by name (``sorted()``, so ids do not
depend on the order of the tasks and are stable between exports with the same label set), or, with
``--classes a,b,c``, exactly those labels in that order; labels not in ``--classes`` are reported
and their regions skipped. The command prints the categories at the end, as an MMDetection
``classes``/``metainfo`` line and as ``id: name`` lines.

MMDetection: RLE masks need ``LoadAnnotations(..., with_mask=True, poly2mask=True)``; with
``poly2mask=False`` (the RTMDet-Ins configs) MMDetection marks RLE instances as ignored, so the
command prints that hint when masks were exported. Exit code: 0 when anything was exported (even
with problems, which are listed), 1 when no image could be exported, 2 when the export cannot be
read or the options are wrong.

Images are fetched through :class:`sam_backend.images.ImageLoader` (``LABEL_STUDIO_URL`` +
``LABEL_STUDIO_API_KEY`` for uploads, ``LOCAL_FILES_DOCUMENT_ROOT`` for local files, presigned
cloud URLs, http(s)); with ``--upload_dir``, ``/data/upload/<project>/<file>`` is first looked up
as ``<upload_dir>/<project>/<file>``. ``images/`` file names are the URL's base name (the Label
Studio upload name, UUID prefix included); a name already used by another task gets the task id as
a prefix (``<task id>_<name>``).

Problems never stop the export: a task whose image cannot be fetched is skipped with its
annotations; a region that cannot be read (bad RLE, missing size, unknown type, degenerate
polygon) is skipped. Each is logged as a warning naming the task id, collected in the returned
:class:`ExportReport` and summarised at the end. Logger: ``sam_backend.export.coco``.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import logging
import math
import os
import posixpath
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from sam_backend.errors import ImageError, SamBackendError
from sam_backend.export.objects import Shape, group_objects, one_object_per_shape, summarize
from sam_backend.labelstudio.rle import rle_to_mask

logger = logging.getLogger("sam_backend.export.coco")

ANN_SUBPATH = os.path.join("annotations", "ann.json")
IMAGES_SUBDIR = "images"

#: result types converted, by the kind of COCO annotation they become
MASK_TYPES = ("brushlabels", "brush")
POLYGON_TYPES = ("polygonlabels", "polygon")
BOX_TYPES = ("rectanglelabels", "rectangle")
SUPPORTED_TYPES = MASK_TYPES + POLYGON_TYPES + BOX_TYPES
#: result types that are not objects to export: ignored without a warning
IGNORED_TYPES = frozenset({
    "keypointlabels", "keypoint",  # smart-tool prompts of this backend
    "choices", "textarea", "rating", "taxonomy", "number", "datetime", "relation", "pairwise",
    "ranker", "list",
})

# (url, task id) -> the image file's bytes; raises ImageError
ImageFetcher = Callable[[str, Optional[int]], bytes]
# (file name under images/, bytes) -> None; stores an exported image
ImageSink = Callable[[str, bytes], None]


class ExportError(SamBackendError):
    """The export as a whole cannot be done (unreadable export file, bad --classes, ...)."""


# --------------------------------------------------------------------------------------------
# Report


@dataclass
class Problem:
    """Something of one task that could not be exported."""

    task_id: Any  # the task's ``id`` (None if the task has none)
    message: str
    position: Optional[int] = None  # index of the task in the export
    annotation_id: Any = None
    region_id: Any = None

    @property
    def where(self) -> str:
        if self.task_id is not None:
            text = f"task {self.task_id}"
        else:
            text = f"task #{self.position} (no id)"
        if self.annotation_id is not None:
            text += f", annotation {self.annotation_id}"
        if self.region_id is not None:
            text += f", region {self.region_id}"
        return text

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class ExportReport:
    """What an export did: counts, categories, and every problem by task id."""

    tasks: int = 0  # tasks in the export
    images: int = 0  # images exported
    annotations: Counter = field(default_factory=Counter)  # "mask" / "polygon" / "box" -> count
    problems: List[Problem] = field(default_factory=list)
    skipped_tasks: List[Any] = field(default_factory=list)  # task ids not exported (problems)
    unlabelled_tasks: List[Any] = field(default_factory=list)  # no submitted annotation
    multi_annotation_tasks: List[Any] = field(default_factory=list)  # > 1 annotation used
    skipped_labels: Dict[str, List[Any]] = field(default_factory=dict)  # label -> task ids
    ignored_results: Counter = field(default_factory=Counter)  # result type -> count
    categories: List[dict] = field(default_factory=list)
    regions: int = 0  # regions (one per label) that went into objects
    objects: int = 0  # objects exported (= annotations)
    merged_regions: int = 0  # regions merged into objects made of several regions
    merged_objects: int = 0  # objects made of several regions
    keep_all_regions: bool = False
    ann_file: Optional[str] = None
    images_dir: Optional[str] = None
    split: Dict[str, int] = field(default_factory=dict)  # "train"/"val" -> images
    annotation_kinds: Dict[int, str] = field(default_factory=dict)  # annotation id -> its kind
    config_file: Optional[str] = None  # the MMDetection config written, if any

    @property
    def problem_task_ids(self) -> List[Any]:
        seen: Dict[Any, None] = {}
        for p in self.problems:
            seen.setdefault(p.task_id if p.task_id is not None else f"#{p.position}")
        return list(seen)

    @property
    def total_annotations(self) -> int:
        return sum(self.annotations.values())

    def summary(self) -> str:
        kinds = ", ".join(_n(n, k) for k, n in sorted(self.annotations.items()))
        lines = [
            f"{_n(self.tasks, 'task')}: {_n(self.images, 'image')} and "
            f"{_n(self.total_annotations, 'annotation')} exported ({kinds or 'none'}), "
            f"{len(self.categories)} {'category' if len(self.categories) == 1 else 'categories'}"
        ]
        if self.keep_all_regions:
            lines.append(f"--keep-all-regions: every region exported as its own object "
                         f"({_n(self.regions, 'region')})")
        elif self.regions:
            lines.append(f"one object, one annotation: {_n(self.regions, 'region')} -> "
                         f"{_n(self.objects, 'object')} ({self.merged_regions} regions merged "
                         f"into {_n(self.merged_objects, 'object')}, "
                         f"{self.objects - self.merged_objects} single-region)")
        if self.split:
            lines.append("split by image: " + ", ".join(
                f"{name} {_n(n, 'image')}" for name, n in self.split.items()))
        if self.unlabelled_tasks:
            lines.append(f"{_n(len(self.unlabelled_tasks), 'task')} without a submitted "
                         f"annotation left out: {_id_list(self.unlabelled_tasks)}")
        if self.multi_annotation_tasks:
            lines.append(f"{_n(len(self.multi_annotation_tasks), 'task')} with several "
                         f"annotations, all exported (check for duplicate objects): "
                         f"{_id_list(self.multi_annotation_tasks)}")
        for label, ids in self.skipped_labels.items():
            lines.append(f"label {label!r} is not in --classes: {_n(len(ids), 'region')} skipped "
                         f"(tasks {_id_list(sorted(set(ids), key=str))})")
        if self.ignored_results:
            lines.append("ignored results (not objects): " + ", ".join(
                f"{n} {t}" for t, n in sorted(self.ignored_results.items())))
        if self.problems:
            lines.append(f"{_n(len(self.problems), 'problem')} in "
                         f"{_n(len(self.problem_task_ids), 'task')} "
                         f"({_n(len(self.skipped_tasks), 'task')} skipped):")
            lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)


def _n(count: int, word: str) -> str:
    if count == 1:
        return f"{count} {word}"
    return f"{count} {word}{'es' if word.endswith(('x', 's')) else 's'}"


def _id_list(ids: Sequence[Any], limit: int = 20) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


#: printed when masks were exported: MMDetection drops RLE masks unless poly2mask=True
MMDET_RLE_HINT = (
    "# The masks are COCO RLE: in MMDetection load them with\n"
    "# dict(type='LoadAnnotations', with_bbox=True, with_mask=True, poly2mask=True)\n"
    "# (with poly2mask=False, as in the RTMDet-Ins configs, RLE masks are ignored)"
)


def format_categories(categories: Sequence[dict]) -> str:
    """The categories as lines to paste into an MMDetection config, then ``id: name`` lines."""
    names = tuple(c["name"] for c in categories)
    lines = ["# MMDetection config:", f"classes = {names!r}", "metainfo = dict(classes=classes)",
             "# COCO category ids:"]
    lines.extend(f"{c['id']}: {c['name']}" for c in categories)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Regions -> COCO annotations


class _RegionError(Exception):
    """A region that cannot be exported; the message says why."""


def _image_size(region: dict) -> Tuple[int, int]:
    """(width, height) from a region's ``original_width``/``original_height``."""
    size = []
    for key in ("original_width", "original_height"):
        value = region.get(key)
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or value != int(value) or value <= 0):
            if value is None:
                raise _RegionError("has no original_width/original_height (the image size)")
            raise _RegionError(f"has an invalid {key} {value!r}")
        size.append(int(value))
    return size[0], size[1]


def _region_labels(region: dict, rtype: str) -> List[str]:
    value = region.get("value") or {}
    labels = value.get(rtype) if rtype.endswith("labels") else None
    if labels is None:
        labels = value.get("labels")
    if isinstance(labels, str):
        labels = [labels]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise _RegionError(f"{rtype} region has no label")
    return list(dict.fromkeys(labels))  # unique, in order


def _mask_annotation(value: dict, width: int, height: int) -> dict:
    from pycocotools import mask as mask_utils

    fmt = value.get("format", "rle")
    if fmt != "rle":
        raise _RegionError(f"brush region has format {fmt!r}; only 'rle' is supported")
    rle = value.get("rle")
    if not isinstance(rle, (list, tuple)) or not rle:
        raise _RegionError("brush region has no 'rle' list")
    try:
        mask = rle_to_mask(rle, height, width)
    except (ValueError, TypeError) as exc:
        raise _RegionError(f"brush RLE cannot be read: {exc}") from None
    coco_rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    area = int(mask_utils.area(coco_rle))
    if area == 0:
        raise _RegionError("brush mask is empty (no pixel set)")
    coco_rle["counts"] = coco_rle["counts"].decode("ascii")
    bbox = [float(v) for v in mask_utils.toBbox(coco_rle)]
    return {"segmentation": coco_rle, "area": area, "bbox": bbox}


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _RegionError(f"{what} is not a finite number: {value!r}")
    return float(value)


def _clip(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nx2 (x, y) pixel points clipped to the image rectangle [0, W] x [0, H]."""
    return np.stack([np.clip(points[:, 0], 0, width), np.clip(points[:, 1], 0, height)], axis=1)


def _shoelace(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def _polygon_fields(points: np.ndarray, area: float) -> dict:
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    return {
        "segmentation": [[float(v) for v in points.ravel()]],
        "area": float(area),
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
    }


def _polygon_annotation(value: dict, width: int, height: int) -> dict:
    if value.get("closed") is False:
        raise _RegionError("polygon is open (a polyline), not an area")
    raw = value.get("points")
    if not isinstance(raw, list) or len(raw) < 3:
        raise _RegionError(f"polygon needs at least 3 points, has "
                           f"{len(raw) if isinstance(raw, list) else 'none'}")
    pts = []
    for i, p in enumerate(raw):
        if not isinstance(p, (list, tuple)) or len(p) < 2:
            raise _RegionError(f"polygon point {i} is not [x, y]: {p!r}")
        pts.append((_number(p[0], f"polygon point {i} x") * width / 100.0,
                    _number(p[1], f"polygon point {i} y") * height / 100.0))
    points = _clip(np.asarray(pts, dtype=np.float64), width, height)
    area = _shoelace(points)
    if area <= 0:
        raise _RegionError("polygon has no area (degenerate, or outside the image)")
    return _polygon_fields(points, area)


def _box_annotation(value: dict, width: int, height: int) -> dict:
    x = _number(value.get("x"), "rectangle x") * width / 100.0
    y = _number(value.get("y"), "rectangle y") * height / 100.0
    w = _number(value.get("width"), "rectangle width") * width / 100.0
    h = _number(value.get("height"), "rectangle height") * height / 100.0
    rotation = _number(value.get("rotation") or 0, "rectangle rotation")
    if rotation % 360 == 0:
        corners = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float64)
    else:
        # Label Studio rotates a rectangle clockwise (y points down) around its top-left corner
        c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
        corners = np.array([[x, y], [x + w * c, y + w * s],
                            [x + w * c - h * s, y + w * s + h * c], [x - h * s, y + h * c]],
                           dtype=np.float64)
    corners = _clip(corners, width, height)
    area = _shoelace(corners)  # w * h for a rectangle inside the image
    if area <= 0:
        raise _RegionError("rectangle has no area (zero size, or outside the image)")
    return _polygon_fields(corners, area)


def region_to_annotation(region: dict, width: int, height: int) -> Tuple[str, dict]:
    """(kind, COCO fields) of one Label Studio region: kind is "mask", "polygon" or "box"; the
    fields are ``segmentation``, ``area`` and ``bbox`` ([x, y, w, h] pixels) for an image of
    ``width x height`` pixels. Raises ``ValueError`` when the region cannot be exported."""
    try:
        return _convert_region(region, width, height)
    except _RegionError as exc:
        raise ValueError(str(exc)) from None


def _convert_region(region: dict, width: int, height: int) -> Tuple[str, dict]:
    rtype = region.get("type")
    value = region.get("value")
    if not isinstance(value, dict):
        raise _RegionError(f"{rtype} region has no 'value'")
    if rtype in MASK_TYPES:
        return "mask", _mask_annotation(value, width, height)
    if rtype in POLYGON_TYPES:
        return "polygon", _polygon_annotation(value, width, height)
    if rtype in BOX_TYPES:
        return "box", _box_annotation(value, width, height)
    raise _RegionError(f"unsupported region type {rtype!r}")


# --------------------------------------------------------------------------------------------
# Tasks


def _task_image_url(task: dict, results: Iterable[dict]) -> str:
    data = task.get("data")
    if not isinstance(data, dict):
        raise _RegionError("task has no 'data'")
    keys = ["image"] + [r.get("to_name") for r in results if isinstance(r.get("to_name"), str)]
    for key in dict.fromkeys(keys):
        if key in data:
            url = data[key]
            break
    else:
        strings = [v for v in data.values() if isinstance(v, str) and v.strip()]
        if len(strings) != 1:
            raise _RegionError(
                f"cannot tell which of the task's data fields is the image (fields: "
                f"{', '.join(map(str, data)) or 'none'}); name it 'image'")
        url = strings[0]
    if isinstance(url, list):
        raise _RegionError("multi-image tasks (a list of images) are not supported")
    if not isinstance(url, str) or not url.strip():
        raise _RegionError(f"the task's image URL is empty or not a string: {url!r}")
    return url.strip()


def _base_name(url: str) -> str:
    """The image's file name from its URL (``?d=`` of local files, else the path's last part)."""
    if url[:5].lower() == "data:":
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    path = parts.path
    if "/data/local-files" in path:
        d = parse_qs(parts.query).get("d")
        if d:
            path = d[0]
    elif parts.scheme.lower() in ("s3", "gs", "azure-blob"):
        path = parts.path or parts.netloc
    name = posixpath.basename(unquote(path).replace("\\", "/"))
    name = "".join(ch for ch in name if ch >= " " and ch not in '/\\:*?"<>|').strip()
    return "" if name in (".", "..") else name


_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "TIFF": ".tif", "DIB": ".bmp"}


def _header_size(data: bytes) -> Optional[Tuple[str, int, int]]:
    """(format, width, height) from the image header, EXIF orientation applied; None if Pillow
    cannot read it; width = height = -1 for an image too large for Pillow to open."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            try:
                orientation = img.getexif().get(0x0112)
            except Exception:  # noqa: BLE001 - a broken EXIF block: orientation unknown
                orientation = None
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            return img.format or "", width, height
    except Image.DecompressionBombError:
        return "", -1, -1
    except Exception:  # noqa: BLE001 - anything Pillow cannot open
        return None


@dataclass
class _PendingAnnotation:
    label: str
    kind: str
    fields: dict


def _used_annotations(task: dict) -> List[dict]:
    anns = task.get("annotations")
    if anns is None:
        anns = task.get("completions")  # very old exports
    if not isinstance(anns, list):
        return []
    return [a for a in anns if isinstance(a, dict) and not a.get("was_cancelled")]


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
                       _n(len(ids), "region"), _id_list(sorted(set(ids), key=str)))
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

    def problem(message: str, annotation_id: Any = None, region_id: Any = None) -> None:
        p = Problem(task_id, message, position, annotation_id, region_id)
        report.problems.append(p)
        logger.warning("%s", p)

    def skip_task(message: str) -> None:
        problem(message + "; task skipped")
        report.skipped_tasks.append(task_id if task_id is not None else f"#{position}")

    if not isinstance(task, dict):
        skip_task(f"is not a task object ({type(task).__name__})")
        return
    used = _used_annotations(task)
    if not used:
        report.unlabelled_tasks.append(task_id if task_id is not None else f"#{position}")
        logger.debug("task %s: no submitted annotation, left out", task_id)
        return
    if len(used) > 1:
        report.multi_annotation_tasks.append(task_id)
    results = [(index, a.get("id"), r) for index, a in enumerate(used)
               for r in (a.get("result") or []) if isinstance(r, dict)]
    try:
        url = _task_image_url(task, (r for _, _, r in results))
    except _RegionError as exc:
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
            labels = _region_labels(region, rtype)
            for label in labels:
                seen_labels.setdefault(label)
            region_size = _image_size(region)
            if size is None:
                size = region_size
            elif region_size != size:
                raise _RegionError(
                    f"image size {region_size[0]}x{region_size[1]} differs from the task's other "
                    f"regions ({size[0]}x{size[1]})")
            kind, fields = _convert_region(region, *size)
        except _RegionError as exc:
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
    n_lost = f" ({_n(len(objects), 'annotation')} not exported)" if objects else ""
    if image_fetcher is not None:
        try:
            data = image_fetcher(url, task_id if isinstance(task_id, int) else None)
        except ImageError as exc:
            skip_task(f"image cannot be fetched{n_lost}: {exc}")
            return
        header = _header_size(data)
        if header is None:
            skip_task(f"image {_short(url)} is not an image Pillow can read ({len(data)} bytes)"
                      f"{n_lost}")
            return
        fmt, width, height = header
        if width < 0:  # too large for Pillow to open: the regions' size has to do
            if size is None:
                skip_task(f"image {_short(url)} is too large to read its size")
                return
        elif size is None:
            size = (width, height)
        elif size != (width, height):
            skip_task(f"image {_short(url)} is {width}x{height} pixels but its regions were drawn "
                      f"on a {size[0]}x{size[1]} image (was the file replaced?){n_lost}")
            return
    else:
        fmt = ""
        if size is None:
            skip_task("no region gives the image size and images are not fetched (--no_images)")
            return

    file_name = _unique_name(url, task_id, position, fmt, used_names)
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


def _short(url: str) -> str:
    from sam_backend.common.text import redact_url

    return redact_url(url)


def _unique_name(url: str, task_id: Any, position: int, fmt: str, used: set) -> str:
    tag = str(task_id) if task_id is not None else f"pos{position}"
    name = _base_name(url) or f"task_{tag}"
    if not os.path.splitext(name)[1] and fmt:
        name += _EXTENSIONS.get(fmt, "." + fmt.lower())
    candidate = name
    n = 1
    # compared case-insensitively: the images may land on a case-insensitive file system
    while candidate.casefold() in used:
        candidate = f"{tag}_{name}" if n == 1 else f"{tag}_{n}_{name}"
        n += 1
    used.add(candidate.casefold())
    return candidate


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


# --------------------------------------------------------------------------------------------
# Files


def _upload_dir_path(url: str, upload_dir: str) -> Optional[str]:
    """``<upload_dir>/<project>/<file>`` for a ``/data/upload/<project>/<file>`` URL, if that file
    exists (and lies inside ``upload_dir``); else None."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    path = parts.path
    if parts.scheme.lower() in ("http", "https"):
        idx = path.find("/data/upload/")
        if idx < 0:
            return None
        path = path[idx:]
    elif parts.scheme:
        return None
    if path.startswith(("upload/", "/upload/")):  # old Label Studio exports
        path = "/data/" + path.lstrip("/")
    prefix = "/data/upload/"
    if not path.startswith(prefix):
        return None
    root = os.path.abspath(os.path.expanduser(upload_dir))
    for rel in dict.fromkeys((path[len(prefix):], unquote(path[len(prefix):]))):
        rel = posixpath.normpath(rel).lstrip("/")
        full = os.path.normpath(os.path.join(root, rel))
        if not full.startswith(root.rstrip(os.sep) + os.sep):
            continue
        if os.path.isfile(full):
            return full
    return None


def make_image_fetcher(image_loader, upload_dir: Optional[str] = None) -> ImageFetcher:
    """An :data:`ImageFetcher`: ``upload_dir`` first for Label Studio uploads, then
    ``image_loader.fetch_bytes`` (an :class:`~sam_backend.images.ImageLoader`)."""

    def fetch(url: str, task_id: Optional[int]) -> bytes:
        local = _upload_dir_path(url, upload_dir) if upload_dir else None
        if local is not None:
            try:
                with open(local, "rb") as fh:
                    data = fh.read()
            except OSError as exc:
                raise ImageError(f"cannot read {local}: {exc.strerror or exc}") from None
            logger.debug("image %s: read from the upload directory (%s)", url, local)
            return data
        try:
            return image_loader.fetch_bytes(url, task_id)
        except ImageError as exc:
            if upload_dir and _is_upload_url(url):
                raise ImageError(
                    f"{exc} (not found under --upload_dir {upload_dir} either)") from None
            raise

    return fetch


def _is_upload_url(url: str) -> bool:
    return "/data/upload/" in url or url.startswith(("upload/", "/upload/"))


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_export(json_file_path: str) -> list:
    """The tasks of a Label Studio JSON export file."""
    try:
        with open(json_file_path, "rb") as fh:
            tasks = json.load(fh)
    except FileNotFoundError:
        raise ExportError(f"export file {json_file_path} not found") from None
    except OSError as exc:
        raise ExportError(
            f"cannot read export file {json_file_path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"export file {json_file_path} is not valid JSON ({exc}); export the "
                          "project from Label Studio in the 'JSON' format") from None
    if isinstance(tasks, dict) and "data" in tasks:
        tasks = [tasks]  # a single task
    if not isinstance(tasks, list):
        raise ExportError(f"export file {json_file_path} does not hold a list of tasks; export the "
                          "project from Label Studio in the 'JSON' format")
    return tasks


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


def _write_json(path: Path, data: dict) -> None:
    try:
        _write_atomic(path, json.dumps(data, ensure_ascii=False).encode("utf-8"))
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from None


def prepare_output(out_dir: str, subdirs: Sequence[str]) -> Path:
    out = Path(os.path.expanduser(out_dir))
    try:
        for sub in subdirs:
            (out / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {out}: {exc.strerror or exc}") from None
    return out


def convert_export(json_file_path: str, images_dir: Optional[Path],
                   classes: Optional[Sequence[str]] = None, image_loader=None,
                   upload_dir: Optional[str] = None, progress: bool = True,
                   keep_all_regions: bool = False) -> Tuple[dict, ExportReport]:
    """Read the export file and :func:`convert` it, storing the images in ``images_dir``
    (None: images are not fetched). Shared by export-coco and export-yolo."""
    tasks = load_export(json_file_path)
    class_list = None
    if classes is not None:
        class_list = parse_classes(classes) if isinstance(classes, str) else _check_classes(classes)
    if upload_dir and not os.path.isdir(os.path.expanduser(upload_dir)):
        raise ExportError(f"--upload_dir {upload_dir} is not a directory (Label Studio's media "
                          "upload directory, e.g. ~/.local/share/label-studio/media/upload)")
    own_loader = False
    fetcher = None
    if images_dir is not None:
        if image_loader is None:
            from sam_backend.images.config import ImageAccessSettings
            from sam_backend.images.loader import ImageLoader

            # an operator's own tool: the export's local paths are read wherever they are
            image_loader = ImageLoader(ImageAccessSettings.from_env(), local_paths_anywhere=True)
            own_loader = True
        fetcher = make_image_fetcher(image_loader, upload_dir)

    def store(file_name: str, data: bytes) -> None:
        try:
            _write_atomic(images_dir / file_name, data)
        except OSError as exc:
            raise ExportError(
                f"cannot write {images_dir / file_name}: {exc.strerror or exc}") from None

    logger.info("exporting %d tasks of %s", len(tasks), json_file_path)
    try:
        return convert(tasks, class_list, fetcher,
                       on_image=store if images_dir is not None else None,
                       progress=progress, keep_all_regions=keep_all_regions)
    finally:
        if own_loader:
            image_loader.close()


def export_coco(json_file_path: str, out_dir: str, classes: Optional[Sequence[str]] = None,
                image_loader=None, upload_dir: Optional[str] = None, copy_images: bool = True,
                progress: bool = True, keep_all_regions: bool = False,
                val_fraction: float = 0.0, seed: int = 0,
                mmdet_config: Optional[str] = None) -> ExportReport:
    """Convert the export ``json_file_path`` into ``out_dir/annotations/ann.json`` and, with
    ``copy_images``, ``out_dir/images/<file_name>``. ``image_loader``: an
    :class:`~sam_backend.images.ImageLoader` (default: one configured from the environment).
    ``classes``: a list of names or ``"a,b,c"``. ``keep_all_regions``: one annotation per region
    instead of one per object. ``val_fraction`` > 0: also ``annotations/train.json`` and
    ``annotations/val.json``, split by image (:func:`split_images`, ``seed``).
    ``mmdet_config``: a name of :data:`sam_backend.export.mmdet_config.TEMPLATES`; writes
    ``out_dir/<name>.py``. Returns the report (also logged)."""
    val_fraction = check_val_fraction(val_fraction)
    if mmdet_config is not None:
        from sam_backend.export.mmdet_config import TEMPLATES

        if mmdet_config not in TEMPLATES:
            raise ExportError(f"--mmdet-config {mmdet_config!r} is not known; choose one of "
                              f"{', '.join(TEMPLATES)}")
    out = prepare_output(out_dir, ["annotations"] + ([IMAGES_SUBDIR] if copy_images else []))
    images_dir = out / IMAGES_SUBDIR
    ann_file = out / ANN_SUBPATH
    coco, report = convert_export(json_file_path, images_dir if copy_images else None, classes,
                                  image_loader, upload_dir, progress, keep_all_regions)
    _write_json(ann_file, coco)
    report.ann_file = str(ann_file)
    train_ann = val_ann = ANN_SUBPATH.replace(os.sep, "/")
    if val_fraction > 0:
        train_ids, val_ids = split_images([i["id"] for i in coco["images"]], val_fraction, seed)
        train_ann, val_ann = "annotations/train.json", "annotations/val.json"
        _write_json(out / train_ann, subset(coco, train_ids))
        _write_json(out / val_ann, subset(coco, val_ids))
        report.split = {"train": len(train_ids), "val": len(val_ids)}
    if mmdet_config is not None:
        from sam_backend.export.mmdet_config import write_config

        if not coco["categories"]:
            raise ExportError("no category was exported: no MMDetection config written")
        report.config_file = str(write_config(
            str(out), mmdet_config, [c["name"] for c in coco["categories"]], train_ann, val_ann))
    report.images_dir = str(images_dir) if copy_images else None
    (logger.warning if report.problems else logger.info)("%s", report.summary())
    logger.info("wrote %s%s", ann_file, f" and {report.images} images to {images_dir}"
                if copy_images else "")
    return report


# --------------------------------------------------------------------------------------------
# Command line


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "export-coco",
        help="convert a Label Studio JSON export into a COCO dataset (RLE masks)",
        description="Convert a Label Studio JSON export into a COCO instance-segmentation "
                    "dataset: OUT_DIR/annotations/ann.json and the images in OUT_DIR/images. "
                    "Brushes become compressed RLE masks, polygons COCO polygons, rectangles "
                    "boxes. Problems are reported by task id and the export goes on.",
    )
    add_input_options(parser, "annotations/ann.json, images/", "the categories in order "
                      "(ids 1..N)")
    parser.add_argument("--no_images", "--no-images", dest="copy_images", action="store_false",
                        help="write only annotations/ann.json, do not fetch or copy the images")
    add_object_options(parser)
    add_split_options(parser)
    from sam_backend.export.mmdet_config import TEMPLATES

    parser.add_argument("--mmdet-config", "--mmdet_config", "--out_config", dest="mmdet_config",
                        choices=list(TEMPLATES), default=None,
                        help="also write OUT_DIR/<NAME>.py, an MMDetection 3.x training config "
                             "for this dataset (data_root, ann_file, classes, num_classes, "
                             "LoadAnnotations for RLE masks)")
    parser.set_defaults(func=_cmd_export_coco)


def add_input_options(parser, outputs: str, classes_help: str) -> None:
    """The options every export command takes: the export file, the output directory, the
    classes and Label Studio's upload directory."""
    parser.add_argument("--json_file_path", "--json-file-path", dest="json_file_path",
                        required=True, metavar="EXPORT.json",
                        help="the project exported from Label Studio in the 'JSON' format")
    parser.add_argument("--out_dir", "--out-dir", dest="out_dir", required=True, metavar="DIR",
                        help=f"output directory ({outputs})")
    parser.add_argument("--classes", default=None, metavar="a,b,c",
                        help=f"{classes_help}; labels not listed are skipped. "
                             "Default: every label in the export, sorted by name")
    parser.add_argument("--upload_dir", "--upload-dir", dest="upload_dir", default=None,
                        metavar="DIR",
                        help="Label Studio's media upload directory: /data/upload/<project>/<file> "
                             "is read from DIR/<project>/<file> when present, before downloading")


def add_object_options(parser) -> None:
    """``--keep-all-regions`` (shared by the export commands)."""
    parser.add_argument("--keep-all-regions", "--keep_all_regions", dest="keep_all_regions",
                        action="store_true",
                        help="one annotation per region (brush, polygon, rectangle) instead of "
                             "one per object: the regions of one object are not merged")


def add_split_options(parser) -> None:
    """``--val-fraction`` and ``--seed`` (shared by the export commands)."""
    parser.add_argument("--val-fraction", "--val_fraction", dest="val_fraction", type=float,
                        default=0.0, metavar="F",
                        help="put this fraction of the images (0 <= F < 1) in a validation split, "
                             "chosen at random by image (default 0: no split)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the train/val split (default 0)")


def _cmd_export_coco(args: argparse.Namespace) -> int:
    report = export_coco(args.json_file_path, args.out_dir, classes=args.classes,
                         upload_dir=args.upload_dir, copy_images=args.copy_images,
                         keep_all_regions=args.keep_all_regions,
                         val_fraction=args.val_fraction, seed=args.seed,
                         mmdet_config=args.mmdet_config)
    # the command's output: what to paste into a training config
    print(format_categories(report.categories))
    if report.config_file:
        print(f"# MMDetection config: {report.config_file}")
    elif report.annotations.get("mask"):
        print(MMDET_RLE_HINT)
    if report.tasks and report.images == 0:
        logger.error("no image was exported (see the problems above)")
        return 1
    return 0


__all__ = [
    "ExportError",
    "ExportReport",
    "Problem",
    "convert",
    "export_coco",
    "format_categories",
    "load_export",
    "make_image_fetcher",
    "parse_classes",
    "region_to_annotation",
    "register_cli",
]
