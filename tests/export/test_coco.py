"""`sam-backend export-coco`: a Label Studio export built here -> COCO, checked with pycocotools."""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from label_studio_converter.brush import mask2rle as ls_mask2rle
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sam_backend import cli
from sam_backend.export.coco import export_coco
from sam_backend.export.convert import convert, parse_classes
from sam_backend.export.geometry import region_to_annotation
from sam_backend.errors import SamBackendError
from sam_backend.labelstudio.rle import mask_to_rle

# pycocotools 2.0.x calls np.array(copy=False) when decoding (annToMask); harmless here
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# --------------------------------------------------------------------------------------------
# Known masks (H x W bool), on non-square images so that a transposition cannot go unnoticed

W1, H1 = 64, 48  # task 101
W2, H2 = 40, 30  # task 102
W3, H3 = 36, 20  # task 103


def ring(h, w):
    """A ring with a hole, touching the image's left and top borders."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - 12, xx - 12)
    return (r <= 12) & (r >= 5)


def two_blobs(h, w):
    m = np.zeros((h, w), bool)
    m[3:9, 40:50] = True
    m[30:47, 55:64] = True  # touches the bottom-right corner
    return m


def thin_line(h, w):
    """A one-pixel diagonal line (8-connected only) plus a one-pixel dot."""
    m = np.zeros((h, w), bool)
    for i in range(20):
        m[20 + i, 25 + i] = True
    m[0, w - 1] = True
    return m


def frame(h, w):
    """The image's border, one pixel wide: a hole as large as the image minus its rim."""
    m = np.ones((h, w), bool)
    m[1:-1, 1:-1] = False
    return m


def png_bytes(w, h, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def brush(rid, mask, label, encoder=mask_to_rle):
    h, w = mask.shape
    return {"id": rid, "type": "brushlabels", "from_name": "tag", "to_name": "image",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": encoder(mask), "brushlabels": [label]}}


def polygon(rid, points, label, w, h):
    return {"id": rid, "type": "polygonlabels", "from_name": "poly", "to_name": "image",
            "original_width": w, "original_height": h,
            "value": {"points": points, "polygonlabels": [label], "closed": True}}


def rectangle(rid, x, y, rw, rh, label, w, h, rotation=0):
    return {"id": rid, "type": "rectanglelabels", "from_name": "rect", "to_name": "image",
            "original_width": w, "original_height": h,
            "value": {"x": x, "y": y, "width": rw, "height": rh, "rotation": rotation,
                      "rectanglelabels": [label]}}


def ls_encoder(mask):
    return ls_mask2rle(mask.astype(np.uint8) * 255)


# expected objects per task id, in export order: ("mask", label, mask) / ("bbox", label, bbox)
EXPECTED = {
    101: [("mask", "cat", ring(H1, W1)), ("mask", "dog", two_blobs(H1, W1)),
          ("mask", "line", thin_line(H1, W1)), ("mask", "cat", frame(H1, W1))],
    102: [("bbox", "dog", [4.0, 3.0, 20.0, 21.0]), ("bbox", "car", [10.0, 3.0, 20.0, 12.0])],
    103: [("mask", "cat", np.pad(np.ones((5, 7), bool), ((2, H3 - 7), (3, W3 - 10))))],
}


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    """An export file, its images under a LOCAL_FILES_DOCUMENT_ROOT and an upload directory."""
    root = tmp_path / "docroot"
    uploads = tmp_path / "upload"
    images = {
        "scene/a.png": png_bytes(W1, H1, 1),
        "other/a.png": png_bytes(W2, H2, 2),  # same base name as task 101's
        "empty/neg.png": png_bytes(20, 10, 4),
    }
    for rel, data in images.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    upload_bytes = png_bytes(W3, H3, 3)
    (uploads / "7").mkdir(parents=True)
    (uploads / "7" / "abcd1234-up.png").write_bytes(upload_bytes)

    e101, e102, e103 = EXPECTED[101], EXPECTED[102], EXPECTED[103]
    tasks = [
        {"id": 101, "data": {"image": "/data/local-files/?d=scene/a.png"}, "annotations": [
            {"id": 1, "was_cancelled": False, "result": [
                brush("r1", e101[0][2], "cat"),
                brush("r2", e101[1][2], "dog", encoder=ls_encoder),  # the reference encoder
                brush("r3", e101[2][2], "line"),
                brush("r4", e101[3][2], "cat"),
                {"id": "k1", "type": "keypointlabels", "to_name": "image", "original_width": W1,
                 "original_height": H1, "value": {"x": 5, "y": 5, "width": 1,
                                                  "keypointlabels": ["cat"]}},  # a SAM prompt
            ]}]},
        {"id": 102, "data": {"image": "/data/local-files/?d=other/a.png"}, "annotations": [
            {"id": 2, "was_cancelled": True, "result": [brush("c1", ring(H2, W2), "cancelled")]},
            {"id": 3, "was_cancelled": False, "result": [
                polygon("p1", [[10, 10], [60, 20], [30, 80]], "dog", W2, H2),
                rectangle("b1", 25, 10, 50, 40, "car", W2, H2),
            ]}]},
        {"id": 103, "data": {"image": "/data/upload/7/abcd1234-up.png"}, "annotations": [
            {"id": 4, "result": [
                brush("bad", np.ones((10, 10), bool), "cat") | {"original_width": W3,
                                                               "original_height": H3},
                {"id": "e1", "type": "ellipselabels", "to_name": "image", "original_width": W3,
                 "original_height": H3, "value": {"x": 1, "y": 1, "radiusX": 2, "radiusY": 2,
                                                  "ellipselabels": ["cat"]}},
                brush("ok", e103[0][2], "cat"),
            ]}]},
        {"id": 104, "data": {"image": "/data/local-files/?d=missing/nope.png"}, "annotations": [
            {"id": 5, "result": [brush("m1", ring(H2, W2), "dog")]}]},
        {"id": 105, "data": {"image": "/data/local-files/?d=scene/a.png"}, "annotations": []},
        {"id": 106, "data": {"image": "/data/local-files/?d=empty/neg.png"}, "annotations": [
            {"id": 6, "result": []}]},
    ]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))

    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY",
                 "LABEL_STUDIO_ACCESS_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # nothing may be downloaded
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(root))
    monkeypatch.setenv("SAM_BACKEND_IMAGE_CACHE_DIR", str(tmp_path / "cache"))
    return {"export": export, "uploads": uploads, "out": tmp_path / "out", "tasks": tasks,
            "images": {"a.png": images["scene/a.png"], "102_a.png": images["other/a.png"],
                       "abcd1234-up.png": upload_bytes, "neg.png": images["empty/neg.png"]}}


def run_cli(dataset, *extra):
    return cli.main(["export-coco", "--json_file_path", str(dataset["export"]),
                     "--out_dir", str(dataset["out"]), "--upload_dir", str(dataset["uploads"]),
                     *extra])


def load_coco(out: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(out / "annotations" / "ann.json"))


def mask_bbox(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1)]


def anns_by_task(coco):
    out = {}
    for img in coco.dataset["images"]:
        ids = coco.getAnnIds(imgIds=[img["id"]])
        out[img["ls_task_id"]] = (img, sorted(coco.loadAnns(ids), key=lambda a: a["id"]))
    return out


# --------------------------------------------------------------------------------------------


def test_masks_come_back_exactly(dataset, capsys):
    assert run_cli(dataset) == 0
    coco = load_coco(dataset["out"])
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    assert names == {1: "car", 2: "cat", 3: "dog", 4: "line"}  # sorted by name

    by_task = anns_by_task(coco)
    assert set(by_task) == {101, 102, 103, 106}
    for task_id, expected in EXPECTED.items():
        img, anns = by_task[task_id]
        assert len(anns) == len(expected), task_id
        for ann, (kind, label, want) in zip(anns, expected):
            assert names[ann["category_id"]] == label
            assert ann["iscrowd"] == 0
            if kind != "mask":
                continue
            assert (img["height"], img["width"]) == want.shape
            assert isinstance(ann["segmentation"]["counts"], str)  # compressed RLE
            got = coco.annToMask(ann)
            assert np.array_equal(got.astype(bool), want), (task_id, label)
            assert ann["area"] == int(want.sum())
            assert ann["bbox"] == mask_bbox(want)
    _, negatives = by_task[106]
    assert negatives == []  # submitted without regions: an image without objects
    assert (by_task[106][0]["width"], by_task[106][0]["height"]) == (20, 10)  # from the file

    printed = capsys.readouterr().out
    assert "classes = ('car', 'cat', 'dog', 'line')" in printed
    assert "1: car\n2: cat\n3: dog\n4: line" in printed
    assert "poly2mask=True" in printed  # MMDetection ignores RLE masks otherwise


def test_polygons_and_boxes(dataset):
    assert run_cli(dataset) == 0
    coco = load_coco(dataset["out"])
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    img, (poly, box) = anns_by_task(coco)[102]
    assert (img["width"], img["height"]) == (W2, H2)
    assert names[poly["category_id"]] == "dog"
    assert poly["segmentation"] == [[4.0, 3.0, 24.0, 6.0, 12.0, 24.0]]
    assert poly["bbox"] == pytest.approx([4.0, 3.0, 20.0, 21.0])
    assert poly["area"] == pytest.approx(abs((24 - 4) * (24 - 3) - (12 - 4) * (6 - 3)) / 2)
    assert names[box["category_id"]] == "car"
    assert box["bbox"] == pytest.approx([10.0, 3.0, 20.0, 12.0])
    assert box["area"] == pytest.approx(20.0 * 12.0)
    assert box["segmentation"] == [[10.0, 3.0, 30.0, 3.0, 30.0, 15.0, 10.0, 15.0]]
    assert coco.annToMask(box)[3:15, 10:30].all()  # usable where a segmentation is required


def test_cocoeval_against_itself_gives_ap_1(dataset):
    assert run_cli(dataset) == 0
    gt = load_coco(dataset["out"])
    anns = gt.loadAnns(gt.getAnnIds())
    assert len(anns) == 7
    for iou_type in ("segm", "bbox"):
        key = "segmentation" if iou_type == "segm" else "bbox"
        results = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                    key: gt.annToRLE(a) if iou_type == "segm" else a["bbox"]} for a in anns]
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(results)
            ev = COCOeval(gt, dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert ev.stats[0] == 1.0, iou_type


def test_problems_reported_by_task_and_export_goes_on(dataset, caplog):
    caplog.set_level(logging.WARNING, logger="sam_backend")
    assert run_cli(dataset) == 0
    text = caplog.text
    assert "task 104" in text and "nope.png" in text  # the missing image
    assert "task 103, annotation 4, region bad" in text and "brush RLE" in text
    assert "task 103, annotation 4, region e1" in text and "ellipselabels" in text

    coco = load_coco(dataset["out"])
    assert 104 not in {i["ls_task_id"] for i in coco.dataset["images"]}
    assert 105 not in {i["ls_task_id"] for i in coco.dataset["images"]}  # not labelled

    report = export_coco(str(dataset["export"]), str(dataset["out"]),
                         upload_dir=str(dataset["uploads"]), progress=False)
    assert report.skipped_tasks == [104]
    assert report.problem_task_ids == [103, 104]
    assert [p.region_id for p in report.problems if p.task_id == 103] == ["bad", "e1"]
    assert report.unlabelled_tasks == [105]
    assert report.images == 4 and report.total_annotations == 7
    assert report.annotations == {"mask": 5, "polygon": 1, "box": 1}
    assert report.ignored_results == {"keypointlabels": 1}
    assert "task 104" in report.summary()


def test_images_copied_as_fetched(dataset):
    assert run_cli(dataset) == 0
    images_dir = dataset["out"] / "images"
    assert sorted(p.name for p in images_dir.iterdir()) == sorted(dataset["images"])
    for name, data in dataset["images"].items():
        assert (images_dir / name).read_bytes() == data  # not re-encoded
    coco = load_coco(dataset["out"])
    assert {i["ls_task_id"]: i["file_name"] for i in coco.dataset["images"]} == {
        101: "a.png", 102: "102_a.png", 103: "abcd1234-up.png", 106: "neg.png"}


def test_classes_fix_ids_and_order(dataset, caplog, capsys):
    caplog.set_level(logging.WARNING, logger="sam_backend")
    assert run_cli(dataset, "--classes", "dog, cat") == 0
    coco = load_coco(dataset["out"])
    assert coco.dataset["categories"] == [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]
    by_task = anns_by_task(coco)
    assert [a["category_id"] for a in by_task[101][1]] == [2, 1, 2]  # "line" skipped
    assert [a["category_id"] for a in by_task[102][1]] == [1]  # "car" skipped
    assert "'line' is not in --classes" in caplog.text and "tasks 101" in caplog.text
    assert "'car' is not in --classes" in caplog.text and "tasks 102" in caplog.text
    assert "classes = ('dog', 'cat')" in capsys.readouterr().out


def test_dashed_options_and_no_images(dataset, caplog):
    caplog.set_level(logging.WARNING, logger="sam_backend")
    out = dataset["out"]
    assert cli.main(["export-coco", "--json-file-path", str(dataset["export"]),
                     "--out-dir", str(out), "--no-images"]) == 0
    assert not (out / "images").exists()
    coco = load_coco(out)
    # without fetching, the missing image goes unnoticed, and an image without regions has no size
    assert {i["ls_task_id"] for i in coco.dataset["images"]} == {101, 102, 103, 104}
    assert "task 106" in caplog.text


def test_bad_input_is_an_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image": "x.png", "label": []}]')  # a JSON-MIN export
    assert cli.main(["export-coco", "--json_file_path", str(bad), "--out_dir",
                     str(tmp_path / "o")]) == 2
    assert cli.main(["export-coco", "--json_file_path", str(tmp_path / "none.json"),
                     "--out_dir", str(tmp_path / "o")]) == 2
    with pytest.raises(SamBackendError, match="more than once"):
        parse_classes("a,b,a")
    assert parse_classes("('a', 'b c')") == ["a", "b c"]


def test_rotated_rectangle_and_size_mismatch():
    region = rectangle("r", 50, 20, 20, 20, "x", 100, 100, rotation=90)
    kind, fields = region_to_annotation(region, 100, 100)
    assert kind == "box"
    assert fields["bbox"] == pytest.approx([30.0, 20.0, 20.0, 20.0])
    assert fields["area"] == pytest.approx(400.0)

    tasks = [{"id": 1, "data": {"image": "a.png"}, "annotations": [{"result": [
        brush("a", ring(H1, W1), "cat"), brush("b", ring(H2, W2), "cat")]}]}]
    coco, report = convert(tasks)  # no fetcher: sizes from the regions only
    assert [(i["width"], i["height"]) for i in coco["images"]] == [(W1, H1)]
    assert len(coco["annotations"]) == 1
    assert "differs from the task's other regions" in str(report.problems[0])
