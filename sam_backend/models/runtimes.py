"""Which runtime runs a variant: ``torch`` (the variant's own modules) or ``onnx`` (onnxruntime).

``runtime=auto`` picks, per variant, the fastest runtime whose masks match the torch reference
(mask IoU >= 0.99 on four aspect ratios and five prompt kinds: tests/models/test_onnx_runtime.py):
``onnx`` for the variants in :data:`ONNX_DEFAULT` on a CPU device, measured faster than torch
with the same masks (benchmarks/bench_runtimes.py; the figures are in the README's "Speed"
section and benchmarks/README.md). It stays ``torch`` for vit_h (SAM and HQ-SAM): not measured,
since exporting it needs more memory than the project's machines have
(:func:`~.onnx_export.export_memory_needed`); and on GPUs, where onnxruntime would need its GPU
build. ``runtime=onnx`` can be asked for any variant; when a checkpoint cannot be exported
faithfully (an unsupported op, a graph that disagrees with torch, not enough memory), the torch
runtime runs instead and the reason is logged.

The first start with ``onnx`` exports the graphs into ``<checkpoint dir>/onnx/``
(:mod:`.onnx_export`); later starts reuse them. SAM 2 and SAM 3 choose their runtime in their own
factories (``registry.Variant.factory``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

from sam_backend.errors import ConfigError
from sam_backend.models.base import SegmentationModel
from sam_backend.models.registry import Variant

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx")

# Variants (model_name/sam_config) for which onnxruntime was measured faster than torch on CPU,
# with masks matching torch's (see the module docstring).
ONNX_DEFAULT = frozenset({"mobile_sam/vit_t", "sam_hq/vit_tiny", "sam/vit_b", "sam_hq/vit_b",
                          "sam/vit_l", "sam_hq/vit_l"})


def default_runtime(variant: Variant, device: str = "cpu") -> str:
    """The runtime ``runtime=auto`` picks for ``variant`` on ``device``."""
    if variant.key in ONNX_DEFAULT and _is_cpu(device):
        return "onnx"
    return "torch"


def _is_cpu(device: str) -> bool:
    from sam_backend.models.loading import resolve_device

    try:
        return resolve_device(device).type == "cpu"
    except ConfigError:
        return True  # create_model reports the bad device itself


def create_model(variant: Variant, checkpoint: Union[str, Path, None], device: str,
                 runtime: str = "auto") -> SegmentationModel:
    """The variant's checkpoint loaded on ``device`` by ``runtime`` (auto, torch or onnx).

    runtime=onnx falls back to torch (with a logged warning) when onnxruntime is not installed
    or the checkpoint cannot be exported faithfully; it is a ConfigError on a device onnxruntime
    cannot use."""
    if variant.factory is not None:
        return variant.factory(variant, checkpoint, device, runtime)
    chosen = default_runtime(variant, device) if runtime == "auto" else runtime
    if chosen not in RUNTIMES:
        raise ConfigError(f"runtime={runtime!r}: use auto, torch or onnx")
    sam = None
    if chosen == "onnx":
        try:
            from sam_backend.models.onnx_runtime import OnnxExportError, OnnxSamModel
        except ImportError as exc:
            log.warning("onnxruntime cannot be imported (%s): running %s with torch", exc,
                        variant.key)
        else:
            try:
                return OnnxSamModel(variant, checkpoint, device)
            except OnnxExportError as exc:
                log.warning("cannot run %s with onnxruntime (%s): running it with torch",
                            variant.key, exc)
                sam = exc.sam
    from sam_backend.models.loading import resolve_device
    from sam_backend.models.torch_runtime import TorchSamModel

    if sam is not None:
        sam = sam.to(resolve_device(device))
    return TorchSamModel(variant, str(checkpoint) if checkpoint else None, device, sam=sam)
