"""Getting a task's image the way a real deployment must: from Label Studio, its storages, or disk.

Where an image URL can point (``ImageLoader.fetch_bytes`` / ``ImageLoader.load``):

* ``/data/upload/...`` and other Label-Studio-relative URLs (``/data/``, ``/storage-data/``,
  ``/tasks/``, ``/projects/``; ``upload/...`` of old exports means ``/data/upload/...``):
  downloaded from Label Studio (``LABEL_STUDIO_URL``, else ``LABEL_STUDIO_HOST``, else the
  ``hostname`` sent in ``/setup``) with Label Studio credentials (``LABEL_STUDIO_API_KEY``, else
  ``LABEL_STUDIO_ACCESS_TOKEN``, else the ``access_token`` sent in ``/setup``). An absolute URL
  whose host:port is Label Studio's (as configured, or as sent in ``/setup`` -- they differ when
  Label Studio calls itself ``localhost`` but the backend reaches it as ``label-studio:8080``) and
  whose path is one of those is treated as the relative URL, fetched from the configured address.
* ``/data/local-files/?d=<path>``: read straight from ``LOCAL_FILES_DOCUMENT_ROOT`` when it is set
  (paths that escape it are refused -- checked lexically, like Label Studio, so symlinks inside
  the root still work; if the file is not there and Label Studio is known, it is
  downloaded from Label Studio instead, with a warning), else downloaded from Label Studio.
* ``s3://``, ``gs://``, ``azure-blob://``: Label Studio presigns them
  (``GET /tasks/<id>/presign/?fileuri=<urlsafe base64>``, answered with a redirect to the storage or
  with the bytes themselves); needs the task id.
* ``http(s)://``: downloaded; Label Studio credentials are sent only to a host:port equal to Label
  Studio's (or to an https upgrade of Label Studio's own host). Redirects are followed by hand so that credentials never follow a redirect to another
  host. Cookies are never stored.
* plain paths and ``file://`` URLs: only inside ``LOCAL_FILES_DOCUMENT_ROOT`` (relative paths
  are relative to it); without it they are off. ``data:`` URLs.

Local files (all three forms) are read only when they are regular files (never devices, FIFOs or
sockets), with the same byte limit as downloads; any local path that cannot be read gives one
message that does not say whether or what exists there.

Time: ``timeout`` bounds a whole download (redirects, headers and body), not each read: a
watchdog closes the connection at the deadline.

Where the key may go. ``LABEL_STUDIO_API_KEY`` is sent only to ``LABEL_STUDIO_URL`` or, when that
is not set, to the hostname of a ``/setup`` that came with valid basic auth
(``update_from_setup(..., authenticated=True)``); a hostname from an unauthenticated ``/setup``
could come from anyone, so fetches that would carry the key there fail with a message naming
``LABEL_STUDIO_URL``. The token sent in ``/setup`` itself is used for its own hostname, as before.

Where downloads may go: every request and redirect hop passes the
:class:`~sam_backend.images.netpolicy.NetworkPolicy` (no link-local / metadata addresses, optional
``image_hosts`` allowlist), checked in the connection layer on the addresses actually connected to.

Credentials. A legacy token is sent as ``Authorization: Token <t>``. A personal access token (PAT)
is a JWT refresh token: it is exchanged at ``/api/token/refresh/`` for a short-lived access token,
sent as ``Authorization: Bearer <access>``, refreshed shortly before the access token's ``exp`` and,
once, when Label Studio answers 401/403. The two kinds are told apart by shape: three base64url
parts whose first two decode to JSON objects are a JWT (``token_type`` ``refresh`` or absent: a PAT;
``access``: used as a bearer token as is, it cannot be refreshed); anything else is a legacy token.
Tokens are never logged and never put into error messages; URLs in logs and messages have their
query values redacted (except ``d`` and ``fileuri``) and any ``user:password@`` removed.

Disk cache. Downloaded bytes (never local files) are cached under ``cache_dir`` in files named by
the SHA-256 of the image's identity (the absolute Label Studio URL, the cloud URI, or the http URL),
so a restarted process does not download again. Only bytes that look like an image are stored. The
cache is bounded by ``cache_max_bytes``: after each store, least-recently-used files (by mtime; a
cache hit touches the file) are deleted until the total fits. Cached URLs are assumed immutable
(Label Studio upload names carry a UUID). ``cache_max_bytes <= 0`` disables the cache.

Decoding (``decode_image``): JPEG (incl. MPO), PNG, WebP, BMP, TIFF, GIF, AVIF; other formats
Pillow knows (EPS, ...) are refused on purpose. The first frame is used. The size is read from the
header and checked against ``max_pixels`` before any pixel is decoded. EXIF orientation is applied:
browsers apply it, so Label Studio's percent coordinates refer to the rotated frame. Output is
always HxWx3 uint8 RGB:

* grayscale / 1-bit / palette / CMYK / YCbCr: converted to RGB;
* with alpha (RGBA, LA, PA, palette with transparency): composited on **black**, i.e. each colour
  is multiplied by alpha/255 (premultiplied alpha), so what is hidden under fully transparent
  pixels (often garbage) never reaches the model;
* 16-bit (``I;16*``): scaled as v/257 rounded (65535 -> 255, not clipped), the way browsers show
  16-bit PNGs; 32-bit integer ``I``: as is if its values fit 0..255, /257 if they fit 0..65535,
  else min-max stretched; float ``F``: x255 if in 0..1, as is if in 0..255, else min-max stretched.

ICC colour profiles are not applied. Pillow's global ``Image.MAX_IMAGE_PIXELS`` is raised (never
lowered) to ``max_pixels`` when that is higher, so that our own header check is the one that rules.

Errors: anything about a particular image raises :class:`~sam_backend.errors.ImageError`, whose
message names the URL (redacted) and says what to configure; invalid settings raise
:class:`~sam_backend.errors.ConfigError`. Logger: ``sam_backend.images.loader``.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import re
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field, fields
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple
from urllib.parse import parse_qs, unquote, unquote_to_bytes, urljoin, urlsplit, urlunsplit
from urllib.request import url2pathname

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from sam_backend.errors import ConfigError, ImageError
from sam_backend.images.netpolicy import DestinationRefused, NetworkPolicy, mount, proxied
from sam_backend.settings import parse_bool
from sam_backend.common.limits import MemoryBudget, Reservation, printable

logger = logging.getLogger("sam_backend.images.loader")

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_CACHE_MAX_BYTES = 2 * 1024**3
DEFAULT_MAX_DOWNLOAD_BYTES = 1024**3
DEFAULT_TIMEOUT = 30.0
MAX_REDIRECTS = 10
CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
# Paths Label Studio serves itself (uploads, local files, file storage, presign/resolve endpoints).
LS_RELATIVE_PREFIXES = ("/data/", "/storage-data/", "/tasks/", "/projects/")
# Query parameters whose values are safe to show (a local-files path, a presign's base64 URI).
_SAFE_QUERY_KEYS = frozenset({"d", "fileuri"})
# Pillow formats we decode; the rest (EPS needs Ghostscript, ...) are refused.
_ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF", "AVIF")
# Refresh a JWT access token this many seconds before its ``exp`` (capped at a tenth of its life).
_ACCESS_TOKEN_SKEW = 10.0

_pil_limit_lock = threading.Lock()


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sam_backend", "images")


# --------------------------------------------------------------------------------------------
# Settings


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


def _env_int(name: str, default: int) -> int:
    raw = _env_str(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        value = float(raw)  # 2e9, 1.5e9
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value != int(value):
        raise ConfigError(f"{name} must be an integer, got {raw!r}")
    return int(value)


def _env_float(name: str, default: float) -> float:
    raw = _env_str(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None


# --------------------------------------------------------------------------------------------
# URL helpers


def redact_url(url: str) -> str:
    """``url`` safe to log or show: no ``user:password@``, query values other than ``d`` and
    ``fileuri`` replaced by ``***``, ``data:`` URLs shortened."""
    if not isinstance(url, str):
        return repr(type(url))
    if url[:5].lower() == "data:":
        head = url.split(",", 1)[0]
        return f"{head},...({len(url)} chars)"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pieces = []
        for piece in query.split("&"):
            key, sep, _value = piece.partition("=")
            if sep and unquote(key).lower() not in _SAFE_QUERY_KEYS:
                piece = f"{key}=***"
            pieces.append(piece)
        query = "&".join(pieces)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _normalise_base_url(url: str, what: str) -> str:
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ConfigError(f"{what} is not a valid URL: {redact_url(url)!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{what} must be an http(s) URL such as http://label-studio:8080, got {redact_url(url)!r}"
        )
    return urlunsplit((parts.scheme.lower(), parts.netloc, parts.path.rstrip("/"), "", ""))


def _origin(url: str) -> Optional[Tuple[str, int]]:
    """(host, port) with the scheme's default port filled in; None if not http(s)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    if port is None:
        port = 443 if scheme == "https" else 80
    return parts.hostname.lower(), port


def _normalise_http_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    netloc = host if port is None or port == (443 if scheme == "https" else 80) else f"{host}:{port}"
    if "@" in parts.netloc:
        netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def jwt_payload(token: str) -> Optional[dict]:
    """The payload of a JWT-shaped token, not verified; None if ``token`` is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3 or not all(re.fullmatch(r"[A-Za-z0-9_-]+", p) for p in parts[:2]):
        return None
    try:
        header = json.loads(_b64url_decode(parts[0]))
        payload = json.loads(_b64url_decode(parts[1]))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        return None
    return payload


def token_kind(token: str) -> str:
    """``"legacy"``, ``"pat"`` (JWT refresh token) or ``"access"`` (JWT access token)."""
    payload = jwt_payload(token)
    if payload is None:
        return "legacy"
    if payload.get("token_type") == "access":
        return "access"
    return "pat"


def _clean_token(token: Optional[str]) -> Optional[str]:
    if token is None:
        return None
    token = token.strip().strip("'\"").strip()
    for prefix in ("token ", "bearer "):
        if token.lower().startswith(prefix):
            token = token[len(prefix):].strip()
    return token or None


def _exp_of(payload: Optional[dict]) -> Optional[float]:
    if not payload:
        return None
    exp = payload.get("exp")
    return float(exp) if isinstance(exp, (int, float)) and math.isfinite(exp) else None


# --------------------------------------------------------------------------------------------
# Disk cache


class DiskCache:
    """Bytes keyed by a string, one file per key, bounded in total bytes, LRU by mtime."""

    SUFFIX = ".img"

    def __init__(self, directory: str, max_bytes: int):
        self.directory = Path(os.path.expanduser(directory))
        self.max_bytes = int(max_bytes)

    def path_for(self, key: str) -> Path:
        return self.directory / (_sha(key) + self.SUFFIX)

    def get(self, key: str) -> Optional[bytes]:
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("Image cache: cannot read %s (%s); ignoring it", path, exc)
            return None
        try:
            os.utime(path)  # recently used
        except OSError:
            pass
        return data

    def discard(self, key: str) -> None:
        try:
            self.path_for(key).unlink()
        except OSError:
            pass

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            logger.debug("Image cache: %d bytes exceed the cache bound; not cached", len(data))
            return
        path = self.path_for(key)
        tmp_name = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            with tempfile.NamedTemporaryFile(
                dir=self.directory, prefix=".tmp-", suffix=self.SUFFIX, delete=False
            ) as tmp:
                tmp_name = tmp.name
                tmp.write(data)
            os.replace(tmp_name, path)
            tmp_name = None
        except OSError as exc:
            logger.warning("Image cache: cannot write to %s (%s); continuing without caching",
                           self.directory, exc)
            return
        finally:
            if tmp_name is not None:
                try:
                    os.unlink(tmp_name)
                except OSError:
                    pass
        self.evict(keep=path)

    def total_bytes(self) -> int:
        return sum(size for _p, size, _m in self._entries())

    def _entries(self):
        out = []
        try:
            with os.scandir(self.directory) as it:
                for entry in it:
                    if not entry.name.endswith(self.SUFFIX) or entry.name.startswith(".tmp-"):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    out.append((Path(entry.path), st.st_size, st.st_mtime_ns))
        except OSError:
            pass
        return out

    def evict(self, keep: Optional[Path] = None) -> int:
        """Delete least recently used files until the total fits; returns how many went."""
        entries = sorted(self._entries(), key=lambda e: e[2])
        total = sum(size for _p, size, _m in entries)
        removed = 0
        for path, size, _mtime in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and path == keep:
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("Image cache: cannot delete %s (%s)", path, exc)
                continue
            total -= size
            removed += 1
        if removed:
            logger.debug("Image cache: evicted %d file(s); %d bytes remain", removed, total)
        return removed


# --------------------------------------------------------------------------------------------
# Decoding


def _ensure_pil_limit(max_pixels: int) -> None:
    # Our own check (from the header) guards; Pillow's global limit must not be lower than ours.
    with _pil_limit_lock:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def _looks_like_html(data: bytes, content_type: Optional[str] = None) -> bool:
    if content_type and "html" in content_type.lower():
        return True
    head = data[:512].lstrip().lower()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<!--", b"<?xml")) or (
        head.startswith(b"<") and b"<html" in data[:4096].lower()
    )


def _allowed_formats() -> list:
    Image.init()
    return [f for f in _ALLOWED_FORMATS if f in Image.OPEN]


def _not_an_image_message(data: bytes, name: str, content_type: Optional[str] = None) -> str:
    if _looks_like_html(data, content_type):
        return (
            f"{name} is an HTML page, not an image ({len(data)} bytes"
            + (f", Content-Type {content_type}" if content_type else "")
            + "). When it comes from Label Studio this is usually its login page: the request was "
            "not authenticated; set LABEL_STUDIO_API_KEY. Otherwise the task's URL points to a web "
            "page rather than to the image file."
        )
    head = data[:64].lstrip()
    kind = ""
    if head.startswith((b"{", b"[")):
        kind = " (it looks like JSON, e.g. an API error)"
    elif head.startswith(b"<svg") or b"<svg" in data[:1024]:
        kind = " (SVG is not supported)"
    return (
        f"{name} is not a supported image{kind}: {len(data)} bytes"
        + (f", Content-Type {content_type}" if content_type else "")
        + ". Supported formats: JPEG, PNG, WebP, BMP, TIFF, GIF."
    )


def sniff_image_format(data: bytes) -> Optional[str]:
    """The Pillow format name if ``data`` starts like a supported image, else None (no decoding)."""
    try:
        with Image.open(io.BytesIO(data), formats=_allowed_formats()) as img:
            return img.format
    except Image.DecompressionBombError:
        return "oversized"
    except Exception:  # noqa: BLE001 - any failure means "not recognisable"
        return None


# Peak bytes per pixel while decoding a mode to RGB (Pillow's buffer, the conversions, the
# result, an EXIF transpose); :func:`_scale_to_uint8` works in row blocks.
_DECODE_BYTES_PER_PIXEL = {"1": 9, "L": 9, "P": 14, "RGB": 14, "RGBA": 30, "LA": 30, "PA": 30,
                           "I;16": 12, "I": 16, "F": 16}


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image",
                 reservation: Optional[Reservation] = None) -> np.ndarray:
    """Decode ``data`` to an HxWx3 uint8 RGB array, EXIF orientation applied (module docstring).
    With ``reservation``, the decode's estimated peak memory is reserved from its budget
    before any pixel is decoded."""
    if not data:
        raise ImageError(f"{name} is empty (0 bytes)")
    if max_pixels <= 0:
        raise ConfigError(f"max_pixels must be positive, got {max_pixels!r}")
    _ensure_pil_limit(max_pixels)
    try:
        img = Image.open(io.BytesIO(data), formats=_allowed_formats())
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"{name} is too large ({str(exc)[:200]}); the limit is {max_pixels:,} pixels "
            "(decompression-bomb guard): downscale the image, or raise "
            "SAM_BACKEND_MAX_IMAGE_PIXELS if it is legitimate"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(_not_an_image_message(data, name)) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on bad headers
        raise ImageError(
            f"{name} is corrupt: its header cannot be read ({type(exc).__name__}: {str(exc)[:200]}); "
            "re-export or re-upload the file"
        ) from None
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageError(f"{name} is corrupt: its header says {width}x{height} pixels")
        if width * height > max_pixels:
            raise ImageError(
                f"{name} is {width}x{height} = {width * height:,} pixels, above the limit of "
                f"{max_pixels:,} pixels (decompression-bomb guard): downscale the image, or raise "
                "SAM_BACKEND_MAX_IMAGE_PIXELS if it is legitimate"
            )
        if reservation is not None:
            mode = "I;16" if img.mode.startswith("I;16") else img.mode
            per_pixel = _DECODE_BYTES_PER_PIXEL.get(mode, 30)
            reservation.grow(width * height * per_pixel, f"{name} ({width}x{height} {img.mode})")
        try:
            img.load()
        except Image.DecompressionBombError:
            raise ImageError(f"{name} is too large to decode (limit {max_pixels:,} pixels)") from None
        except MemoryError:
            raise ImageError(f"{name} ({width}x{height}) does not fit in memory") from None
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt data
            raise ImageError(
                f"{name} is truncated or corrupt ({img.format or 'unknown format'}, header "
                f"{width}x{height}; {type(exc).__name__}: {str(exc)[:200]}): re-export or "
                "re-upload the file"
            ) from None
        try:
            ImageOps.exif_transpose(img, in_place=True)
        except Exception as exc:  # noqa: BLE001 - malformed EXIF: keep the stored orientation
            logger.warning("%s: cannot apply its EXIF orientation (%s: %s); using it as stored",
                           name, type(exc).__name__, str(exc)[:200])
        arr = _to_rgb8(img, name)
    finally:
        img.close()
    return arr


_SCALE_BLOCK_PIXELS = 1 << 20


def _row_blocks(a: np.ndarray):
    rows = max(1, _SCALE_BLOCK_PIXELS // max(1, int(np.prod(a.shape[1:]))))
    for start in range(0, a.shape[0], rows):
        yield slice(start, start + rows)


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer or float pixels -> uint8 (module docstring), in row blocks so that the
    float64 temporaries stay small whatever the image size."""
    if mode.startswith("I;16"):
        out8 = np.empty(a.shape, np.uint8)
        for rows in _row_blocks(a):
            out8[rows] = (a[rows].astype(np.uint32) + 128) // 257
        return out8
    lo, hi = math.inf, -math.inf
    for rows in _row_blocks(a):
        block = a[rows].astype(np.float64)
        block = np.where(np.isfinite(block), block, 0.0)
        if block.size:
            lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    if not a.size:
        lo, hi = 0.0, 0.0
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        scale, offset = 255.0, 0.0
    elif lo >= 0.0 and hi <= 255.0:
        scale, offset = None, 0.0
    elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
        scale, offset = 1 / 257.0, 0.0
    elif hi > lo:
        scale, offset = 255.0 / (hi - lo), lo
    else:
        return np.zeros(a.shape, np.uint8)
    out8 = np.empty(a.shape, np.uint8)
    for rows in _row_blocks(a):
        block = a[rows].astype(np.float64)
        block = np.where(np.isfinite(block), block, 0.0)
        if scale is None:
            out = block
        elif offset:
            out = (block - offset) * scale
        elif scale == 1 / 257.0:
            out = block / 257.0
        else:
            out = block * scale
        out8[rows] = np.clip(np.rint(out), 0, 255)
    return out8


def _to_rgb8(img: Image.Image, name: str) -> np.ndarray:
    mode = img.mode
    if mode in ("P", "L", "RGB") and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(img.convert("RGBA") if mode != "RGBA" else img)
        alpha = rgba[..., 3:4].astype(np.uint16)
        rgb = (rgba[..., :3].astype(np.uint16) * alpha + 127) // 255  # composite on black
        return np.ascontiguousarray(rgb.astype(np.uint8))
    if mode == "RGB":
        arr = np.asarray(img)
    elif mode == "L":
        arr = np.repeat(np.asarray(img)[..., None], 3, axis=2)
    elif mode.startswith("I") or mode == "F":
        gray = _scale_to_uint8(np.asarray(img), mode)
        if gray.ndim == 3:
            gray = gray[..., 0]
        arr = np.repeat(gray[..., None], 3, axis=2)
    else:
        try:
            arr = np.asarray(img.convert("RGB"))
        except Exception as exc:  # noqa: BLE001
            raise ImageError(f"{name} has pixel mode {mode!r}, which cannot be converted to RGB "
                             f"({exc})") from None
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError(f"{name}: unexpected pixel layout {arr.dtype} {arr.shape} (mode {mode})")
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------------------------
# The loader


def _is_regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


class _Deadline:
    """Closes a streaming response's connection when the download's deadline passes, which
    wakes a read that is blocked on a server that sends slowly or not at all."""

    def __init__(self, resp: requests.Response, seconds: float):
        self.fired = False
        self._resp = resp
        self._timer = threading.Timer(max(0.0, seconds), self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        raw = getattr(self._resp, "raw", None)
        conn = getattr(raw, "_connection", None) or getattr(raw, "connection", None)
        sock = getattr(conn, "sock", None)
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


class _UnknownLabelStudio(ImageError):
    """A Label-Studio-relative URL, but no Label Studio address is configured yet."""


@dataclass
class _Source:
    kind: str  # "local" | "data" | "ls" | "cloud" | "http"
    url: str  # the task's URL as given
    display: str  # redacted, for messages and logs
    path: Optional[str] = None  # local file
    fetch_url: Optional[str] = None  # first URL to GET
    cache_key: Optional[str] = None
    note: str = ""  # extra context for error messages


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
        self._local_anywhere = local_paths_anywhere
        self._clock = clock
        self._lock = threading.RLock()
        self._env_ls_url = (
            _normalise_base_url(settings.label_studio_url, "LABEL_STUDIO_URL")
            if settings.label_studio_url else None
        )
        self._env_token = _clean_token(settings.api_key)
        self._setup_ls_url: Optional[str] = None
        self._setup_trusted = False  # that /setup came with valid basic auth
        self._setup_token: Optional[str] = None
        self._access: Optional[str] = None
        self._access_exp: Optional[float] = None
        self._access_life: Optional[float] = None
        self._access_for: Optional[str] = None  # hash of the PAT it came from
        root = settings.local_files_document_root
        self._doc_root = os.path.abspath(os.path.expanduser(root)) if root else None
        cache_dir = settings.cache_dir or default_cache_dir()
        self.cache: Optional[DiskCache] = (
            DiskCache(cache_dir, settings.cache_max_bytes) if settings.cache_max_bytes > 0 else None
        )
        self.policy = NetworkPolicy(settings.allow_link_local, settings.image_hosts)
        self._session = mount(session or self._make_session(), self.policy)
        if self._env_token:
            logger.debug("Label Studio API key from LABEL_STUDIO_API_KEY (%s)",
                         _kind_label(token_kind(self._env_token)))

    @staticmethod
    def _make_session() -> requests.Session:
        session = requests.Session()
        session.headers["User-Agent"] = "sam-backend-image-loader"
        session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # never keep cookies
        return session

    def close(self) -> None:
        self._session.close()

    # ---- configuration -------------------------------------------------------------------

    def update_from_setup(self, hostname: Optional[str], access_token: Optional[str],
                          authenticated: bool = False) -> None:
        """Values Label Studio sent in /setup; used only where the settings/env give none.

        ``authenticated``: the /setup came with valid HTTP basic auth, i.e. from Label Studio.
        Only then may LABEL_STUDIO_API_KEY go to its hostname; from an unauthenticated /setup
        (anyone who reaches the port) the hostname is used with the token sent alongside it only.
        """
        with self._lock:
            if hostname and hostname.strip():
                try:
                    url = _normalise_base_url(hostname, "the hostname sent in /setup")
                except ConfigError as exc:
                    logger.warning("%s; ignoring it", exc)
                    url = None
                if url and (url != self._setup_ls_url or authenticated != self._setup_trusted):
                    self._setup_ls_url = url
                    self._setup_trusted = bool(authenticated)
                    if self._env_ls_url:
                        logger.debug("/setup hostname %s ignored: LABEL_STUDIO_URL is %s", url,
                                     self._env_ls_url)
                    else:
                        logger.info("Label Studio URL from /setup: %s", url)
                        if self._env_token and not authenticated:
                            # Whoever calls an unauthenticated /setup would pick where the key goes.
                            logger.warning(
                                "LABEL_STUDIO_API_KEY is not sent to %s: that address came from a "
                                "/setup without basic auth. Set LABEL_STUDIO_URL to Label Studio's "
                                "address (or turn on basic auth)", url)
            token = _clean_token(access_token)
            if token and token != self._setup_token:
                self._setup_token = token
                if self._env_token:
                    logger.debug("/setup access token ignored: LABEL_STUDIO_API_KEY is set")
                else:
                    logger.info("Using the Label Studio access token sent in /setup (%s)",
                                _kind_label(token_kind(token)))

    @property
    def label_studio_url(self) -> Optional[str]:
        return self._env_ls_url or self._setup_ls_url

    def _ls_url_source(self) -> str:
        if self._env_ls_url:
            return "LABEL_STUDIO_URL"
        return "the hostname Label Studio sent in /setup"

    def _token(self) -> Tuple[Optional[str], str]:
        if self._env_token:
            if not self._env_ls_url and not self._setup_trusted:
                # The address came from an unauthenticated /setup: anyone could have sent it.
                raise ImageError(
                    f"not sending LABEL_STUDIO_API_KEY to {self.label_studio_url}: that address "
                    "was sent in a /setup request without basic auth, so anyone who can reach the "
                    "backend could have chosen it. Set LABEL_STUDIO_URL in the backend's "
                    "environment to Label Studio's address (e.g. http://label-studio:8080), or "
                    "turn on basic auth (BASIC_AUTH_USER / BASIC_AUTH_PASS) and enter it in Label "
                    "Studio's model settings"
                )
            return self._env_token, "from LABEL_STUDIO_API_KEY"
        if self._setup_token:
            return self._setup_token, "sent by Label Studio in /setup"
        return None, "none configured"

    def _is_ls(self, url: str) -> bool:
        """Whether ``url`` is on Label Studio's host:port (the only place credentials go); an
        http -> https upgrade of Label Studio's own host counts too."""
        ls = self.label_studio_url
        if ls is None:
            return False
        target, home = _origin(url), _origin(ls)
        if target is None or home is None:
            return False
        if target == home:
            return True
        return (target[0] == home[0] and home[1] == 80 and target[1] == 443
                and urlsplit(url).scheme.lower() == "https")

    # ---- resolving -----------------------------------------------------------------------

    def _resolve(self, url: str, task_id: Optional[int]) -> _Source:
        if not isinstance(url, str) or not url.strip():
            raise ImageError(f"the task's image URL is empty or not a string ({type(url).__name__})")
        url = url.strip()
        display = redact_url(url)
        if url[:5].lower() == "data:":
            return _Source("data", url, display, cache_key=None)
        try:
            return self._classify(url, display, task_id)
        except ValueError:  # a port out of range, an unclosed [IPv6 literal, a NUL, ...
            raise ImageError(f"image URL {display} is not a valid URL") from None

    def _classify(self, url: str, display: str, task_id: Optional[int]) -> _Source:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - validates the port
        scheme = parts.scheme.lower()
        if scheme in CLOUD_SCHEMES:
            return self._resolve_cloud(url, display, task_id)
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise self._unavailable(display)
            return self._local_source(url, display, url2pathname(parts.path))
        if scheme in ("http", "https"):
            rel = self._as_ls_relative(parts)
            if rel is not None:
                return self._resolve_relative(rel, display)
            return _Source("http", url, display, fetch_url=url, cache_key=_normalise_http_url(url))
        if len(scheme) > 1:
            raise ImageError(
                f"image URL {display} has an unsupported scheme {scheme!r}: use http(s), s3, gs, "
                "azure-blob, a Label Studio /data/... URL or a local path"
            )
        # No scheme (or a Windows drive letter): Label-Studio-relative or a local path.
        if url.startswith(("upload/", "/upload/")):  # old Label Studio exports
            url = "/data" + ("" if url.startswith("/") else "/") + url
        if url.startswith(LS_RELATIVE_PREFIXES):
            return self._resolve_relative(url, display)
        return self._local_source(url, display, url)

    def _as_ls_relative(self, parts) -> Optional[str]:
        """The Label-Studio-relative part of an absolute URL on Label Studio's host (the address
        from the settings or the one sent in /setup, which may differ, e.g. in Docker)."""
        target = _origin(urlunsplit(parts))
        for base in (self._env_ls_url, self._setup_ls_url):
            if not base or _origin(base) != target:
                continue
            base_path = urlsplit(base).path
            if not parts.path.startswith(base_path + "/"):
                continue
            rel = parts.path[len(base_path):]
            if rel.startswith(LS_RELATIVE_PREFIXES):
                return rel + (f"?{parts.query}" if parts.query else "")
        return None

    def _resolve_relative(self, rel: str, display: str) -> _Source:
        if rel.startswith("/data/local-files"):
            return self._resolve_local_files(rel, display)
        return self._ls_source(rel, display)

    def _ls_source(self, rel_url: str, display: str, note: str = "") -> _Source:
        ls = self.label_studio_url
        if not ls:
            raise _UnknownLabelStudio(
                f"image URL {display} is relative to Label Studio, but the Label Studio address is "
                "unknown: set LABEL_STUDIO_URL in the backend's environment (e.g. "
                "http://label-studio:8080, as reachable from the backend), or let Label Studio "
                "call /setup, which sends its hostname"
            )
        full = ls + rel_url
        return _Source("ls", rel_url, display, fetch_url=full, cache_key=_normalise_http_url(full),
                       note=note)

    def _resolve_local_files(self, rel: str, display: str) -> _Source:
        values = parse_qs(urlsplit(rel).query, keep_blank_values=True).get("d")
        if not values or not values[0]:
            raise ImageError(f"Label Studio local-files URL {display} has no ?d=<path> parameter")
        if not self._doc_root:
            return self._ls_source(rel, display, note=(
                "Alternatively set LOCAL_FILES_DOCUMENT_ROOT in the backend to the directory "
                "Label Studio serves local files from, to read them directly."))
        path = self._safe_join(values[0], display)
        if _is_regular_file(path):
            return _Source("local", rel, display, path=path)
        if self.label_studio_url:
            logger.warning(
                "%s is not under LOCAL_FILES_DOCUMENT_ROOT=%s (looked for %s); downloading it from "
                "Label Studio instead. Mount the same directory Label Studio uses to avoid this.",
                display, self._doc_root, path)
            return self._ls_source(rel, display)
        raise ImageError(
            f"{display}: file {path} not found under LOCAL_FILES_DOCUMENT_ROOT={self._doc_root}. "
            "The backend must see the same files as Label Studio: mount the directory Label Studio "
            "uses (LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT) at LOCAL_FILES_DOCUMENT_ROOT, or unset "
            "it and set LABEL_STUDIO_URL so the file is downloaded from Label Studio"
        )

    def _safe_join(self, rel: str, display: str) -> str:
        root = self._doc_root
        assert root is not None
        if "\x00" in rel:
            raise ImageError(f"{display}: the local-files path contains a NUL byte")
        # Like Label Studio: normalise, then make it relative to the document root.
        rel = posixpath.normpath(rel.replace(os.sep, "/")).lstrip("/")
        full = os.path.normpath(os.path.join(root, rel))
        if full != root and not full.startswith(root.rstrip(os.sep) + os.sep):
            raise ImageError(
                f"{display}: refused: the path escapes LOCAL_FILES_DOCUMENT_ROOT={root}. Local-files "
                "paths must lie inside the document root"
            )
        return full

    def _local_source(self, url: str, display: str, path: str) -> _Source:
        """A plain path or file:// URL: inside the document root only (relative paths are
        relative to it); anything else gets the one "not available" message."""
        if "\x00" in path:
            raise self._unavailable(display)
        if self._local_anywhere:
            return _Source("local", url, display, path=os.path.abspath(os.path.expanduser(path)))
        root = self._doc_root
        if not root:
            raise self._unavailable(display)
        full = os.path.normpath(os.path.join(root, path))
        if full != root and not full.startswith(root.rstrip(os.sep) + os.sep):
            raise self._unavailable(display)
        return _Source("local", url, display, path=full)

    def _unavailable(self, display: str) -> ImageError:
        return ImageError(
            f"image {display} is not available. Local paths and file:// URLs are read only from "
            "inside LOCAL_FILES_DOCUMENT_ROOT (regular image files), and only when it is set; "
            "in Label Studio use uploads, local-files storage or a cloud storage")

    def _resolve_cloud(self, uri: str, display: str, task_id: Optional[int]) -> _Source:
        ls = self.label_studio_url
        if task_id is None:
            raise ImageError(
                f"{display} is a cloud-storage URI: Label Studio has to presign it, which needs the "
                "task id, and none was given"
            )
        if not ls:
            raise ImageError(
                f"{display} is a cloud-storage URI that Label Studio has to presign, but the Label "
                "Studio address is unknown: set LABEL_STUDIO_URL in the backend's environment"
            )
        try:
            task = int(task_id)
        except (TypeError, ValueError):
            raise ImageError(f"{display}: invalid task id {task_id!r}") from None
        encoded = base64.urlsafe_b64encode(uri.encode("utf-8")).decode("ascii")
        fetch = f"{ls}/tasks/{task}/presign/?fileuri={encoded}"
        return _Source("cloud", uri, display, fetch_url=fetch, cache_key=uri,
                       note=f"presigned by Label Studio for task {task}")

    # ---- public API ----------------------------------------------------------------------

    def source_key(self, url: str, task_id: Optional[int] = None) -> str:
        """A stable identity of the image behind ``url``, computed without downloading: the
        normalised URL (query values hashed when they may hold credentials); for local files,
        the absolute path plus size and mtime."""
        try:
            scheme = urlsplit(url.strip()).scheme.lower() if isinstance(url, str) else ""
        except ValueError:
            raise ImageError(f"image URL {redact_url(url)} is not a valid URL") from None
        if scheme in CLOUD_SCHEMES:
            return url.strip()  # the object's identity; presigning needs the task id, this not
        src = self._resolve_lenient(url, task_id)
        if src.kind == "local":
            try:
                st = os.stat(src.path)
            except (OSError, ValueError):
                raise self._local_error(src) from None
            return f"file://{src.path}?size={st.st_size}&mtime_ns={st.st_mtime_ns}"
        if src.kind == "data":
            return "data:sha256=" + _sha(src.url)
        key = src.cache_key or src.url
        if src.kind == "ls" and not key.startswith(("http://", "https://")):
            return "label-studio:" + key
        if urlsplit(key).query and redact_url(key) != key:
            return f"{redact_url(key)}#sha256={_sha(key)[:32]}"
        return key

    def _resolve_lenient(self, url: str, task_id: Optional[int]) -> _Source:
        try:
            return self._resolve(url, task_id)
        except _UnknownLabelStudio:
            # An unknown Label Studio address must not prevent keying a relative URL.
            u = url.strip()
            return _Source("ls", u, redact_url(u), cache_key=u)

    def fetch_bytes(self, url: str, task_id: Optional[int] = None,
                    reservation: Optional[Reservation] = None) -> bytes:
        """The image file's bytes (from disk, the disk cache, or downloaded and cached); with
        ``reservation``, their size is reserved from its budget as they arrive."""
        src = self._resolve(url, task_id)
        if src.kind == "local":
            return self._read_local(src, reservation)
        if src.kind == "data":
            return self._read_data_url(src)
        cache = self.cache
        if cache is not None and src.cache_key:
            data = cache.get(src.cache_key)
            if data is not None:
                if reservation is not None:
                    reservation.grow(len(data), f"image {src.display}")
                if sniff_image_format(data):
                    logger.debug("Image %s: from the disk cache (%d bytes)", src.display, len(data))
                    return data
                logger.warning("Image cache entry for %s is not an image; downloading again",
                               src.display)
                cache.discard(src.cache_key)
        data, content_type = self._download(src, reservation)
        if not sniff_image_format(data):
            raise ImageError(_not_an_image_message(data, f"the file downloaded for {src.display}",
                                                   content_type))
        if cache is not None and src.cache_key:
            cache.put(src.cache_key, data)
        return data

    def api_get(self, path: str, params: Optional[dict] = None):
        """GET a Label Studio API path (``/api/...``) with the configured credentials: the
        parsed JSON. A personal access token is refreshed once on 401/403."""
        ls = self.label_studio_url
        if not ls:
            raise ConfigError("the Label Studio address is unknown: set LABEL_STUDIO_URL")
        url = ls + path
        for attempt in range(2):
            header, kind, source = self._auth_header(force_refresh=attempt > 0)
            headers = {"Accept": "application/json"}
            if header:
                headers["Authorization"] = header
            try:
                resp = self._session.get(url, params=params, headers=headers,
                                         timeout=self.settings.timeout, allow_redirects=False)
            except requests.RequestException as exc:
                raise self._connection_error(exc, url, f"Label Studio API {path}", True) from None
            if resp.status_code in (401, 403) and kind == "pat" and attempt == 0:
                continue
            if resp.status_code in (401, 403) or resp.is_redirect:
                raise ImageError(f"Label Studio at {ls} refused {path} (HTTP {resp.status_code}) "
                                 f"with the API key {source} ({_kind_label(kind)}): set "
                                 "LABEL_STUDIO_API_KEY to a personal access token")
            if resp.status_code >= 400:
                raise ImageError(f"Label Studio at {ls} answered HTTP {resp.status_code} for "
                                 f"{path}")
            try:
                return resp.json()
            except ValueError:
                raise ImageError(f"Label Studio at {ls} answered {path} with something that is "
                                 "not JSON") from None
        raise AssertionError("unreachable")

    def load(self, url: str, task_id: Optional[int] = None) -> np.ndarray:
        """HxWx3 uint8 RGB, EXIF orientation applied (the frame Label Studio's percent
        coordinates refer to)."""
        if self.budget is None:
            data = self.fetch_bytes(url, task_id)
            return decode_image(data, self.settings.max_pixels, name=f"image {redact_url(url)}")
        with self.budget.reservation(self.settings.timeout) as held:
            data = self.fetch_bytes(url, task_id, held)
            return decode_image(data, self.settings.max_pixels, name=f"image {redact_url(url)}",
                                reservation=held)

    # ---- local -------------------------------------------------------------------------------

    def _local_error(self, src: _Source) -> ImageError:
        """One message for every local file that cannot be read (missing, not a regular file,
        no permission, ...): it must not tell a stranger what exists on the backend's disk."""
        logger.info("Image %s: %s is not a readable regular file", src.display, src.path)
        return self._unavailable(src.display)

    def _read_local(self, src: _Source, reservation: Optional[Reservation] = None) -> bytes:
        """A regular file's bytes, at most ``max_download_bytes``. Opened non-blocking, so that a
        FIFO cannot block the request; devices, FIFOs and sockets are refused."""
        limit = self.settings.max_download_bytes
        try:
            fd = os.open(src.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
                         | getattr(os, "O_NOCTTY", 0))
        except (OSError, ValueError):
            raise self._local_error(src) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._local_error(src)
            if st.st_size > limit:
                raise ImageError(f"image {src.display} is larger than {limit:,} bytes "
                                 "(SAM_BACKEND_MAX_IMAGE_BYTES)")
            if reservation is not None:
                reservation.grow(st.st_size, f"image {src.display}")
            with os.fdopen(fd, "rb") as fh:
                fd = -1
                data = fh.read(limit + 1)
        except OSError:
            raise self._local_error(src) from None
        finally:
            if fd >= 0:
                os.close(fd)
        if len(data) > limit:
            raise ImageError(f"image {src.display} is larger than {limit:,} bytes "
                             "(SAM_BACKEND_MAX_IMAGE_BYTES)")
        logger.debug("Image %s: read %d bytes from %s", src.display, len(data), src.path)
        return data

    def _read_data_url(self, src: _Source) -> bytes:
        head, sep, payload = src.url.partition(",")
        if not sep:
            raise ImageError(f"{src.display}: malformed data: URL (no comma)")
        try:
            if head.lower().endswith(";base64"):
                return base64.b64decode(payload, validate=False)
            return unquote_to_bytes(payload)
        except (binascii.Error, ValueError):
            raise ImageError(f"{src.display}: malformed base64 in data: URL") from None

    # ---- Label Studio credentials ------------------------------------------------------------

    def _auth_header(self, force_refresh: bool = False) -> Tuple[Optional[str], str, str]:
        """(header value or None, token kind, where the token came from)."""
        token, source = self._token()
        if not token:
            return None, "none", source
        kind = token_kind(token)
        if kind == "legacy":
            return f"Token {token}", kind, source
        if kind == "access":
            exp = _exp_of(jwt_payload(token))
            if exp is not None and self._clock() >= exp:
                raise ImageError(
                    f"the Label Studio API key {source} is a JWT access token that has expired. "
                    "Set LABEL_STUDIO_API_KEY to a personal access token (Label Studio -> Account & "
                    "Settings -> Personal Access Token), which the backend refreshes by itself"
                )
            return f"Bearer {token}", kind, source
        pat_exp = _exp_of(jwt_payload(token))
        if pat_exp is not None and self._clock() >= pat_exp:
            raise ImageError(
                f"the personal access token {source} expired on "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(pat_exp))}: create a new one "
                "(Label Studio -> Account & Settings -> Personal Access Token) and set "
                "LABEL_STUDIO_API_KEY to it"
            )
        with self._lock:
            pat_id = _sha(token)
            now = self._clock()
            stale = (
                self._access is None
                or self._access_for != pat_id
                or force_refresh
                or (self._access_exp is not None and now >= self._access_exp - self._skew())
            )
            if stale:
                self._refresh(token, source)
            return f"Bearer {self._access}", kind, source

    def label_studio_headers(self, force_refresh: bool = False) -> Dict[str, str]:
        """``Authorization`` for Label Studio's API with the configured token (legacy or personal
        access token, refreshed as needed); empty when no token is configured."""
        header, _kind, _source = self._auth_header(force_refresh)
        return {"Authorization": header} if header else {}

    def _skew(self) -> float:
        if self._access_life and self._access_life > 0:
            return min(_ACCESS_TOKEN_SKEW, self._access_life / 10.0)
        return _ACCESS_TOKEN_SKEW

    def _refresh(self, pat: str, source: str) -> None:
        ls = self.label_studio_url
        assert ls is not None
        url = f"{ls}/api/token/refresh/"
        logger.debug("Exchanging the personal access token (%s) for an access token at %s",
                     source, url)
        try:
            resp = self._session.post(url, json={"refresh": pat}, timeout=self.settings.timeout,
                                      allow_redirects=False)
        except requests.RequestException as exc:
            raise self._connection_error(exc, url, "the token refresh endpoint", to_ls=True) from None
        with resp:
            status = resp.status_code
            if status in (400, 401, 403):
                raise ImageError(
                    f"Label Studio at {ls} rejected the personal access token {source} at "
                    f"/api/token/refresh/ (HTTP {status}): it is expired, revoked or belongs to "
                    "another Label Studio instance. Create a new one (Label Studio -> Account & "
                    "Settings -> Personal Access Token) and set LABEL_STUDIO_API_KEY to it"
                )
            if resp.is_redirect:
                target = urljoin(url, resp.headers.get("Location", ""))
                raise ImageError(
                    f"Label Studio's /api/token/refresh/ at {ls} redirected to "
                    f"{redact_url(target)}: set LABEL_STUDIO_URL to Label Studio's final address "
                    "(scheme, host and port)"
                )
            if status in (404, 405):
                raise ImageError(
                    f"Label Studio at {ls} has no token refresh endpoint (/api/token/refresh/ "
                    f"answered HTTP {status}): it may predate personal access tokens, or "
                    f"{self._ls_url_source()} does not point to Label Studio. Check the URL, or use "
                    "a legacy API token in LABEL_STUDIO_API_KEY"
                )
            if status >= 400:
                raise ImageError(
                    f"Label Studio at {ls} failed to refresh the access token (HTTP {status} from "
                    "/api/token/refresh/); check Label Studio's logs"
                )
            try:
                access = resp.json().get("access")
            except (ValueError, AttributeError):
                access = None
        if not isinstance(access, str) or not access:
            raise ImageError(
                f"Label Studio at {ls} answered /api/token/refresh/ without an access token; check "
                f"that {self._ls_url_source()} points to Label Studio"
            )
        payload = jwt_payload(access)
        exp = _exp_of(payload)
        iat = payload.get("iat") if payload else None
        now = self._clock()
        self._access = access
        self._access_for = _sha(pat)
        self._access_exp = exp
        self._access_life = (exp - iat) if exp is not None and isinstance(iat, (int, float)) else None
        if exp is not None:
            logger.info("Obtained a Label Studio access token (valid for %.0f s)", exp - now)
        else:
            logger.info("Obtained a Label Studio access token (no expiry given)")

    # ---- HTTP ----------------------------------------------------------------------------------

    def _download(self, src: _Source,
                  reservation: Optional[Reservation] = None) -> Tuple[bytes, Optional[str]]:
        """GET the image, following redirects by hand; the whole download (every hop, the
        headers and the body) must finish within ``settings.timeout`` seconds."""
        url = src.fetch_url
        assert url is not None
        hops = 0
        force_refresh = False
        retried_auth = False
        deadline = time.monotonic() + self.settings.timeout
        while True:
            to_ls = self._is_ls(url)
            headers = {"Accept": "image/*,*/*;q=0.8"}
            kind, source = "none", "not sent"
            if to_ls:
                header, kind, source = self._auth_header(force_refresh)
                force_refresh = False
                if header:
                    headers["Authorization"] = header
            logger.debug("Image %s: GET %s (%s)", src.display, redact_url(url),
                         f"Label Studio credentials: {_kind_label(kind)}" if to_ls
                         else "no Label Studio credentials")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._connection_error(requests.exceptions.ReadTimeout(), url,
                                             f"image {src.display}", to_ls)
            try:
                self._check_destination(url)
                resp = self._session.get(url, headers=headers, timeout=remaining,
                                         allow_redirects=False, stream=True)
            except DestinationRefused as exc:
                raise DestinationRefused(f"image {self._where(url, src)}: {exc}") from None
            except requests.RequestException as exc:
                raise self._connection_error(exc, url, f"image {src.display}", to_ls) from None
            except ValueError:  # http.client refuses control characters, bad ports, ...
                raise ImageError(f"image URL {self._where(url, src)} is not a valid URL") \
                    from None
            with resp, _Deadline(resp, deadline - time.monotonic()) as watchdog:
                if resp.is_redirect:
                    hops += 1
                    target = urljoin(url, resp.headers.get("Location", ""))
                    if to_ls and "/user/login" in urlsplit(target).path:
                        raise self._auth_error(401, url, src, kind, source)
                    if hops > MAX_REDIRECTS:
                        raise ImageError(f"image {src.display}: too many redirects (last: "
                                         f"{redact_url(target)})")
                    logger.debug("Image %s: HTTP %d redirect to %s", src.display,
                                 resp.status_code, redact_url(target))
                    url = target
                    continue
                status = resp.status_code
                if status in (401, 403) and to_ls and kind == "pat" and not retried_auth:
                    logger.info("Label Studio answered HTTP %d; refreshing the access token and "
                                "retrying once", status)
                    retried_auth = True
                    force_refresh = True
                    continue
                if status >= 400:
                    raise self._http_error(status, resp.reason, url, src, to_ls, kind, source,
                                           _peek(resp) if to_ls else "")
                data = self._read_body(resp, url, src, watchdog, reservation)
                content_type = resp.headers.get("Content-Type")
            logger.debug("Image %s: downloaded %d bytes (%s)", src.display, len(data),
                         content_type or "no Content-Type")
            if (to_ls and kind == "none" and _looks_like_html(data, content_type)
                    and not sniff_image_format(data)):
                raise self._auth_error(200, url, src, kind, source, html=True)
            return data, content_type

    def _check_destination(self, url: str) -> None:
        """The network policy's verdict on ``url`` before any request (the connection layer
        checks the addresses actually connected to as well)."""
        trusted = [self._env_ls_url, self._setup_ls_url if self._setup_trusted else None]
        self.policy.check_url(url, trusted, resolve=proxied(self._session, url))

    def _read_body(self, resp: requests.Response, url: str, src: _Source, watchdog: _Deadline,
                   reservation: Optional[Reservation] = None) -> bytes:
        """The body, at most ``max_download_bytes``, reserved from the memory budget as it
        arrives. It grows in one buffer (large buffers are mapped memory, returned to the system
        as soon as they are dropped; thousands of small chunks would fragment the heap), which
        is dropped at once on any failure (no reference cycle keeps it: the errors are created
        where they are raised)."""
        limit = self.settings.max_download_bytes
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > limit:
            raise self._too_big(src, limit)
        buffer = bytearray()
        reserved = 0
        step = 4 << 20
        try:
            for chunk in resp.iter_content(chunk_size=1 << 16):
                if len(buffer) + len(chunk) > limit:
                    raise self._too_big(src, limit)
                if reservation is not None and len(buffer) + len(chunk) > reserved:
                    reservation.grow(step, f"image {src.display}")
                    reserved += step
                buffer += chunk
            if watchdog.fired:  # a connection closed at the deadline can look like a short body
                raise requests.exceptions.ReadTimeout()
        except requests.RequestException as exc:
            del buffer
            if watchdog.fired:
                exc = requests.exceptions.ReadTimeout()
            raise self._connection_error(exc, url, f"image {src.display}", self._is_ls(url),
                                         during_body=True) from None
        except BaseException:
            del buffer
            raise
        return buffer

    @staticmethod
    def _too_big(src: _Source, limit: int) -> ImageError:
        return ImageError(f"image {src.display}: the download is larger than {limit:,} bytes "
                          "(SAM_BACKEND_MAX_IMAGE_BYTES)")

    def _where(self, url: str, src: Optional[_Source]) -> str:
        shown = redact_url(url)
        if src is None or shown == src.display:
            return shown
        return f"{src.display} (request to {shown})"

    def _connection_error(self, exc: Exception, url: str, what: str, to_ls: bool,
                          during_body: bool = False) -> ImageError:
        shown = redact_url(url)
        parts = urlsplit(url)
        host = parts.netloc.rsplit("@", 1)[-1]
        timeout = self.settings.timeout
        text = str(exc)
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            reason = f"timed out after {timeout:g} s connecting to {host}"
        elif isinstance(exc, requests.exceptions.ReadTimeout) or (
            during_body and "timed out" in text.lower()
        ):
            reason = (f"{host} did not send the whole image within {timeout:g} s "
                      "(SAM_BACKEND_IMAGE_TIMEOUT, for the whole download)")
        elif isinstance(exc, requests.exceptions.SSLError):
            reason = (f"TLS/SSL error talking to {host} (certificate not trusted? set "
                      "REQUESTS_CA_BUNDLE to your CA bundle)")
        elif isinstance(exc, (requests.exceptions.ChunkedEncodingError,
                              requests.exceptions.ContentDecodingError)) or during_body:
            reason = f"the connection to {host} broke off during the download"
        elif isinstance(exc, requests.exceptions.ConnectionError):
            low = text.lower()
            if "refused" in low:
                reason = f"connection to {host} refused (nothing listens there)"
            elif any(s in low for s in ("name or service not known", "nodename nor servname",
                                        "temporary failure in name resolution",
                                        "name resolution", "getaddrinfo failed")):
                reason = f"host name {parts.hostname} cannot be resolved"
            elif "unreachable" in low or "no route to host" in low:
                reason = f"host {host} is unreachable"
            elif "timed out" in low:
                reason = f"timed out after {timeout:g} s connecting to {host}"
            else:
                reason = f"cannot connect to {host}"
        elif isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                              requests.exceptions.InvalidSchema)):
            reason = "the URL is invalid"
        else:
            reason = f"{type(exc).__name__}"
        if to_ls:
            hint = (f"Check {self._ls_url_source()} (now {self.label_studio_url}): the backend must "
                    "reach Label Studio at that address. Inside Docker, 'localhost' is the backend's "
                    "own container: use the Label Studio service name or the host's address, and "
                    "set LABEL_STUDIO_URL.")
        else:
            hint = "Check that the backend can reach that host (network, proxy settings)."
        return ImageError(f"cannot fetch {what} from {shown}: {reason}. {hint}")

    def _auth_error(self, status: int, url: str, src: _Source, kind: str, source: str,
                    html: bool = False) -> ImageError:
        ls = self.label_studio_url
        where = self._where(url, src)
        what = ("answered with an HTML page (its login page) instead of the image" if html
                else f"refused the download (HTTP {status})")
        if kind == "none":
            detail = (
                "the backend has no Label Studio API key. Set LABEL_STUDIO_API_KEY in the backend's "
                "environment to a personal access token (Label Studio -> Account & Settings -> "
                "Personal Access Token) or to a legacy API token"
            )
        elif kind == "legacy":
            detail = (
                f"the legacy API token ({source}) was not accepted. Label Studio 1.23 disables "
                "legacy tokens by default: set LABEL_STUDIO_API_KEY to a personal access token "
                "(Account & Settings -> Personal Access Token), or enable legacy tokens in Label "
                "Studio (Organization -> API Tokens Settings) and check the token is current"
            )
            if status == 403:
                detail += "; if the token is accepted, its user may lack access to this project"
        elif kind == "pat":
            detail = (
                f"the access token obtained from the personal access token ({source}) was refused "
                "even after refreshing it. Check that personal access tokens are enabled "
                "(Organization -> API Tokens Settings) and that its user has access to this "
                "project, or create a new personal access token and set LABEL_STUDIO_API_KEY to it"
            )
        else:
            detail = (
                f"the API key ({source}) is a JWT access token, not a personal access token; set "
                "LABEL_STUDIO_API_KEY to a personal access token (Account & Settings -> Personal "
                "Access Token) or a legacy token"
            )
        return ImageError(f"Label Studio at {ls} {what} for image {where}: {detail}")

    def _http_error(self, status: int, reason: str, url: str, src: _Source, to_ls: bool,
                    kind: str, source: str, body: str = "") -> ImageError:
        where = self._where(url, src)
        ls = self.label_studio_url
        rel_path = urlsplit(url).path[len(urlsplit(ls).path):] if to_ls and ls else ""
        if to_ls and status == 403 and rel_path.startswith("/data/local-files"):
            if "LOCAL_FILES_SERVING_ENABLED" in body:
                return ImageError(
                    f"Label Studio at {ls} refused to serve local file {where} (HTTP 403): local "
                    "files serving is disabled in Label Studio. Set LOCAL_FILES_DOCUMENT_ROOT in "
                    "the backend to the directory Label Studio reads them from (the backend then "
                    "reads them directly), or start Label Studio with "
                    "LOCAL_FILES_SERVING_ENABLED=true"
                )
        if to_ls and status in (401, 403):
            return self._auth_error(status, url, src, kind, source)
        if to_ls and status == 424:
            return ImageError(
                f"Label Studio at {ls} could not read {src.display} from its cloud storage (HTTP "
                "424): check the credentials and bucket of the project's Cloud Storage in Label "
                "Studio"
            )
        if to_ls and status == 500 and rel_path.startswith("/data/upload/"):
            return ImageError(
                f"Label Studio at {ls} failed on image {where} (HTTP 500). Label Studio answers "
                "500 for an upload it does not know: check that "
                f"{self._ls_url_source()} points to the Label Studio instance the task comes from "
                "and that the file was not deleted; otherwise see Label Studio's logs"
            )
        if status in (401, 403):
            if src.kind == "cloud":
                return ImageError(
                    f"the storage refused the presigned download of {where} (HTTP {status}): the "
                    "presigned URL may have expired (check the storage's presign TTL and the clocks) "
                    "or the credentials of the cloud storage configured in Label Studio lack read "
                    "permission"
                )
            return ImageError(
                f"{_host_of(url)} refused access to image {where} (HTTP {status}). Label Studio "
                f"credentials are only sent to Label Studio ({ls or 'unknown: LABEL_STUDIO_URL not set'}); "
                "make the image publicly readable, or import it through a Label Studio storage"
            )
        if status == 404:
            if to_ls and src.kind == "cloud" and "/presign/" in url:
                return ImageError(
                    f"Label Studio at {ls} could not presign {src.display} (HTTP 404 from "
                    f"{redact_url(url)}): the task does not exist or no cloud storage connected to "
                    "the project covers this URI; check the project's Cloud Storage settings and "
                    f"that {self._ls_url_source()} is the right Label Studio"
                )
            if to_ls:
                extra = f" {src.note}" if src.note else ""
                return ImageError(
                    f"Label Studio at {ls} has no file for image {where} (HTTP 404): check that "
                    f"{self._ls_url_source()} points to the Label Studio instance the task comes "
                    f"from and that the file still exists.{extra}"
                )
            return ImageError(f"image {where} not found (HTTP 404 from {_host_of(url)})")
        if status == 407:
            return ImageError(f"image {where}: the HTTP proxy requires authentication (HTTP 407); "
                              "check HTTPS_PROXY/HTTP_PROXY")
        who = f"Label Studio at {ls}" if to_ls else _host_of(url)
        reason = printable(reason or "", 60)
        return ImageError(f"{who} answered HTTP {status} {reason} for image {where}".rstrip()
                          + ("; check Label Studio's logs" if to_ls and status >= 500 else ""))


def _peek(resp: requests.Response, limit: int = 4096) -> str:
    """The start of an error response's body, for recognising known Label Studio errors only
    (never shown: it could echo anything)."""
    try:
        return next(resp.iter_content(limit), b"")[:limit].decode("utf-8", "replace")
    except Exception:  # noqa: BLE001
        return ""


def _host_of(url: str) -> str:
    try:
        return urlsplit(url).netloc.rsplit("@", 1)[-1] or url
    except ValueError:
        return "<unparseable host>"


def _kind_label(kind: str) -> str:
    return {
        "legacy": "legacy token",
        "pat": "personal access token",
        "access": "JWT access token",
        "none": "none",
    }.get(kind, kind)


__all__ = [
    "DiskCache",
    "ImageAccessSettings",
    "ImageLoader",
    "decode_image",
    "default_cache_dir",
    "jwt_payload",
    "redact_url",
    "sniff_image_format",
    "token_kind",
]
