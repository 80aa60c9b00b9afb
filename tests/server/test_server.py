"""The backend as Label Studio sees it: `label-studio-ml start sam ...` on a loopback port,
realistic /predict payloads, answers checked against the model layer's own masks."""
from __future__ import annotations

import json
import os
import time

import cv2
import numpy as np
import pytest
import requests

from sam_backend.models.base import Prompt
from sam_backend.models.registry import get_variant
from sam_backend.models.torch_runtime import TorchSamModel
from tests.support.payloads import FULL_CONFIG, H, W, decode_brush, keypoint, payload, rectangle
from tests.support.server_utils import BackendProcess, free_port

pytestmark = pytest.mark.process  # a real `sam-backend serve`

OTHER_CONFIG = """<View>
  <Image name="photo" value="$img"/>
  <KeyPointLabels name="clicks" toName="photo" smart="true"><Label value="car" smart="true"/></KeyPointLabels>
  <BrushLabels name="masks" toName="photo"><Label value="car"/></BrushLabels>
</View>"""



@pytest.fixture(scope="module")
def image_file(tmp_path_factory, image_factory_module):
    root = tmp_path_factory.mktemp("docroot")
    image = image_factory_module(H, W, seed=3)
    path = root / "pics" / "scene.png"
    path.parent.mkdir()
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return root, path, image


@pytest.fixture(scope="module")
def image_factory_module():
    from tests.support.random_weights import synthetic_image

    return synthetic_image


@pytest.fixture(scope="module")
def backend(checkpoint_factory, image_file, tmp_path_factory):
    root, _, _ = image_file
    checkpoint = checkpoint_factory("mobile_sam")
    port = free_port()
    env = {"LOCAL_FILES_DOCUMENT_ROOT": str(root), "OUT_POLY": "true",
           "SAM_BACKEND_IMAGE_CACHE_DIR": str(tmp_path_factory.mktemp("imgcache"))}
    process = BackendProcess(
        ["label-studio-ml", "start", "sam", "--with", "model_name=mobile_sam",
         f"sam_checkpoint_file={checkpoint}", "device=cpu", "embedding_dtype=float32",
         "runtime=torch",  # compared mask for mask with the torch model layer below
         "-p", str(port), "--host",
         "127.0.0.1"], port, env, tmp_path_factory.mktemp("logs") / "backend.log")
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def reference(checkpoint_factory, image_file):
    model = TorchSamModel(get_variant("mobile_sam"), str(checkpoint_factory("mobile_sam")), "cpu")
    return model, model.embed(image_file[2])


def expected_mask(reference, points, labels, box=None, previous=None):
    model, embedding = reference
    prompt = Prompt(np.array(points, np.float32).reshape(-1, 2), np.array(labels),
                    None if box is None else np.array(box, np.float64),
                    None if previous is None else previous.low_res_logits)
    return model.decode(embedding, prompt)


def test_health_names_the_variant_and_device(backend):
    body = requests.get(backend.url + "/health", timeout=5).json()
    assert body["status"] == "UP"
    assert body["model"] == "mobile_sam/vit_t"
    assert body["device"] == "cpu"


def test_predict_before_any_setup_with_a_positive_click(backend, reference):
    # the first request this server ever gets for the project: no /setup happened
    response = requests.post(backend.url + "/predict", json=payload([keypoint(40.0, 50.0)]),
                             timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    regions = result["result"]
    brush = [r for r in regions if r["type"] == "brushlabels"]
    assert len(brush) == 1
    assert brush[0]["from_name"] == "BrushLabels" and brush[0]["to_name"] == "image"
    assert brush[0]["value"]["brushlabels"] == ["cat"]
    assert (brush[0]["original_width"], brush[0]["original_height"]) == (W, H)
    assert len(brush[0]["value"]["rle"]) > 0
    mask = decode_brush(brush[0])
    want = expected_mask(reference, [[0.40 * W, 0.50 * H]], [1])
    assert np.array_equal(mask, want.mask)
    assert result["score"] == pytest.approx(want.score, abs=1e-5)

    # the box is the mask's tight bounds
    box = [r for r in regions if r["type"] == "rectanglelabels"]
    assert len(box) == 1 and box[0]["from_name"] == "RectangleLabels"
    ys, xs = np.nonzero(mask)
    v = box[0]["value"]
    assert v["x"] == pytest.approx(xs.min() / W * 100)
    assert v["y"] == pytest.approx(ys.min() / H * 100)
    assert v["width"] == pytest.approx((xs.max() + 1 - xs.min()) / W * 100)
    assert v["height"] == pytest.approx((ys.max() + 1 - ys.min()) / H * 100)
    assert v["rectanglelabels"] == ["cat"]

    # polygons (OUT_POLY=true in the environment) cover the mask's large components
    polygons = [r for r in regions if r["type"] == "polygonlabels"]
    assert polygons and all(p["from_name"] == "PolygonLabels" for p in polygons)
    canvas = np.zeros((H, W), np.uint8)
    for p in polygons:
        pts = np.array(p["value"]["points"]) / 100 * [W, H]
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1)
    ids = [r["id"] for r in regions]
    assert len(set(ids)) == len(ids) and all(isinstance(i, str) and i for i in ids)
    assert all(r["score"] == pytest.approx(result["score"]) for r in regions)


def test_positive_then_negative_clicks_feed_back_the_previous_logits(backend, reference):
    first = [keypoint(30.0, 40.0)]
    second = first + [keypoint(60.0, 45.0, positive=False)]
    third = second + [keypoint(35.0, 70.0)]
    masks = []
    for regions in (first, second, third):
        response = requests.post(backend.url + "/predict", json=payload(regions), timeout=60)
        assert response.status_code == 200, response.text
        brush = [r for r in response.json()["results"][0]["result"] if r["type"] == "brushlabels"]
        masks.append(decode_brush(brush[0]))
    p1 = expected_mask(reference, [[0.3 * W, 0.4 * H]], [1])
    p2 = expected_mask(reference, [[0.3 * W, 0.4 * H], [0.6 * W, 0.45 * H]], [1, 0], previous=p1)
    p3 = expected_mask(reference, [[0.3 * W, 0.4 * H], [0.6 * W, 0.45 * H], [0.35 * W, 0.7 * H]],
                       [1, 0, 1], previous=p2)
    assert np.array_equal(masks[0], p1.mask)
    assert np.array_equal(masks[1], p2.mask)
    assert np.array_equal(masks[2], p3.mask)
    # without the fed-back logits the answer would differ: the test can tell the two apart
    fresh = expected_mask(reference, [[0.3 * W, 0.4 * H], [0.6 * W, 0.45 * H]], [1, 0])
    assert not np.array_equal(fresh.mask, p2.mask)


def test_rectangle_prompt_uses_the_last_box(backend, reference):
    regions = [rectangle(5, 5, 20, 20), rectangle(10.0, 20.0, 50.0, 60.0)]
    response = requests.post(backend.url + "/predict", json=payload(regions), timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]["result"]
    brush = [r for r in result if r["type"] == "brushlabels"]
    want = expected_mask(reference, [], [], box=[0.1 * W, 0.2 * H, 0.6 * W, 0.8 * H])
    assert np.array_equal(decode_brush(brush[0]), want.mask)
    # the annotator's own smart rectangle is not duplicated
    assert not [r for r in result if r["type"] == "rectanglelabels"]


def test_two_projects_with_different_control_names(backend, reference):
    other = payload([keypoint(40.0, 50.0, label="car", from_name="clicks", to_name="photo")],
                    config=OTHER_CONFIG, data={"img": "/data/local-files/?d=pics/scene.png"},
                    project="2.1700000001", task_id=7)
    mine = payload([keypoint(40.0, 50.0)])
    a = requests.post(backend.url + "/predict", json=other, timeout=60).json()["results"][0]
    b = requests.post(backend.url + "/predict", json=mine, timeout=60).json()["results"][0]
    assert [(r["type"], r["from_name"], r["to_name"]) for r in a["result"]] == \
        [("brushlabels", "masks", "photo")]
    assert a["result"][0]["value"]["brushlabels"] == ["car"]
    assert {r["from_name"] for r in b["result"]} >= {"BrushLabels", "RectangleLabels"}
    assert np.array_equal(decode_brush(a["result"][0]),
                          decode_brush([r for r in b["result"] if r["type"] == "brushlabels"][0]))


def peer_style(region):
    """A region as HumanSignal's SAM example tests send it: no from_name, no to_name."""
    return {k: v for k, v in region.items() if k not in ("from_name", "to_name")}


def test_prompts_without_from_name_are_answered_when_the_config_says_which(backend, reference):
    box = requests.post(backend.url + "/predict",
                        json=payload([peer_style(rectangle(10.0, 20.0, 50.0, 60.0))]), timeout=60)
    assert box.status_code == 200, box.text
    (brush,) = [r for r in box.json()["results"][0]["result"] if r["type"] == "brushlabels"]
    assert (brush["from_name"], brush["to_name"]) == ("BrushLabels", "image")
    want = expected_mask(reference, [], [], box=[0.1 * W, 0.2 * H, 0.6 * W, 0.8 * H])
    assert np.array_equal(decode_brush(brush), want.mask)

    click = requests.post(backend.url + "/predict",
                          json=payload([peer_style(keypoint(40.0, 50.0))]), timeout=60)
    assert click.status_code == 200, click.text
    (brush,) = [r for r in click.json()["results"][0]["result"] if r["type"] == "brushlabels"]
    want = expected_mask(reference, [[0.4 * W, 0.5 * H]], [1])
    assert np.array_equal(decode_brush(brush), want.mask)


AMBIGUOUS_CONFIG = """<View>
  <Image name="left" value="$image"/><Image name="right" value="$image"/>
  <RectangleLabels name="boxL" toName="left" smart="true"><Label value="cat"/></RectangleLabels>
  <RectangleLabels name="boxR" toName="right" smart="true"><Label value="cat"/></RectangleLabels>
  <BrushLabels name="masks" toName="left"><Label value="cat"/></BrushLabels>
</View>"""


def test_prompt_without_from_name_in_an_ambiguous_config_is_a_clear_400(backend):
    body = payload([peer_style(rectangle(10.0, 20.0, 50.0, 60.0))], config=AMBIGUOUS_CONFIG)
    response = requests.post(backend.url + "/predict", json=body, timeout=60)
    assert response.status_code == 400
    message = response.json()["errors"][0]
    assert "no from_name" in message and "boxL, boxR" in message
    # naming the image is enough to tell
    body["params"]["context"]["result"][0]["to_name"] = "right"
    assert requests.post(backend.url + "/predict", json=body, timeout=60).status_code == 200


def test_setup_is_fast_and_versions_answer_get_and_post(backend):
    body = {"project": "1.1700000000", "schema": FULL_CONFIG, "hostname": "http://localhost:8080",
            "access_token": "0123456789abcdef0123456789abcdef01234567", "extra_params": None}
    for _ in range(3):  # Label Studio often sends it three times in a row
        started = time.perf_counter()
        response = requests.post(backend.url + "/setup", json=body, timeout=3)
        elapsed = time.perf_counter() - started
        assert response.status_code == 200
        assert elapsed < 1.0
    version = response.json()["model_version"]
    assert "mobile_sam/vit_t" in version
    assert requests.get(backend.url + "/versions", timeout=5).json()["versions"] == [version]
    assert requests.post(backend.url + "/versions", json={"project": "1"}, timeout=5).json()[
        "versions"] == [version]
    hook = requests.post(backend.url + "/webhook", json={"action": "ANNOTATION_CREATED",
                                                         "project": {"id": 1}}, timeout=5)
    assert hook.status_code == 200 and hook.json() == {"status": "ok",
                                                       "action": "ANNOTATION_CREATED"}
    assert "job" not in hook.json()
    assert requests.post(backend.url + "/setup", json=body, timeout=3).json()["model_version"] == version


def test_predict_without_context_answers_at_once(backend):
    body = payload([])
    body["params"]["context"] = None
    started = time.perf_counter()
    response = requests.post(backend.url + "/predict", json=body, timeout=10)
    assert response.status_code == 200
    assert response.json()["results"] == []
    assert time.perf_counter() - started < 1.0


BAD_REQUESTS = {
    "malformed JSON": ("{not json", "not valid JSON"),
    "no tasks": ({"label_config": FULL_CONFIG, "params": {"context": {"result": []}}}, "no tasks"),
    "unknown context type": (payload([{**keypoint(10, 10), "type": "choices"}]),
                             "has type 'choices'"),
    "label not in config": (payload([keypoint(10, 10, label="zebra")]),
                            "label 'zebra' is not in the labeling config"),
    "x above 100": (payload([keypoint(140.0, 10)]), "value.x=140.0 is outside the image"),
    "negative y": (payload([keypoint(10, -5.0)]), "value.y=-5.0 is outside the image"),
    "NaN": ('{"tasks": [{"id": 1, "data": {"image": "/data/local-files/?d=pics/scene.png"}}], '
            '"label_config": %s, "params": {"context": {"result": [{"type": "keypointlabels", '
            '"from_name": "KeyPointLabels", "to_name": "image", "value": {"x": NaN, "y": 5, '
            '"keypointlabels": ["cat"]}}]}}}' % json.dumps(FULL_CONFIG), "not a finite number"),
    "missing image file": (payload([keypoint(10, 10)], data={"image": "/data/local-files/?d=pics/none.png"}),
                           "none.png"),
    "empty image field": (payload([keypoint(10, 10)], data={"image": ""}), "has no image"),
    "zero-size image": (payload([keypoint(10, 10)], data={"image": "/data/local-files/?d=pics/empty.png"}),
                        "empty.png"),
    "bad label config": (payload([keypoint(10, 10)], config="<View><Image"), "not valid XML"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_gets_a_clear_json_error_and_the_server_keeps_serving(name, backend, image_file):
    (image_file[0] / "pics" / "empty.png").write_bytes(b"")
    body, expected = BAD_REQUESTS[name]
    data = body if isinstance(body, str) else json.dumps(body)
    response = requests.post(backend.url + "/predict", data=data,
                             headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["status"] == "error"
    assert expected in answer["errors"][0]
    # Label Studio shows str(HTTPError), built from the reason phrase: the message must be there
    with pytest.raises(requests.HTTPError) as shown:
        response.raise_for_status()
    assert expected in " ".join(answer["errors"][0].split())
    assert " ".join(expected.split())[:60] in str(shown.value)
    assert "Traceback" not in response.text
    assert requests.get(backend.url + "/health", timeout=5).status_code == 200
    ok = requests.post(backend.url + "/predict", json=payload([keypoint(40.0, 50.0)]), timeout=60)
    assert ok.status_code == 200
    assert backend.running


def test_exif_rotated_photo_gets_a_mask_in_the_rotated_frame(backend, image_file, reference):
    """A phone photo stored landscape with EXIF orientation 6 is shown portrait by the browser;
    Label Studio's coordinates and the returned mask must be in that portrait frame."""
    from PIL import Image

    root, _, upright = image_file  # H x W, what the browser must show
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # orientation 6 = rotate 90° CW to view
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(root / "pics" / "phone.jpg", quality=100, exif=exif)
    viewed = np.asarray(Image.open(root / "pics" / "phone.jpg").transpose(Image.Transpose.ROTATE_270))
    assert viewed.shape == upright.shape

    click = keypoint(40.0, 50.0)
    response = requests.post(backend.url + "/predict", timeout=60, json=payload(
        [click], data={"image": "/data/local-files/?d=pics/phone.jpg"}))
    assert response.status_code == 200, response.text
    brush = [r for r in response.json()["results"][0]["result"] if r["type"] == "brushlabels"][0]
    assert (brush["original_width"], brush["original_height"]) == (W, H)
    model, _ = reference
    want = model.decode(model.embed(viewed), Prompt(np.array([[0.4 * W, 0.5 * H]]), np.array([1])))
    assert np.array_equal(decode_brush(brush), want.mask)


def test_label_studio_ml_start_closes_after_a_413_and_takes_a_chunked_body_of_the_limit(backend):
    """Issue 21 (8), `label-studio-ml start` path: Werkzeug's development server kept the socket
    open after a 413 whose body was still being sent, and refused a chunked body of exactly
    max_request_mb. It runs on the same server as `sam-backend serve` now."""
    import socket

    limit = 32 * 2 ** 20
    body = json.dumps(payload([keypoint(40.0, 50.0)])).encode()
    body += b" " * (limit - len(body))
    pieces = (body[i:i + 2 ** 20] for i in range(0, len(body), 2 ** 20))
    response = requests.post(backend.url + "/predict", data=pieces, timeout=60,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text[:300]

    port = int(backend.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (limit + 1) + b" " * 65536)  # and no more
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 413"), data[:300]
        assert b"Connection: close" in data.split(b"\r\n\r\n")[0]
        started = time.monotonic()
        try:
            while s.recv(65536):  # the rest of the answer, then the server's close
                pass
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 5
    assert requests.get(backend.url + "/health", timeout=5).status_code == 200
