"""Which runtime runs a variant: ``torch`` (the variant's own modules) or ``onnx``."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from .errors import ConfigError
from .model import SegmentationModel
from .registry import Variant


def default_runtime(variant: Variant) -> str:
    """The runtime ``runtime=auto`` picks for ``variant``."""
    return "torch"


def create_model(variant: Variant, checkpoint: Union[str, Path], device: str,
                 runtime: str = "auto") -> SegmentationModel:
    runtime = default_runtime(variant) if runtime == "auto" else runtime
    if runtime == "torch":
        from .torch_runtime import TorchSamModel

        return TorchSamModel(variant, str(checkpoint), device)
    raise ConfigError(f"runtime={runtime!r} is not available for {variant.key}: use torch")
