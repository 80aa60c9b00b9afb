"""Bytes -> HxWx3 uint8 RGB: modes, bit depths, formats, corrupt data, the header-size guard."""
from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from sam_backend.errors import ImageError
from sam_backend.images.decode import decode_image

from tests.support.loopback_hosts import BLUE, GREEN, RED, assert_rotated_cat, close, encode, exif_rotated_jpeg


def test_exif_rotation_applied():
    arr = decode_image(exif_rotated_jpeg())
    assert_rotated_cat(arr)


def test_grayscale_becomes_rgb():
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (5, 1))
    arr = decode_image(encode(Image.fromarray(gray, "L"), "PNG"))
    assert arr.shape == (5, 25, 3)
    for c in range(3):
        assert np.array_equal(arr[..., c], gray)


def test_one_bit_becomes_rgb():
    img = Image.new("1", (4, 2), 0)
    img.putpixel((1, 0), 1)
    arr = decode_image(encode(img, "PNG"))
    assert arr.shape == (2, 4, 3)
    assert arr[0, 1].tolist() == [255, 255, 255] and arr[0, 0].tolist() == [0, 0, 0]


def test_rgba_composited_on_black():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)
    rgba[0, 1] = (200, 100, 50, 0)
    rgba[0, 2] = (200, 100, 50, 128)
    rgba[1, :] = (255, 255, 255, 255)
    arr = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert arr.shape == (2, 3, 3)
    assert arr[0, 0].tolist() == [200, 100, 50]
    assert arr[0, 1].tolist() == [0, 0, 0]
    assert close(arr[0, 2], (100, 50, 25), tol=1)
    assert arr[1, 0].tolist() == [255, 255, 255]


def test_palette_and_palette_with_transparency():
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    for x in range(3):
        img.putpixel((x, 0), x)
    arr = decode_image(encode(img, "PNG"))
    assert arr[0].tolist() == [list(RED), list(GREEN), list(BLUE)]
    arr = decode_image(encode(img, "PNG", transparency=1))
    assert arr[0].tolist() == [list(RED), [0, 0, 0], list(BLUE)]


def test_16bit_png_scaled_not_clipped():
    values = np.array([[0, 256, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode.startswith("I;16")
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    arr = decode_image(data)
    assert arr.shape == (1, 4, 3)
    assert arr[0, :, 0].tolist() == [0, 1, 128, 255]


def test_16bit_tiff():
    values = np.array([[0, 65535], [32896, 1000]], dtype=np.uint16)
    arr = decode_image(encode(Image.fromarray(values), "TIFF"))
    assert arr[..., 1].tolist() == [[0, 255], [128, 4]]


@pytest.mark.parametrize("fmt,kw", [("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {}),
                                    ("PNG", {}), ("GIF", {})])
def test_formats_roundtrip(fmt, kw):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    if fmt == "GIF":
        src[:] = (10, 200, 30)
    arr = decode_image(encode(Image.fromarray(src, "RGB"), fmt, **kw))
    assert arr.shape == (7, 9, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr, src)


def test_truncated_jpeg():
    data = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3),
                                                                    dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageError, match="truncated or corrupt") as err:
        decode_image(data[: len(data) // 2], name="image /data/upload/1/t.jpg")
    assert "/data/upload/1/t.jpg" in str(err.value)
    with pytest.raises(ImageError, match="not a supported image"):
        decode_image(data[2:40])


def test_corrupt_and_empty():
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageError, match="HTML page"):
        decode_image(b"<!doctype html><html><body>Sign in</body></html>")
    with pytest.raises(ImageError, match="not a supported image"):
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")


def test_oversized_refused_from_header_without_decoding(monkeypatch):
    data = encode(Image.new("RGB", (100, 100)), "PNG")

    def no_decoding(self, *a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError) as err:
        decode_image(data, max_pixels=5000, name="image big.png")
    msg = str(err.value)
    assert "100x100" in msg and "SAM_BACKEND_MAX_IMAGE_PIXELS" in msg and "big.png" in msg


def _png_with_header_size(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_header():
    start = time.monotonic()
    with pytest.raises(ImageError, match="SAM_BACKEND_MAX_IMAGE_PIXELS"):
        decode_image(_png_with_header_size(100_000, 100_000))
    with pytest.raises(ImageError, match="12000x9000"):
        decode_image(_png_with_header_size(12_000, 9_000), max_pixels=50_000_000)
    assert time.monotonic() - start < 2

