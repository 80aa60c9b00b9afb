"""``sam-backend preview``: a dataset drawn as images (each object's mask tinted with its label's
colour, its box, its label) plus a contact sheet; from a COCO export, a YOLO export, a Label
Studio export file or a project read from (the loopback stand-in of) Label Studio's API."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from sam_backend import cli
from sam_backend.export.preview import ALPHA, CONTACT_SHEET, PALETTE, contact_sheet
from tests.support.export_data import answer, block, disc, write_export
from tests.support.team_utils import API_TOKEN, FakeLabelStudioAPI

# pycocotools 2.0.x calls np.array(copy=False) when decoding; harmless here
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

GREY = 128
CAT, DOG = PALETTE[0], PALETTE[1]  # categories in id order: cat = 1, dog = 2


def tinted(base, colour):
    return np.round(np.asarray(base, np.float64) * (1 - ALPHA)
                    + np.asarray(colour, np.float64) * ALPHA).astype(np.uint8)


def rle(mask):
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(encoded, counts=encoded["counts"].decode("ascii"))


@pytest.fixture
def coco_dir(tmp_path):
    """A COCO export laid out as export-coco writes it: two uniform grey images; a cat mask
    (RLE) and a cat polygon on the first, a box-only dog on the second."""
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for name, (w, h) in (("a.png", (120, 80)), ("b.jpg.png", (100, 100))):
        cv2.imwrite(str(root / "images" / name), np.full((h, w, 3), GREY, np.uint8))
    cat = block(80, 120, 20, 30, 60, 70)  # x 20..59, y 30..69
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 120, "height": 80},
                   {"id": 2, "file_name": "b.jpg.png", "width": 100, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle(cat),
             "bbox": [20, 30, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1,
             "segmentation": [[80, 10, 110, 10, 110, 40, 80, 40]], "bbox": [80, 10, 30, 30],
             "area": 900, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 2, "segmentation": [],
             "bbox": [10, 50, 30, 20], "area": 600, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    (root / "annotations" / "ann.json").write_text(json.dumps(coco))
    return root


def read(path):
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image


def test_a_coco_export_is_drawn_mask_box_and_label(coco_dir, tmp_path, capsys):
    out = tmp_path / "preview"
    assert cli.main(["preview", str(coco_dir), "--out_dir", str(out), "--thumb", "64"]) == 0
    summary = capsys.readouterr().out
    assert "COCO export" in summary and "2 images drawn, 3 objects (cat 2, dog 1)" in summary
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.jpg.png", CONTACT_SHEET]

    a = read(out / "a.png")
    assert a.shape == (80, 120, 3)
    assert (a[50, 40] == tinted(GREY, CAT)).all()  # inside the mask: tinted with cat's colour
    assert (a[70:, :] == GREY).all() and (a[:, :15] == GREY).all()  # outside: untouched
    assert (a[69, 25:55] == CAT).all() and (a[35:65, 59] == CAT).all()  # box edges
    assert (a[25, 95] == tinted(GREY, CAT)).all()  # the polygon filled too

    b = read(out / "b.jpg.png")
    assert (b[50:70, 10] == DOG).all() and (b[69, 12:38] == DOG).all()  # a box only: its edges
    assert (b[60, 25] == GREY).all()  # and no fill
    assert (b[75:, :] == GREY).all()

    sheet = read(out / CONTACT_SHEET)
    assert sheet.shape == (64, 2 * 64, 3)  # two cells across, one down


def test_the_contact_sheet_is_a_grid_of_thumbnails():
    images = [(f"{k}.png", np.full((30 + k, 50, 3), k * 20, np.uint8)) for k in range(5)]
    sheet = contact_sheet(images, thumb=40, columns=2)
    assert sheet.shape == (3 * 40, 2 * 40, 3)
    # each image fitted (50 wide -> 40) and centred in its cell
    assert (sheet[20, 40 + 20] == 20).all() and (sheet[80 + 20, 20] == 80).all()
    assert contact_sheet(images[:1], thumb=40, columns=4).shape == (40, 40, 3)


def test_limit_and_a_coco_file_with_its_images_elsewhere(coco_dir, tmp_path, capsys):
    out = tmp_path / "one"
    assert cli.main(["preview", str(coco_dir / "annotations" / "ann.json"), "--out_dir",
                     str(out), "--limit", "1", "--images", str(coco_dir / "images")]) == 0
    assert "1 image drawn, 2 objects (cat 2)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a.png", CONTACT_SHEET]


def ls_project(tmp_path, monkeypatch):
    regions = {1: answer(disc(48, 64, 20, 20, 10), "cat")
               + answer(block(48, 64, 40, 25, 60, 45), "dog"),
               2: answer(disc(30, 40, 15, 15, 8), "dog", polygons=False)}
    return write_export(tmp_path, monkeypatch, regions, {1: (64, 48), 2: (40, 30)})


def test_a_yolo_export_is_drawn(tmp_path, monkeypatch, capsys):
    export = ls_project(tmp_path, monkeypatch)
    yolo = tmp_path / "yolo"
    assert cli.main(["export-yolo", "--json_file_path", str(export), "--out_dir", str(yolo),
                     "--val-fraction", "0.5"]) == 0
    capsys.readouterr()
    out = tmp_path / "preview"
    assert cli.main(["preview", str(yolo), "--out_dir", str(out)]) == 0
    assert "YOLO export" in capsys.readouterr().out
    original = read(next((yolo / "images").rglob("img1.png")))
    drawn = read(out / "img1.png")
    # the cat disc (centre 20, 20, radius 10), below its label tag (drawn inside the box's top
    # when there is no room above it)
    assert (drawn[27, 20] == tinted(original[27, 20], CAT)).all()
    assert (drawn[35, 50] == tinted(original[35, 50], DOG)).all()  # the dog block
    assert (drawn[5, 5] == original[5, 5]).all()


def test_a_project_through_the_api_draws_what_its_coco_export_draws(tmp_path, monkeypatch,
                                                                   capsys):
    export = ls_project(tmp_path, monkeypatch)
    api = FakeLabelStudioAPI("<View/>", json.loads(export.read_text()))
    try:
        assert cli.main(["preview", "--project", "1", "--url", api.url, "--token", API_TOKEN,
                         "--out_dir", str(tmp_path / "from_api")]) == 0
    finally:
        api.stop()
    summary = capsys.readouterr().out
    assert "Label Studio project 1: 2 images drawn, 3 objects (cat 1, dog 2)" in summary
    assert cli.main(["export-coco", "--json_file_path", str(export),
                     "--out_dir", str(tmp_path / "coco")]) == 0
    assert cli.main(["preview", str(tmp_path / "coco"), "--out_dir",
                     str(tmp_path / "from_coco")]) == 0
    assert cli.main(["preview", "--json_file_path", str(export), "--out_dir",
                     str(tmp_path / "from_file")]) == 0
    for name in ("img1.png", "img2.png", CONTACT_SHEET):
        api_png = read(tmp_path / "from_api" / name)
        assert (api_png == read(tmp_path / "from_coco" / name)).all()
        assert (api_png == read(tmp_path / "from_file" / name)).all()


def test_bad_inputs_are_clear(coco_dir, tmp_path, caplog, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["preview", str(tmp_path / "missing"), "--out_dir", out]) == 2
    assert "missing not found" in caplog.text
    (tmp_path / "empty").mkdir()
    assert cli.main(["preview", str(tmp_path / "empty"), "--out_dir", out]) == 2
    assert "neither a COCO export (annotations/ann.json) nor a YOLO export" in caplog.text
    (tmp_path / "other.json").write_text('{"hello": 1}')
    assert cli.main(["preview", str(tmp_path / "other.json"), "--out_dir", out]) == 2
    assert "neither a COCO annotations file" in caplog.text
    assert cli.main(["preview", "--out_dir", out]) == 2
    assert "nothing to preview" in caplog.text
    assert cli.main(["preview", str(coco_dir), "--project", "1", "--out_dir", out]) == 2
    assert "give one dataset" in caplog.text
    capsys.readouterr()

    # an unreadable image is skipped and counted; none readable: exit 1
    (coco_dir / "images" / "b.jpg.png").write_bytes(b"not an image")
    assert cli.main(["preview", str(coco_dir), "--out_dir", out]) == 0
    printed = capsys.readouterr().out
    assert "1 image drawn" in printed and "1 skipped" in printed
    assert "b.jpg.png: not an image OpenCV can read" in printed
    (coco_dir / "images" / "a.png").unlink()
    assert cli.main(["preview", str(coco_dir), "--out_dir", str(tmp_path / "none")]) == 1
    printed = capsys.readouterr().out
    assert "0 images drawn" in printed and "2 skipped" in printed and "a.png: cannot be read" \
        in printed


def test_a_task_whose_image_is_missing_is_skipped_by_task_id(tmp_path, monkeypatch, capsys):
    export = ls_project(tmp_path, monkeypatch)
    (tmp_path / "docroot" / "img2.png").unlink()
    out = tmp_path / "preview"
    assert cli.main(["preview", "--json_file_path", str(export), "--out_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Label Studio export" in printed and "1 image drawn" in printed
    assert "1 skipped" in printed and "skipped task 2: image cannot be fetched" in printed
    assert sorted(p.name for p in out.iterdir()) == [CONTACT_SHEET, "img1.png"]
