"""``sam-backend export-yolo``: a Label Studio JSON export -> an Ultralytics YOLO segmentation
dataset::

    sam-backend export-yolo --json_file_path project.json --out_dir yolo [--classes cat,dog]
                            [--upload_dir DIR] [--val-fraction 0.2 --seed 0]
                            [--boxes-as-polygons] [--keep-all-regions]

Same inputs and the same one-object rule as ``export-coco`` (the export is converted by
:func:`sam_backend.export.convert.convert_export`, then each COCO annotation becomes one label
line). Writes the Ultralytics layout::

    yolo/data.yaml            path (absolute), train, val, names {0: first class, ...}
    yolo/images/<file>        the images as fetched (images/train, images/val with --val-fraction)
    yolo/labels/<stem>.txt    one line per object: class x1 y1 x2 y2 ... (normalised 0..1)

Without ``--val-fraction``, ``train`` and ``val`` both name ``images`` (Ultralytics needs a val
set). Class indices are the COCO category ids minus one (the export's labels sorted by name, or
``--classes`` in order). Every image gets a label file, empty for an image without objects.

**One polygon per object.** A mask object is traced with
:func:`sam_backend.labelstudio.regions.mask_polygons` (outer contours, simplified with
``POLY_TOLERANCE`` pixels; holes are not representable); a polygon object uses its polygons. An
object of several parts is **joined into one polygon** as Ultralytics does for multi-part COCO
segments (``merge_multi_segment``): each further part (largest first) is linked to the polygon
built so far at the closest pair of vertices, by a zero-width bridge walked there and back, so the
joined ring's area is the parts' total. Box-only objects (a rectangle without mask or polygon) have
no outline: they are left out and counted in the report, unless ``--boxes-as-polygons`` writes the
box's 4 corners as the polygon.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from sam_backend.export.convert import (IMAGES_SUBDIR, check_val_fraction, convert_export,
                                        prepare_output, split_images, write_file)
from sam_backend.export.report import ExportReport
from sam_backend.labelstudio.regions import mask_polygons

logger = logging.getLogger("sam_backend.export.yolo")

LABELS_SUBDIR = "labels"
DATA_YAML = "data.yaml"
#: Douglas-Peucker epsilon (pixels) of the polygons traced from masks
POLY_TOLERANCE = 1.0


@dataclass
class YoloReport:
    """What export-yolo wrote, on top of the COCO conversion's :class:`ExportReport`."""

    coco: ExportReport
    label_lines: int = 0  # objects written
    joined_objects: int = 0  # objects of several parts joined into one polygon
    boxes_skipped: int = 0  # box-only objects left out (no --boxes-as-polygons)
    boxes_as_polygons: int = 0  # box-only objects written as their 4 corners
    no_outline: int = 0  # objects whose mask traced to no polygon (e.g. a one-pixel line)
    split: Dict[str, int] = field(default_factory=dict)
    data_yaml: Optional[str] = None

    def summary(self) -> str:
        lines = [self.coco.summary(),
                 f"YOLO: {self.label_lines} objects written as polygons "
                 f"({self.joined_objects} multi-part objects joined into one polygon)"]
        if self.boxes_skipped:
            lines.append(f"{self.boxes_skipped} box-only objects left out (no outline; "
                         f"--boxes-as-polygons writes them as box polygons)")
        if self.boxes_as_polygons:
            lines.append(f"{self.boxes_as_polygons} box-only objects written as box polygons "
                         f"(--boxes-as-polygons)")
        if self.no_outline:
            lines.append(f"{self.no_outline} masks too thin for a polygon left out")
        return "\n".join(lines)


def _signed_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0


def join_parts(parts: Sequence[np.ndarray]) -> np.ndarray:
    """One (K, 2) polygon from several (Ki, 2) parts (pixel x, y), see the module docstring.
    Every part is first given the same orientation, so the joined ring's (shoelace) area is the
    sum of the parts' areas. Parts are taken largest first; ties keep the input order."""
    oriented = []
    for part in parts:
        part = np.asarray(part, dtype=np.float64).reshape(-1, 2)
        oriented.append(part[::-1] if _signed_area(part) < 0 else part)
    oriented.sort(key=lambda p: -abs(_signed_area(p)))
    ring = oriented[0]
    for part in oriented[1:]:
        d = ((ring[:, None, :] - part[None, :, :]) ** 2).sum(axis=2)
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        loop = np.concatenate([part[j:], part[:j], part[j:j + 1]])
        ring = np.concatenate([ring[:i + 1], loop, ring[i:]])
    return ring


def annotation_polygon(ann: dict, kind: str, width: int, height: int,
                       boxes_as_polygons: bool = False) -> Tuple[Optional[np.ndarray], int]:
    """(polygon (K, 2) pixel x, y or None, number of parts) of one COCO annotation made by
    export-coco; ``kind``: ``"mask"``, ``"polygon"`` or ``"box"``."""
    seg = ann["segmentation"]
    if kind == "box":
        if not boxes_as_polygons:
            return None, 0
        x, y, w, h = ann["bbox"]
        return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float64), 1
    if kind == "mask":
        from pycocotools import mask as mask_utils

        parts = mask_polygons(mask_utils.decode(seg), min_area=0.0, tolerance=POLY_TOLERANCE)
    else:
        parts = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in seg]
    parts = [p for p in parts if len(p) >= 3]
    if not parts:
        return None, 0
    return join_parts(parts), len(parts)


def label_line(class_index: int, polygon: np.ndarray, width: int, height: int) -> str:
    """``class x1 y1 x2 y2 ...`` with coordinates normalised by the image size, clipped to 0..1."""
    norm = np.clip(polygon / np.array([width, height], dtype=np.float64), 0.0, 1.0)
    return f"{class_index} " + " ".join(f"{v:.6f}" for v in norm.ravel())


def export_yolo(json_file_path: str, out_dir: str, classes: Optional[Sequence[str]] = None,
                image_loader=None, upload_dir: Optional[str] = None, progress: bool = True,
                keep_all_regions: bool = False, boxes_as_polygons: bool = False,
                val_fraction: float = 0.0, seed: int = 0) -> YoloReport:
    """Write the YOLO dataset (see the module docstring) from the export ``json_file_path`` (or
    a :class:`~.source.ProjectSource`); returns the report (also logged)."""
    import yaml

    val_fraction = check_val_fraction(val_fraction)
    out = prepare_output(out_dir, [IMAGES_SUBDIR, LABELS_SUBDIR])
    images_dir = out / IMAGES_SUBDIR
    coco, coco_report = convert_export(json_file_path, images_dir, classes, image_loader,
                                       upload_dir, progress, keep_all_regions)
    report = YoloReport(coco_report)
    by_image: Dict[int, List[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)

    subdirs = {i["id"]: "" for i in coco["images"]}
    if val_fraction > 0:
        train_ids, val_ids = split_images([i["id"] for i in coco["images"]], val_fraction, seed)
        subdirs.update({i: "train" for i in train_ids})
        subdirs.update({i: "val" for i in val_ids})
        report.split = {"train": len(train_ids), "val": len(val_ids)}

    used_stems: set = set()
    for image in coco["images"]:
        sub = subdirs[image["id"]]
        name = image["file_name"]
        stem = os.path.splitext(name)[0]
        if (sub, stem.casefold()) in used_stems:  # a.png and a.jpg: one label file each
            stem = f"{image['id']}_{stem}"
            name = stem + os.path.splitext(name)[1]
        used_stems.add((sub, stem.casefold()))
        src = images_dir / image["file_name"]
        dst = images_dir / sub / name
        if src != dst and src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        lines = []
        width, height = image["width"], image["height"]
        for ann in by_image.get(image["id"], []):
            kind = coco_report.annotation_kinds[ann["id"]]
            polygon, parts = annotation_polygon(ann, kind, width, height, boxes_as_polygons)
            if polygon is None:
                if kind == "box":
                    report.boxes_skipped += 1
                else:
                    report.no_outline += 1
                continue
            if kind == "box":
                report.boxes_as_polygons += 1
            report.joined_objects += parts > 1
            lines.append(label_line(ann["category_id"] - 1, polygon, width, height))
        label_file = out / LABELS_SUBDIR / sub / f"{stem}.txt"
        label_file.parent.mkdir(parents=True, exist_ok=True)
        write_file(label_file, "".join(line + "\n" for line in lines))
        report.label_lines += len(lines)

    train = f"{IMAGES_SUBDIR}/train" if report.split else IMAGES_SUBDIR
    val = f"{IMAGES_SUBDIR}/val" if report.split else IMAGES_SUBDIR
    data = {"path": str(out.resolve()), "train": train, "val": val,
            "names": {c["id"] - 1: c["name"] for c in coco["categories"]}}
    data_yaml = out / DATA_YAML
    write_file(data_yaml, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    report.data_yaml = str(data_yaml)
    (logger.warning if coco_report.problems else logger.info)("%s", report.summary())
    logger.info("wrote %s, %d images and their label files", data_yaml, coco_report.images)
    return report


__all__ = ["YoloReport", "annotation_polygon", "export_yolo", "join_parts", "label_line"]
