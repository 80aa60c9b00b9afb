"""Fixtures of the concept tests: a seeded random Grounding DINO, a test image, and services
built the way the backend builds them (``make_service``)."""
from __future__ import annotations

import tempfile

import cv2
import pytest

from sam_backend.assembly import prediction_service
from sam_backend.images.config import ImageAccessSettings
from sam_backend.images.loader import ImageLoader
from sam_backend.settings import Settings
from tests.support.random_weights import make_random_grounding_dino, synthetic_image

# the test image's size (image_path)
H, W = 300, 420


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return make_random_grounding_dino(tmp_path_factory.mktemp("gd") / "grounding-dino", "tiny",
                                      seed=7)


@pytest.fixture(scope="module")
def dino_bert_dir(tmp_path_factory):
    """The same reduced Grounding DINO with a tokenizer laid out like BERT's, so the model sees
    a joined caption's periods as delimiters (each phrase attends to itself only), as the real
    one does."""
    return make_random_grounding_dino(tmp_path_factory.mktemp("gd-bert") / "grounding-dino",
                                      "tiny", seed=7, bert_layout=True)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    cv2.imwrite(str(path), cv2.cvtColor(synthetic_image(H, W, seed=5), cv2.COLOR_RGB2BGR))
    return path


def make_service(checkpoint_factory, tmp_path, **options):
    """A PredictionService on random-weight MobileSAM (torch, float32 embeddings) with
    ``options``; local files anywhere under the temporary directory."""
    settings = Settings.load({"model_name": "mobile_sam", "device": "cpu", "runtime": "torch",
                              "sam_checkpoint_file": str(checkpoint_factory("mobile_sam")),
                              "embedding_dtype": "float32", **options}, environ={})
    images = ImageLoader(ImageAccessSettings.from_settings(
        settings, cache_dir=str(tmp_path / "cache"),
        local_files_document_root=tempfile.gettempdir()))
    return prediction_service(settings, images=images)
