"""Which runtime runs a variant: ``torch`` (the variant's own modules) or ``onnx`` (onnxruntime).

The choice is the family table's (:func:`~sam_backend.models.families.choose_runtime`, one place):
``runtime=auto`` picks, per variant, the fastest runtime whose masks match the torch reference
(mask IoU >= 0.99 on four aspect ratios and five prompt kinds: tests/models/test_onnx_runtime.py):
``onnx`` for the configs in each row's ``onnx_by_default`` on a CPU device, measured faster than
torch with the same masks (benchmarks/bench_runtimes.py; the figures are in the README's "Speed"
section and benchmarks/README.md). It stays ``torch`` for vit_h (SAM and HQ-SAM): not measured,
since exporting it needs more memory than the project's machines have
(:func:`~.onnx_export.export_memory_needed`); and on GPUs, where onnxruntime would need its GPU
build. ``runtime=onnx`` can be asked for any variant of a family with an onnx runtime; when a
checkpoint cannot be exported faithfully (an unsupported op, a graph that disagrees with torch,
not enough memory), the torch runtime runs instead and the reason is logged. SAM 2 runs its
decoder in onnxruntime and its encoder in torch; SAM 3 has no onnx runtime.

The first start with ``onnx`` exports the graphs into ``<checkpoint dir>/onnx/``
(:mod:`.onnx_export`); later starts reuse them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

from sam_backend.models.base import SegmentationModel
from sam_backend.models.families import RUNTIME_NAMES, choose_runtime, family_of
from sam_backend.models.registry import Variant

log = logging.getLogger(__name__)

RUNTIMES = tuple(name for name in RUNTIME_NAMES if name != "auto")


def create_model(variant: Variant, checkpoint: Union[str, Path, None], device: str,
                 runtime: str = "auto") -> SegmentationModel:
    """The variant's checkpoint loaded on ``device`` by ``runtime`` (auto, torch or onnx), through
    its family's runtime module (the family table's ``create``).

    runtime=onnx falls back to torch (with a logged warning) for a family without an onnx
    runtime, when onnxruntime is not installed or the checkpoint cannot be exported faithfully;
    for SAM 1 families it is a ConfigError on a device onnxruntime cannot use."""
    chosen = choose_runtime(variant, device, runtime)  # ConfigError for an unknown runtime
    if runtime not in ("auto", chosen):
        log.warning("runtime=%s is not available for %s: running it with %s", runtime,
                    variant.key, chosen)
    return family_of(variant).create(variant, checkpoint, device, chosen)
