"""report.json and report.png: written, readable, and the chart shows what it says (loss per
epoch, candidate against baseline, held-out images with their objects drawn)."""
from __future__ import annotations

import numpy as np

from sam_backend.training.report import Example, draw_report_png, read_report_json, \
    write_report_json
from tests.support.shapes import LABELS, shapes_image

REPORT = {
    "project": 7, "version": "p7-v2", "kind": "rf_detr", "promoted": True, "metric": "segm",
    "promotion_reason": "candidate 0.612 >= baseline 0.400",
    "candidate": {"segm": {"mAP": np.float64(0.612), "mAP50": 0.9, "mAP75": 0.7}},
    "baseline": {"source": "p7-v1", "segm": {"mAP": 0.4, "mAP50": 0.6, "mAP75": 0.3}},
    "dataset": {"held_out_tasks": 8, "missing_images": {"12": "HTTP 404"}},
    "epochs": [{"epoch": k, "epochs": 3, "loss": 3.0 / k, "parts": {"loss_ce": 1.0 / k},
                "mAP50": 0.3 * k} for k in (1, 2, 3)],
}


def test_report_json_round_trips_numpy_figures(tmp_path):
    write_report_json(tmp_path / "report.json", REPORT)
    back = read_report_json(tmp_path / "report.json")
    assert back["candidate"]["segm"]["mAP"] == 0.612 and back["epochs"][2]["loss"] == 1.0
    assert back["dataset"]["missing_images"] == {"12": "HTTP 404"}


def test_report_png_draws_the_figures_and_the_held_out_images(tmp_path):
    import cv2

    image, objects = shapes_image(3)
    truth = [(LABELS.index(label), mask) for label, mask in objects]
    ys, xs = np.nonzero(truth[0][1])
    # one drawn prediction: the first object's box, label and mask, as a detector answers
    example = Example("task 3", image, np.array([[xs.min(), ys.min(), xs.max(), ys.max()]],
                                                np.float32), np.array([0.9], np.float32),
                      np.array([truth[0][0]]), truth[0][1][None], truth)
    draw_report_png(tmp_path / "with.png", REPORT, [example, example], LABELS)
    draw_report_png(tmp_path / "without.png", {**REPORT, "epochs": []}, [], LABELS)
    with_images = cv2.imread(str(tmp_path / "with.png"))
    without = cv2.imread(str(tmp_path / "without.png"))
    assert with_images is not None and without is not None
    # the held-out images add a row; a chart is far from blank
    assert with_images.shape[0] > without.shape[0] > 200
    assert with_images.std() > 10
