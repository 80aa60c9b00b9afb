"""The variants this backend can run: ``model_name`` x ``sam_config`` -> builder and checkpoint.

The variants are the rows of the family table (:mod:`sam_backend.models.families`): this module
indexes them by ``(model_name, sam_config)`` and by file name, and says where checkpoints live.
Nothing in the request path branches on the variant. A builder returns the real architecture with
uninitialised weights (``checkpoint=None``); loading the checkpoint is
:mod:`sam_backend.models.loading`'s job, so that every variant gets the same strict key/shape check
and the same error messages.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple

from sam_backend.errors import ConfigError
from sam_backend.models.families import FAMILIES, Variant

__all__ = ["VARIANTS", "DEFAULT_CONFIG", "Variant", "default_checkpoint", "get_variant",
           "model_names", "variant_for_file", "weights_dir"]

VARIANTS: Dict[Tuple[str, str], Variant] = {
    (v.model_name, v.sam_config): v for family in FAMILIES.values() for v in family.variants
}
DEFAULT_CONFIG: Dict[str, str] = {name: family.default_config for name, family in FAMILIES.items()}


def model_names() -> list:
    return sorted(DEFAULT_CONFIG)


def get_variant(model_name: str, sam_config: Optional[str] = None) -> Variant:
    """The variant for ``model_name`` and ``sam_config`` (the model's default config if None)."""
    if model_name not in DEFAULT_CONFIG:
        raise ConfigError(
            f"unknown model_name {model_name!r}: choose one of {', '.join(model_names())}"
        )
    config = sam_config or DEFAULT_CONFIG[model_name]
    variant = VARIANTS.get((model_name, config))
    if variant is None:
        known = sorted(c for (m, c) in VARIANTS if m == model_name)
        raise ConfigError(
            f"unknown sam_config {config!r} for model_name={model_name}: "
            f"choose one of {', '.join(known)}"
        )
    return variant


def variant_for_file(file_name: str) -> Optional[Variant]:
    """The variant whose official checkpoint file is called ``file_name`` (basename), if any."""
    base = os.path.basename(file_name)
    for variant in VARIANTS.values():
        if variant.checkpoint_name == base:
            return variant
    return None


# The source checkout this package runs from (an editable install or a clone run in place):
# ``<checkout>/sam_backend/models/registry.py``; it is a checkout when ``setup.py`` sits beside
# the package.
_CHECKOUT = Path(__file__).resolve().parents[2]


def weights_dir() -> Path:
    """Where checkpoints live; the first that applies:

    1. ``$SAM_BACKEND_WEIGHTS_DIR``;
    2. ``weights/`` of the source checkout the package runs from (a clone, editable install);
    3. ``weights/`` of the current directory, when it exists;
    4. ``$XDG_CACHE_HOME/sam_backend/weights`` (``~/.cache/sam_backend/weights``): an installed
       package never writes checkpoints into site-packages.
    """
    env = os.environ.get("SAM_BACKEND_WEIGHTS_DIR")
    if env:
        return Path(env).expanduser()
    if (_CHECKOUT / "setup.py").is_file() and (_CHECKOUT / "sam_backend").is_dir():
        return _CHECKOUT / "weights"
    here = Path.cwd() / "weights"
    if here.is_dir():
        return here
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "sam_backend" / "weights"


def default_checkpoint(variant: Variant) -> Path:
    return weights_dir() / variant.checkpoint_name
