"""export-yolo read back (Ultralytics is not installed: see the README) and the MMDetection config
of export-coco loaded with mmengine."""
from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
import yaml

from tests.support.export_data import answer, block, disc, keypoint_prompt, rectangle_region, write_export
from sam_backend import cli
from sam_backend.export.yolo import join_parts

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

W, H = 200, 120
DISC = disc(H, W, 50, 60, 30)
RING = disc(H, W, 140, 50, 28) & ~disc(H, W, 140, 50, 10)  # a hole: lost in YOLO polygons
PARTS = block(H, W, 20, 5, 60, 25) | block(H, W, 120, 90, 180, 115)  # two parts, one object
LONE_BOX = (150, 2, 195, 20)


def regions_task1():
    return (answer(DISC, "cat") + [keypoint_prompt(50, 50, "cat", W, H)]
            + answer(RING, "dog", polygons=False)
            + [rectangle_region(LONE_BOX, "car", "RectangleLabels", "image", W, H)])


def regions_task2():
    return answer(PARTS, "cat")


@pytest.fixture
def export(tmp_path, monkeypatch):
    tasks = {1: regions_task1(), 2: regions_task2(), 3: answer(disc(H, W, 100, 60, 20), "dog"),
             4: answer(disc(H, W, 30, 30, 15), "cat")}
    return write_export(tmp_path, monkeypatch, tasks, {k: (W, H) for k in tasks})


def read_labels(path):
    """[(class, (K, 2) pixel polygon)] of a YOLO label file."""
    out = []
    for line in path.read_text().splitlines():
        values = line.split()
        xy = np.array(values[1:], dtype=np.float64).reshape(-1, 2) * [W, H]
        out.append((int(values[0]), xy))
    return out


def shoelace(p):
    x, y = p[:, 0], p[:, 1]
    return abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2


def raster(p):
    img = np.zeros((H, W), np.uint8)
    cv2.fillPoly(img, [np.round(p).astype(np.int32)], 1)
    return img.astype(bool)


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


# Tolerance: a polygon traced through the boundary pixels' centres (and simplified by 1 px) has a
# shoelace area smaller than the mask's pixel count by about half its perimeter: within 8% for
# these objects (>= 2000 pixels); its raster (boundary pixels included) has IoU >= 0.95 with the
# mask. A hole (the ring) is not representable in YOLO polygons: compared with the filled ring.
AREA_TOLERANCE = 0.08
IOU_MIN = 0.95


def test_yolo_labels_parse_back_to_the_masks(export, tmp_path, capsys):
    out = tmp_path / "yolo"
    assert cli.main(["export-yolo", "--json_file_path", str(export), "--out_dir", str(out)]) == 0
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data == {"path": str(out.resolve()), "train": "images", "val": "images",
                    "names": {0: "car", 1: "cat", 2: "dog"}}
    assert sorted(p.name for p in (out / "images").iterdir()) == \
        ["img1.png", "img2.png", "img3.png", "img4.png"]

    labels = read_labels(out / "labels" / "img1.txt")
    assert [c for c, _ in labels] == [1, 2]  # cat (disc), dog (ring); the lone box left out
    filled_ring = disc(H, W, 140, 50, 28)
    for (_, poly), mask in zip(labels, (DISC, filled_ring)):
        assert shoelace(poly) == pytest.approx(mask.sum(), rel=AREA_TOLERANCE)
        assert iou(raster(poly), mask) >= IOU_MIN

    # two parts joined into one polygon: its area is the parts' sum, its raster covers both
    ((cls, poly),) = read_labels(out / "labels" / "img2.txt")
    assert cls == 1
    assert shoelace(poly) == pytest.approx(PARTS.sum(), rel=AREA_TOLERANCE)
    assert iou(raster(poly), PARTS) >= IOU_MIN
    printed = capsys.readouterr().out
    assert "0: car\n1: cat\n2: dog" in printed


def test_boxes_as_polygons_and_split(export, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sam_backend")
    out = tmp_path / "yolo"
    assert cli.main(["export-yolo", "--json_file_path", str(export), "--out_dir", str(out),
                     "--boxes-as-polygons", "--val-fraction", "0.5", "--seed", "3"]) == 0
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert (data["train"], data["val"]) == ("images/train", "images/val")
    train = sorted(p.stem for p in (out / "images" / "train").iterdir())
    val = sorted(p.stem for p in (out / "images" / "val").iterdir())
    assert len(train) == len(val) == 2 and not set(train) & set(val)
    for split, stems in (("train", train), ("val", val)):
        assert sorted(p.stem for p in (out / "labels" / split).iterdir()) == stems
    where = "train" if "img1" in train else "val"
    box = [p for c, p in read_labels(out / "labels" / where / "img1.txt") if c == 0]
    x0, y0, x1, y1 = LONE_BOX
    assert len(box) == 1 and np.allclose(box[0], [[x0, y0], [x1, y0], [x1, y1], [x0, y1]],
                                         atol=1e-3)
    assert "1 box-only objects written as box polygons" in caplog.text


def test_join_parts_keeps_the_total_area():
    a = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    b = np.array([[20, 0], [20, 5], [30, 5], [30, 0]], float)  # the other orientation
    joined = join_parts([b, a])
    assert shoelace(joined) == pytest.approx(100 + 50)
    assert joined[0].tolist() == [0, 0]  # the largest part first


@pytest.mark.parametrize("template,heads", [("mask-rcnn_r50_fpn", 2), ("rtmdet-ins_s", 1)])
def test_mmdet_config_loads_with_mmengine(export, tmp_path, template, heads, capsys):
    from mmengine import Config

    out = tmp_path / "coco"
    assert cli.main(["export-coco", "--json_file_path", str(export), "--out_dir", str(out),
                     "--mmdet-config", template, "--val-fraction", "0.25", "--seed", "1"]) == 0
    path = out / f"{template}.py"
    assert f"# MMDetection config: {path}" in capsys.readouterr().out
    cfg = Config.fromfile(str(path))
    coco = json.loads((out / "annotations" / "ann.json").read_text())
    classes = tuple(c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"]))
    assert classes == ("car", "cat", "dog")
    assert cfg.metainfo.classes == classes
    assert cfg.data_root == str(out) + "/"

    found = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "num_classes":
                    found.append(value)
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(cfg.model.to_dict())
    assert found == [len(classes)] * heads

    train, val = cfg.train_dataloader.dataset, cfg.val_dataloader.dataset
    assert (train.ann_file, val.ann_file) == ("annotations/train.json", "annotations/val.json")
    assert train.data_prefix == val.data_prefix == {"img": "images/"}
    assert train.metainfo.classes == val.metainfo.classes == classes
    assert cfg.val_evaluator.ann_file == str(out) + "/annotations/val.json"
    loads = [s for s in cfg.train_dataloader.dataset.pipeline if s.type == "LoadAnnotations"]
    assert loads and all(s.with_mask and s.poly2mask for s in loads)  # RLE masks are read

    split = {name: json.loads((out / train.ann_file.replace("train", name)).read_text())
             for name in ("train", "val")}
    ids = {name: {i["id"] for i in d["images"]} for name, d in split.items()}
    assert len(ids["val"]) == 1 and len(ids["train"]) == 3 and not ids["train"] & ids["val"]
    for d in split.values():  # annotations follow their image
        assert {a["image_id"] for a in d["annotations"]} <= {i["id"] for i in d["images"]}
    for image in coco["images"]:
        assert (out / "images" / image["file_name"]).is_file()


def test_split_is_seeded(export, tmp_path):
    def val_ids(seed, name):
        out = tmp_path / name
        assert cli.main(["export-coco", "--json_file_path", str(export), "--out_dir", str(out),
                         "--no_images", "--val-fraction", "0.5", "--seed", str(seed)]) == 0
        return [i["ls_task_id"] for i in
                json.loads((out / "annotations" / "val.json").read_text())["images"]]

    first = val_ids(0, "a")
    assert val_ids(0, "b") == first
    assert any(val_ids(seed, f"s{seed}") != first for seed in range(1, 6))


def test_bad_split_and_config_names_are_errors(export, tmp_path):
    base = ["export-coco", "--json_file_path", str(export), "--out_dir", str(tmp_path / "o")]
    assert cli.main(base + ["--val-fraction", "1.0"]) == 2
    with pytest.raises(SystemExit):
        cli.main(base + ["--mmdet-config", "yolov8"])
