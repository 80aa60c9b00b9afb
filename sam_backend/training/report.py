"""A run's report, the two files saved with each version: ``report.json`` (what the runner
measured, see :mod:`.runner`) and ``report.png``, the page a person looks at:

* top left: the training loss per epoch (and its parts, when the trainer names them);
* top right: the candidate's and the baseline's held-out mAP, mAP50 and mAP75 (the figure that
  decides promotion, ``metric``: segm for rf_detr, bbox for grounding_dino), per epoch too when
  the epochs' logs carry ``mAP50``;
* below: a few held-out images with the candidate's predictions drawn (mask, box, label and
  score), beside the annotated objects.

Drawn with matplotlib's Agg canvas on a Figure of its own (no pyplot state: safe in a thread).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from sam_backend.common.files import atomic_write


def _plain(value: Any) -> Any:
    """JSON for numpy scalars and arrays, paths and anything else (as text)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_report_json(path: Path, report: Dict[str, Any]) -> None:
    """``report`` as indented JSON at ``path`` (atomically)."""
    atomic_write(path, json.dumps(report, indent=2, sort_keys=True, default=_plain) + "\n")


def read_report_json(path: Path) -> Dict[str, Any]:
    return json.loads(Path(path).read_text())


@dataclass
class Example:
    """One held-out image to draw: ``image`` HxWx3 uint8 RGB; ``boxes`` (N, 4) float xyxy
    pixels of that image, ``scores`` (N,), ``labels`` (N,) class indices, ``masks`` (N, H, W)
    bool or None: the candidate's predictions; ``truth``: the annotated objects as
    ``(label index, (H, W) bool mask)``."""

    title: str
    image: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: Optional[np.ndarray]
    truth: Sequence[Any] = ()


def _overlay(image: np.ndarray, masks: Sequence[np.ndarray], colours: Sequence[np.ndarray],
             alpha: float = 0.45) -> np.ndarray:
    out = image.astype(np.float32).copy()
    for mask, colour in zip(masks, colours):
        if mask is not None and mask.shape == image.shape[:2]:
            out[mask] = out[mask] * (1 - alpha) + colour * 255 * alpha
    return np.clip(out, 0, 255).astype(np.uint8)


def _figures(side: Optional[dict], metric: str) -> List[float]:
    figures = (side or {}).get(metric) or {}
    return [float(figures.get(k) or 0.0) for k in ("mAP", "mAP50", "mAP75")]


def draw_report_png(path: Path, report: Dict[str, Any], examples: Sequence[Example] = (),
                    classes: Sequence[str] = ()) -> None:
    """``report.png`` for ``report`` (the dict written as report.json) and up to four held-out
    ``examples`` (see the module docstring), written atomically."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    examples = list(examples)[:4]
    rows = 2 if examples else 1
    columns = max(2, len(examples))
    figure = Figure(figsize=(4.2 * columns, 3.6 * rows), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(rows, columns * 2)
    metric = report.get("metric") or "segm"
    title = (f"{report.get('version') or 'candidate'} ({report.get('kind', '?')}): "
             f"{'promoted' if report.get('promoted') else 'not promoted'}"
             f" - {report.get('promotion_reason', '')}")
    figure.suptitle(title, fontsize=10)

    # loss per epoch
    loss_ax = figure.add_subplot(grid[0, :columns])
    epochs = report.get("epochs") or []
    xs = [e.get("epoch") for e in epochs]
    if epochs:
        loss_ax.plot(xs, [e.get("loss") for e in epochs], "o-", label="loss", color="black")
        parts = sorted({k for e in epochs for k in (e.get("parts") or {})})
        for name in parts[:6]:
            loss_ax.plot(xs, [(e.get("parts") or {}).get(name) for e in epochs], "--",
                         label=name, linewidth=1)
        loss_ax.legend(fontsize=7)
    else:
        loss_ax.text(0.5, 0.5, "no epoch finished", ha="center", va="center")
    per_epoch = [(e.get("epoch"), e.get("mAP50")) for e in epochs if e.get("mAP50") is not None]
    if per_epoch:  # the trainer measured the held-out mAP50 after each epoch
        twin = loss_ax.twinx()
        twin.plot(*zip(*per_epoch), "s-", color="tab:blue", label="held-out mAP50")
        twin.set_ylim(0, 1.05)
        twin.legend(fontsize=7, loc="lower left")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_title("training loss per epoch", fontsize=9)

    # held-out mAP: candidate against baseline (and per epoch, when the trainer measured it)
    map_ax = figure.add_subplot(grid[0, columns:])
    names = ["mAP", "mAP50", "mAP75"]
    positions = np.arange(len(names))
    candidate = _figures(report.get("candidate"), metric)
    baseline = _figures(report.get("baseline"), metric)
    source = (report.get("baseline") or {}).get("source", "none")
    map_ax.bar(positions - 0.2, candidate, 0.4, label="candidate", color="tab:blue")
    map_ax.bar(positions + 0.2, baseline, 0.4, label=f"baseline: {source}", color="tab:gray")
    for x, value in zip(positions, candidate):
        map_ax.text(x - 0.2, value + 0.01, f"{value:.2f}", ha="center", fontsize=7)
    for x, value in zip(positions, baseline):
        map_ax.text(x + 0.2, value + 0.01, f"{value:.2f}", ha="center", fontsize=7)
    map_ax.set_xticks(positions, names)
    map_ax.set_ylim(0, 1.05)
    map_ax.legend(fontsize=7, loc="upper left")
    map_ax.set_title(f"held-out {metric} ({(report.get('dataset') or {}).get('held_out_tasks', '?')}"
                     f" tasks)", fontsize=9)

    # held-out images: annotated objects | the candidate's predictions
    cmap = colormaps["tab10"]
    for i, example in enumerate(examples):
        for side in (0, 1):
            ax = figure.add_subplot(grid[1, 2 * i + side])
            ax.set_axis_off()
            if side == 0:
                masks = [m for _, m in example.truth]
                colours = [np.array(cmap(int(label) % 10)[:3]) for label, _ in example.truth]
                ax.imshow(_overlay(example.image, masks, colours))
                ax.set_title(f"{example.title}: annotated", fontsize=7)
                continue
            labels = np.asarray(example.labels).reshape(-1)
            colours = [np.array(cmap(int(label) % 10)[:3]) for label in labels]
            masks = list(example.masks) if example.masks is not None else []
            ax.imshow(_overlay(example.image, masks, colours))
            for box, score, label, colour in zip(np.asarray(example.boxes).reshape(-1, 4),
                                                 np.asarray(example.scores).reshape(-1),
                                                 labels, colours):
                x0, y0, x1, y1 = (float(v) for v in box)
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                       edgecolor=colour, linewidth=1))
                name = classes[int(label)] if 0 <= int(label) < len(classes) else str(label)
                ax.text(x0, y0, f"{name} {float(score):.2f}", fontsize=6, color="white",
                        va="bottom", bbox={"facecolor": colour, "alpha": 0.8, "pad": 0.5,
                                           "linewidth": 0})
            ax.set_title(f"{example.title}: predicted ({len(labels)})", fontsize=7)
    figure.tight_layout()
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write(path, buffer.getvalue())


__all__ = ["Example", "draw_report_png", "read_report_json", "write_report_json"]
