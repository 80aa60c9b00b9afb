"""``sam-backend export-coco``: a Label Studio JSON export -> a COCO instance-segmentation dataset.

Writes ``<out_dir>/annotations/ann.json`` and the task images into ``<out_dir>/images/`` (the bytes
as fetched, never re-encoded), ready for MMDetection (Mask R-CNN, RTMDet-Ins) and other COCO tools.
The conversion itself (one object, one annotation; categories; problems) is :mod:`.convert`, the
geometry of each kind of region :mod:`.geometry`. ``val_fraction`` also writes
``annotations/train.json`` and ``annotations/val.json`` (split by image, seeded);
``mmdet_config`` writes a ready MMDetection config (:mod:`.mmdet_config`) next to the dataset.

MMDetection: RLE masks need ``LoadAnnotations(..., with_mask=True, poly2mask=True)``; with
``poly2mask=False`` (the RTMDet-Ins configs) MMDetection marks RLE instances as ignored, so the
command prints :data:`MMDET_RLE_HINT` when masks were exported. The command line is
:mod:`.cli`.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

from sam_backend.export.convert import (IMAGES_SUBDIR, check_val_fraction, convert_export,
                                        prepare_output, split_images, subset, write_file)
from sam_backend.export.report import ExportError, ExportReport

logger = logging.getLogger(__name__)

ANN_SUBPATH = os.path.join("annotations", "ann.json")

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


def _write_json(path, data: dict) -> None:
    write_file(path, json.dumps(data, ensure_ascii=False))


def export_coco(json_file_path: str, out_dir: str, classes: Optional[Sequence[str]] = None,
                image_loader=None, upload_dir: Optional[str] = None, copy_images: bool = True,
                progress: bool = True, keep_all_regions: bool = False,
                val_fraction: float = 0.0, seed: int = 0,
                mmdet_config: Optional[str] = None) -> ExportReport:
    """Convert the export ``json_file_path`` (or a :class:`~.source.ProjectSource`: the project
    read from Label Studio's API) into ``out_dir/annotations/ann.json`` and, with
    ``copy_images``, ``out_dir/images/<file_name>``. ``image_loader``: an
    :class:`~sam_backend.images.loader.ImageLoader` (default: one configured from the environment).
    ``classes``: a list of names or ``"a,b,c"``. ``keep_all_regions``: one annotation per region
    instead of one per object. ``val_fraction`` > 0: also ``annotations/train.json`` and
    ``annotations/val.json``, split by image (:func:`~.convert.split_images`, ``seed``).
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


__all__ = ["ANN_SUBPATH", "MMDET_RLE_HINT", "export_coco", "format_categories"]
