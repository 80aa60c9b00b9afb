"""The training routes in process (server/app.py's build_app with Flask's test client, a real
random-weight MobileSAM, the real TrainingJobs starting real background runs): Label Studio
1.23.2's *Start Training* (``START_TRAINING`` to /webhook) and older Label Studio's /train start
one run and queue exactly one follow-up; annotation webhooks count toward ``train_every``; bad
requests are clear 400s while unknown events are acknowledged; /train/status and /metrics show
it; /setup and a task opened name a project's promoted trained version.

The runs read the project from "Label Studio" at an address that accepts connections and never
answers until the test lets go (:class:`Silent`): a run is going on for exactly as long as the
test needs it, then fails at once (its status says why). Runtime here: ~45 s (each run is a
spawned process that imports the training code)."""
from __future__ import annotations

import gc
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from sam_backend.server.app import build_app, close_app
from sam_backend.settings import Settings
from sam_backend.training.base import ImageSample, TrainOptions, trainer_for
from sam_backend.training.dataset import build_dataset
from sam_backend.training.versions import VersionStore
from tests.support.payloads import keypoint
from tests.support.shapes import SHAPES_CONFIG, shapes_project

IMAGE_ENV = ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY",
             "LABEL_STUDIO_ACCESS_TOKEN", "IMAGE_HOSTS", "LOCAL_FILES_DOCUMENT_ROOT")
TOKEN = "0123456789abcdef0123456789abcdef01234567"


class Silent:
    """A loopback TCP server that accepts connections and never answers, until :meth:`close`
    (then every held connection is closed and the port refuses)."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.url = "http://127.0.0.1:%d" % self.server.getsockname()[1]
        self.held = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.held.append(connection)

    def close(self):
        self.server.close()
        for connection in self.held:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()
        self._thread.join(5)


@pytest.fixture(scope="module")
def make_app(checkpoint_factory, tmp_path_factory):
    """``make_app(**options) -> (test client, app)``: build_app on random MobileSAM with its own
    trained_dir; Label Studio's address and token from the options; closed after the module."""
    checkpoint = checkpoint_factory("mobile_sam")
    apps = []
    with pytest.MonkeyPatch.context() as env:
        for name in IMAGE_ENV:
            env.delenv(name, raising=False)
        env.setenv("SAM_BACKEND_IMAGE_CACHE_DIR", str(tmp_path_factory.mktemp("imgcache")))

        def make(**options):
            settings = Settings.load(dict(
                model_name="mobile_sam", sam_checkpoint_file=str(checkpoint), device="cpu",
                runtime="torch", embedding_dtype="float32",
                local_files_document_root=tempfile.gettempdir(),
                trained_dir=str(tmp_path_factory.mktemp("trained")), **options), environ={})
            app = build_app(settings)
            app.testing = True
            apps.append(app)
            return app.test_client(), app

        yield make
    for app in apps:
        close_app(app)
    gc.unfreeze()  # build_app froze the test process's objects out of the collector


@pytest.fixture()
def silent():
    server = Silent()
    yield server
    server.close()


def jobs_of(app):
    return app.extensions["sam_backend"]["jobs"]


def ok(response):
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def error_of(response):
    assert response.status_code == 400, response.get_data(as_text=True)
    body = response.get_json()
    assert body["status"] == "error" and len(body["errors"]) == 1
    return body["errors"][0]


@pytest.mark.process  # a run is a process
def test_start_training_starts_one_run_and_queues_exactly_one_follow_up(make_app, silent):
    client, app = make_app(label_studio_url=silent.url, label_studio_api_key=TOKEN)
    # Label Studio 1.23.2: {"action": "START_TRAINING", "project": <the project, serialized>}
    first = ok(client.post("/webhook", json={"action": "START_TRAINING",
                                             "project": {"id": 5, "title": "shapes"}}))
    assert first["status"] == "ok" and first["run"] == "started" and first["project"] == 5
    assert first["job"]  # Label Studio keeps a train-job record only with "job"
    # older Label Studio: /train with "<id>.<created timestamp>"
    second = ok(client.post("/train", json={"project": "5.1700000000", "annotations": [],
                                            "label_config": SHAPES_CONFIG}))
    assert (second["run"], second["job"]) == ("queued", first["job"])
    third = ok(client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 5}}))
    assert third["run"] == "already_queued"
    status = ok(client.get("/train/status?project=5"))
    assert status["state"] == "running" and status["follow_up"] is True
    metrics = ok(client.get("/metrics"))
    assert metrics["training_runs_started"] == 1 and metrics["training_runs_queued"] == 1
    silent.close()  # "Label Studio" goes away: the run fails, its one follow-up runs and fails
    assert jobs_of(app).wait(300)
    status = ok(client.get("/train/status?project=5"))
    assert status["state"] == "failed" and status["message"] and status["follow_up"] is False
    assert status["served"] is None and status["versions"] == []
    counters = jobs_of(app).counters()
    assert counters["runs_started"] == 2 and counters["runs_failed"] == 2


@pytest.mark.process  # a run is a process
def test_a_run_without_label_studios_address_fails_and_says_so(make_app):
    client, app = make_app()  # no label_studio_url, and no /setup has given one
    assert ok(client.post("/webhook", json={"action": "START_TRAINING",
                                            "project": {"id": 4}}))["run"] == "started"
    assert jobs_of(app).wait(300)
    status = ok(client.get("/train/status?project=4"))
    assert status["state"] == "failed" and "LABEL_STUDIO_URL" in status["message"]
    assert status["served"] is None


@pytest.mark.process  # a run is a process
def test_annotation_events_count_toward_train_every(make_app, silent):
    client, app = make_app(label_studio_url=silent.url, label_studio_api_key=TOKEN,
                           train_every="3")
    created = {"action": "ANNOTATION_CREATED", "project": {"id": 6},
               "annotation": {"id": 1, "result": []}, "task": {"id": 1, "project": 6}}
    answer = ok(client.post("/webhook", json=created))
    assert answer == {"status": "ok", "action": "ANNOTATION_CREATED", "project": 6,
                      "annotations": 1}
    # the project id found in the task when the payload has no project object
    assert "job" not in ok(client.post("/webhook", json={
        "action": "ANNOTATION_UPDATED", "annotation": {"id": 1}, "task": {"id": 1, "project": 6}}))
    assert jobs_of(app).counters()["runs_started"] == 0
    bulk = ok(client.post("/webhook", json={"action": "ANNOTATIONS_CREATED", "project": {"id": 6},
                                            "annotation": [{"id": 2}], "task": [{"id": 2}]}))
    assert bulk["annotations"] == 1 and bulk["run"] == "started" and bulk["job"]
    # five more while it runs: one follow-up, queued
    more = ok(client.post("/webhook", json={"action": "ANNOTATIONS_CREATED",
                                            "project": {"id": 6},
                                            "annotation": [{"id": i} for i in range(10, 15)]}))
    assert more["annotations"] == 5 and more["run"] == "queued"
    counters = jobs_of(app).counters()
    assert counters["annotation_events"] == 8 and counters["runs_started"] == 1
    # an event without its payload cannot count; it is acknowledged all the same
    assert ok(client.post("/webhook", json={"action": "ANNOTATION_CREATED"})) \
        == {"status": "ok", "action": "ANNOTATION_CREATED", "counted": False}
    assert jobs_of(app).counters()["annotation_events"] == 8
    # deletions and other events are acknowledged, never counted
    assert ok(client.post("/webhook", json={"action": "ANNOTATIONS_DELETED",
                                            "annotations": [{"id": 1}], "project": {"id": 6}})) \
        == {"status": "ok", "action": "ANNOTATIONS_DELETED"}
    assert jobs_of(app).counters()["annotation_events"] == 8
    silent.close()
    assert jobs_of(app).wait(300)
    assert jobs_of(app).counters()["runs_started"] == 2


def test_bad_training_requests_are_clear_400s_and_other_events_are_acknowledged(make_app):
    client, app = make_app()  # train_every=0: annotation events only counted
    assert "names no project" in error_of(client.post("/webhook",
                                                      json={"action": "START_TRAINING"}))
    assert "names no project" in error_of(client.post(
        "/webhook", json={"action": "START_TRAINING", "project": {"id": "shapes"}}))
    assert "names no project" in error_of(client.post("/train", json={"project": "x.17"}))
    assert "not valid JSON" in error_of(client.post("/train", data=b"{",
                                                    content_type="application/json"))
    # train_every=0: annotation events are acknowledged, nothing is counted
    assert ok(client.post("/webhook", json={"action": "ANNOTATION_CREATED",
                                            "annotation": {"id": 1}})) \
        == {"status": "ok", "action": "ANNOTATION_CREATED"}
    assert "?project=" in error_of(client.get("/train/status"))
    assert "?project=" in error_of(client.get("/train/status?project=abc"))
    # never fail Label Studio's delivery of an event this backend does not act on
    assert ok(client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}})) \
        == {"status": "ok", "action": "PROJECT_UPDATED"}
    assert ok(client.post("/webhook", data=b"not json"))["action"] is None
    assert "job" not in ok(client.post("/webhook", json={
        "action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 1}}))
    assert jobs_of(app).counters()["runs_started"] == 0


def test_train_status_and_metrics(make_app):
    client, _ = make_app()
    status = ok(client.get("/train/status?project=42"))
    assert {"project", "state", "progress", "message", "follow_up", "served", "versions",
            "last_report", "served_here"} <= set(status)
    assert (status["project"], status["state"], status["served"], status["versions"],
            status["served_here"]) == (42, "idle", None, [], None)
    metrics = ok(client.get("/metrics"))
    for name in ("runs_started", "runs_succeeded", "runs_failed", "runs_promoted", "runs_queued",
                 "annotation_events"):
        assert metrics[f"training_{name}"] == 0
    assert metrics["trained_versions_loaded"] == [] and metrics["trained_served"] == {}


def test_setup_and_task_open_name_the_promoted_version_and_clicks_do_not(make_app,
                                                                         tmp_path_factory):
    client, app = make_app(trained_threshold="0", concept_timeout="300")
    root = Path(tempfile.gettempdir())
    tasks = shapes_project(tmp_path_factory.mktemp("shapes"), 2, seed=5)
    dataset = build_dataset(tasks, SHAPES_CONFIG, min_tasks=1)
    # a reduced random-init RF-DETR saved through the trainer's own path (no epoch)
    work = tmp_path_factory.mktemp("rf")
    trainer_for("rf_detr", TrainOptions(epochs=0, reduced=True, seed=1)).train(
        [ImageSample(s, Path(s.image)) for s in dataset.samples], dataset.classes,
        list(dataset.classes), work / "model")
    store = VersionStore.from_settings(app.extensions["sam_backend"]["trained"].service.settings)
    target = store.work_dir(11)
    shutil.copytree(work / "model", target / "model")
    store.promote(11, store.publish(11, target, "rf_detr", {"promoted": True}), "test")
    plain = ok(client.get("/health"))["model_version"]
    trained = f"{plain}+rf_detr@p11-v1"
    setup = ok(client.post("/setup", json={"project": "11.1700000000", "schema": SHAPES_CONFIG}))
    assert setup["model_version"] == trained
    assert ok(client.post("/setup", json={"project": "12.1700000000",
                                          "schema": SHAPES_CONFIG}))["model_version"] == plain
    task = {"id": 1, "data": {"image": "/data/local-files/?d=" + str(
        Path(tasks[0]["data"]["image"]).relative_to(root))}}
    body = {"tasks": [task], "project": "11.1700000000", "label_config": SHAPES_CONFIG,
            "params": {"context": None}}
    answer = ok(client.post("/predict", json=body))
    assert answer["model_version"] == trained and answer["results"][0]["model_version"] == trained
    assert answer["results"][0]["result"]
    click = ok(client.post("/predict", json={**body, "params": {"context": {"result": [
        keypoint(50.0, 50.0, "circle")]}}}))
    assert click["model_version"] == plain and click["results"][0]["model_version"] == plain
    assert ok(client.get("/train/status?project=11"))["served_here"] == "p11-v1"
    assert ok(client.get("/metrics"))["trained_served"] == {"11": "p11-v1"}
