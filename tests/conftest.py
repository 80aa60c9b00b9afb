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
from imaging import synthetic_image

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


@pytest.fixture
def image_factory():
    return synthetic_image
