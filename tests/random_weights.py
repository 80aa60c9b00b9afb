"""Test and benchmark fixtures: seeded random-weight checkpoints kept between runs, and synthetic
images."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np

from sam_backend.models.random_init import make_random_checkpoint
from sam_backend.models.registry import get_variant

# Test and benchmark checkpoints are deterministic (seeded), so they are kept between runs; the
# tag changes when the way they are made changes.
CACHE_DIR = Path(os.environ.get("SAM_BACKEND_TEST_WEIGHTS",
                                Path.home() / ".cache" / "sam_backend" / "test-weights-v1"))
CACHE_SEED = 1234


def cached_random_checkpoint(model_name: str, sam_config: Union[str, None] = None) -> Path:
    """The seeded random-weight checkpoint of a variant, made once into ``CACHE_DIR``."""
    variant = get_variant(model_name, sam_config)
    path = CACHE_DIR / f"seed{CACHE_SEED}" / variant.checkpoint_name
    if not path.is_file():
        make_random_checkpoint(variant, path, seed=CACHE_SEED)
    return path


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """HxWx3 uint8 RGB: a smooth gradient with a few coloured discs."""
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


def cached_random_sam3(reduced: bool = True) -> Path:
    """The seeded random-weight SAM 3 checkpoint directory (official layout), made once into
    ``CACHE_DIR``; ``reduced``: the small configuration of the same classes (fast tests)."""
    from sam_backend.models.sam3_runtime import make_random_checkpoint_dir

    path = CACHE_DIR / f"seed{CACHE_SEED}" / ("sam3-reduced" if reduced else "sam3")
    if not (path / "config.json").is_file():
        make_random_checkpoint_dir(path, seed=CACHE_SEED, reduced=reduced)
    return path
