"""Seeded random-weight checkpoints of the real architectures, behind
``sam-backend weights random`` (tests, benchmarks and offline demos).

No pretrained weights can be fetched on every machine (CI, air-gapped sites). A random-weight
checkpoint has the exact layout and compute cost of the official file, so the whole pipeline can
be exercised and timed; its masks are meaningless. Files made here are saved with
``torch.save(model.state_dict(), path)`` — the official files' format — and loaded through the
normal loading path; SAM 2's official files wrap theirs as ``{"model": state_dict}``, and so do
the files made here for ``family == "sam2"``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch

from sam_backend.common.files import atomic_path
from sam_backend.errors import CheckpointError
from sam_backend.models import hub, registry
from sam_backend.models.registry import Variant

log = logging.getLogger(__name__)


def seeded_random_model(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """``build()`` under torch seed ``seed`` (the global generator untouched), then every
    floating-point tensor perturbed by N(0, 0.02): upstream initialises some parameters to
    constants (zeros/ones), and every weight should matter, as trained weights do."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.add_(torch.randn_like(tensor) * 0.02)
    return model


def make_random_checkpoint(variant: Variant, path: Union[str, Path], seed: int = 0) -> Path:
    """Build ``variant`` with weights drawn from ``seed`` and save its state dict to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = seeded_random_model(variant.builder, seed)
    state = model.state_dict()
    with atomic_path(path) as tmp:
        torch.save({"model": state} if variant.family == "sam2" else state, tmp)
    log.info("wrote random-weight %s checkpoint (seed %d) to %s", variant.key, seed, path)
    return path


RANDOM_WARNING = ("RANDOM WEIGHTS: {path} is a random-weight {key} checkpoint (seed {seed}) under "
                  "the official file name. Its masks are MEANINGLESS: use it only for tests, "
                  "benchmarks and offline demos, and delete it before serving real work.")


def write_random(variant: Variant, dest_dir: Union[str, Path, None] = None, seed: int = 0,
                 force: bool = False) -> Path:
    """A random-weight checkpoint of ``variant`` under its official name in ``dest_dir`` (default:
    the weights dir); never replaces an existing one unless ``force``."""
    dest = (Path(dest_dir).expanduser() if dest_dir else registry.weights_dir()) \
        / variant.checkpoint_name
    if dest.exists() and not force:
        raise CheckpointError(f"{dest} already exists: not replacing it with random weights "
                              f"(use --force, or --dir to write elsewhere)")
    if hub.hub_repo(variant):
        make_random_sam3_dir(dest, seed=seed)
    else:
        make_random_checkpoint(variant, dest, seed=seed)
    log.warning(RANDOM_WARNING.format(path=dest, key=variant.key, seed=seed))
    return dest


def make_random_sam3_dir(path: Union[str, Path], seed: int = 0,
                         config: Optional[Dict] = None) -> Path:
    """Write a seeded random-weight SAM 3 checkpoint directory in the official layout
    (``Sam3VideoModel.save_pretrained``: config.json + model.safetensors, ~3.4 GB at full size;
    building it needs about twice that in memory). ``config``: Sam3VideoConfig keyword arguments
    (None: the published architecture). Masks from it are meaningless."""
    import shutil

    from transformers import Sam3VideoConfig, Sam3VideoModel

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = Sam3VideoConfig(**(config or {}))
    model = seeded_random_model(lambda: Sam3VideoModel(config), seed)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    del model
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    log.info("wrote random-weight SAM 3 checkpoint directory (seed %d) to %s", seed, path)
    return path
