"""Shared fixtures: random-weight checkpoints of the real architectures, test images."""
from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys

import pytest

from tests.support.random_weights import CACHE_DIR, CACHE_SEED, cached_random_checkpoint, cached_random_sam3, synthetic_image
from tests.support.server_utils import REPO


@pytest.fixture(scope="session")
def checkpoint_factory():
    """``checkpoint_factory(model_name, sam_config=None) -> Path`` of a seeded random-weight file."""
    return cached_random_checkpoint


@pytest.fixture(scope="module")
def sam2_file(checkpoint_factory):
    """The seeded random-weight SAM 2.1 hiera_tiny checkpoint."""
    return checkpoint_factory("sam2", "hiera_tiny")


@pytest.fixture(scope="module")
def official_dir():
    """A reduced random SAM 3 in the official layout (Sam3VideoModel.save_pretrained)."""
    return cached_random_sam3(reduced=True)


@pytest.fixture(scope="module")
def sam3_full_root():
    """``sam-backend weights random sam3`` (full size) into a weights directory, once: the seeded
    directory is kept in the test-weights cache between runs."""
    root = CACHE_DIR / f"seed{CACHE_SEED}-full"
    if not (root / "sam3" / "config.json").is_file():
        env = dict(os.environ, PYTHONPATH=str(REPO))
        done = subprocess.run([sys.executable, "-m", "sam_backend.cli", "weights", "random", "sam3",
                               "--dir", str(root), "--seed", str(CACHE_SEED), "--force"],
                              env=env, capture_output=True, text=True, timeout=3600)
        assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((root / "sam3" / "config.json").read_text())
    assert config["model_type"] == "sam3_video"
    assert config["detector_config"]["vision_config"]["backbone_config"]["num_hidden_layers"] == 32
    return root


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

