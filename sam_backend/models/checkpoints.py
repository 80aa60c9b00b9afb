"""Which checkpoint a start uses: the variant inferred from the options (``sam_checkpoint_file``
alone is enough), the names ``sam-backend weights`` accepts, and the file on disk, downloaded
first (:mod:`.download`) when it is missing and downloads are allowed.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, List, Optional, Union

from sam_backend.errors import CheckpointError, ConfigError
from sam_backend.models import hub, registry
from sam_backend.models.download import download
from sam_backend.models.families import DEFAULT_MODEL_NAME
from sam_backend.models.registry import VARIANTS, Variant

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODEL_NAME", "ensure_checkpoint", "infer_variant", "resolve_names"]


# -- names ---------------------------------------------------------------------------------------
def _valid_names() -> str:
    return (f"a model_name ({', '.join(registry.model_names())}), model_name/sam_config "
            f"({', '.join(v.key for v in VARIANTS.values())}), a checkpoint file name "
            f"({', '.join(v.checkpoint_name for v in VARIANTS.values())}), or all")


def resolve_names(names: Iterable[str]) -> List[Variant]:
    """The variants named by ``names`` (model_name, model_name/sam_config, file name or ``all``),
    in order, without duplicates. Raises ConfigError for an unknown name, listing the valid ones."""
    names = [str(n).strip() for n in names]
    if not names:
        raise ConfigError(f"name a checkpoint: {_valid_names()}")
    found: List[Variant] = []
    for name in names:
        if name == "all":
            matches = list(VARIANTS.values())
        elif name in registry.DEFAULT_CONFIG:
            matches = [registry.get_variant(name)]
        elif name.count("/") == 1 and tuple(name.split("/")) in VARIANTS:
            matches = [VARIANTS[tuple(name.split("/"))]]
        else:
            by_file = [v for v in VARIANTS.values() if v.checkpoint_name == name]
            if not by_file:
                raise ConfigError(f"unknown checkpoint name {name!r}: use {_valid_names()}")
            matches = by_file
        for variant in matches:
            if variant not in found:
                found.append(variant)
    return found


def _blank(value: Optional[str]) -> bool:
    return value is None or str(value).strip() == ""


def infer_variant(model_name: Optional[str] = None, sam_config: Optional[str] = None,
                  checkpoint: Union[str, Path, None] = None) -> Variant:
    """The variant to run from the start-up options; ``sam_checkpoint_file`` alone is enough.

    - ``model_name`` given: ``registry.get_variant(model_name, sam_config)``; when ``sam_config``
      is not given and the checkpoint has the official name of one of that model's files, that
      file's config (``model_name=sam`` + ``sam_vit_h_4b8939.pth`` -> ``sam/vit_h``); SAM 2.0's
      files are recognised by name under their 2.1 config too (``sam_config=hiera_tiny`` +
      ``sam2_hiera_tiny.pt`` -> ``sam2/hiera_tiny_v2.0``).
    - ``model_name`` not given, checkpoint given: the variant whose official file name it has;
      an unknown file name is a ConfigError asking for ``model_name``.
    - neither: the product default, ``mobile_sam``.
    Empty strings count as not given (Label Studio passes them for unset options).
    """
    model_name = None if _blank(model_name) else str(model_name).strip()
    sam_config = None if _blank(sam_config) else str(sam_config).strip()
    checkpoint = None if _blank(checkpoint) else str(checkpoint).strip()
    by_file = registry.variant_for_file(checkpoint) if checkpoint else None

    if model_name:
        if sam_config is None and by_file is not None and by_file.model_name == model_name:
            return by_file
        if by_file is not None and by_file.key == f"{model_name}/{sam_config}_v2.0":
            # sam_config=hiera_tiny with SAM 2.0's sam2_hiera_tiny.pt: that file's layout
            log.info("%s is a SAM 2.0 checkpoint: running it as %s", checkpoint, by_file.key)
            return by_file
        variant = registry.get_variant(model_name, sam_config)
        if by_file is not None and by_file != variant:
            log.warning("sam_checkpoint_file %s is named like %s's checkpoint, but %s was asked "
                        "for; loading will tell whether it fits", checkpoint, by_file.key,
                        variant.key)
        return variant

    if checkpoint:
        if by_file is None:
            raise ConfigError(
                f"cannot tell which model sam_checkpoint_file={checkpoint} is for: its name is not "
                f"an official checkpoint name ({', '.join(v.checkpoint_name for v in VARIANTS.values())}). "
                f"Set model_name ({', '.join(registry.model_names())}) and sam_config"
            )
        if sam_config is not None and sam_config != by_file.sam_config:
            raise ConfigError(
                f"sam_config={sam_config} does not match sam_checkpoint_file={checkpoint}, which is "
                f"{by_file.key}'s checkpoint: drop sam_config or set model_name as well"
            )
        return by_file

    if sam_config is not None and (DEFAULT_MODEL_NAME, sam_config) not in VARIANTS:
        having = sorted(m for (m, c) in VARIANTS if c == sam_config)
        if having:
            raise ConfigError(f"sam_config={sam_config} given without model_name: set model_name "
                              f"({', '.join(having)})")
    return registry.get_variant(DEFAULT_MODEL_NAME, sam_config)


def ensure_checkpoint(variant: Variant, checkpoint: Union[str, Path, None] = None,
                      offline: bool = False) -> Path:
    """The checkpoint the backend will load, downloading it first if it is missing.

    ``checkpoint`` None means the default path (weights dir / official file name). A missing file
    is downloaded when it is the default path or carries the variant's official file name (into
    its own directory), unless ``offline`` (the caller's ``Settings.offline``, which already
    weighs the option against ``SAM_BACKEND_OFFLINE``).
    """
    default = registry.default_checkpoint(variant)
    path = Path(checkpoint).expanduser() if not _blank(checkpoint) else default
    if hub.hub_repo(variant):
        return _ensure_hub_checkpoint(variant, path, default, offline)
    if path.is_file():
        return path
    if path.exists():
        raise CheckpointError(f"checkpoint {path} is not a file")
    official = path.name == variant.checkpoint_name
    if not official and path.absolute() != default.absolute():
        raise CheckpointError(
            f"checkpoint {path} not found. It is not named like {variant.key}'s official "
            f"checkpoint ({variant.checkpoint_name}), so it is not downloaded: fix "
            f"sam_checkpoint_file, or leave it empty to use {default}"
        )
    if offline:
        raise CheckpointError(
            f"checkpoint {path} for {variant.key} is missing and downloads are off (offline). "
            f"Get it with `sam-backend weights download {variant.key}`"
            f"{f' --dir {path.parent}' if path.parent.absolute() != default.parent.absolute() else ''}"
            f" on a machine with internet access, or download {variant.url} and copy it to {path}"
        )
    log.info("checkpoint %s for %s is missing: downloading it", path, variant.key)
    return download(variant, dest_dir=path.parent, progress=True)


def _ensure_hub_checkpoint(variant: Variant, path: Path, default: Path,
                           offline: bool) -> Path:
    """A hub-format checkpoint directory, downloaded first when missing (see ensure_checkpoint)."""
    if hub.is_checkpoint_dir(path):
        return path
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"checkpoint {path} for {variant.key} is a file: {variant.key} loads "
                              f"from a hub-format directory (config.json + model.safetensors)")
    if path.name != variant.checkpoint_name and path.absolute() != default.absolute():
        raise CheckpointError(
            f"checkpoint directory {path} not found (or without config.json). It is not named like "
            f"{variant.key}'s checkpoint ({variant.checkpoint_name}), so it is not downloaded: fix "
            f"sam_checkpoint_file, or leave it empty to use {default}")
    if offline:
        raise CheckpointError(hub.missing_message(variant, path))
    log.info("checkpoint directory %s for %s is missing: downloading it", path, variant.key)
    return hub.download(variant, path.parent, progress=True)


