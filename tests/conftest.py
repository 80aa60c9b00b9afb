"""Shared fixtures: random-weight checkpoints of the real architectures, test images."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # test helpers

from sam_backend.random_weights import make_random_checkpoint
from sam_backend.registry import get_variant

# Checkpoints are deterministic (seeded), so they are kept between runs; bump the tag when the
# way they are made changes.
_CKPT_DIR = Path(os.environ.get("SAM_BACKEND_TEST_WEIGHTS",
                                Path.home() / ".cache" / "sam_backend" / "test-weights-v1"))
SEED = 1234


def random_checkpoint(model_name: str, sam_config: str | None = None) -> Path:
    variant = get_variant(model_name, sam_config)
    path = _CKPT_DIR / f"seed{SEED}" / variant.checkpoint_name
    if not path.is_file():
        make_random_checkpoint(variant, path, seed=SEED)
    return path


@pytest.fixture(scope="session")
def checkpoint_factory():
    return random_checkpoint


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """HxWx3 uint8 RGB: a smooth background with a few coloured shapes."""
    import cv2

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)),
                      np.full_like(xx, 96)], axis=-1).astype(np.uint8)
    for _ in range(4):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        radius = int(rng.integers(max(2, min(height, width) // 12), max(3, min(height, width) // 4)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(image, centre, radius, colour, -1)
    return image


@pytest.fixture
def image_factory():
    return synthetic_image
