"""Box exemplars (issue 23) through a real Label Studio 1.23.2, with ``xml_templates/exemplars.xml``.

- Label Studio accepts the template (``POST /api/projects``: its config schema allows any attribute
  on a control) and keeps ``exemplar="positive"`` / ``exemplar="negative"`` in the project's
  ``label_config``, which it sends with every /predict.
- A box drawn with the ``Exemplar`` tool is what the browser sends for a smart rectangle
  (``POST /api/ml/<id>/interactive-annotating``; 1.23.2 serialises a smart rectangle without
  ``is_positive``, and an Alt-drag is sent exactly like a plain one — browser23's finding in
  /work/findings/alt_rectangle.md — hence a second control for "not like this"). The editor
  groups the dynamic regions of one region type, one label and one image
  (``getConnectedDynamicRegions``), so the boxes of both exemplar controls with that label travel
  together, the newest last.
- The backend runs a reduced SAM 3 of the real classes (random weights) with
  ``concept_model=sam3`` (threshold 0.25 and no NMS: random weights score many near-duplicate
  boxes just above 0.25): the answer Label Studio hands back holds ``max_instances`` instances
  under the label (a click would give one), equal to what the backend answers directly for the
  label_config Label Studio stored; a negative exemplar changes it.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import requests
from PIL import Image

from sam_backend.labelstudio.label_config import parse_label_config
from tests.e2e.test_backend_with_label_studio import start_backend
from tests.support.random_weights import (cached_random_sam3, synthetic_image,
                                          write_test_tokenizer)
from tests.support.server_utils import REPO

TEMPLATE = (REPO / "xml_templates" / "exemplars.xml").read_text()
MAX_INSTANCES = 4
H, W = 360, 540  # a scene on which the random weights find more than MAX_INSTANCES instances
OUTPUTS = {"BrushLabels": "brushlabels", "RectangleLabels": "rectanglelabels"}


@pytest.fixture(scope="module")
def sam3_backend(session_backend_process, label_studio, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sam3") / "sam3"
    shutil.copytree(cached_random_sam3(reduced=True), directory)
    write_test_tokenizer(directory)
    return start_backend(
        session_backend_process, directory, label_studio.url, label_studio.token,
        tmp_path_factory, model=("model_name=sam3", "concept_model=sam3",
                                 "concept_threshold=0.25", f"max_instances={MAX_INSTANCES}",
                                 # random weights: near-identical boxes that NMS would merge
                                 "concept_nms_iou=1.0"))


@pytest.fixture(scope="module")
def project(label_studio, sam3_backend, tmp_path_factory):
    path = tmp_path_factory.mktemp("exemplar-image") / "scene.png"
    Image.fromarray(synthetic_image(H, W, seed=3)).save(path)
    api = label_studio.api
    made = api.create_project("e2e exemplars", TEMPLATE)
    task = api.import_image(made["id"], path)[0]
    ml = api.add_ml_backend(made["id"], sam3_backend.url, is_interactive=True)
    return {"project": made, "task": task, "ml": ml}


def box(x, y, w, h, from_name="Exemplar", label="cat", region_id="e1"):
    """A smart rectangle as the editor of 1.23.2 serialises it (no is_positive)."""
    return {"original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                      "rectanglelabels": [label]},
            "id": region_id, "from_name": from_name, "to_name": "image",
            "type": "rectanglelabels", "origin": "manual"}


def test_label_studio_keeps_the_exemplar_marking(label_studio, project):
    stored = label_studio.api.get_project(project["project"]["id"])["label_config"]
    assert 'exemplar="positive"' in stored and 'exemplar="negative"' in stored
    kinds = {c.name: c.exemplar for c in parse_label_config(stored).controls}
    assert kinds == {"Exemplar": "positive", "NotExemplar": "negative", "BrushLabels": None,
                     "RectangleLabels": None}


def ask(label_studio, project, regions):
    answer = label_studio.api.interactive_annotating(project["ml"]["id"], project["task"]["id"],
                                                     {"result": regions})
    assert "errors" not in answer, answer
    return answer["data"]


def scores(data, label="cat"):
    """The instances' scores; every region in an output control under ``label``, a brush and
    its box per instance."""
    kinds = []
    for region in data["result"]:
        assert OUTPUTS[region["from_name"]] == region["type"]
        assert region["value"][region["type"]] == [label] and region["to_name"] == "image"
        kinds.append(region["type"])
    assert kinds.count("brushlabels") == kinds.count("rectanglelabels")
    return [r["score"] for r in data["result"] if r["type"] == "brushlabels"]


def test_an_exemplar_comes_back_as_every_instance_and_a_negative_changes_it(
        label_studio, project, sam3_backend):
    positive = [box(10, 15, 30, 35)]
    through_ls = ask(label_studio, project, positive)
    found = scores(through_ls)
    assert len(found) == MAX_INSTANCES > 1  # instances like it, not a click's one mask

    # the same request straight to the backend, with the label_config Label Studio stored
    stored = label_studio.api.get_project(project["project"]["id"])["label_config"]
    direct = requests.post(sam3_backend.url + "/predict", timeout=120, json={
        "tasks": [label_studio.api.get_task(project["task"]["id"])], "label_config": stored,
        "project": str(project["project"]["id"]), "params": {"context": {"result": positive}}})
    assert direct.status_code == 200, direct.text[:500]
    def without_ids(regions):
        return [{k: v for k, v in r.items() if k != "id"} for r in regions]

    assert without_ids(direct.json()["results"][0]["result"]) == without_ids(through_ls["result"])

    # a negative exemplar drawn with the second tool travels with the first box
    both = positive + [box(60, 5, 20, 20, from_name="NotExemplar", region_id="n1")]
    with_negative = scores(ask(label_studio, project, both))
    assert 0 < len(with_negative) <= MAX_INSTANCES
    assert not np.allclose(sorted(with_negative), sorted(found), atol=1e-5)

    metrics = requests.get(sam3_backend.url + "/metrics", timeout=10).json()
    assert metrics["embedding_cache_misses"] == 1  # every pass reused the one encode
