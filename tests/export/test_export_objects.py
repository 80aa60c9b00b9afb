"""One object, one annotation: the regions the backend returns for one object (brush, polygons,
tight box) and the annotator's prompts export as one COCO annotation."""
from __future__ import annotations

import contextlib
import io
import json
import random

import numpy as np
import pytest
from pycocotools.coco import COCO

from tests.support.export_data import (answer, block, box_prompt, disc, keypoint_prompt, rectangle_region,
                         write_export)
from sam_backend import cli
from sam_backend.export.convert import convert
from sam_backend.export.objects import Shape, group_objects

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

W, H = 160, 100
CAT = disc(H, W, 40, 50, 22)  # a disc
DOG = block(H, W, 90, 20, 130, 80)  # a block, away from the disc


def two_objects():
    """The issue's case: brush + polygon + tight box for each of two objects, a smart keypoint
    prompt (first object) and a smart rectangle prompt (second object)."""
    return (answer(CAT, "cat") + [keypoint_prompt(25, 50, "cat", W, H)]
            + answer(DOG, "cat") + [box_prompt((86, 16, 134, 84), "cat", W, H)])


def task(regions, task_id=1):
    return {"id": task_id, "data": {"image": "x.png"}, "annotations": [{"id": 1,
                                                                       "result": regions}]}


def coco_of(regions, **kwargs):
    coco, report = convert([task(regions)], **kwargs)
    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO()
        api.dataset = coco
        api.createIndex()
    return api, report


def bbox_of(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1)]


def test_two_objects_export_as_two_annotations_with_their_masks():
    regions = two_objects()
    assert sum(r["type"] != "keypointlabels" for r in regions) == 7
    api, report = coco_of(regions)
    anns = api.loadAnns(api.getAnnIds())
    assert len(anns) == 2
    for ann, mask in zip(anns, (CAT, DOG)):
        assert isinstance(ann["segmentation"]["counts"], str)  # the mask, as compressed RLE
        assert np.array_equal(api.annToMask(ann).astype(bool), mask)
        assert ann["area"] == int(mask.sum())
        assert ann["bbox"] == bbox_of(mask)
    assert report.annotations == {"mask": 2}
    assert (report.regions, report.objects, report.merged_regions) == (7, 2, 7)
    assert "7 regions -> 2 objects" in report.summary()
    assert report.ignored_results == {"keypointlabels": 1}  # the keypoint prompt is no object


def test_keep_all_regions_gives_one_annotation_per_region(tmp_path, monkeypatch):
    export = write_export(tmp_path, monkeypatch, {1: two_objects()}, {1: (W, H)})
    counts = {}
    for flag in ([], ["--keep-all-regions"]):
        out = tmp_path / ("all" if flag else "objects")
        assert cli.main(["export-coco", "--json_file_path", str(export), "--out_dir", str(out),
                         *flag]) == 0
        coco = json.loads((out / "annotations" / "ann.json").read_text())
        counts[bool(flag)] = len(coco["annotations"])
    assert counts == {False: 2, True: 7}


@pytest.mark.parametrize("gap", [0, -6])  # touching, overlapping by 6 pixels
def test_touching_or_overlapping_masks_of_one_label_stay_two(gap):
    left = block(H, W, 20, 20, 60, 80)
    right = block(H, W, 60 + gap, 30, 100, 70)
    api, report = coco_of(answer(left, "cat") + answer(right, "cat"))
    anns = api.loadAnns(api.getAnnIds())
    assert len(anns) == 2
    assert [a["area"] for a in anns] == [int(left.sum()), int(right.sum())]
    assert report.objects == 2


def test_lone_rectangle_is_one_box_only_object():
    api, report = coco_of([rectangle_region((10, 10, 50, 40), "car", "RectangleLabels", "image",
                                            W, H)])
    (ann,) = api.loadAnns(api.getAnnIds())
    assert ann["bbox"] == [10.0, 10.0, 40.0, 30.0]
    assert report.annotations == {"box": 1}


def test_rectangle_that_only_touches_a_mask_stays_its_own_object():
    touching = box_prompt((55, 20, 120, 80), "cat", W, H)  # overlaps the disc's right edge
    api, report = coco_of(answer(CAT, "cat", polygons=False, box=False) + [touching])
    assert report.annotations == {"mask": 1, "box": 1}


def test_other_label_is_never_merged():
    api, report = coco_of(answer(CAT, "cat") + answer(CAT, "dog"))
    assert report.objects == 2
    assert sorted(api.cats[a["category_id"]]["name"] for a in api.loadAnns(api.getAnnIds())) == \
        ["cat", "dog"]


def test_polygons_without_a_mask_are_grouped_by_their_tight_box():
    # out_mask=false: a two-part object (two polygons + one tight box), and a small object of
    # the same label inside the first one's box with its own tight box
    two_parts = block(H, W, 10, 10, 40, 40) | block(H, W, 60, 50, 90, 90)
    small = block(H, W, 45, 15, 55, 25)
    regions = answer(two_parts, "cat", brush=False) + answer(small, "cat", brush=False)
    assert len(regions) == 5
    api, report = coco_of(regions)
    anns = api.loadAnns(api.getAnnIds())
    assert [len(a["segmentation"]) for a in anns] == [2, 1]  # polygons: 2 parts, 1 part
    assert anns[0]["bbox"] == pytest.approx([10, 10, 79, 79])  # the traced outline's bounds
    assert report.annotations == {"polygon": 2}


def test_grouping_does_not_depend_on_region_order():
    regions = two_objects() + answer(block(H, W, 140, 5, 158, 15), "cat", polygons=False)
    api, _ = coco_of(regions)
    want = sorted((a["area"], tuple(a["bbox"])) for a in api.loadAnns(api.getAnnIds()))
    for seed in range(5):
        shuffled = list(regions)
        random.Random(seed).shuffle(shuffled)
        api, _ = coco_of(shuffled)
        assert sorted((a["area"], tuple(a["bbox"])) for a in api.loadAnns(api.getAnnIds())) == want


def test_group_objects_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="unknown shape kind"):
        group_objects([Shape("ellipse", "cat", {})], W, H)


def test_a_ring_and_its_hole_less_polygon_are_one_object():
    # a thin ring: its traced polygon (a disc) is mostly the ring's hole
    ring = disc(H, W, 50, 50, 30) & ~disc(H, W, 50, 50, 24)
    regions = answer(ring, "cat")
    assert [r["type"] for r in regions] == ["brushlabels", "polygonlabels", "rectanglelabels"]
    api, report = coco_of(regions)
    (ann,) = api.loadAnns(api.getAnnIds())
    assert np.array_equal(api.annToMask(ann).astype(bool), ring)
    assert report.merged_regions == 3
