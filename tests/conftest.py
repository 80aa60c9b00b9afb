"""Shared fixtures: random-weight checkpoints of the real architectures, test images."""
from __future__ import annotations

import ctypes
import gc
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # test helpers

from random_weights import cached_random_checkpoint, synthetic_image


@pytest.fixture(scope="session")
def checkpoint_factory():
    """``checkpoint_factory(model_name, sam_config=None) -> Path`` of a seeded random-weight file."""
    return cached_random_checkpoint


@pytest.fixture
def image_factory():
    return synthetic_image


@pytest.fixture
def release_memory():
    """Give back what a test's models used before the next test runs.

    vit_b models, their ONNX sessions and export buffers hold several GB in reference cycles that
    Python's collector (triggered by allocation counts, not bytes) may not visit for a long time,
    and glibc keeps freed heap mapped; measured: a test session grew to 17 GB over the vit_b ONNX
    tests, and ONNX exports after them found only 2 GB available. Used by the model-heavy modules."""
    yield
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@pytest.fixture(scope="module", autouse=True)
def drop_process_wide_models():
    """After each test module, forget the process-wide segmenters (``segmenter_for`` keeps each
    loaded model for the life of the process, as a server should) and give their memory back:
    in one pytest process, every module's models would otherwise stay loaded until the end
    (a full run was killed for lack of memory at 17.7 GB)."""
    yield
    from sam_backend.embeddings import engine

    with engine._SEGMENTERS_LOCK:
        engine._SEGMENTERS.clear()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass

