"""The harness itself, proven against a real Label Studio 1.23.2 (no ML backend involved)."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import requests
from label_studio_converter.brush import decode_rle, mask2rle
from PIL import Image

from tests.support import ls_harness
from tests.support.ls_harness import BackendProcess, HarnessError, LabelStudioClient, unzip_json

KP_BRUSH_CONFIG = (
    '<View><Image name="image" value="$image" zoom="true"/>'
    '<BrushLabels name="tag" toName="image"><Label value="cat"/></BrushLabels>'
    '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat" smart="true"/>'
    "</KeyPointLabels></View>"
)
BOX_POLY_BRUSH_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image"><Label value="cat"/></BrushLabels>'
    '<RectangleLabels name="box" toName="image"><Label value="cat"/></RectangleLabels>'
    '<PolygonLabels name="poly" toName="image"><Label value="cat"/></PolygonLabels></View>'
)
W, H = 64, 48
# the object: rows 10..29, columns 16..47 -> COCO bbox [16, 10, 32, 20]
Y0, Y1, X0, X1 = 10, 30, 16, 48


def make_png(path) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 80, size=(H, W, 3), dtype=np.uint8)
    img[Y0:Y1, X0:X1] = (230, 120, 40)
    Image.fromarray(img).save(path, format="PNG")
    return img


def object_mask() -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[Y0:Y1, X0:X1] = 255
    return m


def brush_region(region_id: str = "brush1") -> dict:
    # the shape PROTOCOL.md documents for a backend's brushlabels region
    return {
        "id": region_id,
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask2rle(object_mask()), "brushlabels": ["cat"]},
    }


def decode_brush(region: dict) -> np.ndarray:
    rgba = decode_rle(region["value"]["rle"]).reshape(region["original_height"],
                                                      region["original_width"], 4)
    return rgba[:, :, 3] > 0


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def uploaded(label_studio, tmp_path_factory):
    """A KeyPointLabels+BrushLabels project with one uploaded PNG."""
    png = tmp_path_factory.mktemp("img") / "cat.png"
    img = make_png(png)
    project = label_studio.api.create_project("harness keypoint+brush", KP_BRUSH_CONFIG)
    tasks = label_studio.api.import_image(project["id"], png)
    assert len(tasks) == 1
    return {"project": project, "task": tasks[0], "png": png, "pixels": img}


def test_import_gives_upload_url(label_studio, uploaded):
    task, project = uploaded["task"], uploaded["project"]
    assert task["data"]["image"].startswith(f"/data/upload/{project['id']}/")
    assert task["data"]["image"].endswith("cat.png")
    assert [t["id"] for t in label_studio.api.list_tasks(project["id"])] == [task["id"]]
    assert label_studio.api.get_task(task["id"])["data"] == task["data"]


def test_brush_annotation_roundtrip_and_export(label_studio, uploaded):
    api = label_studio.api
    task, project = uploaded["task"], uploaded["project"]
    region = brush_region()
    ann = api.create_annotation(task["id"], [region])
    assert ann["result"][0]["value"]["rle"] == region["value"]["rle"]

    # JSON: the annotation comes back verbatim and decodes to the mask
    exported = json.loads(api.export(project["id"], "JSON"))
    [t] = [t for t in exported if t["id"] == task["id"]]
    [a] = [a for a in t["annotations"] if a["id"] == ann["id"]]
    [r] = a["result"]
    assert (r["type"], r["from_name"], r["to_name"]) == ("brushlabels", "tag", "image")
    assert r["value"]["brushlabels"] == ["cat"]
    assert r["value"]["rle"] == region["value"]["rle"]
    assert np.array_equal(decode_brush(r), object_mask() > 0)

    # the snapshot API gives the same JSON
    snap = json.loads(api.export_snapshot(project["id"], "JSON"))
    assert [a["result"] for a in snap[0]["annotations"]] == [a["result"] for a in t["annotations"]]

    # COCO: the plain COCO converter ignores brushlabels; the image is there, no annotations.
    # (LS marks COCO "disabled" for a KeyPointLabels config without RectangleLabels, but the
    # sync endpoint still produces it.)
    formats = {f["name"]: f for f in api.export_formats(project["id"])}
    assert formats["COCO"].get("disabled") is True
    assert not formats["BRUSH_TO_COCO"].get("disabled")
    coco = unzip_json(api.export(project["id"], "COCO"))
    assert [(i["width"], i["height"]) for i in coco["images"]] == [(W, H)]
    assert coco["annotations"] == []

    # BRUSH_TO_COCO carries the brush mask (as a contour polygon + bbox)
    bcoco = unzip_json(api.export(project["id"], "BRUSH_TO_COCO"))
    cats = {c["id"]: c["name"] for c in bcoco["categories"]}
    [b] = bcoco["annotations"]
    assert cats[b["category_id"]] == "cat"
    assert b["bbox"] == [X0, Y0, X1 - X0, Y1 - Y0]
    assert [(i["width"], i["height"]) for i in bcoco["images"]] == [(W, H)]


def test_coco_export_boxes_and_polygons(label_studio, tmp_path):
    """With RectangleLabels/PolygonLabels, COCO carries the regions (sync and snapshot API)."""
    api = label_studio.api
    png = tmp_path / "obj.png"
    make_png(png)
    project = api.create_project("harness box+poly+brush", BOX_POLY_BRUSH_CONFIG)
    [task] = api.import_image(project["id"], png)
    px, py = 100 / W, 100 / H  # percent per pixel
    box = {"id": "box1", "from_name": "box", "to_name": "image", "type": "rectanglelabels",
           "original_width": W, "original_height": H, "image_rotation": 0,
           "value": {"x": X0 * px, "y": Y0 * py, "width": (X1 - X0) * px,
                     "height": (Y1 - Y0) * py, "rotation": 0, "rectanglelabels": ["cat"]}}
    poly = {"id": "poly1", "from_name": "poly", "to_name": "image", "type": "polygonlabels",
            "original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"points": [[X0 * px, Y0 * py], [X1 * px, Y0 * py], [X1 * px, Y1 * py],
                                 [X0 * px, Y1 * py]], "polygonlabels": ["cat"], "closed": True}}
    api.create_annotation(task["id"], [box, poly, brush_region()])

    formats = {f["name"]: f for f in api.export_formats(project["id"])}
    assert not formats["COCO"].get("disabled")
    for data in (api.export(project["id"], "COCO"), api.export_snapshot(project["id"], "COCO")):
        coco = unzip_json(data)
        assert [c["name"] for c in coco["categories"]] == ["cat"]
        assert len(coco["annotations"]) == 2  # box + polygon; the brush is not in COCO
        for a in coco["annotations"]:
            assert a["bbox"] == pytest.approx([X0, Y0, X1 - X0, Y1 - Y0], abs=1e-6)
    # BRUSH_TO_COCO has all three: box (bbox only), polygon (bbox one pixel larger: it counts
    # the end vertices inclusively) and the brush (contour polygon + exact bbox)
    bcoco = unzip_json(api.export(project["id"], "BRUSH_TO_COCO"))
    assert len(bcoco["annotations"]) == 3
    assert [X0, Y0, X1 - X0, Y1 - Y0] in [a["bbox"] for a in bcoco["annotations"]]


def test_coco_export_fails_on_saved_keypoints_without_model_index(label_studio, tmp_path):
    """Found while building this: saving keypoint regions in a config whose KeyPointLabels have
    no ``model_index`` makes COCO export answer 500 ("No keypoint order found"). An e2e test that
    exports COCO must not save the keypoint prompts into the annotation."""
    api = label_studio.api
    png = tmp_path / "kp.png"
    make_png(png)
    project = api.create_project("harness keypoint export", KP_BRUSH_CONFIG)
    [task] = api.import_image(project["id"], png)
    kp = {"id": "kp1", "from_name": "kp", "to_name": "image", "type": "keypointlabels",
          "original_width": W, "original_height": H, "image_rotation": 0,
          "value": {"x": 50, "y": 50, "width": 0.5, "keypointlabels": ["cat"]}}
    api.create_annotation(task["id"], [kp, brush_region()])
    assert json.loads(api.export(project["id"], "JSON"))[0]["annotations"][0]["result"][0]["id"] == "kp1"
    with pytest.raises(ls_harness.LabelStudioAPIError) as err:
        api.export(project["id"], "COCO")
    assert err.value.status == 500 and "keypoint order" in err.value.body


def test_download_image_with_legacy_token(label_studio, uploaded):
    path = uploaded["task"]["data"]["image"]
    assert requests.get(label_studio.url + path, timeout=30).status_code == 401
    r = requests.get(label_studio.url + path, headers=label_studio.legacy_auth_header(), timeout=30)
    assert r.status_code == 200, r.text[:300]
    assert np.array_equal(pixels(r.content), uploaded["pixels"])
    # a PAT-derived Bearer token works too while legacy tokens are on
    r = requests.get(label_studio.url + path, headers=label_studio.bearer_auth_header(), timeout=30)
    assert r.status_code == 200
    assert label_studio.api.jwt_settings() == {"api_tokens_enabled": True,
                                              "legacy_api_tokens_enabled": True}


def test_legacy_tokens_disabled_pat_bearer_works(label_studio_no_legacy, tmp_path):
    ls = label_studio_no_legacy
    api = ls.api
    assert api.mode == "bearer"
    assert api.jwt_settings() == {"api_tokens_enabled": True, "legacy_api_tokens_enabled": False}
    png = tmp_path / "cat.png"
    img = make_png(png)
    project = api.create_project("harness no legacy", KP_BRUSH_CONFIG)
    [task] = api.import_image(project["id"], png)
    url = ls.url + task["data"]["image"]

    # the legacy token LS still has (and still sends to backends in /setup) is refused
    r = requests.get(url, headers=ls.legacy_auth_header(), timeout=30)
    assert r.status_code == 401
    assert "legacy token authentication has been disabled" in r.text
    assert ls.legacy_client().raw("GET", "/api/projects").status_code == 401

    # the personal access token itself is a JWT *refresh* token: not usable as Bearer directly
    pat = ls.personal_access_token()
    assert requests.get(url, headers={"Authorization": f"Bearer {pat}"}, timeout=30).status_code == 401
    assert requests.get(url, headers={"Authorization": f"Token {pat}"}, timeout=30).status_code == 401

    # POST /api/token/refresh/ {"refresh": PAT} -> {"access": ...}; Bearer <access> works
    r = requests.post(ls.url + "/api/token/refresh/", json={"refresh": pat}, timeout=30)
    assert r.status_code == 200
    access = r.json()["access"]
    r = requests.get(url, headers={"Authorization": f"Bearer {access}"}, timeout=30)
    assert r.status_code == 200
    assert np.array_equal(pixels(r.content), img)

    # a username/password session works as well; a user holds one live PAT at a time (409;
    # get_personal_access_token() would blacklist the old one and create a new one)
    sess = ls.session_client()
    assert sess.whoami()["email"] == ls.username
    assert sess.raw("POST", "/api/token/").status_code == 409
    assert len(sess.get("/api/token/")) == 1
    assert LabelStudioClient(ls.url, personal_access_token=pat).download(
        task["data"]["image"]).status_code == 200


def test_backend_process_factory(backend_process, tmp_path):
    """The factory starts any command and waits for GET /health == 200 (here: a static file)."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "health").write_text("ok")
    port = ls_harness.free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
           "--directory", str(root)]
    proc = backend_process(cmd, port, name="static")
    assert proc.running
    assert requests.get(f"{proc.url}/health", timeout=5).text == "ok"
    pid = proc.process.pid
    proc.restart()
    assert proc.process.pid != pid
    assert requests.get(f"{proc.url}/health", timeout=5).status_code == 200
    assert "GET /health" in proc.log_tail()


def test_backend_process_failures_report_log_tail(tmp_path):
    port = ls_harness.free_port()
    crash = BackendProcess([sys.executable, "-c", "print('boom', flush=True); raise SystemExit(3)"],
                           port, log_path=tmp_path / "crash.log", name="crash")
    with pytest.raises(HarnessError, match=r"(?s)exited with 3.*boom"):
        crash.start(timeout=30)
    assert not crash.running

    # something that answers, but not 200 on /health
    (tmp_path / "empty").mkdir()
    never = BackendProcess([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                            "--directory", str(tmp_path / "empty")], port,
                           log_path=tmp_path / "never.log", name="never")
    with pytest.raises(HarnessError, match=r"(?s)not 200 within 3 s.*HTTP 404"):
        never.start(timeout=3)
    assert not never.running
    assert not ls_harness.port_in_use(port)
