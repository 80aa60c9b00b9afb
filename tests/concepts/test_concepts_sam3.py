"""Concept engine ``sam3`` on a reduced SAM 3 of the real classes (random weights): instances equal
transformers' own pipeline (Sam3Processor -> Sam3Model -> post_process_instance_segmentation) on the
same weights and threshold, computed on the image state the click model cached; a click after a
concept pass encodes nothing."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from sam_backend.concepts.base import Selection
from sam_backend.images.config import ImageAccessSettings
from sam_backend.images.loader import ImageLoader
from sam_backend.models.base import Prompt
from tests.support.random_weights import cached_random_sam3, synthetic_image
from tests.support.random_weights import write_test_tokenizer
from sam_backend.assembly import prediction_service
from sam_backend.settings import Settings

THRESHOLD = 0.25  # random weights: low enough to give instances


@pytest.fixture(scope="module")
def sam3_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sam3") / "sam3"
    shutil.copytree(cached_random_sam3(reduced=True), directory)
    return write_test_tokenizer(directory)


def test_sam3_instances_equal_the_libraries_pipeline_and_share_the_click_cache(sam3_dir,
                                                                               tmp_path):
    from transformers import Sam3Model, Sam3Processor

    settings = Settings.load({"model_name": "sam3", "sam_checkpoint_file": str(sam3_dir),
                              "device": "cpu", "embedding_dtype": "float32",
                              "concept_model": "sam3", "concept_threshold": str(THRESHOLD)},
                             environ={})
    service = prediction_service(settings, images=ImageLoader(
        ImageAccessSettings.from_settings(settings, cache_dir=str(tmp_path / "cache"),
                                          local_files_document_root=str(tmp_path))))
    image = synthetic_image(180, 260, seed=2)
    engine = service.concept_annotator().engine
    found = engine.detect("sam3-fidelity", lambda: image, ["red car"], THRESHOLD,
                          Selection(1.0, 1000))[0]

    model = Sam3Model.from_pretrained(str(sam3_dir)).eval()
    processor = Sam3Processor.from_pretrained(str(sam3_dir))
    inputs = processor(images=image, text="red car", return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    ref = processor.post_process_instance_segmentation(
        outputs, threshold=THRESHOLD, mask_threshold=0.5,
        target_sizes=inputs["original_sizes"].tolist())[0]
    order = torch.argsort(ref["scores"], descending=True, stable=True)
    assert len(ref["scores"]) > 0 and len(found) == len(ref["scores"])
    np.testing.assert_allclose(found.scores, ref["scores"][order].numpy(), atol=1e-4)
    np.testing.assert_allclose(found.boxes, ref["boxes"][order].numpy(), atol=1e-2)
    same = (found.masks == ref["masks"][order].numpy().astype(bool)).mean(axis=(1, 2))
    assert same.min() > 0.999

    misses = service.segmenter.cache.misses
    service.segmenter.segment("sam3-fidelity", lambda: image,
                              Prompt(np.array([[50.0, 60.0]], np.float32), np.array([1])))
    assert service.segmenter.cache.misses == misses  # the click reused the concept pass's state


@pytest.mark.slow
def test_full_size_sam3_concept_pass_on_the_cached_click_state(tmp_path):
    """SAM 3 at its published size (random weights, ~3.4 GB directory, built once): a concept
    pass through the service gives instances above the threshold as regions, and a click after it
    encodes nothing."""
    source = cached_random_sam3(reduced=False)
    directory = tmp_path / "sam3"
    directory.mkdir()
    for item in source.iterdir():  # linked, not copied
        (directory / item.name).symlink_to(item)
    write_test_tokenizer(directory)
    settings = Settings.load({"model_name": "sam3", "sam_checkpoint_file": str(directory),
                              "device": "cpu", "concept_model": "sam3",
                              "concept_threshold": str(THRESHOLD), "max_instances": "5"},
                             environ={})
    service = prediction_service(settings, images=ImageLoader(
        ImageAccessSettings.from_settings(settings, cache_dir=str(tmp_path / "cache"),
                                          local_files_document_root=str(tmp_path))))
    path = tmp_path / "scene.png"
    import cv2

    cv2.imwrite(str(path), synthetic_image(360, 480, seed=4))
    config = """<View><Image name="image" value="$image"/>
      <BrushLabels name="brush" toName="image"><Label value="car" hint="red car"/></BrushLabels>
      <RectangleLabels name="boxes" toName="image"><Label value="car"/></RectangleLabels></View>"""
    textarea = {"result": [{"type": "textarea", "from_name": "t", "to_name": "image",
                            "value": {"text": ["car"]}}]}
    (prediction,) = service.predict([{"id": 1, "data": {"image": str(path)}}], config, textarea)
    kinds = [r["type"] for r in prediction["result"]]
    assert kinds.count("brushlabels") == kinds.count("rectanglelabels") <= 5
    assert all(r["score"] > THRESHOLD for r in prediction["result"])
    misses = service.segmenter.cache.misses
    click = {"result": [{"type": "rectanglelabels", "from_name": "boxes", "to_name": "image",
                         "value": {"x": 10, "y": 10, "width": 40, "height": 50,
                                   "rectanglelabels": ["car"]}}]}
    service.predict([{"id": 1, "data": {"image": str(path)}}], config, click)
    assert service.segmenter.cache.misses == misses
