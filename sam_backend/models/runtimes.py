"""Which runtime runs a variant: ``torch`` (the variant's own modules) or ``onnx`` (onnxruntime).

``runtime=auto`` picks, per variant, the fastest runtime whose masks match the torch reference
(mask IoU >= 0.99 on four aspect ratios and five prompt kinds: tests/models/test_onnx_runtime.py).
Measured on this project's 2-core CPU machines (busy with other work: medians of runs taken in
turn, torch/onnx/torch/...), random-weight checkpoints, a 1920x1080 image
(benchmarks/bench_runtimes.py -> benchmarks/results/runtimes.json):

=================  ==================  ====================  ===============================
variant            image encoder       a click (decoder +    onnx vs torch, 24 prompts: min
                   torch -> onnx       upscale) torch->onnx  mask IoU, max |score difference|
=================  ==================  ====================  ===============================
mobile_sam/vit_t   1.47 s -> 0.48 s    50 ms -> 29 ms        0.99998, 2e-7
sam_hq/vit_tiny    1.39 s -> 0.52 s    167 ms -> 66 ms       0.99990, 3e-7
sam/vit_b          23.5 s -> 5.1 s     53 ms -> 35 ms        0.99999, 2e-7
sam_hq/vit_b       13.6 s -> 4.3 s     133 ms -> 69 ms       0.99994, 2e-7
sam/vit_l          37-46 s -> 11-17 s  46 ms -> 27 ms        0.99999 (3 prompts, one run)
sam_hq/vit_l       60-82 s -> 26-40 s  onnx faster (noisy)   0.99999 (3 prompts, one run)
=================  ==================  ====================  ===============================

(vit_l: two interleaved runs each on a machine busy with other work, not in runtimes.json.)

At 3840x2160 a click costs the same plus upscaling (torch ~8 ms, onnx ~4 ms). So ``auto`` is
``onnx`` for the variants in :data:`ONNX_DEFAULT` on a CPU device. It stays ``torch`` for vit_h
(SAM and HQ-SAM): not measured here — exporting a 2.5 GB checkpoint needs ~25 GB of memory
(vit_l's measured peak was 11.7 GB), more than these machines have — and on GPUs, where
onnxruntime would need its GPU build. ``runtime=onnx`` can be asked for any variant; when a
checkpoint cannot be exported faithfully (an unsupported op, a graph that disagrees with torch,
not enough memory), the torch runtime runs instead and the reason is logged.

An int8 encoder (dynamic quantisation of MatMul/Gemm weights, ``OnnxSamModel(int8_encoder=True)``)
is not used by default: on MobileSAM it ran ~1.4x faster than float32 onnx but changed masks too
much (min mask IoU 0.985 per channel, 0.979 per tensor; 0.991 with uint8 weights, which were
barely faster). When asked for, it is checked at creation and refused (with a warning) below
IoU 0.99.

The first start with ``onnx`` exports the graphs (~10 s for the TinyViT variants, 1.5-3 min for
vit_b / vit_l) into ``<checkpoint dir>/onnx/``; later starts reuse them.
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
