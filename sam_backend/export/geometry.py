"""One Label Studio region -> COCO geometry: ``segmentation``, ``area`` and ``bbox`` in pixels
(pure functions, no I/O). A region with several labels counts once per label (see
:mod:`.convert`); ``iscrowd`` is always 0.

* ``brushlabels`` (``value.format == "rle"``): decoded with
  :func:`sam_backend.labelstudio.rle.rle_to_mask` at the region's ``original_height x
  original_width``, written as compressed COCO RLE (``pycocotools.mask.encode``, ``counts`` as a
  str); ``area`` is the mask's pixel count and ``bbox`` its tight box (``pycocotools.mask.area`` /
  ``toBbox``). Holes, several parts and one-pixel-thin parts come through exactly.
* ``polygonlabels``: percent points -> pixels, flattened ``[x1, y1, x2, y2, ...]`` as one COCO
  polygon; ``area`` is the polygon's geometric (shoelace) area, as in the COCO dataset itself;
  ``bbox`` the polygon's bounds.
* ``rectanglelabels``: ``bbox`` is the box (for a rotated rectangle, the bounds of its rotated
  corners; Label Studio rotates around the top-left corner), ``area`` the rectangle's area
  (``w * h``), and ``segmentation`` the rectangle as a 4-point polygon, so that tools which need a
  segmentation on every annotation (COCOeval 'segm', Mask R-CNN loaders) still work. An
  instance-segmentation model then learns box-shaped masks for those objects.
* Points are clipped to the image. ``keypointlabels`` (the smart-tool prompts of this backend)
  and non-spatial results (choices, text, ratings, relations, ...) are :data:`IGNORED_TYPES`.

Image sizes come from the regions' ``original_width``/``original_height`` (the size after EXIF
orientation, as browsers show the image).
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import numpy as np

from sam_backend.labelstudio.rle import rle_to_mask

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


class RegionError(Exception):
    """A region (or a task's data) that cannot be exported; the message says why."""


def image_size(region: dict) -> Tuple[int, int]:
    """(width, height) from a region's ``original_width``/``original_height``."""
    size = []
    for key in ("original_width", "original_height"):
        value = region.get(key)
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or value != int(value) or value <= 0):
            if value is None:
                raise RegionError("has no original_width/original_height (the image size)")
            raise RegionError(f"has an invalid {key} {value!r}")
        size.append(int(value))
    return size[0], size[1]


def task_image_size(region: dict, size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """The region's (width, height), which must equal ``size``, the size the task's other
    regions gave (None for its first region); raises RegionError otherwise."""
    region_size = image_size(region)
    if size is not None and region_size != size:
        raise RegionError(f"image size {region_size[0]}x{region_size[1]} differs from the task's "
                          f"other regions ({size[0]}x{size[1]})")
    return region_size


def region_labels(region: dict, rtype: str) -> List[str]:
    """The region's labels, unique, in order; raises RegionError when it has none."""
    value = region.get("value") or {}
    labels = value.get(rtype) if rtype.endswith("labels") else None
    if labels is None:
        labels = value.get("labels")
    if isinstance(labels, str):
        labels = [labels]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise RegionError(f"{rtype} region has no label")
    return list(dict.fromkeys(labels))


def _mask_annotation(value: dict, width: int, height: int) -> dict:
    from pycocotools import mask as mask_utils

    fmt = value.get("format", "rle")
    if fmt != "rle":
        raise RegionError(f"brush region has format {fmt!r}; only 'rle' is supported")
    rle = value.get("rle")
    if not isinstance(rle, (list, tuple)) or not rle:
        raise RegionError("brush region has no 'rle' list")
    try:
        mask = rle_to_mask(rle, height, width)
    except (ValueError, TypeError) as exc:
        raise RegionError(f"brush RLE cannot be read: {exc}") from None
    coco_rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    area = int(mask_utils.area(coco_rle))
    if area == 0:
        raise RegionError("brush mask is empty (no pixel set)")
    coco_rle["counts"] = coco_rle["counts"].decode("ascii")
    bbox = [float(v) for v in mask_utils.toBbox(coco_rle)]
    return {"segmentation": coco_rle, "area": area, "bbox": bbox}


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegionError(f"{what} is not a finite number: {value!r}")
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
        raise RegionError("polygon is open (a polyline), not an area")
    raw = value.get("points")
    if not isinstance(raw, list) or len(raw) < 3:
        raise RegionError(f"polygon needs at least 3 points, has "
                          f"{len(raw) if isinstance(raw, list) else 'none'}")
    pts = []
    for i, p in enumerate(raw):
        if not isinstance(p, (list, tuple)) or len(p) < 2:
            raise RegionError(f"polygon point {i} is not [x, y]: {p!r}")
        pts.append((_number(p[0], f"polygon point {i} x") * width / 100.0,
                    _number(p[1], f"polygon point {i} y") * height / 100.0))
    points = _clip(np.asarray(pts, dtype=np.float64), width, height)
    area = _shoelace(points)
    if area <= 0:
        raise RegionError("polygon has no area (degenerate, or outside the image)")
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
        raise RegionError("rectangle has no area (zero size, or outside the image)")
    return _polygon_fields(corners, area)


def convert_region(region: dict, width: int, height: int) -> Tuple[str, dict]:
    """As :func:`region_to_annotation`, raising :class:`RegionError`."""
    rtype = region.get("type")
    value = region.get("value")
    if not isinstance(value, dict):
        raise RegionError(f"{rtype} region has no 'value'")
    if rtype in MASK_TYPES:
        return "mask", _mask_annotation(value, width, height)
    if rtype in POLYGON_TYPES:
        return "polygon", _polygon_annotation(value, width, height)
    if rtype in BOX_TYPES:
        return "box", _box_annotation(value, width, height)
    raise RegionError(f"unsupported region type {rtype!r}")


def region_to_annotation(region: dict, width: int, height: int) -> Tuple[str, dict]:
    """(kind, COCO fields) of one Label Studio region: kind is "mask", "polygon" or "box"; the
    fields are ``segmentation``, ``area`` and ``bbox`` ([x, y, w, h] pixels) for an image of
    ``width x height`` pixels. Raises ``ValueError`` when the region cannot be exported."""
    try:
        return convert_region(region, width, height)
    except RegionError as exc:
        raise ValueError(str(exc)) from None


__all__ = ["BOX_TYPES", "IGNORED_TYPES", "MASK_TYPES", "POLYGON_TYPES", "RegionError",
           "SUPPORTED_TYPES", "convert_region", "image_size", "region_labels",
           "region_to_annotation"]
