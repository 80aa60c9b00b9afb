"""What the image layer is configured with: :class:`ImageAccessSettings`, built from the one
:class:`~sam_backend.settings.Settings` (``from_settings``), validated when built."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Optional

from sam_backend.errors import ConfigError
from sam_backend.images.decode import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from sam_backend.settings import Settings

DEFAULT_CACHE_MAX_BYTES = 2 * 1024**3
DEFAULT_MAX_DOWNLOAD_BYTES = 1024**3
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_CONCURRENT_DOWNLOADS = 16


@dataclass
class ImageAccessSettings:
    """Where images come from and how they are fetched; ``from_settings`` builds it from the
    backend's Settings (each comment names the Settings field)."""

    label_studio_url: Optional[str] = None  # label_studio_url
    api_key: Optional[str] = field(default=None, repr=False)  # label_studio_api_key (never shown)
    local_files_document_root: Optional[str] = None  # local_files_document_root
    cache_dir: Optional[str] = None  # image_cache_dir; None: default_cache_dir()
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES  # image_cache_bytes; <=0: off
    max_pixels: int = DEFAULT_MAX_PIXELS  # max_image_pixels
    timeout: float = DEFAULT_TIMEOUT  # image_timeout; seconds per download
    max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES  # max_image_bytes
    image_hosts: Optional[str] = None  # image_hosts; comma-separated allowlist (netpolicy)
    allow_link_local: bool = False  # allow_link_local_images
    max_concurrent_downloads: int = DEFAULT_MAX_CONCURRENT_DOWNLOADS  # max_concurrent_downloads

    def __post_init__(self) -> None:
        if not isinstance(self.max_pixels, int) or self.max_pixels <= 0:
            raise ConfigError(f"max_pixels must be a positive integer, got {self.max_pixels!r}")
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ConfigError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if not isinstance(self.max_download_bytes, int) or self.max_download_bytes <= 0:
            raise ConfigError(
                f"max_download_bytes must be a positive integer, got {self.max_download_bytes!r}"
            )
        if not isinstance(self.max_concurrent_downloads, int) or self.max_concurrent_downloads <= 0:
            raise ConfigError(f"max_concurrent_downloads must be a positive integer, got "
                              f"{self.max_concurrent_downloads!r}")

    @classmethod
    def from_settings(cls, settings: "Settings", **overrides) -> "ImageAccessSettings":
        """The image layer's part of ``settings`` (the one options object: options, environment,
        defaults); keyword overrides (this class's field names) win, except those that are
        None."""
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown image access setting(s): {', '.join(sorted(unknown))}")
        values = dict(
            label_studio_url=settings.label_studio_url,
            api_key=settings.label_studio_api_key,
            local_files_document_root=settings.local_files_document_root,
            cache_dir=settings.image_cache_dir,
            cache_max_bytes=settings.image_cache_bytes,
            max_pixels=settings.max_image_pixels,
            timeout=settings.image_timeout,
            max_download_bytes=settings.max_image_bytes,
            image_hosts=settings.image_hosts,
            allow_link_local=settings.allow_link_local_images,
            max_concurrent_downloads=settings.max_concurrent_downloads,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


__all__ = ["DEFAULT_MAX_CONCURRENT_DOWNLOADS", "ImageAccessSettings"]
