"""The routes in process: server/app.py's build_app with Flask's test client, as the
label-studio-ml examples test their backends (a real random-weight MobileSAM, real images on
disk; no server process)."""
from __future__ import annotations

import base64
import gc

import cv2
import numpy as np
import pytest

from sam_backend.models.base import Prompt
from sam_backend.models.registry import get_variant
from sam_backend.models.torch_runtime import TorchSamModel
from sam_backend.server.app import build_app
from sam_backend.settings import Settings
from tests.support.payloads import FULL_CONFIG, H, W, decode_brush, keypoint, payload, rectangle
from tests.support.random_weights import synthetic_image

IMAGE_ENV = ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY",
             "LABEL_STUDIO_ACCESS_TOKEN", "IMAGE_HOSTS", "LOCAL_FILES_DOCUMENT_ROOT")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """The document root holding pics/scene.png (payloads' default task image), and its pixels."""
    root = tmp_path_factory.mktemp("docroot")
    image = synthetic_image(H, W, seed=3)
    (root / "pics").mkdir()
    cv2.imwrite(str(root / "pics" / "scene.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return root, image


@pytest.fixture(scope="module")
def make_app(checkpoint_factory, scene, tmp_path_factory):
    """``make_app(**options) -> Flask test client`` of build_app; the model loads once (the
    process-wide segmenter), the environment does not take part."""
    checkpoint = checkpoint_factory("mobile_sam")
    with pytest.MonkeyPatch.context() as env:
        for name in IMAGE_ENV:
            env.delenv(name, raising=False)
        env.setenv("SAM_BACKEND_IMAGE_CACHE_DIR", str(tmp_path_factory.mktemp("imgcache")))

        def make(**options):
            settings = Settings.load(dict(
                model_name="mobile_sam", sam_checkpoint_file=str(checkpoint), device="cpu",
                runtime="torch", embedding_dtype="float32", local_files_document_root=str(scene[0]),
                out_poly="true", max_label_config_kb="4", **options), environ={})
            app = build_app(settings)
            app.testing = True
            return app.test_client()

        yield make
    gc.unfreeze()  # build_app froze the test process's objects out of the collector


@pytest.fixture(scope="module")
def client(make_app):
    return make_app()


@pytest.fixture(scope="module")
def reference(checkpoint_factory, scene):
    """The model layer's own answer on the same image, to compare /predict's masks with."""
    model = TorchSamModel(get_variant("mobile_sam"), str(checkpoint_factory("mobile_sam")), "cpu")
    embedding = model.embed(scene[1])

    def mask(points, labels, box=None):
        return model.decode(embedding, Prompt(np.array(points, np.float32).reshape(-1, 2),
                                              np.array(labels, np.int64),
                                              None if box is None else np.array(box, np.float64)))
    return mask


def error_of(response, status):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["status"] == "error" and len(body["errors"]) == 1
    return body["errors"][0]


def test_health_names_the_model_class_variant_runtime_and_device(client):
    for path in ("/health", "/"):
        body = client.get(path).get_json()
        assert body["status"] == "UP"
        assert body["model_class"] == "SamBackend"  # what label-studio-ml backends report
        assert (body["model"], body["runtime"], body["device"]) == \
            ("mobile_sam/vit_t", "torch", "cpu")
        assert body["model_version"].startswith("sam_backend-") and \
            body["model_version"].endswith(":mobile_sam/vit_t")
        assert body["embedding_store"] == {"state": "off"}


def test_predict_answers_a_click_with_the_model_layers_mask(client, reference):
    response = client.post("/predict", json=payload([keypoint(40.0, 50.0)]))
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    (result,) = body["results"]
    assert body["model_version"] == result["model_version"]
    kinds = [r["type"] for r in result["result"]]
    assert kinds[0] == "brushlabels" and kinds[-1] == "rectanglelabels" and \
        "polygonlabels" in kinds  # out_poly=true
    brush = result["result"][0]
    assert (brush["from_name"], brush["to_name"], brush["value"]["brushlabels"]) == \
        ("BrushLabels", "image", ["cat"])
    want = reference([[0.4 * W, 0.5 * H]], [1])
    assert np.array_equal(decode_brush(brush), want.mask)
    assert result["score"] == pytest.approx(want.score, abs=1e-5)


def test_predict_answers_a_smart_rectangle_without_repeating_the_box(client, reference):
    response = client.post("/predict", json=payload([rectangle(10.0, 20.0, 50.0, 60.0)]))
    assert response.status_code == 200, response.get_data(as_text=True)
    regions = response.get_json()["results"][0]["result"]
    assert "rectanglelabels" not in [r["type"] for r in regions]
    want = reference([], [], box=[0.1 * W, 0.2 * H, 0.6 * W, 0.8 * H])
    assert np.array_equal(decode_brush(regions[0]), want.mask)


def test_an_opened_task_gets_no_prediction(client):
    body = payload([])
    body["params"]["context"] = None
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    assert response.get_json()["results"] == []


def test_setup_remembers_the_projects_config_for_predict_without_one(client, reference):
    body = payload([keypoint(40.0, 50.0)], project="9.1700000009")
    body.pop("label_config")
    assert "no label_config" in error_of(client.post("/predict", json=body), 400)

    setup = client.post("/setup", json={"project": "9.1700000009", "schema": FULL_CONFIG,
                                        "hostname": "", "access_token": ""})
    assert setup.status_code == 200
    assert setup.get_json()["model_version"] == client.get("/versions").get_json()["model_version"]
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    brush = response.get_json()["results"][0]["result"][0]
    assert np.array_equal(decode_brush(brush), reference([[0.4 * W, 0.5 * H]], [1]).mask)


@pytest.mark.parametrize("path, body, message", [
    ("/predict", {"tasks": []}, "the request has no tasks"),
    ("/predict", {"tasks": [{"id": 1}]}, "tasks[0] is not a task object with 'data'"),
    ("/predict", dict(payload([keypoint(1, 1)]), label_config=7),
     "label_config must be the labeling config XML (a string), got int"),
    ("/predict", dict(payload([keypoint(1, 1)]), params=[]), "params must be an object, got list"),
    ("/predict", dict(payload([keypoint(1, 1)]), label_config=FULL_CONFIG + " " * 5000),
     "more than the limit of 4,096 (max_label_config_kb)"),
    ("/predict", payload([keypoint(150, 1)]), "context.result[0]: value.x=150.0 is outside"),
    ("/predict", dict(payload([keypoint(1, 1)]), tasks=[{"data": {}}] * 65),
     "the request has 65 tasks, more than the limit of 64 (max_tasks)"),
    ("/setup", {"project": 1, "schema": "<View"}, "the label_config is not valid XML"),
    ("/setup", {"project": [1]}, "project must be a string or an integer, got list"),
])
def test_bad_requests_get_a_400_naming_the_field(client, path, body, message):
    assert message in error_of(client.post(path, json=body), 400)
    assert client.get("/health").status_code == 200  # and the server keeps serving


def test_a_body_that_is_not_a_json_object_is_a_400(client):
    assert "not valid JSON" in error_of(
        client.post("/predict", data=b"{", content_type="application/json"), 400)
    assert "must be a JSON object" in error_of(client.post("/predict", json=[1]), 400)


def test_versions_and_webhook(client):
    version = client.get("/health").get_json()["model_version"]
    for method in (client.get, client.post):
        assert method("/versions").get_json() == {"versions": [version], "model_version": version}
    response = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1}})
    assert response.status_code == 200
    # train_every=0: acknowledged, not counted
    assert response.get_json() == {"status": "ok", "action": "ANNOTATION_CREATED"}
    assert client.post("/webhook", data=b"not json").get_json()["action"] is None


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_refuses_requests_without_the_credentials(make_app, reference):
    client = make_app(basic_auth_user="ls", basic_auth_pass="s3cret")
    for call in (lambda h: client.post("/predict", json=payload([keypoint(40.0, 50.0)]), headers=h),
                 lambda h: client.post("/setup", json={"project": 1}, headers=h),
                 lambda h: client.get("/versions", headers=h),
                 lambda h: client.get("/metrics", headers=h)):
        for headers in ({}, basic("ls", "wrong"), basic("other", "s3cret")):
            response = call(headers)
            assert response.status_code == 401, response.get_data(as_text=True)
            assert response.headers["WWW-Authenticate"].startswith('Basic realm="sam_backend"')
    # /health without credentials: liveness only; with wrong ones: 401
    assert client.get("/health").get_json() == {"status": "UP"}
    assert client.get("/health", headers=basic("ls", "wrong")).status_code == 401
    assert client.get("/health", headers=basic("ls", "s3cret")).get_json()["model_class"] == \
        "SamBackend"
    response = client.post("/predict", json=payload([keypoint(40.0, 50.0)]),
                           headers=basic("ls", "s3cret"))
    assert response.status_code == 200, response.get_data(as_text=True)
    brush = response.get_json()["results"][0]["result"][0]
    assert np.array_equal(decode_brush(brush), reference([[0.4 * W, 0.5 * H]], [1]).mask)


def test_a_predict_whose_client_has_gone_stops_with_one_log_line(client, caplog):
    # the server's disconnect check (waitress provides it) says the client has left
    with caplog.at_level("INFO", logger="sam_backend"):
        response = client.post("/predict", json=payload([keypoint(40, 50)]),
                               environ_base={"waitress.client_disconnected": lambda: True})
    assert response.status_code == 499
    assert "disconnected" in response.get_json()["errors"][0]
    records = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None
    assert records[0].levelname == "INFO"
    assert client.post("/predict", json=payload([keypoint(40, 50)])).status_code == 200
