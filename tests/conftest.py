"""Shared fixtures: random-weight checkpoints of the real architectures, test images."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # test helpers

from sam_backend.random_weights import cached_random_checkpoint, synthetic_image


@pytest.fixture(scope="session")
def checkpoint_factory():
    """``checkpoint_factory(model_name, sam_config=None) -> Path`` of a seeded random-weight file."""
    return cached_random_checkpoint


@pytest.fixture
def image_factory():
    return synthetic_image
