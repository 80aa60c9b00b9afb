"""SAM 2.1 in a real Label Studio: `label-studio-ml start sam --with model_name=sam2
sam_config=hiera_tiny device=cpu` answers a click, an Alt-click and a box on an uploaded image."""
from __future__ import annotations

import numpy as np
import requests

from tests.e2e.test_backend_with_label_studio import (EXPECTED, H, W, check_answer, click, images,  # noqa: F401
                                            keypoint_region, rectangle_region, scene,
                                            start_backend)
from sam_backend.labelstudio.rle import rle_to_mask
from sam_backend.models.onnx_runtime import mask_iou as iou
from tests.support.server_utils import REPO


def test_sam2_click_alt_click_and_box(label_studio, session_backend_process, checkpoint_factory,
                                      images, tmp_path_factory):  # noqa: F811
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    checkpoint = checkpoint_factory("sam2", "hiera_tiny")
    backend = start_backend(session_backend_process, checkpoint, label_studio.url,
                            label_studio.token, tmp_path_factory,
                            model=("model_name=sam2", "sam_config=hiera_tiny",
                                   "embedding_dtype=float32"))  # as exact as it gets
    api = label_studio.api
    config = (REPO / "xml_templates" / "full.xml").read_text()
    project = api.create_project("e2e sam2", config)
    tasks = api.import_image(project["id"], images["png"])
    made = {"project": project, "ml": api.add_ml_backend(project["id"], backend.url,
                                                         is_interactive=True)}

    positive = [keypoint_region(config, 36.0, 50.0)]
    _, mask = check_answer(click(label_studio, made, tasks[0], positive), config,
                           EXPECTED["full"]["keypoint"])
    # the mask is SAM2ImagePredictor's on the same weights and image
    predictor = SAM2ImagePredictor(build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml",
                                              str(checkpoint), device="cpu"))
    predictor.set_image(scene())
    masks, scores, _ = predictor.predict(np.array([[0.36 * W, 0.5 * H]], np.float32),
                                         np.array([1]), multimask_output=True)
    assert iou(mask, masks[int(np.argmax(scores))] > 0) >= 0.99  # onnx decoder: not bit-exact

    both = positive + [keypoint_region(config, 80.0, 40.0, positive=False)]
    check_answer(click(label_studio, made, tasks[0], both), config, EXPECTED["full"]["keypoint"])
    # a box: the brush is the predictor's box mask (random weights give fragments, which may all
    # be below poly_min_area, so polygons are not required here)
    data = click(label_studio, made, tasks[0], [rectangle_region(config, 15, 15, 45, 70)])
    brush = [r for r in data["result"] if r["type"] == "brushlabels"]
    assert len(brush) == 1
    assert {r["type"] for r in data["result"]} <= EXPECTED["full"]["rectangle"]
    masks, _, _ = predictor.predict(box=np.array([0.15 * W, 0.15 * H, 0.6 * W, 0.85 * H]),
                                    multimask_output=False)
    assert iou(rle_to_mask(brush[0]["value"]["rle"], H, W), masks[0] > 0) >= 0.99
    health = requests.get(backend.url + "/health", timeout=10).json()
    assert (health["model"], health["runtime"]) == ("sam2/hiera_tiny", "onnx")  # the default
