"""Training-time augmentation shared by the trainers: one random, seeded transform of an image
and its objects' masks (numpy, no torch).

:func:`augment` flips horizontally (p = 0.5), crops a random window of 70-100 % of each side
and scales it back to the image's size (objects cut away entirely are dropped), and jitters
brightness and contrast (+-20 %). Boxes are always the augmented masks' tight bounds, so a box
and its mask never disagree (box-only objects' masks are their filled boxes, see
:meth:`~.dataset.TrainObject.mask`).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, 4) float32 ``(x0, y0, x1, y1)`` pixel bounds of (N, H, W) bool masks (x1, y1
    exclusive: a one-pixel mask at (x, y) is ``(x, y, x + 1, y + 1)``); zeros for an empty
    mask."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, mask in enumerate(masks):
        ys = np.flatnonzero(mask.any(axis=1))
        xs = np.flatnonzero(mask.any(axis=0))
        if len(xs) and len(ys):
            boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def augment(image: np.ndarray, masks: np.ndarray, labels: np.ndarray,
            rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A random transform of ``image`` (HxWx3 uint8) and its objects: ``masks`` (N, H, W) bool,
    ``labels`` (N,) ints. Returns ``(image, masks, boxes, labels)`` of the same height and
    width; objects with nothing left are dropped (``labels`` follows); ``boxes`` (N', 4) float32
    xyxy pixels from the masks."""
    import cv2

    height, width = image.shape[:2]
    if rng.random() < 0.5:
        image = image[:, ::-1]
        masks = masks[:, :, ::-1]
    scale = rng.uniform(0.7, 1.0)
    crop_w, crop_h = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
    x0 = int(rng.integers(0, width - crop_w + 1))
    y0 = int(rng.integers(0, height - crop_h + 1))
    image = cv2.resize(np.ascontiguousarray(image[y0:y0 + crop_h, x0:x0 + crop_w]),
                       (width, height), interpolation=cv2.INTER_LINEAR)
    if len(masks):
        cropped = np.ascontiguousarray(masks[:, y0:y0 + crop_h, x0:x0 + crop_w], np.uint8)
        masks = np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_NEAREST)
                          for m in cropped]).astype(bool)
    else:
        masks = np.zeros((0, height, width), bool)
    contrast = rng.uniform(0.8, 1.2)
    brightness = rng.uniform(-0.2, 0.2) * 255
    image = np.clip(image.astype(np.float32) * contrast + brightness, 0, 255).astype(np.uint8)
    keep = masks.any(axis=(1, 2))  # (N,) also for N = 0
    masks, labels = masks[keep], np.asarray(labels)[keep]
    return image, masks, mask_boxes(masks), labels


__all__ = ["augment", "mask_boxes"]
