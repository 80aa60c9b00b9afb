"""What the image layer is configured with: :class:`ImageAccessSettings`, from options and the
environment (``from_env``), validated when built."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Optional

from sam_backend.common.text import parse_bool
from sam_backend.errors import ConfigError
from sam_backend.images.decode import DEFAULT_MAX_PIXELS

DEFAULT_CACHE_MAX_BYTES = 2 * 1024**3
DEFAULT_MAX_DOWNLOAD_BYTES = 1024**3
DEFAULT_TIMEOUT = 30.0


@dataclass
class ImageAccessSettings:
    """Where images come from and how they are fetched. ``from_env`` reads the environment."""

    label_studio_url: Optional[str] = None  # env LABEL_STUDIO_URL (or LABEL_STUDIO_HOST)
    api_key: Optional[str] = field(default=None, repr=False)  # env LABEL_STUDIO_API_KEY (never shown)
    local_files_document_root: Optional[str] = None  # env LOCAL_FILES_DOCUMENT_ROOT
    cache_dir: Optional[str] = None  # env SAM_BACKEND_IMAGE_CACHE_DIR; None: default_cache_dir()
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES  # env SAM_BACKEND_IMAGE_CACHE_BYTES; <=0: off
    max_pixels: int = DEFAULT_MAX_PIXELS  # env SAM_BACKEND_MAX_IMAGE_PIXELS
    timeout: float = DEFAULT_TIMEOUT  # env SAM_BACKEND_IMAGE_TIMEOUT; seconds per download
    max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES  # env SAM_BACKEND_MAX_IMAGE_BYTES
    image_hosts: Optional[str] = None  # env IMAGE_HOSTS; comma-separated allowlist (netpolicy)
    allow_link_local: bool = False  # env ALLOW_LINK_LOCAL_IMAGES

    def __post_init__(self) -> None:
        if not isinstance(self.max_pixels, int) or self.max_pixels <= 0:
            raise ConfigError(f"max_pixels must be a positive integer, got {self.max_pixels!r}")
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ConfigError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if not isinstance(self.max_download_bytes, int) or self.max_download_bytes <= 0:
            raise ConfigError(
                f"max_download_bytes must be a positive integer, got {self.max_download_bytes!r}"
            )

    @classmethod
    def from_env(cls, **overrides) -> "ImageAccessSettings":
        """Settings from the environment; keyword overrides win, except those that are None."""
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown image access setting(s): {', '.join(sorted(unknown))}")
        values = dict(
            label_studio_url=_env_str("LABEL_STUDIO_URL") or _env_str("LABEL_STUDIO_HOST"),
            api_key=_env_str("LABEL_STUDIO_API_KEY") or _env_str("LABEL_STUDIO_ACCESS_TOKEN"),
            local_files_document_root=_env_str("LOCAL_FILES_DOCUMENT_ROOT"),
            cache_dir=_env_str("SAM_BACKEND_IMAGE_CACHE_DIR"),
            cache_max_bytes=_env_int("SAM_BACKEND_IMAGE_CACHE_BYTES", DEFAULT_CACHE_MAX_BYTES),
            max_pixels=_env_int("SAM_BACKEND_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS),
            timeout=_env_float("SAM_BACKEND_IMAGE_TIMEOUT", DEFAULT_TIMEOUT),
            max_download_bytes=_env_int("SAM_BACKEND_MAX_IMAGE_BYTES", DEFAULT_MAX_DOWNLOAD_BYTES),
            image_hosts=_env_str("IMAGE_HOSTS"),
            allow_link_local=parse_bool("ALLOW_LINK_LOCAL_IMAGES",
                                        _env_str("ALLOW_LINK_LOCAL_IMAGES") or "false"),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _env_str(name: str) -> Optional[str]:
    value = os.environ.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _as_int(raw: str) -> Optional[int]:
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        value = float(raw)  # 2e9, 1.5e9
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value == int(value) else None


def _as_float(raw: str) -> Optional[float]:
    try:
        return float(raw)
    except ValueError:
        return None


def _env_number(name: str, default, parse, what: str):
    raw = _env_str(name)
    if raw is None:
        return default
    value = parse(raw)
    if value is None:
        raise ConfigError(f"{name} must be {what}, got {raw!r}")
    return value


def _env_int(name: str, default: int) -> int:
    return _env_number(name, default, _as_int, "an integer")


def _env_float(name: str, default: float) -> float:
    return _env_number(name, default, _as_float, "a number of seconds")


__all__ = ["ImageAccessSettings"]
