"""Bytes -> ``HxWx3 uint8`` RGB: which formats, the header-size check, EXIF, 16-bit and float.

Formats: JPEG (incl. MPO), PNG, WebP, BMP, TIFF, GIF, AVIF; other formats Pillow knows (EPS, ...)
are refused on purpose. The first frame is used. The size is read from the header
(:func:`open_image`, the one place a header is read) and checked against ``max_pixels`` before
any pixel is decoded (:func:`pixels_of`). EXIF orientation is applied: browsers apply it, so Label
Studio's percent coordinates refer to the rotated frame. Output is always HxWx3 uint8 RGB:

* grayscale / 1-bit / palette / CMYK / YCbCr: converted to RGB;
* with alpha (RGBA, LA, PA, palette with transparency): composited on **black**, i.e. each colour
  is multiplied by alpha/255 (premultiplied alpha), so what is hidden under fully transparent
  pixels (often garbage) never reaches the model;
* 16-bit (``I;16*``): scaled as v/257 rounded (65535 -> 255, not clipped), the way browsers show
  16-bit PNGs; 32-bit integer ``I``: as is if its values fit 0..255, /257 if they fit 0..65535,
  else min-max stretched; float ``F``: x255 if in 0..1, as is if in 0..255, else min-max stretched.

ICC colour profiles are not applied. Pillow's global ``Image.MAX_IMAGE_PIXELS`` is raised (never
lowered) to ``max_pixels`` when that is higher, so that our own header check is the one that rules.
"""
from __future__ import annotations

import io
import logging
import math
import re
import threading
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sam_backend.common.limits import Reservation
from sam_backend.errors import ConfigError, ImageError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 100_000_000
# Pillow formats we decode; the rest (EPS needs Ghostscript, ...) are refused.
_ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF", "AVIF")

_pil_limit_lock = threading.Lock()


def _ensure_pil_limit(max_pixels: int) -> None:
    # Our own check (from the header) guards; Pillow's global limit must not be lower than ours.
    with _pil_limit_lock:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def looks_like_html(data: bytes, content_type: Optional[str] = None) -> bool:
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


_MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]{1,64}/[a-z0-9!#$&^_.+-]{1,64}")


def _shown_type(content_type: Optional[str]) -> str:
    """``", Content-Type <type/subtype>"`` for a message, or nothing: only a well-formed media
    type, without its parameters -- the header is whatever the server chose to write."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return f", Content-Type {media}" if _MEDIA_TYPE.fullmatch(media) else ""


def not_an_image_message(data: bytes, name: str, content_type: Optional[str] = None) -> str:
    if looks_like_html(data, content_type):
        return (
            f"{name} is an HTML page, not an image ({len(data)} bytes"
            + _shown_type(content_type)
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
        + _shown_type(content_type)
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


class NotAnImage(ImageError):
    """The bytes are not an image we decode (unknown format, or a header Pillow cannot read)."""


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               name: str = "image") -> Image.Image:
    """Read ``data``'s header only (format, size, mode; no pixel is decoded) and check it: a
    supported format, a size within ``max_pixels``. The one place an image's header is read.
    Raises :class:`NotAnImage` for bytes that are not a supported image, ImageError otherwise."""
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
        raise NotAnImage(not_an_image_message(data, name)) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on bad headers
        raise NotAnImage(
            f"{name} is corrupt: its header cannot be read ({type(exc).__name__}: {str(exc)[:200]}); "
            "re-export or re-upload the file"
        ) from None
    width, height = img.size
    problem = None
    if width <= 0 or height <= 0:
        problem = f"{name} is corrupt: its header says {width}x{height} pixels"
    elif width * height > max_pixels:
        problem = (f"{name} is {width}x{height} = {width * height:,} pixels, above the limit of "
                   f"{max_pixels:,} pixels (decompression-bomb guard): downscale the image, or "
                   "raise SAM_BACKEND_MAX_IMAGE_PIXELS if it is legitimate")
    if problem:
        img.close()
        raise ImageError(problem)
    return img


def pixels_of(img: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image",
              reservation: Optional[Reservation] = None) -> np.ndarray:
    """An image opened by :func:`open_image` -> HxWx3 uint8 RGB, EXIF orientation applied
    (module docstring); closes ``img``. With ``reservation``, the decode's estimated peak memory
    is reserved from its budget before any pixel is decoded."""
    try:
        width, height = img.size
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
        return _to_rgb8(img, name)
    finally:
        img.close()


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image",
                 reservation: Optional[Reservation] = None) -> np.ndarray:
    """Decode ``data`` to an HxWx3 uint8 RGB array, EXIF orientation applied (module docstring):
    :func:`open_image` then :func:`pixels_of`."""
    return pixels_of(open_image(data, max_pixels, name), max_pixels, name, reservation)


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


__all__ = ["DEFAULT_MAX_PIXELS", "NotAnImage", "decode_image", "looks_like_html",
           "not_an_image_message", "open_image", "pixels_of", "sniff_image_format"]
