"""A synthetic, learnable project for the training tests and benchmarks: images with one to three
filled shapes of two labels (``circle`` and ``square``) on a noisy background, masks known.

:func:`shapes_image` draws one image (seeded); :func:`shapes_project` writes ``n`` of them as PNG
files and returns Label Studio tasks annotated with brush + polygon + box regions per object (as
this backend's clicks leave them), ready for :func:`sam_backend.training.dataset.build_dataset`
or for a real Label Studio (the tasks' ``data.image`` is whatever ``url_for(path)`` returns).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

from tests.support.export_data import answer

LABELS = ("circle", "square")

#: brush, polygon and rectangle controls with the two labels (and a smart keypoint tool)
SHAPES_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="BrushLabels" toName="image">
    <Label value="circle"/><Label value="square"/>
  </BrushLabels>
  <PolygonLabels name="PolygonLabels" toName="image">
    <Label value="circle"/><Label value="square"/>
  </PolygonLabels>
  <RectangleLabels name="RectangleLabels" toName="image" smart="true">
    <Label value="circle"/><Label value="square"/>
  </RectangleLabels>
  <KeyPointLabels name="KeyPointLabels" toName="image" smart="true">
    <Label value="circle"/><Label value="square"/>
  </KeyPointLabels>
</View>"""


def shapes_image(seed: int, width: int = 160, height: int = 120
                 ) -> Tuple[np.ndarray, List[Tuple[str, np.ndarray]]]:
    """One image (HxWx3 uint8 RGB) and its objects ``[(label, (H, W) bool mask), ...]``: one to
    three shapes, each 18-34 % of the shorter side across, not overlapping, in a saturated
    colour on a grey noisy background."""
    import cv2

    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(110, 18, (height, width, 3)), 0, 255).astype(np.uint8)
    objects: List[Tuple[str, np.ndarray]] = []
    taken = np.zeros((height, width), bool)
    side = min(width, height)
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(20):
            label = LABELS[int(rng.integers(0, 2))]
            size = int(rng.uniform(0.18, 0.34) * side)
            cx = int(rng.integers(size, width - size))
            cy = int(rng.integers(size, height - size))
            mask = np.zeros((height, width), np.uint8)
            if label == "circle":
                cv2.circle(mask, (cx, cy), size // 2, 1, -1)
            else:
                half = size // 2
                cv2.rectangle(mask, (cx - half, cy - half), (cx + half, cy + half), 1, -1)
            grown = cv2.dilate(mask, np.ones((7, 7), np.uint8)).astype(bool)
            if (grown & taken).any():
                continue
            colour = rng.integers(0, 256, 3)
            colour[int(rng.integers(0, 3))] = int(rng.integers(200, 256))  # saturated
            image[mask.astype(bool)] = colour
            taken |= mask.astype(bool)
            objects.append((label, mask.astype(bool)))
            break
    return image, objects


def shapes_project(directory: Path, n: int, seed: int = 0, width: int = 160, height: int = 120,
                   url_for: Optional[Callable[[Path], str]] = None,
                   first_id: int = 1) -> List[dict]:
    """``n`` images written to ``directory`` (``shape-<i>.png``) and their tasks, ids from
    ``first_id``, each annotated once (brush + polygons + box per object; ``data.image`` =
    ``url_for(path)``, default the path itself)."""
    import cv2

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tasks = []
    for i in range(n):
        image, objects = shapes_image(seed * 100_003 + i, width, height)
        path = directory / f"shape-{i}.png"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        result = [region for label, mask in objects for region in answer(mask, label)]
        task_id = first_id + i
        tasks.append({"id": task_id, "data": {"image": url_for(path) if url_for else str(path)},
                      "annotations": [{"id": 10_000 + task_id, "result": result,
                                       "was_cancelled": False,
                                       "created_at": "2026-11-01T10:00:00.000000Z"}],
                      "predictions": []})
    return tasks


__all__ = ["LABELS", "SHAPES_CONFIG", "shapes_image", "shapes_project"]
