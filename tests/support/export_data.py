"""Label Studio exports built from what this backend answers (its own region builders), for the
export tests: one object = brush + polygons traced from it + its tight box (+ prompts)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from sam_backend.labelstudio.regions import (brush_region, mask_bbox, mask_polygons, polygon_region,
                                 rectangle_region)


def disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.hypot(xx - cx, yy - cy) <= r


def block(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def answer(mask, label, brush=True, polygons=True, box=True):
    """The regions the backend returns for one object (out_mask, out_poly, out_bbox)."""
    h, w = mask.shape
    out = []
    if brush:
        out.append(brush_region(mask, label, "BrushLabels", "image"))
    if polygons:
        out += [polygon_region(p, label, "PolygonLabels", "image", w, h)
                for p in mask_polygons(mask, 64, 1.5)]
    if box:
        out.append(rectangle_region(mask_bbox(mask), label, "RectangleLabels", "image", w, h))
    return out


def keypoint_prompt(x, y, label, w, h):
    return {"id": f"kp{x}{y}", "type": "keypointlabels", "from_name": "KeyPointLabels",
            "to_name": "image", "original_width": w, "original_height": h,
            "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]},
            "is_positive": True}


def box_prompt(bbox_px, label, w, h):
    return rectangle_region(bbox_px, label, "RectangleLabels", "image", w, h)


def png_bytes(w, h, seed=0):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_export(tmp_path: Path, monkeypatch, tasks_regions, sizes):
    """Write images under a LOCAL_FILES_DOCUMENT_ROOT and the export; returns its path.
    ``tasks_regions``: {task id: [regions]}; ``sizes``: {task id: (w, h)}."""
    root = tmp_path / "docroot"
    root.mkdir(exist_ok=True)
    tasks = []
    for task_id, regions in tasks_regions.items():
        w, h = sizes[task_id]
        (root / f"img{task_id}.png").write_bytes(png_bytes(w, h, task_id))
        tasks.append({"id": task_id, "data": {"image": f"/data/local-files/?d=img{task_id}.png"},
                      "annotations": [{"id": task_id, "result": regions}]})
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(root))
    monkeypatch.setenv("SAM_BACKEND_IMAGE_CACHE_DIR", str(tmp_path / "cache"))
    return export
