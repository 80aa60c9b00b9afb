"""COCO mAP of predictions on held-out samples, with answers known in advance."""
from __future__ import annotations

import numpy as np
import pytest

from sam_backend.labelstudio.regions import rectangle_region
from sam_backend.training.dataset import build_dataset
from sam_backend.training.evaluate import Prediction, evaluate
from tests.support.training_data import CONFIG, H, W, annotation, project, task

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def samples_and_classes(tasks):
    ts = build_dataset(tasks, CONFIG, min_tasks=1)
    return ts.samples, ts.classes


def perfect(samples, label_shift=0):
    return {s.task_id: Prediction(boxes=[o.box for o in s.objects],
                                  scores=[0.9] * len(s.objects),
                                  labels=[(o.label + label_shift) % 2 for o in s.objects],
                                  masks=np.stack([o.mask() for o in s.objects]))
            for s in samples}


def test_perfect_predictions_score_one():
    samples, classes = samples_and_classes(project(4))
    result = evaluate(samples, perfect(samples), classes)
    for iou_type in ("bbox", "segm"):
        assert result[iou_type]["mAP"] == pytest.approx(1.0)
        assert result[iou_type]["mAP50"] == pytest.approx(1.0)
        assert result[iou_type]["per_label"] == {"cat": pytest.approx(1.0),
                                                 "dog": pytest.approx(1.0)}
    assert (result["images"], result["objects"], result["predictions"]) == (4, 6, 6)


def test_no_predictions_score_zero():
    samples, classes = samples_and_classes(project(3))
    for predictions in ({}, {s.task_id: Prediction([], [], []) for s in samples}):
        result = evaluate(samples, predictions, classes)
        assert result["bbox"]["mAP"] == result["segm"]["mAP50"] == 0.0


def test_a_wrong_label_scores_zero():
    samples, classes = samples_and_classes(project(4))
    result = evaluate(samples, perfect(samples, label_shift=1), classes)
    assert result["bbox"]["mAP"] == result["segm"]["mAP50"] == 0.0


def test_a_shifted_box_counts_at_iou_050_but_not_075():
    """A 100x80 box predicted 20 px to the right: IoU 80/120 = 0.67."""
    box = rectangle_region((20, 10, 120, 90), "dog", "RectangleLabels", "image", W, H)
    samples, classes = samples_and_classes([task(1, [annotation(1, [box])])])
    assert samples[0].objects[0].box == pytest.approx((20, 10, 120, 90))
    shifted = np.zeros((1, H, W), bool)
    shifted[0, 10:90, 40:140] = True
    result = evaluate(samples, {1: Prediction([(40, 10, 140, 90)], [0.8], [1], shifted)}, classes)
    for iou_type in ("bbox", "segm"):
        figures = result[iou_type]
        assert figures["mAP50"] == pytest.approx(1.0)
        assert figures["mAP75"] == 0.0
        assert figures["mAP"] == pytest.approx(0.4)  # counted at IoU 0.50, 0.55, 0.60, 0.65
        assert figures["per_label"] == {"cat": None, "dog": pytest.approx(0.4)}  # no cat


def test_box_only_predictions_have_no_segm_and_bad_input_is_refused():
    samples, classes = samples_and_classes(project(2))
    boxes_only = {s.task_id: Prediction([o.box for o in s.objects], [1.0] * len(s.objects),
                                        [o.label for o in s.objects]) for s in samples}
    with_masks = perfect(samples)
    with_masks[samples[0].task_id] = Prediction([], [], [])  # no detection, no masks: still segm
    # task 1's cat and dog missed: cat AP ~0.5 (half its objects found), dog AP 0
    segm = evaluate(samples, with_masks, classes)["segm"]
    assert segm["per_label"]["cat"] == pytest.approx(0.5, abs=0.01)
    assert segm["per_label"]["dog"] == 0.0
    assert segm["mAP50"] == pytest.approx(0.25, abs=0.01)
    result = evaluate(samples, boxes_only, classes)
    assert result["bbox"]["mAP"] == pytest.approx(1.0) and result["segm"] is None
    with pytest.raises(ValueError, match="not among the samples"):
        evaluate(samples, {99: Prediction([], [], [])}, classes)
    with pytest.raises(ValueError, match="label index 2"):
        evaluate(samples, {1: Prediction([(0, 0, 5, 5)], [1.0], [2])}, classes)
