"""The tracker table: which model families can track video, and how each tracker is made.

One row per family (``model_name``): its factory, referenced lazily (reading the table imports
neither torch nor a model package). ``factory(variant, checkpoint, device, click_model,
feature_cache_mb, max_sessions) -> Tracker`` loads the tracker from the same checkpoint as the
click model, sharing the loaded click model's weights when it is given.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict

from sam_backend.errors import ConfigError


def _lazy(module: str, name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = f"{module}.{name}"
    return call


TRACKERS: Dict[str, Callable[..., Any]] = {
    "sam2": _lazy("sam_backend.video.sam2_tracker", "create_sam2_tracker"),
    "sam3": _lazy("sam_backend.video.sam3_tracker", "create_sam3_tracker"),
}


def tracker_factory(model_name: str) -> Callable[..., Any]:
    """The row for ``model_name``; a family without a tracker is a ConfigError naming those
    that have one."""
    factory = TRACKERS.get(model_name)
    if factory is None:
        names = "/".join(TRACKERS)
        raise ConfigError(f"model_name={model_name} has no video tracker: video tracking needs "
                          f"model_name={names} (SAM 2.1 or SAM 3)")
    return factory
