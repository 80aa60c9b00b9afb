"""Seeded random-weight checkpoints of the real architectures, behind
``sam-backend weights random`` (tests, benchmarks and offline demos).

No pretrained weights can be fetched on every machine (CI, air-gapped sites). A random-weight
checkpoint has the exact layout and compute cost of the official file, so the whole pipeline can
be exercised and timed; its masks are meaningless. Files made here are saved with
``torch.save(model.state_dict(), path)`` — the official files' format — and loaded through the
normal loading path. Each family's recipe is its row's ``random_init`` in the family table
(:mod:`.families`): a state-dict file (:func:`write_random_state_dict`, wrapped as the official
files wrap theirs, e.g. SAM 2's ``{"model": state_dict}``) or a hub-format directory
(:func:`write_random_pretrained_dir`, SAM 3).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch

from sam_backend.common.files import atomic_path
from sam_backend.errors import CheckpointError
from sam_backend.models import registry
from sam_backend.models.families import family_of
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


def write_random_state_dict(variant: Variant, path: Union[str, Path], seed: int = 0,
                            wrap: Optional[str] = None) -> Path:
    """The state-dict-file recipe: ``variant``'s architecture with weights drawn from ``seed``,
    saved with ``torch.save(state_dict)`` to ``path`` (``{wrap: state_dict}`` when the official
    files wrap theirs so, as SAM 2's do under ``"model"``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = seeded_random_model(variant.builder, seed)
    state = model.state_dict()
    with atomic_path(path) as tmp:
        torch.save({wrap: state} if wrap else state, tmp)
    log.info("wrote random-weight %s checkpoint (seed %d) to %s", variant.key, seed, path)
    return path


def write_random_pretrained_dir(build: Callable[[], torch.nn.Module], path: Union[str, Path],
                                seed: int = 0, what: str = "hub-format") -> Path:
    """The hub-format-directory recipe: ``build()`` with weights drawn from ``seed``, written
    with ``save_pretrained`` (config.json + model.safetensors) into ``path``, replacing it."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = seeded_random_model(build, seed)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    del model
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    log.info("wrote random-weight %s checkpoint directory (seed %d) to %s", what, seed, path)
    return path


def make_random_checkpoint(variant: Variant, path: Union[str, Path], seed: int = 0,
                           **architecture) -> Path:
    """``variant``'s random-weight checkpoint at ``path``, by its family's recipe (the family
    table's ``random_init``); ``architecture``: that recipe's overrides for a reduced model."""
    return family_of(variant).random_init(variant, path, seed, **architecture)


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
    make_random_checkpoint(variant, dest, seed=seed)
    log.warning(RANDOM_WARNING.format(path=dest, key=variant.key, seed=seed))
    return dest


def make_random_sam3_dir(path: Union[str, Path], seed: int = 0,
                         config: Optional[Dict] = None) -> Path:
    """SAM 3's random-weight checkpoint directory (official layout); ``config``: Sam3VideoConfig
    keyword arguments (None: the published architecture)."""
    return make_random_checkpoint(registry.get_variant("sam3"), path, seed, config=config)
