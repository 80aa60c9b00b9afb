"""sam_backend.labelstudio.regions: mask geometry and Label Studio region dicts."""
import json

import cv2
import numpy as np
import pytest
from label_studio_converter.brush import decode_rle

from sam_backend.labelstudio.regions import (
    brush_region,
    mask_bbox,
    mask_polygons,
    new_region_id,
    polygon_region,
    rectangle_region,
)


def disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


def rasterise(polygon, shape):
    out = np.zeros(shape, np.uint8)
    cv2.fillPoly(out, [np.round(polygon).astype(np.int32)], 1)
    return out.astype(bool)


# ---------------------------------------------------------------- mask_bbox

def nonzero_bounds(mask):
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("seed", range(8))
def test_bbox_equals_nonzero_bounds(seed):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(1, 90, 2))
    mask = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 4))):
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        mask[y:y + int(rng.integers(1, 20)), x:x + int(rng.integers(1, 20))] = True
    bbox = mask_bbox(mask)
    assert bbox == nonzero_bounds(mask)
    assert all(type(v) is int for v in bbox)
    x0, y0, x1, y1 = bbox
    assert mask[y0:y1, x0:x1].sum() == mask.sum()


def test_bbox_edges_and_dtypes():
    mask = np.zeros((5, 7), np.uint8)
    assert mask_bbox(mask) is None
    mask[4, 6] = 255
    assert mask_bbox(mask) == (6, 4, 7, 5)
    mask[0, 0] = 1
    assert mask_bbox(mask) == (0, 0, 7, 5)
    assert mask_bbox(np.ones((1, 1), bool)) == (0, 0, 1, 1)


def test_bbox_rejects_non_2d():
    with pytest.raises(ValueError):
        mask_bbox(np.zeros((2, 2, 2), bool))


# ---------------------------------------------------------------- mask_polygons

def test_disc_polygon_rasterises_back():
    mask = disc(200, 300, 140, 90, 60)
    polys = mask_polygons(mask, min_area=10, tolerance=1.0)
    assert len(polys) == 1
    poly = polys[0]
    assert poly.dtype == np.float64 and poly.ndim == 2 and poly.shape[1] == 2 and len(poly) >= 3
    assert iou(rasterise(poly, mask.shape), mask) >= 0.9
    # simplification keeps far fewer vertices than the traced boundary
    assert len(poly) < len(mask_polygons(mask, min_area=10, tolerance=0)[0])


def test_coordinates_are_x_y_in_image_frame():
    mask = np.zeros((100, 200), bool)
    mask[10:20, 150:190] = True  # wide rectangle in the right half
    (poly,) = mask_polygons(mask, min_area=1, tolerance=0.5)
    assert poly[:, 0].min() == 150 and poly[:, 0].max() == 189
    assert poly[:, 1].min() == 10 and poly[:, 1].max() == 19


def test_two_blobs_two_polygons_largest_first():
    mask = disc(120, 240, 50, 60, 20) | disc(120, 240, 180, 60, 35)
    polys = mask_polygons(mask, min_area=10, tolerance=1.0)
    assert len(polys) == 2
    assert polys[0][:, 0].mean() > 120  # the larger disc (right) first
    for poly, cx in zip(polys, (180, 50)):
        assert abs(poly[:, 0].mean() - cx) < 3
        assert iou(rasterise(poly, mask.shape), disc(120, 240, cx, 60, 35 if cx == 180 else 20)) >= 0.9


def test_small_blob_dropped():
    mask = disc(100, 100, 30, 30, 20)
    mask[80:83, 80:83] = True  # 9 pixels, contour area 4
    polys = mask_polygons(mask, min_area=50, tolerance=1.0)
    assert len(polys) == 1
    assert polys[0][:, 0].max() < 60
    assert len(mask_polygons(mask, min_area=0, tolerance=1.0)) == 2


def test_degenerate_components_dropped_and_empty_mask():
    assert mask_polygons(np.zeros((10, 10), bool), min_area=0, tolerance=1.0) == []
    mask = np.zeros((20, 20), bool)
    mask[5, 5] = True  # single pixel
    mask[10, 2:15] = True  # one-pixel-wide line
    assert mask_polygons(mask, min_area=0, tolerance=1.0) == []


def test_blob_touching_image_border():
    mask = np.zeros((50, 60), np.uint8)
    mask[:, :25] = 255
    (poly,) = mask_polygons(mask, min_area=1, tolerance=1.0)
    assert set(map(tuple, poly.astype(int).tolist())) == {(0, 0), (24, 0), (24, 49), (0, 49)}


def test_same_as_full_frame_contours():
    rng = np.random.default_rng(3)
    mask = np.zeros((300, 400), np.uint8)
    for _ in range(6):
        cv2.circle(mask, (int(rng.integers(40, 360)), int(rng.integers(40, 260))), int(rng.integers(5, 40)), 1, -1)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    expected = sorted((c.reshape(-1, 2).tolist() for c in contours if len(c) >= 3), key=len)
    got = sorted((p.astype(int).tolist() for p in mask_polygons(mask, min_area=0, tolerance=0)), key=len)
    assert got == expected


# ---------------------------------------------------------------- region dicts

COMMON = {"id", "from_name", "to_name", "type", "original_width", "original_height", "image_rotation", "value"}


def test_brush_region():
    mask = disc(60, 80, 30, 20, 10)
    region = brush_region(mask, "cat", "tag", "image", image_rotation=90, score=np.float32(0.75))
    assert set(region) == COMMON | {"score"}
    assert region["type"] == "brushlabels"
    assert region["from_name"] == "tag" and region["to_name"] == "image"
    assert region["original_width"] == 80 and region["original_height"] == 60
    assert region["image_rotation"] == 90
    assert type(region["score"]) is float and region["score"] == pytest.approx(0.75)
    value = region["value"]
    assert value["format"] == "rle" and value["brushlabels"] == ["cat"]
    alpha = decode_rle(value["rle"]).reshape(60, 80, 4)[:, :, 3]
    assert np.array_equal(alpha != 0, mask)
    json.dumps(region)


def test_polygon_region_percent():
    pts = np.array([[0, 0], [200, 0], [200, 50], [50, 100]], dtype=np.int32)
    region = polygon_region(pts, "dog", "poly", "image", width=400, height=200)
    assert set(region) == COMMON
    assert region["type"] == "polygonlabels"
    assert region["original_width"] == 400 and region["original_height"] == 200
    assert region["value"] == {
        "points": [[0.0, 0.0], [50.0, 0.0], [50.0, 25.0], [12.5, 50.0]],
        "polygonlabels": ["dog"],
        "closed": True,
    }
    assert all(type(v) is float for p in region["value"]["points"] for v in p)
    json.dumps(region)


def test_polygon_region_rejects_bad_points():
    with pytest.raises(ValueError):
        polygon_region(np.zeros((2, 2)), "dog", "poly", "image", 10, 10)
    with pytest.raises(ValueError):
        polygon_region(np.zeros((4, 3)), "dog", "poly", "image", 10, 10)
    with pytest.raises(ValueError):
        polygon_region(np.zeros((4, 2)), "dog", "poly", "image", 0, 10)


def test_rectangle_region_percent():
    bbox = (np.int64(40), np.int64(30), np.int64(100), np.int64(90))
    region = rectangle_region(bbox, "cat", "rect", "image", width=200, height=120, score=0.5)
    assert set(region) == COMMON | {"score"}
    assert region["type"] == "rectanglelabels"
    assert region["value"] == {
        "x": 20.0, "y": 25.0, "width": 30.0, "height": 50.0, "rotation": 0, "rectanglelabels": ["cat"],
    }
    assert all(type(region["value"][k]) is float for k in ("x", "y", "width", "height"))
    json.dumps(region)


def test_rectangle_region_from_mask_bbox_covers_pixels():
    mask = np.zeros((100, 100), bool)
    mask[90:, 90:] = True
    region = rectangle_region(mask_bbox(mask), "cat", "rect", "image", 100, 100)
    v = region["value"]
    assert v["x"] + v["width"] == pytest.approx(100.0)
    assert v["y"] + v["height"] == pytest.approx(100.0)


def test_no_numpy_types_anywhere():
    mask = disc(50, 70, 30, 25, 12)
    regions = [
        brush_region(mask, "a", "b", "image", image_rotation=np.int64(180), score=np.float64(0.1)),
        polygon_region(mask_polygons(mask, 1, 1.0)[0], "a", "p", "image", np.int64(70), np.int64(50),
                       score=np.float32(0.2)),
        rectangle_region(mask_bbox(mask), "a", "r", "image", 70, 50, image_rotation=np.int32(270)),
    ]
    text = json.dumps({"results": [{"result": regions, "score": 0.9}]})
    assert json.loads(text)["results"][0]["result"][1]["original_width"] == 70

    def walk(obj):
        if isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)
        else:
            assert type(obj) in (str, int, float, bool), (type(obj), obj)

    walk(regions)


def test_unique_ids():
    mask = np.ones((4, 4), bool)
    ids = {brush_region(mask, "a", "b", "c")["id"] for _ in range(200)}
    ids |= {rectangle_region((0, 0, 1, 1), "a", "b", "c", 4, 4)["id"] for _ in range(200)}
    ids |= {new_region_id() for _ in range(1000)}
    assert len(ids) == 1400
    assert all(isinstance(i, str) and len(i) == 10 for i in ids)
