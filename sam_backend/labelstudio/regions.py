"""Label Studio layer: masks -> result regions (pure functions on numpy arrays).

Coordinate frames:

* A mask is an (H, W) array in the image's natural frame (after EXIF orientation, before any
  viewer rotation): row index = y, column index = x, pixel (x, y) covers [x, x+1) x [y, y+1).
* Pixel coordinates returned here are in that frame. Bounding boxes are (x0, y0, x1, y1) with x1,
  y1 exclusive, i.e. the edges of the covered pixels. Polygon vertices are the centres-as-integers
  of boundary pixels as OpenCV traces them (x, y in [0, W-1] x [0, H-1]).
* Label Studio wants percent of the natural size: ``x% = x / W * 100``, ``y% = y / H * 100``.
  ``image_rotation`` is only echoed: region coordinates stay in the unrotated frame.

The region dicts follow Label Studio's /predict response format: every region has a unique
string ``id``, ``from_name``, ``to_name``, ``type``, ``original_width``, ``original_height``,
``image_rotation``, ``value``, and ``score`` when given. All numbers are plain Python ints/floats.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from sam_backend.labelstudio.rle import mask_to_rle

logger = logging.getLogger(__name__)

__all__ = [
    "mask_bbox",
    "mask_polygons",
    "brush_region",
    "polygon_region",
    "rectangle_region",
    "new_region_id",
]

BBox = Tuple[int, int, int, int]


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D (height, width) array, got shape {mask.shape}")
    return mask


def mask_bbox(mask: np.ndarray) -> Optional[BBox]:
    """Tight pixel bounds of the mask's on pixels.

    ``mask``: (H, W) array, bool or numeric (on = non-zero), image frame.
    Returns ``(x0, y0, x1, y1)`` as Python ints, inclusive-exclusive (``mask[y0:y1, x0:x1]`` holds
    every on pixel), or None when no pixel is on.
    """
    mask = _check_mask(mask)
    rows = np.flatnonzero(np.any(mask, axis=1))
    if rows.size == 0:
        return None
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(np.any(mask[y0:y1], axis=0))  # only the rows that have on pixels
    return int(cols[0]), y0, int(cols[-1]) + 1, y1


def mask_polygons(mask: np.ndarray, min_area: float = 0.0, tolerance: float = 1.0) -> List[np.ndarray]:
    """Outer contours of the mask's connected components, as simplified polygons.

    ``mask``: (H, W) array, bool or numeric (on = non-zero), image frame.
    ``min_area``: components whose outer contour encloses less than this many square pixels
    (``cv2.contourArea`` of the unsimplified contour, holes included) are dropped.
    ``tolerance``: ``cv2.approxPolyDP`` epsilon in pixels (<= 0: no simplification).

    One polygon per 8-connected component (``cv2.findContours`` with ``RETR_EXTERNAL`` and
    ``CHAIN_APPROX_SIMPLE``; holes are not represented). Each polygon is a (K, 2) float64 array of
    (x, y) pixel coordinates, K >= 3; components that cannot make a polygon (a single pixel, a
    one-pixel-wide line) are dropped. Sorted by area, largest first.

    Only the bounding-box crop of the mask (plus a one-pixel zero border) is traced, so the cost
    follows the object's size, not the image's.
    """
    mask = _check_mask(mask)
    bbox = mask_bbox(mask)
    if bbox is None:
        return []
    x0, y0, x1, y1 = bbox
    crop = np.zeros((y1 - y0 + 2, x1 - x0 + 2), dtype=np.uint8)
    np.not_equal(mask[y0:y1, x0:x1], 0, out=crop[1:-1, 1:-1].view(bool))
    contours, _ = cv2.findContours(
        crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x0 - 1, y0 - 1)
    )
    found = []
    for contour in contours:
        area = float(cv2.contourArea(contour))
        if area < min_area:
            continue
        poly = contour
        if tolerance > 0:
            poly = cv2.approxPolyDP(contour, float(tolerance), True)
            if len(poly) < 3:
                poly = contour  # simplification collapsed it: keep the traced outline
        if len(poly) < 3:
            continue
        found.append((area, poly.reshape(-1, 2).astype(np.float64)))
    found.sort(key=lambda item: item[0], reverse=True)
    logger.debug(
        "mask_polygons: %d contours, %d kept (min_area=%s, tolerance=%s)",
        len(contours), len(found), min_area, tolerance,
    )
    return [poly for _, poly in found]


def new_region_id() -> str:
    """A fresh region id: 10 hex characters, like Label Studio's own ids in length."""
    return uuid.uuid4().hex[:10]


def _check_size(width: int, height: int) -> Tuple[int, int]:
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return width, height


def _region(
    region_type: str,
    value: Dict[str, Any],
    from_name: str,
    to_name: str,
    width: int,
    height: int,
    image_rotation: float,
    score: Optional[float],
) -> Dict[str, Any]:
    region: Dict[str, Any] = {
        "id": new_region_id(),
        "from_name": from_name,
        "to_name": to_name,
        "type": region_type,
        "original_width": width,
        "original_height": height,
        "image_rotation": image_rotation,
        "value": value,
    }
    if score is not None:
        region["score"] = float(score)
    return region


def _rotation(image_rotation: float) -> float:
    # keep ints as ints (Label Studio sends 0/90/180/270), but never numpy scalars
    rot = float(image_rotation)
    return int(rot) if rot.is_integer() else rot


def brush_region(mask: np.ndarray, label: str, from_name: str, to_name: str,
                 image_rotation: float = 0, score: Optional[float] = None) -> Dict[str, Any]:
    """A ``brushlabels`` region for ``mask``.

    ``mask``: (H, W) array (on = non-zero) of the image's natural size; ``original_width`` /
    ``original_height`` are taken from its shape. ``value = {"format": "rle", "rle": [...],
    "brushlabels": [label]}`` with the Label Studio brush RLE (:func:`sam_backend.labelstudio.rle.mask_to_rle`).
    """
    mask = _check_mask(mask)
    width, height = _check_size(mask.shape[1], mask.shape[0])
    value = {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}
    return _region(
        "brushlabels", value, from_name, to_name, width, height, _rotation(image_rotation), score
    )


def polygon_region(points_px: np.ndarray, label: str, from_name: str, to_name: str,
                   width: int, height: int, image_rotation: float = 0,
                   score: Optional[float] = None) -> Dict[str, Any]:
    """A closed ``polygonlabels`` region.

    ``points_px``: (K, 2) array-like of (x, y) pixel coordinates in the natural image frame, K >= 3
    (e.g. one polygon of :func:`mask_polygons`). ``width``, ``height``: the image's natural size.
    ``value = {"points": [[x%, y%], ...], "polygonlabels": [label], "closed": True}``.
    """
    width, height = _check_size(width, height)
    pts = np.asarray(points_px, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 3:
        raise ValueError(f"polygon needs a (K, 2) array of points with K >= 3, got shape {pts.shape}")
    pct = pts * (100.0 / np.array([width, height], dtype=np.float64))
    value = {"points": pct.tolist(), "polygonlabels": [label], "closed": True}
    return _region(
        "polygonlabels", value, from_name, to_name, width, height, _rotation(image_rotation), score
    )


def rectangle_region(bbox_px: Sequence[float], label: str, from_name: str, to_name: str,
                     width: int, height: int, image_rotation: float = 0,
                     score: Optional[float] = None) -> Dict[str, Any]:
    """An axis-aligned ``rectanglelabels`` region.

    ``bbox_px``: (x0, y0, x1, y1) in pixels of the natural image frame, x1/y1 exclusive (as from
    :func:`mask_bbox`). ``width``, ``height``: the image's natural size.
    ``value = {"x", "y", "width", "height", "rotation": 0, "rectanglelabels": [label]}``, percent,
    ``x``/``y`` the top-left corner.
    """
    width, height = _check_size(width, height)
    if len(bbox_px) != 4:
        raise ValueError(f"bbox must be (x0, y0, x1, y1), got {bbox_px!r}")
    x0, y0, x1, y1 = (float(v) for v in bbox_px)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"bbox must have x1 >= x0 and y1 >= y0, got {bbox_px!r}")
    value = {
        "x": x0 / width * 100.0,
        "y": y0 / height * 100.0,
        "width": (x1 - x0) / width * 100.0,
        "height": (y1 - y0) / height * 100.0,
        "rotation": 0,
        "rectanglelabels": [label],
    }
    return _region(
        "rectanglelabels", value, from_name, to_name, width, height, _rotation(image_rotation), score
    )
