"""Label by concept through a real Label Studio 1.23.2, the two ways Label Studio itself asks.

- *Typed in the task*: the annotator types a phrase into the ``TextArea`` of
  ``xml_templates/concepts.xml`` with Auto-Annotation on. The editor's text region is a dynamic
  region like a smart click, so the data manager posts it the same way:
  ``POST /api/ml/<id>/interactive-annotating {"task", "context": {"result": [<textarea region>]}}``
  (read in 1.23.2's bundle: ``TextAreaRegionModel`` composes the region mixin whose
  ``notifyDrawingFinished`` invokes ``regionFinishedDrawing``; the listener serialises those
  regions as ``context.result``). Label Studio forwards it to /predict and hands back
  ``{"data": results[0]}``, shown to the annotator as suggestions.
- *"Retrieve predictions"*: the data manager's action
  ``POST /api/dm/actions?id=retrieve_tasks_predictions&project=<id>`` (``selectedItems``) calls
  ``MLBackend.predict_tasks``: one /predict with every selected task that has no prediction of the
  model version /setup reported, and stores what comes back as predictions.

The backend runs Grounding DINO with seeded random weights (the reduced configuration the unit
tests use, ``make_random_grounding_dino(..., "tiny")``) and random-weight MobileSAM for the masks.
Random weights score every box near 0.5, so ``concept_threshold=0.3`` (below the 0.5 default) is
set to be sure instances come back; ``max_instances=3`` keeps the answers small.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import requests
from PIL import Image

from tests.support.random_weights import synthetic_image
from tests.support.random_weights import make_random_grounding_dino
from sam_backend.labelstudio.rle import rle_to_mask
from tests.support.server_utils import REPO
from tests.e2e.test_backend_with_label_studio import start_backend

TEMPLATE = (REPO / "xml_templates" / "concepts.xml").read_text()
THRESHOLD = 0.3
MAX_INSTANCES = 3
H, W = 240, 320
LABELS = {"cat", "dog"}
OUTPUTS = {"BrushLabels": "brushlabels", "RectangleLabels": "rectanglelabels"}

# the module starts Label Studio, the backend and three concept passes: ~2-3 min on 2 busy cores
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("concept-images")
    paths = []
    for seed in range(3):
        path = folder / f"scene{seed}.png"
        Image.fromarray(synthetic_image(H, W, seed=20 + seed)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def backend(session_backend_process, checkpoint_factory, label_studio, tmp_path_factory):
    """The backend as a user starts it for concepts, told where Label Studio is."""
    dino = make_random_grounding_dino(tmp_path_factory.mktemp("gd") / "grounding-dino", "tiny",
                                      seed=7)
    return start_backend(
        session_backend_process, checkpoint_factory("mobile_sam"), label_studio.url,
        label_studio.token, tmp_path_factory,
        model=("model_name=mobile_sam", "concept_model=grounding_dino",
               f"concept_checkpoint={dino}", f"concept_threshold={THRESHOLD}",
               f"max_instances={MAX_INSTANCES}", "auto_annotate=true",
               # a shared 2-core machine: well inside Label Studio's 100 s predict timeout
               "concept_timeout=60"))


def make_project(label_studio, backend, images, title):
    api = label_studio.api
    project = api.create_project(title, TEMPLATE)
    tasks = []
    for path in images:
        tasks += api.import_image(project["id"], path)
    ml = api.add_ml_backend(project["id"], backend.url, is_interactive=True)
    return project, tasks, ml


def textarea(text):
    """The TextArea region as the editor serialises it (``serializeAnnotation()``)."""
    return {"result": [{"id": "Ph1rase0", "from_name": "concept", "to_name": "image",
                        "type": "textarea", "origin": "manual", "value": {"text": [text]}}]}


def check_regions(regions, labels):
    """Every region sits in an output control of the template, under one of ``labels``, with a
    score at or above the threshold; each instance is a brush mask plus its box. Returns the
    number of instances."""
    by_type = {}
    for region in regions:
        assert OUTPUTS.get(region["from_name"]) == region["type"], region["from_name"]
        assert region["to_name"] == "image"
        assert region["value"][region["type"]][0] in labels
        assert THRESHOLD <= region["score"] <= 1
        by_type.setdefault(region["type"], []).append(region)
    brush, boxes = by_type.get("brushlabels", []), by_type.get("rectanglelabels", [])
    assert len(brush) == len(boxes) <= MAX_INSTANCES * len(labels)
    for region in brush:
        assert (region["original_width"], region["original_height"]) == (W, H)
        mask = rle_to_mask(region["value"]["rle"], H, W)
        assert 0 < mask.sum() < H * W
    for region in boxes:
        value = region["value"]
        assert 0 <= value["x"] and value["x"] + value["width"] <= 100 + 1e-6
        assert 0 <= value["y"] and value["y"] + value["height"] <= 100 + 1e-6
        assert value["width"] > 0 and value["height"] > 0
    return len(brush)


def cache_misses(backend):
    return requests.get(f"{backend.url}/metrics", timeout=10).json()["embedding_cache_misses"]


def test_a_typed_phrase_comes_back_as_every_instance_through_label_studio(label_studio, backend,
                                                                         images):
    api = label_studio.api
    project, tasks, ml = make_project(label_studio, backend, images[:1], "concepts typed")
    task = tasks[0]

    answer = api.interactive_annotating(ml["id"], task["id"], textarea("a cat_cat"))
    assert "errors" not in answer, answer
    data = answer["data"]
    assert data["model_version"].endswith("+grounding_dino")
    n = check_regions(data["result"], {"cat"})
    assert 0 < n <= MAX_INSTANCES
    assert len({tuple(r["value"]["rle"]) for r in data["result"] if r["type"] == "brushlabels"}) \
        == n  # distinct instances, not one mask repeated

    # a label's name typed alone takes that label
    dogs = api.interactive_annotating(ml["id"], task["id"], textarea("dog"))["data"]
    assert 0 < check_regions(dogs["result"], {"dog"}) <= MAX_INSTANCES
    assert {r["value"][r["type"]][0] for r in dogs["result"]} == {"dog"}

    # a Smart KeyPoint click on the same image afterwards: a mask, and no new image encode
    misses = cache_misses(backend)
    click = {"result": [{"id": "k1", "from_name": "KeyPointLabels", "to_name": "image",
                         "type": "keypointlabels", "origin": "manual", "is_positive": True,
                         "original_width": W, "original_height": H, "image_rotation": 0,
                         "value": {"x": 50, "y": 50, "width": 0.6, "keypointlabels": ["cat"]}}]}
    clicked = api.interactive_annotating(ml["id"], task["id"], click)
    assert "errors" not in clicked, clicked
    assert {r["type"] for r in clicked["data"]["result"]} == {"brushlabels", "rectanglelabels"}
    assert cache_misses(backend) == misses

    # a phrase that names no label: Label Studio hands the backend's clear message to the editor
    refused = api.interactive_annotating(ml["id"], task["id"], textarea("tree"))
    assert "which label" in " ".join(refused.get("errors", [])), refused
    assert requests.get(f"{backend.url}/health", timeout=10).status_code == 200


def test_retrieve_predictions_leaves_one_auto_annotation_per_task(label_studio, backend, images):
    api = label_studio.api
    project, tasks, ml = make_project(label_studio, backend, images, "concepts retrieve")
    assert api.get("/api/predictions", params={"project": project["id"]}) == []

    def retrieve():
        return api.post(f"/api/dm/actions?id=retrieve_tasks_predictions&project={project['id']}",
                        {"selectedItems": {"all": True, "excluded": []}})

    done = retrieve()
    assert done["processed_items"] == len(tasks), done
    predictions = api.get("/api/predictions", params={"project": project["id"]})
    presses = 1
    while len(predictions) < len(tasks) and presses < 4:
        # passes that missed the concept_timeout bound answered [] (Label Studio stores nothing
        # for those tasks) and finish in the background; the next press gets them at once
        time.sleep(10)
        retrieve()
        presses += 1
        predictions = api.get("/api/predictions", params={"project": project["id"]})
    assert sorted(p["task"] for p in predictions) == sorted(t["id"] for t in tasks)
    versions = {p["model_version"] for p in predictions}
    assert len(versions) == 1
    version = versions.pop()
    assert version.endswith("mobile_sam/vit_t+grounding_dino")
    # the version /setup reports is the one predictions carry, so Label Studio recognises them
    assert api.get_ml_backend(ml["id"])["model_version"] == version
    counts = [check_regions(p["result"], LABELS) for p in predictions]
    assert all(0 < c <= MAX_INSTANCES * len(LABELS) for c in counts), counts
    for p in predictions:
        scores = [r["score"] for r in p["result"]]
        assert p["score"] == pytest.approx(float(np.mean(scores)), abs=1e-6)

    # the tasks as Label Studio serves them to the editor carry that prediction
    shown = api.get_task(tasks[0]["id"])
    assert [p["model_version"] for p in shown["predictions"]] == [version]

    # pressed again: every task already has this model version's prediction, nothing is added
    retrieve()
    again = api.get("/api/predictions", params={"project": project["id"]})
    assert sorted(p["id"] for p in again) == sorted(p["id"] for p in predictions)
