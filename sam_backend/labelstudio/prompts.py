"""Label Studio layer: the interactive context -> one prompt (points and/or a box) on one image.

The frontend sends the regions of one smart control, one label and one image together. Every
click on an object re-sends all of its points, positive and negative (``is_positive``); a smart
rectangle event carries every rectangle of the control, the new one last.
A region without ``from_name``/``to_name`` (as HumanSignal's SAM example tests send them) is
answered when the config has exactly one candidate control (see :func:`_only_candidate`).
Coordinates arrive in percent (0-100) of the image's natural size (EXIF orientation applied);
``image_rotation`` is only the viewer's rotation and does not change them.

A rectangle drawn with a box-exemplar control (``exemplar="positive"`` / ``"negative"``, see
:mod:`~sam_backend.labelstudio.label_config`) is not a click: :func:`parse_context` answers
:class:`~sam_backend.concepts.base.Exemplars`, every exemplar box of that label on that image
(Label Studio re-sends them all with each new one, so they accumulate like clicks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Union

import numpy as np

from sam_backend.concepts.base import Exemplars
from sam_backend.errors import RequestError
from sam_backend.labelstudio.label_config import PROMPT_TYPES, Control, LabelConfig
from sam_backend.common.limits import check_count, shown
from sam_backend.models.base import Prompt

# Label Studio rounds percent values; a hair outside 0..100 is an edge click, not an error.
_EDGE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class PromptRequest:
    """A prompt as Label Studio sent it. ``points``: Nx2 float (x, y) in percent;
    ``point_labels``: N int (1 positive, 0 negative); ``box``: (x0, y0, x1, y1) percent or None."""

    kind: str
    from_name: str
    to_name: str
    label: str
    points: np.ndarray
    point_labels: np.ndarray
    box: Optional[np.ndarray]
    original_width: Optional[int]
    original_height: Optional[int]
    image_rotation: float
    item_index: Optional[int]

    def to_prompt(self, width: int, height: int) -> Prompt:
        """The prompt in pixels of an image ``width`` x ``height``."""
        scale = np.array([width / 100.0, height / 100.0])
        points = self.points * scale if len(self.points) else np.zeros((0, 2))
        box = None
        if self.box is not None:
            box = self.box * np.tile(scale, 2)
        return Prompt(points.astype(np.float32), self.point_labels.astype(np.int64), box)


def _number(value: Any, what: str, index: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestError(f"context.result[{index}]: {what} must be a number, got "
                           f"{shown(value)}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise RequestError(f"context.result[{index}]: {what} must be a number, got "
                           f"{shown(value)}") from None
    if not math.isfinite(number):
        raise RequestError(f"context.result[{index}]: {what} is {shown(value)}, not a finite "
                           f"number")
    return number


def _percent(value: Any, what: str, index: int) -> float:
    number = _number(value, what, index)
    if not -_EDGE_TOLERANCE <= number <= 100 + _EDGE_TOLERANCE:
        raise RequestError(f"context.result[{index}]: {what}={number} is outside the image "
                           f"(Label Studio coordinates are percent, 0 to 100)")
    return min(max(number, 0.0), 100.0)


def _is_positive(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no")
    return True if value is None else bool(value)


def _label(item: dict, kind: str, index: int) -> str:
    value = item.get("value") or {}
    labels = value.get(kind) or value.get("labels")
    if isinstance(labels, str):
        labels = [labels]
    if not labels or not isinstance(labels, list) or not isinstance(labels[0], str):
        raise RequestError(f"context.result[{index}] has no label: pick a label before "
                           f"clicking (value.{kind} is empty)")
    return labels[0]


def _optional_int(value: Any) -> Optional[int]:
    """``value`` as an int, or None when absent or not a finite integral number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
        return int(number) if math.isfinite(number) and number == int(number) else None
    except (TypeError, ValueError, OverflowError):
        return None


def _only_candidate(config: LabelConfig, kind: str, label: str, to_name: Any) -> Control:
    """The control a prompt without ``from_name`` belongs to (as HumanSignal's own SAM example
    tests send rectangles): the ``kind`` control that has ``label`` (on ``to_name``, when given),
    preferring a smart one, when exactly one such control exists and its image is in the
    config. Raises RequestError naming the candidates otherwise."""
    candidates = [c for c in config.controls if c.type == kind and c.has_label(label)
                  and (not to_name or c.to_name == to_name)]
    if len(candidates) > 1 and sum(c.smart for c in candidates) == 1:
        candidates = [c for c in candidates if c.smart]
    where = f" on {to_name!r}" if to_name else ""
    if not candidates:
        raise RequestError(f"the prompt has no from_name and the labeling config has no {kind} "
                           f"control{where} with the label {label!r}")
    if len(candidates) > 1:
        raise RequestError(
            f"the prompt has no from_name and the labeling config has "
            f"{len(candidates)} {kind} controls{where} with the label {label!r} "
            f"({', '.join(c.name for c in candidates)}): send from_name (and to_name) to say "
            f"which one")
    control = candidates[0]
    if control.to_name not in config.images:
        raise RequestError(f"the prompt has no from_name and its control {control.name!r} "
                           f"labels {control.to_name!r}, which is not an <Image> of the config")
    return control


def _index(item: dict, index: int) -> Optional[int]:
    """``item_index`` (which image of a multi-image task): None or a non-negative integer."""
    value = item.get("item_index")
    number = _optional_int(value)
    if value is not None and (number is None or number < 0 or number > 1_000_000):
        raise RequestError(f"context.result[{index}].item_index must be a non-negative integer, "
                           f"got {shown(value)}")
    return number


def _size(item: dict, name: str, index: int) -> Optional[int]:
    """``original_width`` / ``original_height``: None, or a positive integral number."""
    value = item.get(name)
    if value is None:
        return None
    number = _optional_int(value)
    if number is None or number < 0 or number > 10_000_000:
        raise RequestError(f"context.result[{index}].{name} must be a positive integer (pixels), "
                           f"got {shown(value)}")
    return number or None


def _box(item: dict, index: int) -> np.ndarray:
    """A rectangle region's (x0, y0, x1, y1) float64 in percent, checked: inside the image
    (0-100, a hair of rounding allowed), with an area."""
    value = item["value"]
    x = _percent(value.get("x"), "value.x", index)
    y = _percent(value.get("y"), "value.y", index)
    w = _number(value.get("width"), "value.width", index)
    h = _number(value.get("height"), "value.height", index)
    if w <= 0 or h <= 0:
        raise RequestError(f"context.result[{index}]: the rectangle has no area "
                           f"(width={w}, height={h})")
    x1 = _percent(x + w, "value.x + value.width", index)
    y1 = _percent(y + h, "value.y + value.height", index)
    return np.array([x, y, x1, y1], dtype=np.float64)


def _exemplars(group: List[tuple], config: LabelConfig, label: str, to_name: str,
               from_name: str, item_index: Optional[int]) -> Exemplars:
    """The exemplar boxes of ``label`` in ``group`` (the rectangles of the request on that
    image): a box of an ``exemplar="negative"`` control, or one sent with ``is_positive: false``,
    is negative; the label's hint (on ``from_name`` first) is the phrase."""
    if not any(config.output_for(kind, to_name, label)
               for kind in ("brushlabels", "polygonlabels", "rectanglelabels")):
        raise RequestError(
            f"no BrushLabels, PolygonLabels or RectangleLabels control on {shown(to_name)} has "
            f"the exemplar's label {shown(label)}: nowhere to put the instances (give the output "
            f"controls the exemplar controls' labels)")
    boxes: List[np.ndarray] = []
    positive: List[bool] = []
    for i, item in group:
        control = config.control(item.get("from_name") or from_name)
        if control is None or control.exemplar is None or _label(item, item["type"], i) != label:
            continue  # a box of another tool, or of another label
        boxes.append(_box(item, i))
        positive.append(control.exemplar == "positive" and _is_positive(item.get("is_positive")))
    phrase = config.hint_for(to_name, label, prefer=from_name)
    if not any(positive) and not phrase:
        raise RequestError(
            f"only negative exemplars of {shown(label)}, and the label has no hint to say what to "
            f"find: draw a box around one instance with the exemplar=\"positive\" tool first "
            f"(a negative exemplar only removes look-alikes)")
    return Exemplars(label=label, to_name=to_name,
                     boxes=np.array(boxes, np.float64).reshape(-1, 4),
                     positive=np.array(positive, bool), phrase=phrase, item_index=item_index)


def parse_context(context: Any, config: LabelConfig,
                  max_points: int = 512) -> Optional[Union[PromptRequest, Exemplars]]:
    """The prompt in ``context`` (``params.context`` of /predict), or None when there is none
    (a task was opened, not clicked): a :class:`PromptRequest` for a click or a box, the
    :class:`Exemplars` of a label when the newest region was drawn with an exemplar control.
    Raises RequestError on anything malformed, and on more than ``max_points`` regions."""
    if context is None:
        return None
    if not isinstance(context, dict):
        raise RequestError("context must be an object with a 'result' list")
    items = context.get("result")
    if items is None or items == []:
        return None
    if not isinstance(items, list):
        raise RequestError("context.result must be a list of regions")
    check_count(items, max_points, "context.result", "regions", "max_points")
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            raise RequestError(f"context.result[{index}] is not a region object with a 'value'")
        kind = item.get("type")
        if not isinstance(kind, str) or kind not in PROMPT_TYPES:
            raise RequestError(
                f"context.result[{index}] has type {shown(kind)}: this backend takes "
                f"smart KeyPointLabels or RectangleLabels prompts ({', '.join(PROMPT_TYPES)})")
        for name in ("from_name", "to_name"):
            if item.get(name) is not None and not isinstance(item.get(name), str):
                raise RequestError(f"context.result[{index}].{name} must be a string, got "
                                   f"{type(item.get(name)).__name__}")

    # The last region is the one just drawn: it decides the kind, control, label and image.
    last_index = len(items) - 1
    last = items[-1]
    kind = last["type"]
    label = _label(last, kind, last_index)
    from_name = last.get("from_name")
    if from_name is None or from_name == "":
        control = _only_candidate(config, kind, label, last.get("to_name"))
        from_name = control.name
    else:
        control = config.control(from_name) if isinstance(from_name, str) else None
    if control is None or control.type != kind:
        raise RequestError(f"the prompt's from_name {shown(from_name)} is not a {kind} control "
                           f"of the labeling config")
    if not control.has_label(label):
        raise RequestError(f"label {shown(label)} is not in the labeling config's "
                           f"{shown(from_name)} control (labels: "
                           f"{shown(', '.join(control.labels) or 'none', 200)})")
    to_name = last.get("to_name") or control.to_name
    item_index = _index(last, last_index)

    if control.exemplar is not None:
        # every exemplar control's boxes on this image (a negative tool is another control)
        group = [(i, item) for i, item in enumerate(items)
                 if item["type"] == kind and (item.get("to_name") or to_name) == to_name
                 and _optional_int(item.get("item_index")) == item_index]
        return _exemplars(group, config, label, to_name, from_name, item_index)

    group = [
        (i, item) for i, item in enumerate(items)
        if item["type"] == kind and (item.get("from_name") or from_name) == from_name
        and (item.get("to_name") or to_name) == to_name
        and _optional_int(item.get("item_index")) == item_index
    ]
    points: List[List[float]] = []
    point_labels: List[int] = []
    box = None
    if kind == "keypointlabels":
        for i, item in group:
            if _label(item, kind, i) != label:
                continue  # a point of another object with another label
            value = item["value"]
            points.append([_percent(value.get("x"), "value.x", i),
                           _percent(value.get("y"), "value.y", i)])
            point_labels.append(1 if _is_positive(item.get("is_positive")) else 0)
    else:
        box = _box(last, last_index)

    width = _size(last, "original_width", last_index)
    height = _size(last, "original_height", last_index)
    rotation = last.get("image_rotation") or 0
    return PromptRequest(
        kind=kind, from_name=from_name, to_name=to_name, label=label,
        points=np.array(points, dtype=np.float64).reshape(-1, 2),
        point_labels=np.array(point_labels, dtype=np.int64), box=box,
        original_width=width,
        original_height=height,
        image_rotation=_number(rotation, "image_rotation", last_index),
        item_index=item_index,
    )
