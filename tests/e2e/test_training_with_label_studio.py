"""Learn from the labels through a real Label Studio 1.23.2: the loop a team runs.

A synthetic project (``tests/support/shapes.py``: 160x120 images with one to three circles and
squares on a noisy background, masks known) is uploaded to Label Studio and annotated through
its API (``POST /api/tasks/<id>/annotations/`` with the brush + polygon + box regions this
backend's clicks leave). Then, as a user does it:

1. the training set read back through Label Studio's API is exactly what was annotated;
2. the backend (``sam-backend serve``, trainer ``rf_detr`` from random weights, the reduced
   recipe) is connected to the project; *Start Training* (``POST /api/ml/<id>/train``, what the
   model menu's button calls) starts one run, watched on ``GET /train/status``; the held-out segm
   mAP50 of the trained version is clearly above the untrained baseline's, the version is
   promoted, *Retrieve predictions* stores predictions of ``…+rf_detr@p<id>-v1`` and
   ``sam-backend annotate --project`` writes predictions under the same model_version;
3. a candidate made worse on purpose (``sam-backend train`` with a learning rate that wrecks the
   weights) is kept but not promoted: v1 stays served;
4. ``train_every=N`` (a second backend, another project): N annotations created through the
   API start one run; more annotations during it queue exactly one follow-up, which starts
   only after the first run finished (never two in parallel).
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import requests

from tests.support.server_utils import REPO, free_port
from tests.support.shapes import LABELS, SHAPES_CONFIG, shapes_project

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.process,
              # pycocotools 2.0.x calls np.array(copy=False) when decoding; harmless here
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

#: the project the loop learns from: 40 images of 160x120 (the reduced recipe's size)
N_IMAGES = 40
W, H = 160, 120
CLI = [sys.executable, "-m", "sam_backend.cli"]


# ---------------------------------------------------------------------------------------------
# the project in Label Studio


def upload_images(api, project_id: int, paths: List[Path], chunk: int = 20) -> Dict[Path, int]:
    """Upload image files to the project (one multipart import per ``chunk`` files, as the
    import dialog does with several files); {path: task id}. Label Studio names an upload
    ``/data/upload/<project>/<8 hex>-<file name>``."""
    for start in range(0, len(paths), chunk):
        handles = [open(p, "rb") for p in paths[start:start + chunk]]
        try:
            files = {f"file{i}": (p.name, fh, "image/png")
                     for i, (p, fh) in enumerate(zip(paths[start:start + chunk], handles))}
            done = api.post(f"/api/projects/{project_id}/import", files=files)
            assert done["task_count"] == len(files), done
        finally:
            for fh in handles:
                fh.close()
    by_name = {}
    for task in api.list_tasks(project_id):
        by_name[task["data"]["image"].rsplit("-", 1)[-1]] = task["id"]
    return {p: by_name[p.name.rsplit("-", 1)[-1]] for p in paths}


def make_project(api, folder: Path, title: str, n: int, seed: int, annotated: int = None):
    """A shapes project in Label Studio: ``n`` images uploaded, the first ``annotated`` (default
    all) annotated through the API. Returns (project, [(task id, regions)] in image order)."""
    tasks = shapes_project(folder, n, seed=seed, width=W, height=H)
    paths = [Path(t["data"]["image"]) for t in tasks]
    project = api.create_project(title, SHAPES_CONFIG)
    ids = upload_images(api, project["id"], paths)
    made = [(ids[p], t["annotations"][0]["result"]) for p, t in zip(paths, tasks)]
    for task_id, result in made[:n if annotated is None else annotated]:
        api.create_annotation(task_id, result)
    return project, made


@pytest.fixture(scope="module")
def shapes(label_studio, tmp_path_factory):
    """The learning project: 40 images, all annotated (before any backend is connected, so no
    annotation webhook reaches a backend)."""
    return make_project(label_studio.api, tmp_path_factory.mktemp("shapes"), "learn from labels",
                        N_IMAGES, seed=5)


def test_the_training_set_read_through_label_studio_is_what_was_annotated(label_studio, shapes,
                                                                          tmp_path):
    """The annotations survive Label Studio: read back through its API (as a training run reads
    them), every task is one sample whose objects are the drawn shapes (label, mask)."""
    from sam_backend.images.config import ImageAccessSettings
    from sam_backend.images.loader import ImageLoader
    from sam_backend.labelstudio.api import LabelStudioAPI
    from sam_backend.settings import Settings
    from sam_backend.training.dataset import build_dataset
    from tests.support.shapes import shapes_image

    project, made = shapes
    settings = Settings.load({}, environ={})
    loader = ImageLoader(ImageAccessSettings.from_settings(
        settings, label_studio_url=label_studio.url, api_key=label_studio.token,
        cache_dir=str(tmp_path / "cache")))
    client = LabelStudioAPI(loader)
    dataset = build_dataset(client.tasks(project["id"], annotations=True),
                            client.label_config(project["id"]))
    assert dataset.classes == list(LABELS)
    by_task = {s.task_id: s for s in dataset.samples}
    assert sorted(by_task) == sorted(task_id for task_id, _ in made)
    for i, (task_id, _) in enumerate(made):
        _, objects = shapes_image(5 * 100_003 + i, W, H)  # what shapes_project drew
        sample = by_task[task_id]
        assert (sample.width, sample.height) == (W, H)
        assert sorted(LABELS[o.label] for o in sample.objects) == sorted(l for l, _ in objects)
        for obj in sample.objects:
            best = max(iou(obj.mask(), mask) for label, mask in objects
                       if label == LABELS[obj.label])
            assert best > 0.99, (task_id, best)
        assert loader.load(sample.image, task_id).shape == (H, W, 3)  # downloadable with the token
    assert not dataset.report.skipped_tasks and not dataset.report.skipped_regions


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))
