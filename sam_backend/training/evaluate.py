"""COCO mAP of a model's predictions on held-out samples (pycocotools' ``COCOeval``).

The ground truth is the samples' objects (:class:`~.dataset.Sample`): each object's box and mask
(box-only objects: the box filled, as in a COCO export), category = its label index + 1, iscrowd
0. The predictions are, per task id, :class:`Prediction` (boxes ``[x0, y0, x1, y1]`` pixels,
scores, label indices, optionally masks (N, H, W) bool). :func:`evaluate` answers, for ``"bbox"``
and ``"segm"``:

* ``mAP``: AP averaged over IoU 0.50:0.05:0.95 and the labels that have ground truth (COCO's
  headline figure, ``stats[0]``); ``mAP50`` and ``mAP75``: at IoU 0.50 and 0.75;
* ``per_label``: each label's AP (IoU 0.50:0.95), None for a label without ground truth.

COCO's defaults otherwise: up to 100 detections per image, all object sizes. A task without
predictions has none (its objects are missed); predictions for a task that is not among the
samples are an error. ``segm`` is None when an image's predictions have no masks (a box-only
model). With no
prediction at all every figure is 0.0; with no ground-truth object every figure is None.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from sam_backend.training.base import Prediction  # what a Detector answers
from sam_backend.training.dataset import Sample

IOU_TYPES = ("bbox", "segm")


def _gt(samples: Sequence[Sample], classes: Sequence[str]) -> dict:
    images, annotations = [], []
    for image_id, sample in enumerate(samples, start=1):
        images.append({"id": image_id, "width": sample.width or 0, "height": sample.height or 0})
        for obj in sample.objects:
            x0, y0, x1, y1 = obj.box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": obj.label + 1, "iscrowd": 0,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": obj.area,
                                "segmentation": dict(obj.rle)})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": c} for i, c in enumerate(classes, start=1)]}


def _detections(samples: Sequence[Sample], predictions: Mapping[Any, Prediction],
                n_classes: int) -> List[dict]:
    from pycocotools import mask as mask_utils

    image_of = {str(s.task_id): i for i, s in enumerate(samples, start=1)}
    unknown = [t for t in predictions if str(t) not in image_of]
    if unknown:
        raise ValueError(f"predictions for tasks that are not among the samples: "
                         f"{', '.join(map(str, unknown[:10]))}")
    out = []
    for task_id, pred in predictions.items():
        boxes = np.asarray(pred.boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(pred.scores, dtype=np.float64).reshape(-1)
        labels = np.asarray(pred.labels).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"task {task_id}: {len(boxes)} boxes, {len(scores)} scores and "
                             f"{len(labels)} labels")
        masks = None
        if pred.masks is not None:
            masks = np.asarray(pred.masks, dtype=bool)
            if masks.ndim != 3 or len(masks) != len(boxes):
                raise ValueError(f"task {task_id}: masks must be (N, H, W) for {len(boxes)} "
                                 f"boxes, got {masks.shape}")
        for k in range(len(boxes)):
            label = int(labels[k])
            if not 0 <= label < n_classes:
                raise ValueError(f"task {task_id}: label index {label} is not one of the "
                                 f"{n_classes} classes")
            x0, y0, x1, y1 = boxes[k]
            det = {"image_id": image_of[str(task_id)], "category_id": label + 1,
                   "score": float(scores[k]),
                   "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]}
            if masks is not None:
                rle = mask_utils.encode(np.asfortranarray(masks[k].astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                det["segmentation"] = rle
            out.append(det)
    return out


def _figure(value: float) -> Optional[float]:
    return None if value < 0 else float(value)


def _run(gt, detections: List[dict], iou_type: str, classes: Sequence[str]) -> dict:
    from pycocotools.cocoeval import COCOeval

    dets = [dict(d) for d in detections]
    if iou_type == "bbox":
        for d in dets:
            d.pop("segmentation", None)  # loadRes would otherwise take the masks' areas
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        result = gt.loadRes(dets)
        coco_eval = COCOeval(gt, result, iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    precision = coco_eval.eval["precision"]  # (IoU, recall, label, area range, max dets)
    iou_thrs = list(np.round(coco_eval.params.iouThrs, 2))

    def ap(p: np.ndarray) -> Optional[float]:
        p = p[p > -1]
        return float(np.mean(p)) if p.size else None

    per_label = {name: ap(precision[:, :, k, 0, -1]) for k, name in enumerate(classes)}
    return {"mAP": _figure(coco_eval.stats[0]), "mAP50": _figure(coco_eval.stats[1]),
            "mAP75": _figure(coco_eval.stats[2]),
            "mAP_at": {f"{t:.2f}": ap(precision[i, :, :, 0, -1]) for i, t in enumerate(iou_thrs)},
            "per_label": per_label}


def _constant(value: Optional[float], classes: Sequence[str], has_gt: Sequence[bool]) -> dict:
    return {"mAP": value, "mAP50": value, "mAP75": value, "mAP_at": {},
            "per_label": {c: (value if g else None) for c, g in zip(classes, has_gt)}}


def evaluate(samples: Sequence[Sample], predictions: Mapping[Any, Prediction],
             classes: Sequence[str]) -> Dict[str, Optional[dict]]:
    """``{"bbox": {...}, "segm": {...} or None, "images": n, "objects": n, "predictions": n}``
    for ``predictions`` (task id -> :class:`Prediction`) on ``samples`` (see the module
    docstring)."""
    from pycocotools.coco import COCO

    classes = list(classes)
    detections = _detections(samples, predictions, len(classes))
    dataset = _gt(samples, classes)
    has_gt = [any(a["category_id"] == k for a in dataset["annotations"])
              for k in range(1, len(classes) + 1)]
    # an image without detections says nothing about masks
    with_masks = all(p.masks is not None for p in predictions.values()
                     if np.asarray(p.boxes).size)
    out: Dict[str, Any] = {"images": len(samples), "objects": len(dataset["annotations"]),
                           "predictions": len(detections)}
    if not dataset["annotations"]:
        for iou_type in IOU_TYPES:
            out[iou_type] = _constant(None, classes, has_gt)
        return out
    if not detections:
        for iou_type in IOU_TYPES:
            out[iou_type] = _constant(0.0, classes, has_gt)
        return out
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
    for iou_type in IOU_TYPES:
        out[iou_type] = (_run(gt, detections, iou_type, classes)
                         if iou_type == "bbox" or with_masks else None)
    return out


__all__ = ["IOU_TYPES", "Prediction", "evaluate"]
