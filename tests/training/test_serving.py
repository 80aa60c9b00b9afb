"""Serving a project's promoted trained version (sam_backend/training/serving.py): a task opened
(a /predict without context) is answered by the version's model under its model_version; a newly
promoted version answers from the next look at the pointer (at most once a second), without a
restart; a damaged version is refused and the one before keeps serving; a project without a
version is answered as before.

Real components: a reduced RF-DETR trained for one epoch on a synthetic shapes project by the
trainer itself (random init, CPU), published and promoted through the real VersionStore; a
random-weight MobileSAM behind the service; the grounding_dino trainer's reduced random Grounding
DINO for that kind and for a detector without masks. The poll interval runs on a clock the test
advances (no sleeping). Runtime here: ~60 s (training ~10 s, the reduced Grounding DINO ~10 s,
loads, one pass per case)."""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from sam_backend.assembly import prediction_service
from sam_backend.concepts.base import Selection
from sam_backend.images.config import ImageAccessSettings
from sam_backend.images.loader import ImageLoader
from sam_backend.settings import Settings
from sam_backend.training import serving
from sam_backend.training.base import ImageSample, TrainOptions, trainer_for
from sam_backend.training.dataset import build_dataset
from sam_backend.training.serving import DetectorEngine, TrainedModels
from sam_backend.training.versions import VersionStore
from tests.support.shapes import LABELS, SHAPES_CONFIG, shapes_project

PROJECT = 7


class Clock:
    """Seconds the test moves forward itself."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Four shapes images under the temporary directory (the service's document root) and their
    annotated tasks (``data.image`` a local-files URL)."""
    root = Path(tempfile.gettempdir())
    directory = tmp_path_factory.mktemp("shapes")
    tasks = shapes_project(directory, 4, seed=11, url_for=lambda p: str(p))
    for task in tasks:  # what the service reads: Label Studio's local-files URL
        task["local"] = task["data"]["image"]
        relative = Path(task["local"]).relative_to(root)
        task["data"] = {"image": f"/data/local-files/?d={relative}"}
    return tasks


@pytest.fixture(scope="module")
def rf_detr_model(shapes, tmp_path_factory):
    """A reduced RF-DETR trained one epoch on the shapes (the trainer's own save path)."""
    dataset = build_dataset([{**t, "data": {"image": t["local"]}} for t in shapes],
                            SHAPES_CONFIG, min_tasks=1)
    samples = [ImageSample(s, Path(s.image)) for s in dataset.samples]
    out = tmp_path_factory.mktemp("rf") / "model"
    trainer_for("rf_detr", TrainOptions(epochs=1, batch_size=2, reduced=True, seed=0)).train(
        samples, dataset.classes, list(dataset.classes), out)
    return out


def publish(store: VersionStore, project: int, model: Path, kind: str):
    """``model`` (a trainer's directory) published as the project's next version and promoted."""
    work = store.work_dir(project)
    shutil.copytree(model, work / "model")
    version = store.publish(project, work, kind, {"promoted": True})
    store.promote(project, version, "test")
    return version


@pytest.fixture(scope="module")
def service(checkpoint_factory, tmp_path_factory):
    """A PredictionService (random MobileSAM, torch, float32 embeddings) whose trained versions
    live in a fresh trained_dir; local files anywhere under the temporary directory; a pass
    waits for its answer (concept_timeout) and keeps every instance (trained_threshold 0)."""
    trained_dir = tmp_path_factory.mktemp("trained")
    settings = Settings.load({
        "model_name": "mobile_sam", "device": "cpu", "runtime": "torch",
        "sam_checkpoint_file": str(checkpoint_factory("mobile_sam")),
        "embedding_dtype": "float32", "trained_dir": str(trained_dir), "out_poly": "true",
        "trained_threshold": "0", "concept_timeout": "300"}, environ={})
    images = ImageLoader(ImageAccessSettings.from_settings(
        settings, cache_dir=str(tmp_path_factory.mktemp("cache")),
        local_files_document_root=tempfile.gettempdir()))
    return prediction_service(settings, images=images)


@pytest.fixture(scope="module")
def served(service):
    """The service serving trained versions, on a clock the test advances."""
    clock = Clock()
    trained = TrainedModels(service, VersionStore.from_settings(service.settings), clock=clock)
    service.trained = trained
    yield trained, clock
    service.trained = None
    trained.close()


def open_task(service, task, project=f"{PROJECT}.1700000000"):
    """A task opened in Label Studio: /predict without context."""
    return service.predict([task], SHAPES_CONFIG, None, project)


def test_attach_follows_serve_trained(service):
    assert service.settings.serve_trained  # the default
    trained = serving.attach(service)
    try:
        assert isinstance(trained, TrainedModels) and service.trained is trained
    finally:
        service.trained = None
        trained.close()
    off = type(service)(dataclasses.replace(service.settings, serve_trained=False),
                        service.segmenter, service.images)
    assert serving.attach(off) is None and off.trained is None


def test_a_promoted_version_answers_task_open_under_its_model_version(service, served, shapes,
                                                                     rf_detr_model):
    trained, clock = served
    store = trained.versions
    assert open_task(service, shapes[0]) == []  # no version yet: as before (auto_annotate off)
    assert service.model_version_for(f"{PROJECT}.1") == service.model_version
    v1 = publish(store, PROJECT, rf_detr_model, "rf_detr")
    clock.now += 1.0
    expected = f"{service.click_model_version}+rf_detr@p{PROJECT}-v1"
    assert service.model_version_for(f"{PROJECT}.1700000000") == expected  # what /setup answers
    [answer] = open_task(service, shapes[0])
    assert answer["model_version"] == expected
    regions = answer["result"]
    assert regions, "the trained model's instances (every score kept) give regions"
    assert {r["type"] for r in regions} == {"brushlabels", "polygonlabels", "rectanglelabels"}
    assert {r["value"][r["type"]][0] for r in regions} <= set(LABELS)
    # the boxes are the model's own: each rectangle is one of the detector's boxes on the image
    engine = service.trained.annotator(PROJECT)[0].engine
    assert isinstance(engine, DetectorEngine) and engine.name == f"rf_detr@p{PROJECT}-v1"
    image = service.images.load(shapes[0]["data"]["image"], shapes[0]["id"])
    found = engine.detector.predict(image, 0.0)
    height, width = image.shape[:2]
    for region in (r for r in regions if r["type"] == "rectanglelabels"):
        value = region["value"]
        box = np.array([value["x"] * width / 100, value["y"] * height / 100,
                        (value["x"] + value["width"]) * width / 100,
                        (value["y"] + value["height"]) * height / 100])
        label = engine.detector.classes.index(value["rectanglelabels"][0])
        mine = np.asarray(found.boxes)[np.asarray(found.labels) == label]
        assert np.abs(mine - box).max(axis=1).min() < 0.01, (box, mine)
    # clicks are unchanged: the service's own model_version
    assert service.model_version_for(None) == service.model_version
    assert v1.name in trained.metrics()["trained_versions_loaded"]


def test_a_newly_promoted_version_serves_from_the_next_look(service, served, shapes,
                                                            rf_detr_model):
    trained, clock = served
    store = trained.versions
    if store.current(PROJECT) is None:
        publish(store, PROJECT, rf_detr_model, "rf_detr")
        clock.now += 1.0
    before = open_task(service, shapes[1])[0]["model_version"]
    v2 = publish(store, PROJECT, rf_detr_model, "rf_detr")
    # within the second since the last look, the pointer is not read again
    assert open_task(service, shapes[1])[0]["model_version"] == before
    clock.now += 1.0
    [answer] = open_task(service, shapes[1])
    assert answer["model_version"] == f"{service.click_model_version}+rf_detr@{v2.name}"
    assert answer["result"]
    assert trained.serving()[str(PROJECT)] == v2.name


def test_a_damaged_version_is_refused_and_the_one_before_keeps_serving(service, served, shapes,
                                                                       rf_detr_model, caplog):
    trained, clock = served
    store = trained.versions
    good = publish(store, PROJECT, rf_detr_model, "rf_detr")
    clock.now += 1.0
    assert open_task(service, shapes[2])[0]["model_version"].endswith(good.name)
    bad = publish(store, PROJECT, rf_detr_model, "rf_detr")
    weights = next(bad.model_dir.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    weights.write_bytes(bytes(data))
    failures = trained.load_failures
    clock.now += 1.0
    with caplog.at_level("ERROR", logger="sam_backend.training.serving"):
        [answer] = open_task(service, shapes[2])
    assert answer["model_version"].endswith(good.name) and answer["result"]
    assert trained.load_failures == failures + 1
    assert any(bad.name in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)
    # refused once: the next asks neither retry it nor stop serving the good one
    clock.now += 1.0
    assert open_task(service, shapes[2])[0]["model_version"].endswith(good.name)
    assert trained.load_failures == failures + 1


def test_a_project_without_a_version_is_answered_as_before(service, served, shapes):
    assert open_task(service, shapes[0], project="8.1700000000") == []
    assert service.model_version_for("8.1700000000") == service.model_version
    assert service.trained_annotator("no project") is None


@pytest.fixture(scope="module")
def reduced_dino(tmp_path_factory):
    """A reduced random Grounding DINO of the grounding_dino trainer (its words: the shapes'
    labels) as ``(model, processor, directory in transformers' format)``."""
    from sam_backend.training.grounding_dino import build_reduced

    model, processor = build_reduced(LABELS, seed=0)
    directory = tmp_path_factory.mktemp("gd") / "model"
    model.save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    return model, processor, directory


def test_a_grounding_dino_version_stays_open_vocabulary(service, served, reduced_dino):
    trained, clock = served
    version = publish(trained.versions, 9, reduced_dino[2], "grounding_dino")
    clock.now += 1.0
    annotator, model_version = trained.annotator(9)
    assert model_version == f"{service.click_model_version}+grounding_dino@{version.name}"
    engine = annotator.engine
    from sam_backend.concepts.grounding_dino import GroundingDinoEngine
    assert isinstance(engine, GroundingDinoEngine) and engine.name.endswith(version.name)
    # the concept engine's own path: any phrase is asked (open vocabulary), masks by the click
    # model
    found = engine.detect("k", lambda: np.zeros((64, 80, 3), np.uint8), ["a new thing"], 0.0,
                          Selection(0.7, 2))
    assert len(found) == 1 and found[0].masks.shape == (2, 64, 80)


def test_annotate_posts_the_promoted_versions_predictions(rf_detr_model, checkpoint_factory,
                                                          tmp_path, monkeypatch, capsys):
    """``sam-backend annotate --project`` of a project with a promoted version: its predictions,
    under its model_version; no concept model is loaded (its checkpoint does not exist)."""
    from sam_backend import cli
    from tests.support.team_utils import API_TOKEN, FakeLabelStudioAPI

    docs = tmp_path / "docs"
    tasks = [{"id": t["id"], "data": t["data"]} for t in shapes_project(docs, 2, seed=2)]
    api = FakeLabelStudioAPI(SHAPES_CONFIG, tasks, project=21)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", API_TOKEN)
    monkeypatch.setenv("SAM_BACKEND_IMAGE_CACHE_DIR", str(tmp_path / "image-cache"))
    for name in ("LOCAL_FILES_DOCUMENT_ROOT", "CONCEPT_MODEL", "MODEL_NAME", "LABEL_STUDIO_URL"):
        monkeypatch.delenv(name, raising=False)
    store = VersionStore(tmp_path / "trained")
    version = publish(store, 21, rf_detr_model, "rf_detr")
    try:
        code = cli.main(["annotate", "--project", "21", "--url", api.url, "--no-progress",
                         "--with", "model_name=mobile_sam",
                         f"sam_checkpoint_file={checkpoint_factory('mobile_sam')}", "device=cpu",
                         f"concept_checkpoint={tmp_path / 'no-such-model'}",
                         f"trained_dir={tmp_path / 'trained'}", "trained_threshold=0",
                         "--local_files_document_root", str(docs)])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "2 task(s) annotated" in out and f"+rf_detr@{version.name}" in out
        assert sorted(p["task"] for p in api.predictions) == [1, 2]
        # the click model's name, then the version's (the zero-shot engine takes no part)
        assert {p["model_version"].split(":", 1)[1] for p in api.predictions} == {
            f"mobile_sam/vit_t+rf_detr@{version.name}"}
        assert all(p["result"] for p in api.predictions)
    finally:
        api.stop()


def test_a_boxes_only_detector_gets_its_masks_from_the_click_model(service, shapes,
                                                                    reduced_dino):
    """DetectorEngine over a detector without masks (the grounding_dino trainer's detector,
    reduced random weights): each kept box's mask is the click model's decode of that box; a
    phrase the detector has no class for finds nothing."""
    from sam_backend.models.base import Prompt
    from sam_backend.training.grounding_dino import GroundingDinoDetector

    detector = GroundingDinoDetector(reduced_dino[0], reduced_dino[1], list(LABELS),
                                     list(LABELS))
    assert detector.segments is False
    engine = DetectorEngine(detector, service.segmenter, "grounding_dino@test")
    image = service.images.load(shapes[3]["data"]["image"], shapes[3]["id"])
    key = "boxes-only-test"
    circles, unknown = engine.detect(key, lambda: image, ["Circle.", "triangle"], 0.0,
                                     Selection(0.7, 2))
    assert len(unknown) == 0
    assert len(circles) == 2 and circles.masks.shape == (2,) + image.shape[:2]
    embedding = service.segmenter.embedding(key, lambda: image)
    for box, mask in zip(circles.boxes, circles.masks):
        assert np.array_equal(mask, service.segmenter.decode(key, embedding, Prompt(box=box)).mask)
