"""Synthetic Label Studio projects for the training tests: tasks as Label Studio's API and JSON
export give them (``annotations`` with timestamps and ``was_cancelled``, ``predictions``), their
regions built by this backend's own region builders (tests/support/export_data.py)."""
from __future__ import annotations

from typing import Any, List, Optional

import numpy as np

from tests.support.export_data import answer, block, box_prompt, disc, keypoint_prompt
from tests.support.payloads import FULL_CONFIG

__all__ = ["CONFIG", "W", "H", "annotation", "task", "cat_mask", "dog_mask", "object_regions",
           "project", "answer", "block", "box_prompt", "disc", "keypoint_prompt"]

#: labels cat, dog under brush, polygon, rectangle and (smart) keypoint controls
CONFIG = FULL_CONFIG
W, H = 160, 100


def cat_mask() -> np.ndarray:
    return disc(H, W, 40, 50, 22)


def dog_mask() -> np.ndarray:
    return block(H, W, 90, 20, 130, 80)


def object_regions(mask: np.ndarray, label: str) -> List[dict]:
    """What a click answered by the backend leaves for one object: brush + polygons + tight box
    and the annotator's smart keypoint prompt."""
    ys, xs = np.nonzero(mask)
    x, y = 100.0 * xs.mean() / W, 100.0 * ys.mean() / H
    return answer(mask, label) + [keypoint_prompt(round(x, 2), round(y, 2), label, W, H)]


def annotation(ann_id: int, result: List[dict], *, updated_at: Optional[str] = None,
               created_at: Optional[str] = None, cancelled: bool = False) -> dict:
    ann: dict = {"id": ann_id, "result": result, "was_cancelled": cancelled,
                 "ground_truth": False, "lead_time": 3.2, "completed_by": 1}
    if created_at is not None:
        ann["created_at"] = created_at
    if updated_at is not None:
        ann["updated_at"] = updated_at
    return ann


def task(task_id: Any, annotations: List[dict], predictions: Optional[List[dict]] = None) -> dict:
    return {"id": task_id, "data": {"image": f"/data/upload/1/img{task_id}.png"},
            "annotations": annotations, "predictions": predictions or [], "drafts": [],
            "project": 1}


def project(n: int, first_id: int = 1) -> List[dict]:
    """``n`` tasks, each annotated once: a cat (even ids) or a dog and a cat (odd ids)."""
    tasks = []
    for task_id in range(first_id, first_id + n):
        regions = object_regions(cat_mask(), "cat")
        if task_id % 2:
            regions += object_regions(dog_mask(), "dog")
        tasks.append(task(task_id, [annotation(1000 + task_id, regions,
                                               created_at="2026-11-01T10:00:00.000000Z")]))
    return tasks
