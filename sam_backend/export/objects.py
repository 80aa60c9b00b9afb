"""One object, one annotation: the regions of one Label Studio annotation that describe the same
object become one exported object (pure, deterministic functions; no I/O).

A click answered by this backend leaves several regions for one object: the brush mask, the
polygons traced from it (one per connected part), its tight box, and the annotator's own smart
rectangle prompt. Exported one by one they count the object several times. :func:`group_objects`
groups them back, from their geometry alone (a Label Studio export does not say which regions came
from one click).

**The matching rule**, applied separately to each label of each annotation of an image
(regions with another label, or in another annotation, are never merged):

1. **Masks** (brush regions): every mask is an object of its own. Two masks are never merged, so
   two objects that touch or overlap stay two objects.
2. **Polygons**: a polygon joins the mask that holds the largest share of its pixels, when that
   share is at least ``POLYGON_IN_MASK`` (0.5); the polygons traced from a mask lie inside it.
   The mask's holes count as inside (a polygon is an outer contour: a ring's polygon is a disc).
3. **Rectangles and masks**: a rectangle joins the mask whose bounds it matches best by IoU, when
   that IoU is at least ``BOX_IOU`` (0.5) and the rectangle holds at least ``BOX_HOLDS`` (0.8) of
   the mask's pixels. This takes the mask's tight box (IoU ~1) and a smart rectangle prompt (SAM's
   mask of a box prompt fills the box), but not a rectangle that only touches the object.
4. **Polygons without a mask** (``out_mask=false``): a polygon joins the *smallest* rectangle left
   that holds at least ``POLYGON_IN_BOX`` (0.9) of its pixels; that rectangle and all the polygons
   it took become one object (the parts of a multi-part object share their tight box; the
   smallest rectangle keeps a small object inside a large one apart). A polygon no rectangle
   holds is an object of its own.
5. **Rectangles left** join the polygon object they match by the rule of 3; a rectangle that
   joins nothing is a **box-only object**. Two rectangles are never merged.
6. **Ties** go to the region that comes first in the annotation; objects are listed in the order
   of their first region. Keypoint prompts are not shapes and never reach this module.

What an object exports: its mask when it has one (area = the mask's pixels, bbox = the mask's
bounds); else its polygons (one COCO polygon per part; area = the sum of their areas, bbox = their
union's bounds); else its box.

Pixels: overlaps are counted on the image's pixel grid, each shape rasterised only inside its own
bounding box (so the cost follows the objects' sizes, not the image's).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

import cv2
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["Shape", "ExportObject", "group_objects", "one_object_per_shape", "summarize",
           "POLYGON_IN_MASK", "POLYGON_IN_BOX", "BOX_IOU", "BOX_HOLDS"]

#: a polygon joins a mask holding at least this share of its pixels
POLYGON_IN_MASK = 0.5
#: without a mask, a polygon joins the smallest rectangle holding at least this share of its pixels
POLYGON_IN_BOX = 0.9
#: a rectangle joins an object whose bounds it overlaps with at least this IoU ...
BOX_IOU = 0.5
#: ... and of whose pixels it holds at least this share
BOX_HOLDS = 0.8

KINDS = ("mask", "polygon", "box")


@dataclass(frozen=True)
class Shape:
    """One region (for one of its labels) as COCO geometry.

    ``kind``: ``"mask"``, ``"polygon"`` or ``"box"``. ``fields``: the COCO ``segmentation``
    (compressed RLE dict for a mask; a list of flat ``[x1, y1, x2, y2, ...]`` pixel polygons
    otherwise, a box's being its 4 corners), ``area`` and ``bbox`` (``[x, y, w, h]`` pixels).
    ``ref``: the caller's reference (e.g. the region id), carried through untouched."""

    kind: str
    label: str
    fields: dict
    ref: Any = None


@dataclass
class ExportObject:
    """One object: its label and the shapes (regions) that describe it, in annotation order."""

    label: str
    shapes: List[Shape] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """``"mask"`` if the object has a mask, else ``"polygon"`` if it has polygons, else
        ``"box"``: what its COCO annotation is made of."""
        kinds = {s.kind for s in self.shapes}
        return next(k for k in KINDS if k in kinds)

    @property
    def fields(self) -> dict:
        """The object's COCO ``segmentation``, ``area`` and ``bbox`` (see the module docstring)."""
        kind = self.kind
        chosen = [s for s in self.shapes if s.kind == kind]
        if kind != "polygon" or len(chosen) == 1:
            return dict(chosen[0].fields)
        segmentation = [poly for s in chosen for poly in s.fields["segmentation"]]
        bounds = [_xyxy(s.fields["bbox"]) for s in chosen]
        x0, y0 = min(b[0] for b in bounds), min(b[1] for b in bounds)
        x1, y1 = max(b[2] for b in bounds), max(b[3] for b in bounds)
        return {"segmentation": segmentation,
                "area": float(sum(s.fields["area"] for s in chosen)),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]}


def one_object_per_shape(shapes: Sequence[Shape]) -> List[ExportObject]:
    """Every shape an object of its own (``--keep-all-regions``)."""
    return [ExportObject(s.label, [s]) for s in shapes]


def group_objects(shapes: Sequence[Shape], width: int, height: int) -> List[ExportObject]:
    """Group the shapes of one annotation on a ``width x height`` image into objects by the rule
    of the module docstring. Shapes of different labels are grouped independently; the result is
    in the order of each object's first shape."""
    by_label: Dict[str, List[Tuple[int, Shape]]] = {}
    for index, shape in enumerate(shapes):
        if shape.kind not in KINDS:
            raise ValueError(f"unknown shape kind {shape.kind!r}")
        by_label.setdefault(shape.label, []).append((index, shape))
    grouped: List[Tuple[int, ExportObject]] = []
    for label, members in by_label.items():
        grouped.extend(_group_label(label, members, width, height))
    grouped.sort(key=lambda item: item[0])
    objects = [obj for _, obj in grouped]
    logger.debug("%d shapes -> %d objects", len(shapes), len(objects))
    return objects


# --------------------------------------------------------------------------------------------


@dataclass
class _Raster:
    """A shape's pixels: ``crop`` (h, w) bool covering pixels ``[x0, x0 + w) x [y0, y0 + h)``."""

    x0: int
    y0: int
    crop: np.ndarray

    @property
    def count(self) -> int:
        return int(np.count_nonzero(self.crop))


class _Group:
    """An object being built: its first shape's position, shapes (position, shape), pixels."""

    def __init__(self, index: int, shape: Shape, raster: _Raster):
        self.first = index
        self.members: List[Tuple[int, Shape]] = [(index, shape)]
        self.raster = raster
        self.bbox = _xyxy(shape.fields["bbox"])

    def add(self, index: int, shape: Shape) -> None:
        self.members.append((index, shape))


def _group_label(label: str, members: List[Tuple[int, Shape]], width: int,
                 height: int) -> List[Tuple[int, ExportObject]]:
    rasters = {i: _rasterize(s, width, height) for i, s in members}
    masks = [(i, s) for i, s in members if s.kind == "mask"]
    polygons = [(i, s) for i, s in members if s.kind == "polygon"]
    boxes = [(i, s) for i, s in members if s.kind == "box"]

    # 1. every mask is an object
    groups = [_Group(i, s, rasters[i]) for i, s in masks]
    outlines = [_fill_holes(g.raster) for g in groups]  # a polygon has no holes

    # 2. polygons join the mask holding most of them
    loose: List[Tuple[int, Shape]] = []
    for i, s in polygons:
        own = rasters[i].count
        best, best_share = None, 0.0
        for g, outline in zip(groups, outlines):
            share = _overlap(rasters[i], outline) / own if own else 0.0
            if share > best_share:
                best, best_share = g, share
        if best is not None and best_share >= POLYGON_IN_MASK:
            best.add(i, s)
        else:
            loose.append((i, s))

    # 3. rectangles join the mask they match
    free_boxes = [(j, b) for j, b in boxes if not _join_box(j, b, groups, rasters)]

    # 4. polygons without a mask: grouped by the smallest free rectangle that holds them
    taken: Dict[int, List[Tuple[int, Shape]]] = {}
    for i, s in loose:
        own = rasters[i].count
        best_box, best_area = None, None
        for j, _ in free_boxes:
            if own and _overlap(rasters[i], rasters[j]) / own >= POLYGON_IN_BOX:
                area = rasters[j].count
                if best_area is None or area < best_area:
                    best_box, best_area = j, area
        if best_box is None:
            groups.append(_Group(i, s, rasters[i]))
        else:
            taken.setdefault(best_box, []).append((i, s))
    box_shape = dict(free_boxes)
    for j, polys in taken.items():
        parts = sorted(polys + [(j, box_shape[j])], key=lambda m: m[0])
        g = _Group(parts[0][0], parts[0][1], _union([rasters[i] for i, _ in polys]))
        g.bbox = _bounds([_xyxy(s.fields["bbox"]) for _, s in polys])
        for i, s in parts[1:]:
            g.add(i, s)
        groups.append(g)

    # 5. the other rectangles join the polygon object they match, else stand alone
    polygon_groups = groups[len(masks):]
    for j, b in free_boxes:
        if j not in taken and not _join_box(j, b, polygon_groups, rasters):
            groups.append(_Group(j, b, rasters[j]))

    out = []
    for g in groups:
        ordered = [s for _, s in sorted(g.members, key=lambda m: m[0])]
        out.append((min(i for i, _ in g.members), ExportObject(label, ordered)))
    return out


def _join_box(j: int, box: Shape, groups: Sequence[_Group], rasters: Dict[int, _Raster]) -> bool:
    """Add the rectangle to the group whose bounds it matches best (IoU >= BOX_IOU, holding
    >= BOX_HOLDS of its pixels; ties: the earlier group). False when none matches."""
    rect = _xyxy(box.fields["bbox"])
    best, best_iou = None, 0.0
    for g in sorted(groups, key=lambda g: g.first):
        iou = _iou(rect, g.bbox)
        if iou < BOX_IOU or iou <= best_iou:
            continue
        pixels = g.raster.count
        if pixels and _overlap(rasters[j], g.raster) / pixels >= BOX_HOLDS:
            best, best_iou = g, iou
    if best is None:
        return False
    best.add(j, box)
    return True


def _fill_holes(r: "_Raster") -> "_Raster":
    """The raster with its holes filled (what its outer contours enclose): background pixels not
    4-connected to the crop's border become on."""
    h, w = r.crop.shape
    pad = np.zeros((h + 2, w + 2), dtype=np.uint8)
    pad[1:-1, 1:-1] = r.crop
    cv2.floodFill(pad, None, (0, 0), 2)
    return _Raster(r.x0, r.y0, pad[1:-1, 1:-1] != 2)


def _xyxy(bbox: Sequence[float]) -> Tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in bbox)
    return x, y, x + w, y + h


def _bounds(boxes: Sequence[Tuple[float, float, float, float]]):
    return (min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes))


def _iou(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _rasterize(shape: Shape, width: int, height: int) -> _Raster:
    """The shape's pixels on the ``width x height`` grid, cropped to its bounding box."""
    seg = shape.fields["segmentation"]
    if shape.kind == "mask":
        from pycocotools import mask as mask_utils

        full = mask_utils.decode(seg).astype(bool)  # (H, W)
        x, y, w, h = (int(round(v)) for v in shape.fields["bbox"])
        return _Raster(x, y, full[y:y + h, x:x + w])
    polys = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in seg]
    if shape.kind == "box" and len(polys) == 1 and _axis_aligned(polys[0]):
        # pixel (i, j) is inside when its centre is: [round(x0), round(x1)) x [round(y0), round(y1))
        x0, y0 = np.round(polys[0].min(axis=0)).astype(int)
        x1, y1 = np.round(polys[0].max(axis=0)).astype(int)
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        return _Raster(int(x0), int(y0), np.ones((y1 - y0, x1 - x0), dtype=bool))
    pts = [np.round(p).astype(np.int32) for p in polys]
    allpts = np.concatenate(pts)
    x0, y0 = np.clip(allpts.min(axis=0), 0, [width - 1, height - 1])
    x1, y1 = np.clip(allpts.max(axis=0), 0, [width - 1, height - 1]) + 1
    crop = np.zeros((int(y1 - y0), int(x1 - x0)), dtype=np.uint8)
    cv2.fillPoly(crop, [p - np.array([x0, y0], dtype=np.int32) for p in pts], 1)
    return _Raster(int(x0), int(y0), crop.astype(bool))


def _axis_aligned(corners: np.ndarray) -> bool:
    return (len(corners) == 4 and len(set(np.round(corners[:, 0], 6))) <= 2
            and len(set(np.round(corners[:, 1], 6))) <= 2)


def _overlap(a: _Raster, b: _Raster) -> int:
    """Pixels on in both rasters."""
    ah, aw = a.crop.shape
    bh, bw = b.crop.shape
    x0, y0 = max(a.x0, b.x0), max(a.y0, b.y0)
    x1, y1 = min(a.x0 + aw, b.x0 + bw), min(a.y0 + ah, b.y0 + bh)
    if x1 <= x0 or y1 <= y0:
        return 0
    sa = a.crop[y0 - a.y0:y1 - a.y0, x0 - a.x0:x1 - a.x0]
    sb = b.crop[y0 - b.y0:y1 - b.y0, x0 - b.x0:x1 - b.x0]
    return int(np.count_nonzero(sa & sb))


def _union(rasters: Sequence[_Raster]) -> _Raster:
    x0 = min(r.x0 for r in rasters)
    y0 = min(r.y0 for r in rasters)
    x1 = max(r.x0 + r.crop.shape[1] for r in rasters)
    y1 = max(r.y0 + r.crop.shape[0] for r in rasters)
    crop = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for r in rasters:
        h, w = r.crop.shape
        crop[r.y0 - y0:r.y0 - y0 + h, r.x0 - x0:r.x0 - x0 + w] |= r.crop
    return _Raster(x0, y0, crop)


def summarize(objects: Sequence[ExportObject]) -> Tuple[int, int, int, int]:
    """(regions, objects, regions merged into objects of several regions, such objects)."""
    regions = sum(len(o.shapes) for o in objects)
    several = [o for o in objects if len(o.shapes) > 1]
    return regions, len(objects), sum(len(o.shapes) for o in several), len(several)

