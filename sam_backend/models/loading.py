"""Load a checkpoint into its architecture, strictly.

Every variant goes through :func:`load_model`: the checkpoint must fit the architecture exactly
(no missing or unexpected keys, no shape mismatch). The upstream builders load with
``strict=False`` and would silently keep random weights; we never do.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from sam_backend.errors import CheckpointError, ConfigError
from sam_backend.models.registry import Variant, default_checkpoint

log = logging.getLogger(__name__)

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(device: Optional[str]) -> torch.device:
    """``auto`` (or None/empty) -> cuda if available, else cpu; also ``cpu``, ``cuda``, ``cuda:N``,
    ``mps``. A device that is asked for but not present is an error, not a silent fallback."""
    name = (device or "auto").strip().lower()
    if not _DEVICE_RE.match(name):
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} asked for, but no CUDA GPU is available: use device=cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={name} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps asked for, but MPS is not available: use device=cpu")
    return torch.device(name)


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, on the CPU. Raises CheckpointError when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle of something else, ...
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); the file is "
            f"truncated or not a PyTorch checkpoint: download it again"
        ) from exc
    # Some trainers wrap the weights; the official files are plain state dicts.
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def guess_variant(state: Dict[str, torch.Tensor]) -> Optional[str]:
    """What a state dict looks like, e.g. ``sam_hq/vit_h`` (None if unrecognisable): each
    family's recogniser (the family table's ``recognise``) asked in turn.

    Used only to make mismatch errors helpful; loading never depends on it.
    """
    from sam_backend.models.families import recognise

    return recognise(state)


def _mismatch_report(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> List[str]:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = []

    def show(title: str, items: List[str]) -> None:
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{len(items)} {title}: {', '.join(items[:3])}{more}")

    show("missing keys", missing)
    show("unexpected keys", unexpected)
    show("shape mismatches", shapes)
    return problems


def check_fits(model: torch.nn.Module, state: Dict[str, torch.Tensor], variant: Variant,
               path: Union[str, Path]) -> None:
    """Raise CheckpointError unless ``state`` fits ``model`` exactly."""
    problems = _mismatch_report(model, state)
    if not problems:
        return
    guess = guess_variant(state)
    hint = ""
    if guess and guess != variant.key:
        model_name, config = guess.split("/")
        hint = (f" The file looks like a {guess} checkpoint: start with "
                f"model_name={model_name} sam_config={config}.")
    raise CheckpointError(
        f"checkpoint {path} does not fit {variant.key} (expected the layout of "
        f"{variant.checkpoint_name}): {'; '.join(problems)}.{hint}"
    )


def load_model(variant: Variant, checkpoint: Union[str, Path, None] = None,
               device: Union[str, torch.device, None] = "cpu") -> torch.nn.Module:
    """Build ``variant``'s architecture and load ``checkpoint`` into it (strict), in eval mode.

    ``checkpoint`` defaults to ``weights/<official file name>`` (see registry.weights_dir).
    """
    path = Path(checkpoint) if checkpoint else default_checkpoint(variant)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} not found for {variant.key}: run `sam-backend weights download "
            f"{variant.key}` or pass sam_checkpoint_file=<path to {variant.checkpoint_name}>"
        )
    state = read_state_dict(path)
    model = variant.builder()
    check_fits(model, state, variant, path)
    model.load_state_dict(state, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    log.info("loaded %s from %s on %s", variant.key, path, dev)
    return model.to(dev)
