"""SAM 3 at full size behind a real Label Studio 1.23.2 (slow lane): a click, an Alt-click and a
box through Label Studio's own interactive-annotating call, on an uploaded image.

SAM 3's encoder takes minutes per image on a busy 2-core machine, longer than Label Studio waits
for an ML backend, so the task is opened first (a /predict without a prompt: the backend encodes
the image in the background, as when an annotator opens the task) and the clicks come once the
embedding is cached — the way the README tells SAM 3 users on a CPU to work.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.support.server_utils import REPO, free_port
from tests.e2e.test_backend_with_label_studio import (check_answer, click, images,  # noqa: F401 (fixture)
                                            keypoint_region, rectangle_region)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def sam3_backend(session_backend_process, sam3_full_root, label_studio,  # noqa: F811
                 tmp_path_factory):
    port = free_port()
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url,
           "LABEL_STUDIO_API_KEY": label_studio.token, "SAM_BACKEND_OFFLINE": "1",
           "SAM_BACKEND_IMAGE_CACHE_DIR": str(tmp_path_factory.mktemp("image-cache")),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    return session_backend_process(
        ["label-studio-ml", "start", "sam", "--with", "model_name=sam3",
         f"sam_checkpoint_file={sam3_full_root / 'sam3'}", "device=cpu", "out_poly=true",
         "-p", str(port), "--host", "127.0.0.1"], port, env=env, cwd=REPO, name="sam-backend")


def test_sam3_click_alt_click_and_box_in_label_studio(label_studio, sam3_backend,
                                                      images):  # noqa: F811
    config = (REPO / "xml_templates" / "full.xml").read_text()
    api = label_studio.api
    project = api.create_project("e2e sam3", config)
    task = api.import_image(project["id"], images["png"])[0]
    ml = api.add_ml_backend(project["id"], sam3_backend.url, is_interactive=True)
    made = {"project": project, "ml": ml}

    health = requests.get(sam3_backend.url + "/health", timeout=10).json()
    assert health["model"] == "sam3/default"
    # open the task: the backend answers at once and encodes in the background
    opened = requests.post(sam3_backend.url + "/predict", timeout=30, json={
        "tasks": [task], "label_config": config, "project": str(project["id"]),
        "params": {"context": None}})
    assert opened.status_code == 200 and opened.json()["results"] == []
    deadline = time.monotonic() + 1800
    while requests.get(sam3_backend.url + "/metrics", timeout=10).json()[
            "embedding_cache_images"] < 1:
        assert time.monotonic() < deadline, "the image was not encoded within 30 min"
        time.sleep(5)

    positive = [keypoint_region(config, 36.0, 50.0)]
    check_answer(click(label_studio, made, task, positive), config,
                 {"brushlabels", "polygonlabels", "rectanglelabels"})
    alt = positive + [keypoint_region(config, 80.0, 40.0, positive=False)]
    check_answer(click(label_studio, made, task, alt), config,
                 {"brushlabels", "polygonlabels", "rectanglelabels"})
    check_answer(click(label_studio, made, task, [rectangle_region(config, 15, 15, 45, 70)]),
                 config, {"brushlabels", "polygonlabels"})
    metrics = requests.get(sam3_backend.url + "/metrics", timeout=10).json()
    assert metrics["embedding_cache_misses"] == 1  # the clicks never re-ran the encoder
