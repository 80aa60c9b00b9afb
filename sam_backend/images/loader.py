"""A task's image, the way a real deployment must get it: :class:`ImageLoader` joins the parts.

    URL --sources--> Source (+ identity key) --sources/fetch/disk_cache--> bytes
        --decode--> HxWx3 uint8 RGB

:mod:`.sources` says what a URL means and reads local files; :mod:`.credentials` holds Label
Studio's address and tokens; :mod:`.fetch` downloads (deadline, limits, retries, the network
policy); :mod:`.disk_cache` keeps downloaded bytes across restarts; :mod:`.decode` turns bytes into
pixels; :mod:`.messages` explains failures. A click resolves its URL once and reads the image's
header once: :meth:`ImageLoader.locate` returns an :class:`ImageRef` (the key, without
downloading) whose ``load()`` fetches and decodes.

Errors: anything about a particular image raises :class:`~sam_backend.errors.ImageError`, whose
message names the URL (redacted) and says what to configure; invalid settings raise
:class:`~sam_backend.errors.ConfigError`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Optional, Tuple, TypeVar

import numpy as np
import requests
from PIL import Image

from sam_backend.common.limits import LoadGate, MemoryBudget, Reservation
from sam_backend.errors import ImageError
from sam_backend.images.config import ImageAccessSettings
from sam_backend.images.credentials import LabelStudioAccess
from sam_backend.images.decode import (NotAnImage, not_an_image_message, open_image, pixels_of,
                                       sniff_image_format)
from sam_backend.images.disk_cache import DiskCache, default_cache_dir
from sam_backend.images.fetch import Fetcher, image_session
from sam_backend.images.netpolicy import NetworkPolicy
from sam_backend.images.sources import Media, Source, Sources

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ImageRef:
    """A task's image, resolved once: its identity ``key`` (known without downloading) and
    ``load()``, which fetches and decodes it (HxWx3 uint8 RGB, EXIF orientation applied)."""

    key: str
    source: Source = field(repr=False)
    loader: "ImageLoader" = field(repr=False, compare=False)

    def load(self) -> np.ndarray:
        return self.loader.load_source(self.source)

    def fetch(self, reservation: Optional[Reservation] = None) -> Image.Image:
        """The image's bytes (from disk, the disk cache, or downloaded under a download slot)
        with its header read and checked, no pixel decoded; with ``reservation``, the bytes are
        reserved from its budget as they arrive."""
        return self.loader.fetch_source(self.source, reservation)

    def decode(self, header: Image.Image, reservation: Optional[Reservation] = None
               ) -> np.ndarray:
        """The pixels of what :meth:`fetch` returned (HxWx3 uint8 RGB, EXIF orientation
        applied); with ``reservation``, the decode's peak is reserved before decoding."""
        return self.loader.decode_fetched(self.source, header, reservation)


class ImageLoader:
    """Fetches and decodes task images; one per process, safe to share between threads."""

    def __init__(self, settings: ImageAccessSettings, *, session: Optional[requests.Session] = None,
                 clock: Callable[[], float] = time.time, budget: Optional[MemoryBudget] = None,
                 local_paths_anywhere: bool = False):
        """``budget``: bytes and decoded pixels of concurrent loads (None: unbounded).
        ``local_paths_anywhere``: read local paths outside ``local_files_document_root`` too (an
        operator's own command-line tool, never a server)."""
        self.settings = settings
        self.budget = budget
        self.policy = NetworkPolicy(settings.allow_link_local, settings.image_hosts)
        self._session = image_session(self.policy, session)
        self.access = LabelStudioAccess(settings.label_studio_url, settings.api_key,
                                        self._session, settings.timeout, clock)
        self.sources = Sources(self.access, settings.local_files_document_root,
                               settings.max_download_bytes, local_paths_anywhere)
        self.fetcher = Fetcher(settings, self.access, self.policy, self._session)
        self.downloads = LoadGate(settings.max_concurrent_downloads, "max_concurrent_downloads",
                                  "downloading {held} images")
        self.cache: Optional[DiskCache] = (
            DiskCache(settings.cache_dir or default_cache_dir(), settings.cache_max_bytes)
            if settings.cache_max_bytes > 0 else None
        )

    def close(self) -> None:
        self._session.close()

    # ---- Label Studio ----------------------------------------------------------------------

    def update_from_setup(self, hostname: Optional[str], access_token: Optional[str],
                          authenticated: bool = False) -> None:
        """Values Label Studio sent in /setup (see :class:`LabelStudioAccess`)."""
        self.access.update_from_setup(hostname, access_token, authenticated)

    @property
    def label_studio_url(self) -> Optional[str]:
        return self.access.url

    def label_studio_credentials(self) -> Tuple[Optional[str], Optional[str]]:
        """(Label Studio's address, the token for its API), from the settings or else from
        /setup (:meth:`LabelStudioAccess.credentials`)."""
        return self.access.credentials()

    def label_studio_headers(self, force_refresh: bool = False) -> Dict[str, str]:
        """``Authorization`` for Label Studio's API (empty when no token is configured)."""
        return self.access.headers(force_refresh)

    def api_get(self, path: str, params: Optional[dict] = None):
        """GET a Label Studio API path (``/api/...``) with the configured credentials: the
        parsed JSON."""
        return self.fetcher.api_get(path, params)

    # ---- images ------------------------------------------------------------------------------

    def locate(self, url: str, task_id: Optional[int] = None) -> ImageRef:
        """The image behind ``url``, resolved once: its key now, its pixels on ``load()``."""
        src = self.sources.locate(url, task_id)
        return ImageRef(src.key, src, self)

    def source_key(self, url: str, task_id: Optional[int] = None) -> str:
        """A stable identity of the image behind ``url``, computed without downloading
        (:meth:`Sources.locate <sam_backend.images.sources.Sources.locate>`)."""
        return self.sources.locate(url, task_id).key

    def load(self, url: str, task_id: Optional[int] = None) -> np.ndarray:
        """HxWx3 uint8 RGB, EXIF orientation applied (the frame Label Studio's percent
        coordinates refer to)."""
        return self.load_source(self.sources.resolve(url, task_id))

    def load_source(self, src: Source) -> np.ndarray:
        """:meth:`load` of a resolved source: its bytes, the header read once, the pixels."""
        if self.budget is None:
            return self._decode(src, None)
        with self.budget.reservation(self.settings.timeout) as held:
            return self._decode(src, held)

    def _decode(self, src: Source, reservation: Optional[Reservation]) -> np.ndarray:
        return self.decode_fetched(src, self.fetch_source(src, reservation), reservation)

    def fetch_source(self, src: Source, reservation: Optional[Reservation] = None
                     ) -> Image.Image:
        """:meth:`ImageRef.fetch` of a resolved source."""
        name, max_pixels = f"image {src.display}", self.settings.max_pixels
        return self._obtain(src, reservation, lambda data: open_image(data, max_pixels, name))

    def decode_fetched(self, src: Source, header: Image.Image,
                       reservation: Optional[Reservation] = None) -> np.ndarray:
        """:meth:`ImageRef.decode`: the pixels of a header :meth:`fetch_source` returned."""
        return pixels_of(header, self.settings.max_pixels, f"image {src.display}", reservation)

    def fetch_bytes(self, url: str, task_id: Optional[int] = None,
                    reservation: Optional[Reservation] = None) -> bytes:
        """The image file's bytes (from disk, the disk cache, or downloaded and cached); with
        ``reservation``, their size is reserved from its budget as they arrive."""
        src = self.sources.resolve(url, task_id)

        def accept(data: bytes) -> bytes:
            if src.kind not in ("local", "data") and not sniff_image_format(data):
                raise NotAnImage(src.display)
            return data

        return self._obtain(src, reservation, accept)

    def fetch_media(self, url: str, task_id: Optional[int], media: Media,
                    recognise: Callable[[bytes], bool],
                    refused: Callable[[bytes, str, Optional[str]], str],
                    reservation: Optional[Reservation] = None) -> bytes:
        """The bytes of a task's file that is not an image (a video), from the same sources as
        images (uploads, local files under the document root, presigned cloud URIs, http(s);
        the disk cache) under ``media``'s byte limit and names. ``recognise(bytes)``: whether
        they are what is wanted (e.g. a video container's signature), checked for every source;
        ``refused(bytes, name, content_type)``: the message when they are not (a download that
        is not is neither kept nor cached)."""
        src = replace(self.sources.resolve(url, task_id), media=media)

        def accept(data: bytes) -> bytes:
            if not recognise(data):
                if src.kind in ("local", "data"):
                    raise ImageError(refused(data, f"{media.noun} {src.display}", None))
                raise NotAnImage(src.display)
            return data

        return self._obtain(src, reservation, accept, refused)

    def _obtain(self, src: Source, reservation: Optional[Reservation],
                accept: Callable[[bytes], T],
                refused: Callable[[bytes, str, Optional[str]], str] = not_an_image_message) -> T:
        """``accept(bytes)`` of the source's bytes: read from disk, a ``data:`` URL, the disk
        cache or downloaded. ``accept`` raises :class:`NotAnImage` for bytes that are no image:
        a cache entry is then dropped and downloaded again, a download refused with a message
        on what came instead; downloads are cached only once accepted."""
        if src.problem is not None:
            raise src.problem.with_traceback(None)
        if src.kind == "local":
            return accept(self.sources.read_local(src, reservation))
        if src.kind == "data":
            return accept(self.sources.read_data_url(src))
        cache = self.cache if src.cache_key else None
        data = cache.get(src.cache_key) if cache is not None else None
        if data is not None:
            if reservation is not None:
                reservation.grow(len(data), f"{src.media.noun} {src.display}")
            try:
                accepted = accept(data)
            except NotAnImage:
                logger.warning("Image cache entry for %s is not a%s %s; downloading again",
                               src.display, "n" if src.media.noun[0] in "aeiou" else "",
                               src.media.noun)
                cache.discard(src.cache_key)
            else:
                logger.debug("Image %s: from the disk cache (%d bytes)", src.display, len(data))
                return accepted
        with self.downloads.admit():  # waiting on a host holds a download slot, nothing else
            data, content_type = self.fetcher.download(src, reservation)
        try:
            accepted = accept(data)
        except NotAnImage:
            raise ImageError(refused(
                data, f"the file downloaded for {src.display}", content_type)) from None
        if cache is not None:
            cache.put(src.cache_key, data)
        return accepted


__all__ = ["ImageLoader", "ImageRef"]
