"""A real Label Studio 1.23.2 and the real backend, driven the way an operator and an annotator do.

Label Studio calls the backend itself: `POST /api/ml/<id>/interactive-annotating` is exactly what
the browser sends on a smart-tool click, and Label Studio answers `{"data": results[0]}` after
forwarding the prompt to our /predict. Images are uploaded to Label Studio, so the backend has
to download them from it with the credentials it was given.
"""
from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from PIL import Image

from sam_backend import cli
from sam_backend.labelstudio.rle import rle_to_mask
from tests.support.server_utils import REPO, free_port

# the image templates (video.xml has its own test: test_video_with_label_studio.py)
TEMPLATES = sorted(p for p in (REPO / "xml_templates").glob("*.xml") if p.stem != "video")
H, W = 240, 360  # the upright (browser) size of both images


def scene() -> np.ndarray:
    """HxWx3 RGB: a plain background with a big disc and a square."""
    image = np.full((H, W, 3), (210, 220, 200), np.uint8)
    cv2.circle(image, (130, 120), 70, (200, 40, 40), -1)
    cv2.rectangle(image, (250, 60), (330, 150), (30, 60, 200), -1)
    return image


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    png = folder / "scene.png"
    Image.fromarray(scene()).save(png)
    # a phone photo: stored rotated, EXIF orientation 6 tells viewers to turn it upright
    phone = folder / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(scene(), k=1))).save(phone, quality=95, exif=exif)
    return {"png": png, "phone": phone}


def start_backend(session_backend_process, checkpoint, ls_url, api_key, tmp_path_factory,
                  port=None, model=("model_name=mobile_sam",)):
    """`label-studio-ml start sam ...` told where Label Studio is and which token to use."""
    port = port or free_port()
    env = {**os.environ, "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": api_key,
           "SAM_BACKEND_IMAGE_CACHE_DIR": str(tmp_path_factory.mktemp("image-cache")),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    return session_backend_process(
        ["label-studio-ml", "start", "sam", "--with", *model,
         f"sam_checkpoint_file={checkpoint}", "device=cpu", "out_poly=true",
         "-p", str(port), "--host", "127.0.0.1"], port, env=env, cwd=REPO, name="sam-backend")


@pytest.fixture(scope="module")
def backend(session_backend_process, checkpoint_factory, label_studio, tmp_path_factory):
    return start_backend(session_backend_process, checkpoint_factory("mobile_sam"),
                         label_studio.url, label_studio.token, tmp_path_factory)


@pytest.fixture(scope="module")
def projects(label_studio, backend, images):
    """One project per template, each with the PNG and the phone JPEG, backend attached."""
    api = label_studio.api
    made = {}
    for template in TEMPLATES:
        project = api.create_project(f"e2e {template.stem}", template.read_text())
        tasks = api.import_image(project["id"], images["png"])
        tasks += api.import_image(project["id"], images["phone"])
        ml = api.add_ml_backend(project["id"], backend.url, is_interactive=True)
        made[template.stem] = {"project": project, "tasks": tasks, "ml": ml,
                               "config": template.read_text()}
    return made


def controls(config: str):
    from sam_backend.labelstudio.label_config import parse_label_config

    return parse_label_config(config)


def keypoint_region(config, x, y, positive=True, label="cat"):
    control = next(c for c in controls(config).controls if c.type == "keypointlabels")
    return {"original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": [label]},
            "is_positive": positive, "id": f"k{x:.0f}{y:.0f}{int(positive)}",
            "from_name": control.name, "to_name": control.to_name, "type": "keypointlabels",
            "origin": "manual"}


def rectangle_region(config, x, y, w, h, label="cat"):
    control = next(c for c in controls(config).controls if c.type == "rectanglelabels")
    return {"original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                      "rectanglelabels": [label]},
            "id": "r1", "from_name": control.name, "to_name": control.to_name,
            "type": "rectanglelabels", "origin": "manual"}


def click(label_studio, project, task, regions):
    answer = label_studio.api.interactive_annotating(project["ml"]["id"], task["id"],
                                                     {"result": regions})
    assert "errors" not in answer, answer
    return answer["data"]


def check_answer(data, config, kinds_expected):
    """The regions Label Studio handed back: right types, names, label, sizes; brush decodes."""
    parsed = controls(config)
    regions = data["result"]
    assert regions, "the backend returned nothing"
    kinds = {r["type"] for r in regions}
    assert kinds == kinds_expected, (kinds, kinds_expected)
    for region in regions:
        control = parsed.control(region["from_name"])
        assert control is not None and control.type == region["type"]
        assert region["to_name"] == control.to_name == "image"
        assert region["value"][region["type"]] == ["cat"]
        assert (region["original_width"], region["original_height"]) == (W, H)
    brush = [r for r in regions if r["type"] == "brushlabels"]
    mask = None
    if brush:
        mask = rle_to_mask(brush[0]["value"]["rle"], H, W)
        assert 0 < mask.sum() < H * W
    for region in regions:
        if region["type"] == "rectanglelabels" and mask is not None:
            ys, xs = np.nonzero(mask)
            assert region["value"]["x"] == pytest.approx(xs.min() / W * 100)
            assert region["value"]["width"] == pytest.approx((xs.max() + 1 - xs.min()) / W * 100)
    return regions, mask


EXPECTED = {  # template -> (prompt kind, region types a keypoint / rectangle prompt gets back)
    "full": {"keypoint": {"brushlabels", "polygonlabels", "rectanglelabels"},
             "rectangle": {"brushlabels", "polygonlabels"}},
    "point_to_brush": {"keypoint": {"brushlabels"}},
    "box_to_brush": {"rectangle": {"brushlabels"}},
    "point_to_polygon": {"keypoint": {"polygonlabels"}},
    "concepts": {"keypoint": {"brushlabels", "rectanglelabels"}},
    "exemplars": {},  # box exemplars need SAM 3's concept model: see the test below
}


def test_every_template_gets_its_regions_back_for_each_kind_of_click(label_studio, projects):
    assert set(projects) == set(EXPECTED)
    for name, made in projects.items():
        config, task = made["config"], made["tasks"][0]
        assert task["data"]["image"].startswith("/data/upload/")
        if "keypoint" in EXPECTED[name]:
            positive = [keypoint_region(config, 36.0, 50.0)]
            data = click(label_studio, made, task, positive)
            check_answer(data, config, EXPECTED[name]["keypoint"])
            both = positive + [keypoint_region(config, 80.0, 40.0, positive=False)]
            data = click(label_studio, made, task, both)
            check_answer(data, config, EXPECTED[name]["keypoint"])
        if "rectangle" in EXPECTED[name]:
            data = click(label_studio, made, task, [rectangle_region(config, 15, 15, 45, 70)])
            check_answer(data, config, EXPECTED[name]["rectangle"])


def test_an_exemplar_box_on_a_backend_without_sam3_comes_back_as_a_clear_error(label_studio,
                                                                              projects):
    """xml_templates/exemplars.xml through Label Studio to a MobileSAM backend: the exemplar
    marking reaches /predict (the backend tells the box from a click) and the answer names the
    option to start with; the backend keeps answering clicks."""
    made = projects["exemplars"]
    region = dict(rectangle_region(made["config"], 15, 15, 45, 70), from_name="Exemplar")
    answer = label_studio.api.interactive_annotating(made["ml"]["id"], made["tasks"][0]["id"],
                                                     {"result": [region]})
    assert "box exemplars need SAM 3's concept model" in str(answer.get("errors")), answer
    assert "concept_model=sam3" in str(answer["errors"])
    box_made = projects["box_to_brush"]
    click(label_studio, box_made, box_made["tasks"][0],
          [rectangle_region(box_made["config"], 15, 15, 45, 70)])


def test_phone_photo_mask_is_in_the_upright_frame(label_studio, projects):
    made = projects["point_to_brush"]
    phone_task = made["tasks"][1]
    data = click(label_studio, made, phone_task, [keypoint_region(made["config"], 36.0, 50.0)])
    _, mask = check_answer(data, made["config"], {"brushlabels"})
    # the same click on the upright PNG gives (nearly) the same mask; JPEG noise aside
    png = click(label_studio, made, made["tasks"][0], [keypoint_region(made["config"], 36.0, 50.0)])
    _, upright = check_answer(png, made["config"], {"brushlabels"})
    iou = (mask & upright).sum() / (mask | upright).sum()
    assert iou > 0.8, iou


def test_annotation_from_the_regions_is_accepted_and_exported(label_studio, projects, tmp_path,
                                                              monkeypatch):
    made = projects["full"]
    api = label_studio.api
    config, task = made["config"], made["tasks"][0]
    data = click(label_studio, made, task, [keypoint_region(config, 36.0, 50.0)])
    regions, mask = check_answer(data, config, EXPECTED["full"]["keypoint"])
    saved = api.create_annotation(task["id"], regions)  # Label Studio validates the result
    assert {r["type"] for r in saved["result"]} == {r["type"] for r in regions}

    exported = json.loads(api.export(made["project"]["id"], "JSON"))
    result = [t for t in exported if t["id"] == task["id"]][0]["annotations"][0]["result"]
    brush = [r for r in result if r["type"] == "brushlabels"][0]
    assert np.array_equal(rle_to_mask(brush["value"]["rle"], H, W), mask)

    coco_zip = zipfile.ZipFile(io.BytesIO(api.export(made["project"]["id"], "COCO")))
    coco = json.loads(coco_zip.read(next(n for n in coco_zip.namelist() if n.endswith(".json"))))
    assert coco["annotations"], "Label Studio's COCO export holds the polygons and the box"

    # and our own exporter turns the JSON export into COCO with the brush mask as RLE, fetching
    # the image from Label Studio the way a user configures it
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    monkeypatch.setenv("SAM_BACKEND_IMAGE_CACHE_DIR", str(tmp_path / "image-cache"))
    export_file = tmp_path / "export.json"
    export_file.write_text(json.dumps(exported))
    assert cli.main(["export-coco", "--json_file_path", str(export_file),
                     "--out_dir", str(tmp_path / "coco")]) == 0
    from pycocotools.coco import COCO

    ours = COCO(str(tmp_path / "coco" / "annotations" / "ann.json"))
    # one object: its brush, polygons and box are one annotation, the mask
    (ann,) = ours.loadAnns(ours.getAnnIds())
    assert isinstance(ann["segmentation"], dict)
    assert np.array_equal(ours.annToMask(ann).astype(bool), mask)
    assert len([r for r in regions if r["type"] == "polygonlabels"]) >= 1
    assert len(list((tmp_path / "coco" / "images").iterdir())) == 1


def test_clicks_keep_working_after_a_backend_restart_without_setup(label_studio, projects,
                                                                   backend):
    made = projects["point_to_brush"]
    region = [keypoint_region(made["config"], 40.0, 45.0)]
    before = click(label_studio, made, made["tasks"][0], region)
    backend.restart()
    setups_before = backend.log_path.read_text().count("/setup")
    after = click(label_studio, made, made["tasks"][0], region)
    assert backend.log_path.read_text().count("/setup") == setups_before  # no /setup happened
    assert after["result"][0]["value"]["rle"]
    assert np.array_equal(rle_to_mask(after["result"][0]["value"]["rle"], H, W),
                          rle_to_mask(before["result"][0]["value"]["rle"], H, W))


def test_personal_access_token_when_legacy_tokens_are_disabled(label_studio_no_legacy,
                                                               session_backend_process,
                                                               checkpoint_factory, images,
                                                               tmp_path_factory):
    ls = label_studio_no_legacy
    pat = ls.personal_access_token()
    # the legacy token is refused by this Label Studio...
    api = ls.api
    project = api.create_project("e2e pat", (REPO / "xml_templates" / "point_to_brush.xml").read_text())
    task = api.import_image(project["id"], images["png"])[0]
    legacy = requests.get(ls.url + task["data"]["image"], headers=ls.legacy_auth_header(), timeout=10)
    assert legacy.status_code == 401
    # ...so the backend is given the personal access token, and fetches the image with it
    backend = start_backend(session_backend_process, checkpoint_factory("mobile_sam"), ls.url, pat,
                            tmp_path_factory)
    ml = api.add_ml_backend(project["id"], backend.url, is_interactive=True)
    made = {"project": project, "ml": ml}
    data = click(ls, made, task, [keypoint_region(project["label_config"], 36.0, 50.0)])
    _, mask = check_answer(data, project["label_config"], {"brushlabels"})
    assert mask.any()
    assert pat not in backend.log_path.read_text()
