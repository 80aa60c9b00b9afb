"""SAM 3 at its published size (slow lane): `sam-backend weights random sam3` writes the official
layout (Sam3VideoModel, ~3.4 GB), `label-studio-ml start sam --with model_name=sam3 device=cpu`
loads the click model from it (~458M parameters), and a click and a box over HTTP equal
transformers' own interactive pipeline on the same weights, run in a separate process (so the two
~1.8 GB models are never in one process, and this one holds none).

Each image encode takes ~80 s on 2 idle cores (minutes on a busy machine).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import requests

from tests.support.server_utils import REPO, BackendProcess, free_port
from tests.models.test_sam3 import ask, box, click

pytestmark = [pytest.mark.process, pytest.mark.slow]

SIZE = (480, 720)  # H, W

# transformers' interactive recipe, as in tests/models/test_sam3.py (LibraryClicks), on the click model
# the library wires from the official layout: Sam3VideoModel's backbone and tracker neck.
REFERENCE = r"""
import json, sys
import numpy as np, torch, cv2
from transformers import (Sam3ImageProcessor, Sam3TrackerConfig, Sam3TrackerModel,
                          Sam3TrackerProcessor, Sam3VideoModel)
directory, image_path, out = sys.argv[1:4]
video = Sam3VideoModel.from_pretrained(directory).eval()
model = Sam3TrackerModel(Sam3TrackerConfig.from_dict(video.config.tracker_config.to_dict()))
state = {**{"vision_encoder.backbone." + k: v
            for k, v in video.detector_model.vision_encoder.backbone.state_dict().items()},
         **{"vision_encoder.neck." + k: v for k, v in video.tracker_neck.state_dict().items()},
         **{k: v for k, v in video.tracker_model.state_dict().items()
            if not k.startswith("vision_encoder.")}}
missing, _ = model.load_state_dict(state, strict=False)
assert not missing, missing
del video, state
model.eval()
processor = Sam3TrackerProcessor(Sam3ImageProcessor())
image = cv2.cvtColor(cv2.imread(image_path), cv2.COLOR_BGR2RGB)
inputs = processor(images=image, return_tensors="pt")
sizes = inputs["original_sizes"]
with torch.no_grad():
    embeddings = model.get_image_embeddings(inputs["pixel_values"])
answers = {}
h, w = image.shape[:2]
for name, kwargs in {"point": dict(input_points=[[[[0.3 * w, 0.4 * h]]]], input_labels=[[[1]]]),
                     "box": dict(input_boxes=[[[0.1 * w, 0.2 * h, 0.6 * w, 0.8 * h]]])}.items():
    prompt = processor(original_sizes=sizes, return_tensors="pt", **kwargs)
    prompt.pop("original_sizes")
    with torch.no_grad():
        o = model(image_embeddings=embeddings, multimask_output=name == "point", **prompt)
    best = int(o.iou_scores[0, 0].argmax())
    mask = processor.post_process_masks(o.pred_masks[:, :, best:best + 1], sizes)[0][0, 0].numpy()
    np.save(out + "." + name + ".npy", mask)
    answers[name] = float(o.iou_scores[0, 0, best])
json.dump(answers, open(out + ".json", "w"))
"""


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from tests.support.random_weights import synthetic_image

    root = tmp_path_factory.mktemp("docroot")
    cv2.imwrite(str(root / "full.png"), cv2.cvtColor(synthetic_image(*SIZE, seed=11),
                                                     cv2.COLOR_RGB2BGR))
    return root


def test_full_size_sam3_click_and_box_match_the_library(sam3_full_root, image, tmp_path):
    out = tmp_path / "reference"
    reference = subprocess.Popen([sys.executable, "-c", REFERENCE, str(sam3_full_root / "sam3"),
                                  str(image / "full.png"), str(out)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        reference_log, _ = reference.communicate(timeout=3600)
    finally:
        if reference.poll() is None:
            reference.kill()
    assert reference.returncode == 0, reference_log[-3000:]
    want = json.loads(out.with_suffix(".json").read_text())

    port = free_port()
    backend = BackendProcess(
        ["label-studio-ml", "start", "sam", "--with", "model_name=sam3", "device=cpu",
         "embedding_dtype=float32", "-p", str(port), "--host", "127.0.0.1"], port,
        {"LOCAL_FILES_DOCUMENT_ROOT": str(image), "SAM_BACKEND_WEIGHTS_DIR": str(sam3_full_root),
         "SAM_BACKEND_OFFLINE": "1", "SAM_BACKEND_IMAGE_CACHE_DIR": str(tmp_path / "imgcache")},
        tmp_path / "backend.log")
    backend.start()
    try:
        health = requests.get(backend.url + "/health", timeout=10).json()
        assert health["model"] == "sam3/default"
        got, score = ask(backend, [click(30.0, 40.0, SIZE)], "full")
        assert np.array_equal(got, np.load(f"{out}.point.npy"))
        assert score == pytest.approx(want["point"], abs=1e-5)
        got_box, score_box = ask(backend, [box(10.0, 20.0, 50.0, 60.0, SIZE)], "full")
        assert np.array_equal(got_box, np.load(f"{out}.box.npy"))
        assert score_box == pytest.approx(want["box"], abs=1e-5)
        metrics = requests.get(backend.url + "/metrics", timeout=10).json()
        assert metrics["embedding_cache_misses"] == 1  # one encode for both prompts
    finally:
        backend.stop()
