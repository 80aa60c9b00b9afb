"""The training set: annotations only, the latest per task, cancelled tasks out, objects grouped
exactly as the exporters group them, classes from the config, problems counted by task id."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from sam_backend.export.convert import convert
from sam_backend.labelstudio.regions import brush_region, rectangle_region
from sam_backend.training.dataset import (NotEnoughData, build_dataset, classes_from_config,
                                          latest_annotation)
from tests.support.training_data import (CONFIG, H, W, annotation, box_prompt, cat_mask,
                                         dog_mask, object_regions, project, task)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def build(tasks, **kwargs):
    kwargs.setdefault("min_tasks", 1)
    return build_dataset(tasks, CONFIG, **kwargs)


def labels_of(sample, classes):
    return [classes[o.label] for o in sample.objects]


def test_classes_come_from_the_config_in_its_order():
    config = """<View><Image name="img" value="$pic"/>
      <KeyPointLabels name="kp" toName="img" smart="true"><Label value="bird"/></KeyPointLabels>
      <PolygonLabels name="p" toName="img"><Label value="dog"/><Label value="cat"/></PolygonLabels>
      <BrushLabels name="b" toName="img"><Label value="cat"/><Label value="fox"/></BrushLabels>
    </View>"""
    assert classes_from_config(config) == ["dog", "cat", "fox"]  # keypoints are prompts
    assert classes_from_config(CONFIG) == ["cat", "dog"]
    with pytest.raises(ValueError, match="nothing to train"):
        classes_from_config('<View><Image name="i" value="$image"/></View>')


def test_one_sample_per_task_with_the_exporters_objects():
    ts = build(project(4))
    assert ts.classes == ["cat", "dog"]
    assert [s.task_id for s in ts.samples] == [1, 2, 3, 4]
    one = ts.samples[0]  # task 1: a cat and a dog, each brush + polygon + box + keypoint prompt
    assert (one.image, one.width, one.height) == ("/data/upload/1/img1.png", W, H)
    assert labels_of(one, ts.classes) == ["cat", "dog"]
    for obj, mask in zip(one.objects, (cat_mask(), dog_mask())):
        assert obj.kind == "mask"
        assert obj.mask().shape == (H, W) and obj.mask().dtype == bool
        assert np.array_equal(obj.mask(), mask)
        ys, xs = np.nonzero(mask)
        assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert labels_of(ts.samples[1], ts.classes) == ["cat"]
    assert ts.report.objects_per_label == {"cat": 4, "dog": 2}
    assert ts.report.used == [1, 2, 3, 4]


def test_latest_annotation_wins_by_updated_at_then_created_at_then_id():
    cat, dog = object_regions(cat_mask(), "cat"), object_regions(dog_mask(), "dog")
    tasks = [
        # updated later, created earlier: updated_at decides
        task(1, [annotation(10, cat, created_at="2026-11-02T00:00:00Z",
                            updated_at="2026-11-02T00:00:00Z"),
                 annotation(11, dog, created_at="2026-11-01T00:00:00Z",
                            updated_at="2026-11-03T09:00:00.123456Z")]),
        # no updated_at: created_at decides (time zones compared as instants)
        task(2, [annotation(21, cat, created_at="2026-11-01T12:00:00+02:00"),
                 annotation(20, dog, created_at="2026-11-01T11:00:00Z")]),
        # no time at all: the larger id
        task(3, [annotation(31, dog), annotation(30, cat)]),
    ]
    ts = build(tasks)
    assert [labels_of(s, ts.classes) for s in ts.samples] == [["dog"], ["dog"], ["dog"]]
    assert [s.annotation_id for s in ts.samples] == [11, 20, 31]
    assert latest_annotation({"id": 9, "annotations": []}) is None


def test_a_task_whose_latest_annotation_was_cancelled_is_left_out():
    cat = object_regions(cat_mask(), "cat")
    tasks = [
        task(1, [annotation(1, cat, created_at="2026-11-01T00:00:00Z"),
                 annotation(2, [], created_at="2026-11-02T00:00:00Z", cancelled=True)]),
        task(2, [annotation(3, [], created_at="2026-11-01T00:00:00Z", cancelled=True),
                 annotation(4, cat, created_at="2026-11-02T00:00:00Z")]),
    ]
    ts = build(tasks)
    assert [s.task_id for s in ts.samples] == [2]
    assert ts.report.cancelled == [1]


def test_predictions_and_drafts_are_never_learnt_from():
    dog = object_regions(dog_mask(), "dog")
    prediction = {"id": 7, "model_version": "sam", "score": 0.9, "result": dog}
    tasks = [task(1, [], predictions=[prediction]),
             task(2, [annotation(5, object_regions(cat_mask(), "cat"))], predictions=[prediction])]
    tasks[1]["drafts"] = [{"id": 3, "result": dog}]
    ts = build(tasks)
    assert [s.task_id for s in ts.samples] == [2]
    assert labels_of(ts.samples[0], ts.classes) == ["cat"]
    assert ts.report.unlabelled == [1]


def test_grouping_equals_the_exporters_objects():
    """Brush + polygons + tight box + smart prompts, polygon-only and rectangle-only objects,
    touching masks: the same objects as export-coco makes of the same tasks."""
    polys_only = [r for r in object_regions(dog_mask(), "dog") if r["type"] == "polygonlabels"]
    tasks = project(3) + [
        task(4, [annotation(40, polys_only + [rectangle_region((5, 5, 30, 40), "cat",
                                                               "RectangleLabels", "image", W, H)])]),
        task(5, [annotation(50, object_regions(cat_mask(), "cat")
                            + [box_prompt((14, 24, 66, 76), "cat", W, H)]
                            + object_regions(np.roll(cat_mask(), 30, axis=1), "cat"))]),
    ]
    ts = build(tasks)
    coco, _ = convert(copy.deepcopy(tasks), classes=ts.classes)
    by_image = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert len(coco["images"]) == len(ts.samples) == 5
    for image, sample in zip(coco["images"], ts.samples):
        assert image["ls_task_id"] == sample.task_id
        anns = by_image.get(image["id"], [])
        assert len(anns) == len(sample.objects)
        for ann, obj in zip(anns, sample.objects):
            assert ann["category_id"] == obj.label + 1
            x, y, w, h = ann["bbox"]
            assert obj.box == pytest.approx((x, y, x + w, y + h))
            assert obj.area == pytest.approx(ann["area"])
            seg = ann["segmentation"]
            if isinstance(seg, dict):
                expected = mask_utils.decode({"size": seg["size"],
                                              "counts": seg["counts"].encode()})
            else:
                expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, H, W)))
            assert np.array_equal(obj.mask(), expected.astype(bool))
    kinds = {s.task_id: [o.kind for o in s.objects] for s in ts.samples}
    assert kinds[4] == ["polygon", "box"]  # the polygons of one dog; a box-only cat
    assert kinds[5] == ["mask", "mask"]  # the smart rectangle joined the first cat


def test_labels_not_in_the_config_are_skipped_and_counted():
    regions = object_regions(cat_mask(), "cat") + object_regions(dog_mask(), "bird")
    tasks = [task(1, [annotation(1, regions)]),
             task(2, [annotation(2, object_regions(dog_mask(), "bird"))])]
    ts = build(tasks)
    assert [s.task_id for s in ts.samples] == [1]
    assert labels_of(ts.samples[0], ts.classes) == ["cat"]
    assert set(ts.report.unknown_labels) == {"bird"}
    assert set(ts.report.unknown_labels["bird"]) == {1, 2}
    assert "not in the labeling config" in ts.report.skipped_tasks[2]


def test_corrupt_and_empty_masks_are_skipped_and_counted_by_task():
    corrupt = brush_region(dog_mask(), "dog", "BrushLabels", "image")
    corrupt["value"]["rle"] = [0, 1, 2, 3, 4]
    empty = brush_region(dog_mask(), "dog", "BrushLabels", "image")
    empty["value"]["rle"] = brush_region(np.zeros((H, W), bool), "dog", "BrushLabels",
                                         "image")["value"]["rle"]
    tasks = [task(1, [annotation(1, object_regions(cat_mask(), "cat") + [corrupt])]),
             task(2, [annotation(2, [empty])]),
             task(3, [annotation(3, [])]),  # submitted with no region: a negative image
             task(None, [annotation(4, object_regions(cat_mask(), "cat"))])]
    ts = build(tasks)
    assert [s.task_id for s in ts.samples] == [1, 3]
    assert labels_of(ts.samples[0], ts.classes) == ["cat"]
    assert ts.samples[1].objects == [] and ts.samples[1].width is None
    assert set(ts.report.skipped_regions) == {1, 2}
    assert "cannot be read" in ts.report.skipped_regions[1][0]
    assert "empty" in ts.report.skipped_regions[2][0]
    assert set(ts.report.skipped_tasks) == {2, "#3"}  # #3: the fourth task has no id
    report = ts.report.as_dict()
    assert [p["task"] for p in report["skipped_regions"]] == [1, 2]
    assert report["objects"] == 1


def test_too_few_annotated_tasks_is_a_clear_error():
    tasks = project(3) + [task(9, [])]
    tasks[0]["annotations"][0]["was_cancelled"] = True
    with pytest.raises(NotEnoughData) as info:
        build_dataset(tasks, CONFIG, min_tasks=5)
    message = str(info.value)
    assert message.startswith("2 annotated tasks can be trained on, 5 are needed")
    assert "1 without annotation (tasks 9)" in message
    assert "1 skipped or cancelled (tasks 1)" in message
    assert "annotate 3 more" in message
    with pytest.raises(NotEnoughData, match="no object"):
        build([task(1, [annotation(1, [])])])
    assert len(build_dataset(project(10), CONFIG).samples) == 10  # the default minimum, 10
