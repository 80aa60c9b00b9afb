"""Image access against loopback HTTP servers that behave like Label Studio and a cloud storage."""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np
import pytest
from PIL import Image, ImageFile

from sam_backend.errors import ImageError, SamBackendError
from sam_backend.common.text import redact_url
from sam_backend.images.config import ImageAccessSettings
from sam_backend.images.credentials import token_kind
from sam_backend.images.decode import decode_image
from sam_backend.images.disk_cache import DiskCache
from sam_backend.images.loader import ImageLoader

from loopback_hosts import (  # noqa: F401
    BLUE,
    GREEN,
    RED,
    Clock,
    FakeLabelStudio,
    FakeStorage,
    LEGACY_TOKEN,
    Redirector,
    SIGNATURE,
    _Handler,
    _LoopbackHost,
    _Server,
    _b64,
    close,
    encode,
    exif_rotated_jpeg,
    make_jwt,
    rgb_png,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy",
                 "LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY",
                 "LOCAL_FILES_DOCUMENT_ROOT", "SAM_BACKEND_IMAGE_CACHE_DIR",
                 "SAM_BACKEND_IMAGE_CACHE_BYTES", "SAM_BACKEND_MAX_IMAGE_PIXELS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", os.devnull)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def ls(clock):
    server = FakeLabelStudio(clock)
    server.files["/data/upload/1/x.jpg"] = (exif_rotated_jpeg(), "image/jpeg")
    server.files["/data/upload/1/y.png"] = (rgb_png(), "image/png")
    server.files["/data/upload/1/page.jpg"] = (
        b"<!DOCTYPE html><html><head><title>Label Studio</title></head><body>login</body></html>",
        "text/html; charset=utf-8")
    yield server
    server.stop()


@pytest.fixture
def storage():
    server = FakeStorage()
    server.files["/bucket/cat.jpg"] = (exif_rotated_jpeg(), "image/jpeg")
    server.files["/public/pic.png"] = (rgb_png(colour=(1, 2, 3)), "image/png")
    yield server
    server.stop()


@pytest.fixture
def make_loader(tmp_path, clock):
    made = []

    def make(**kw):
        kw.setdefault("cache_dir", str(tmp_path / "cache"))
        kw.setdefault("cache_max_bytes", 0)  # off unless a test turns it on
        kw.setdefault("timeout", 5.0)
        loader = ImageLoader(ImageAccessSettings(**kw), clock=clock)
        made.append(loader)
        return loader

    yield make
    for loader in made:
        loader.close()


def assert_rotated_cat(arr: np.ndarray) -> None:
    """The EXIF-rotated JPEG decoded in the display frame: 40 wide x 60 high; the stored top-left
    (red) is at the top right, the stored bottom-left (green) at the top left."""
    assert arr.shape == (60, 40, 3) and arr.dtype == np.uint8
    assert close(arr[5, 35], RED)
    assert close(arr[5, 4], GREEN)
    assert close(arr[50, 20], BLUE)
    # A Label Studio click at x=95%, y=10% (percent of the natural, rotated size) lands on red.
    x, y = 95.0, 10.0
    px, py = int(x / 100 * arr.shape[1]), int(y / 100 * arr.shape[0])
    assert close(arr[py, px], RED)


# --------------------------------------------------------------------------------------------
# Decoding


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


# --------------------------------------------------------------------------------------------
# Tokens, URLs


def test_token_kinds_and_redaction():
    assert token_kind(LEGACY_TOKEN) == "legacy"
    assert token_kind(make_jwt({"token_type": "refresh", "exp": 1})) == "pat"
    assert token_kind(make_jwt({"token_type": "access", "exp": 1})) == "access"
    assert token_kind("a.b.c") == "legacy"
    shown = redact_url(f"https://user:pw@s3.example.com/b/k.jpg?X-Amz-Signature={SIGNATURE}&d=x")
    assert SIGNATURE not in shown and "pw" not in shown and "d=x" in shown
    assert redact_url("/data/local-files/?d=a/b.jpg") == "/data/local-files/?d=a/b.jpg"


def test_settings_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ls:8080/")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", LEGACY_TOKEN)
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    monkeypatch.setenv("SAM_BACKEND_IMAGE_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("SAM_BACKEND_IMAGE_CACHE_BYTES", "1000")
    monkeypatch.setenv("SAM_BACKEND_MAX_IMAGE_PIXELS", "2e6")
    s = ImageAccessSettings.from_env(timeout=3.0, label_studio_url=None)
    assert s.label_studio_url == "http://ls:8080/" and s.api_key == LEGACY_TOKEN
    assert s.cache_max_bytes == 1000 and s.max_pixels == 2_000_000 and s.timeout == 3.0
    assert s.cache_dir == str(tmp_path / "c") and s.local_files_document_root == str(tmp_path)
    assert LEGACY_TOKEN not in repr(s)
    monkeypatch.setenv("SAM_BACKEND_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(SamBackendError, match="SAM_BACKEND_MAX_IMAGE_PIXELS"):
        ImageAccessSettings.from_env()


# --------------------------------------------------------------------------------------------
# Label Studio uploads: legacy tokens, personal access tokens


def test_upload_with_legacy_token(ls, make_loader):
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    assert_rotated_cat(loader.load("/data/upload/1/x.jpg"))
    assert ls.requests[-1][2] == f"Token {LEGACY_TOKEN}"


def test_legacy_token_refused_when_legacy_tokens_disabled(ls, make_loader):
    ls.legacy_enabled = False
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    with pytest.raises(ImageError) as err:
        loader.load("/data/upload/1/x.jpg")
    msg = str(err.value)
    assert "401" in msg and "/data/upload/1/x.jpg" in msg and "legacy" in msg
    assert "LABEL_STUDIO_API_KEY" in msg and "personal access token" in msg
    assert LEGACY_TOKEN not in msg


def test_setup_values_used_when_env_gives_none(ls, make_loader):
    loader = make_loader()
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL"):
        loader.load("/data/upload/1/x.jpg")
    loader.update_from_setup(ls.url, LEGACY_TOKEN)
    assert_rotated_cat(loader.load("/data/upload/1/x.jpg"))
    # Env/settings win over /setup.
    loader2 = make_loader(label_studio_url=ls.url, api_key=ls.pat)
    loader2.update_from_setup("http://127.0.0.1:9", "bogus-setup-token")
    loader2.load("/data/upload/1/y.png")
    assert ls.requests[-1][2].startswith("Bearer ")


def test_other_label_studio_url_forms(ls, storage, make_loader):
    ls.cloud["s3://bucket/cat.jpg"] = storage.presigned("/bucket/cat.jpg")
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    # What Label Studio calls itself (sent in /setup) differs from how the backend reaches it.
    loader.update_from_setup("http://localhost:8080", "ignored-because-env-has-a-key")
    loader.load("http://localhost:8080/data/upload/1/y.png")
    assert ls.requests[-1][1:] == ("/data/upload/1/y.png", f"Token {LEGACY_TOKEN}")
    # Old exports: "upload/..." means "/data/upload/...".
    loader.load("upload/1/y.png")
    assert ls.requests[-1][1] == "/data/upload/1/y.png"
    # A presign URL already resolved by Label Studio.
    fileuri = base64.urlsafe_b64encode(b"s3://bucket/cat.jpg").decode()
    assert_rotated_cat(loader.load(f"/tasks/5/presign/?fileuri={fileuri}"))
    assert "authorization" not in storage.headers[-1]


def test_no_credentials_and_login_redirect(ls, make_loader):
    ls.login_redirect = True
    loader = make_loader(label_studio_url=ls.url)
    with pytest.raises(ImageError) as err:
        loader.load("/data/upload/1/x.jpg")
    assert "no Label Studio API key" in str(err.value) and "LABEL_STUDIO_API_KEY" in str(err.value)


def test_personal_access_token_refresh_and_expiry(ls, make_loader, clock):
    loader = make_loader(label_studio_url=ls.url, api_key=ls.pat)
    assert_rotated_cat(loader.load("/data/upload/1/x.jpg"))
    assert ls.refreshes == 1
    assert ls.requests[-1][2] == f"Bearer {ls.issued[0]}"
    loader.load("/data/upload/1/y.png")
    assert ls.refreshes == 1  # the access token is reused while valid

    # The access token expires: the loader refreshes it before using it again.
    clock.advance(ls.access_lifetime + 1)
    assert not ls.authenticated(f"Bearer {ls.issued[0]}")
    loader.load("/data/upload/1/y.png")
    assert ls.refreshes == 2 and ls.rejected == []
    assert ls.requests[-1][2] == f"Bearer {ls.issued[1]}"

    # Label Studio stops accepting the access token early: 401, refresh, retry once.
    ls.revoked.add(ls.issued[1])
    loader.load("/data/upload/1/x.jpg")
    assert ls.refreshes == 3 and ls.rejected == [("/data/upload/1/x.jpg", "Bearer")]
    assert ls.requests[-1][2] == f"Bearer {ls.issued[2]}"


def test_concurrent_loads_share_one_access_token(ls, make_loader):
    from concurrent.futures import ThreadPoolExecutor

    loader = make_loader(label_studio_url=ls.url, api_key=ls.pat)
    with ThreadPoolExecutor(8) as pool:
        shapes = list(pool.map(lambda _: loader.load("/data/upload/1/y.png").shape, range(16)))
    assert shapes == [(6, 8, 3)] * 16 and ls.refreshes == 1 and ls.rejected == []


def test_download_size_limit_and_data_urls(ls, make_loader):
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN, max_download_bytes=100)
    with pytest.raises(ImageError, match="SAM_BACKEND_MAX_IMAGE_BYTES"):
        loader.load("/data/upload/1/x.jpg")
    png = rgb_png(colour=(9, 8, 7))
    arr = loader.load("data:image/png;base64," + base64.b64encode(png).decode())
    assert arr[0, 0].tolist() == [9, 8, 7]


def test_personal_access_token_rejected(ls, make_loader):
    bad = make_jwt({"token_type": "refresh", "exp": 4102444800, "jti": "other"})
    loader = make_loader(label_studio_url=ls.url, api_key=bad)
    with pytest.raises(ImageError) as err:
        loader.load("/data/upload/1/x.jpg")
    msg = str(err.value)
    assert "personal access token" in msg and "LABEL_STUDIO_API_KEY" in msg and bad not in msg


def test_html_instead_of_image(ls, make_loader):
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    with pytest.raises(ImageError) as err:
        loader.load("/data/upload/1/page.jpg")
    assert "HTML" in str(err.value) and "/data/upload/1/page.jpg" in str(err.value)


def test_http_errors(ls, make_loader):
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN, timeout=0.3)
    with pytest.raises(ImageError, match="HTTP 404") as err:
        loader.load("/data/upload/1/missing.jpg")
    assert "/data/upload/1/missing.jpg" in str(err.value)
    assert "LABEL_STUDIO_URL" in str(err.value)

    ls.slow["/data/upload/1/y.png"] = 1.5
    start = time.monotonic()
    with pytest.raises(ImageError, match="did not send the whole image within") as err:
        loader.load("/data/upload/1/y.png")
    assert time.monotonic() - start < 1.4
    assert "/data/upload/1/y.png" in str(err.value)

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    loader = make_loader(label_studio_url=dead, api_key=LEGACY_TOKEN)
    with pytest.raises(ImageError) as err:
        loader.load("/data/upload/1/x.jpg")
    msg = str(err.value)
    assert "refused" in msg and "LABEL_STUDIO_URL" in msg and dead in msg


# --------------------------------------------------------------------------------------------
# Cloud storage via presign, other hosts


def test_presign_redirect_does_not_leak_credentials(ls, storage, make_loader):
    uri = "s3://bucket/cat.jpg"
    ls.cloud[uri] = storage.presigned("/bucket/cat.jpg")
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    assert_rotated_cat(loader.load(uri, task_id=7))
    presign = [r for r in ls.requests if r[1].startswith("/tasks/7/presign/")]
    assert len(presign) == 1 and presign[0][2] == f"Token {LEGACY_TOKEN}"
    fileuri = parse_qs(urlsplit(presign[0][1]).query)["fileuri"][0]
    assert base64.urlsafe_b64decode(fileuri).decode() == uri
    assert len(storage.headers) == 1
    assert "authorization" not in storage.headers[0] and "cookie" not in storage.headers[0]

    # The same with a personal access token: no Bearer token to the storage either.
    loader = make_loader(label_studio_url=ls.url, api_key=ls.pat)
    loader.load(uri, task_id=7)
    assert all("authorization" not in h for h in storage.headers)


def test_presign_proxy_mode_and_errors(ls, storage, make_loader):
    ls.cloud["gs://b/direct.jpg"] = exif_rotated_jpeg()  # LS streams the bytes itself
    ls.cloud["azure-blob://c/old.jpg"] = storage.url + f"/expired/old.jpg?sig={SIGNATURE}&se=1"
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    assert_rotated_cat(loader.load("gs://b/direct.jpg", task_id=3))
    with pytest.raises(ImageError, match="task id"):
        loader.load("gs://b/direct.jpg")
    with pytest.raises(ImageError) as err:
        loader.load("azure-blob://c/old.jpg", task_id=3)
    msg = str(err.value)
    assert "403" in msg and "presigned" in msg and "azure-blob://c/old.jpg" in msg
    assert SIGNATURE not in msg
    with pytest.raises(ImageError, match="could not presign"):
        loader.load("s3://nope/none.jpg", task_id=3)


def test_plain_urls_get_credentials_only_on_label_studio_host(ls, storage, make_loader):
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    arr = loader.load(storage.url + "/public/pic.png")
    assert arr[0, 0].tolist() == [1, 2, 3]
    assert "authorization" not in storage.headers[-1]
    loader.load(ls.url + "/data/upload/1/y.png")
    assert ls.requests[-1][2] == f"Token {LEGACY_TOKEN}"
    with pytest.raises(ImageError, match="404"):
        loader.load(storage.url + "/public/missing.png")


# --------------------------------------------------------------------------------------------
# Local files


@pytest.fixture
def doc_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "img.png").write_bytes(rgb_png(colour=(5, 6, 7)))
    (tmp_path / "secret.png").write_bytes(rgb_png(colour=(66, 66, 66)))
    return root


def test_local_files_read_from_document_root(ls, make_loader, doc_root):
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN,
                         local_files_document_root=str(doc_root))
    assert loader.load("/data/local-files/?d=sub/img.png")[0, 0].tolist() == [5, 6, 7]
    assert loader.load("/data/local-files/?d=/sub/img.png")[0, 0].tolist() == [5, 6, 7]
    assert loader.load(ls.url + "/data/local-files/?d=sub%2Fimg.png")[0, 0].tolist() == [5, 6, 7]
    assert ls.requests == []  # nothing downloaded


@pytest.mark.parametrize("d", ["../secret.png", "sub/../../secret.png", "sub/../../root/../secret.png"])
def test_local_files_refuse_escaping_paths(make_loader, doc_root, d):
    loader = make_loader(local_files_document_root=str(doc_root))
    with pytest.raises(ImageError, match="escapes LOCAL_FILES_DOCUMENT_ROOT"):
        loader.load(f"/data/local-files/?d={d}")
    with pytest.raises(ImageError, match="escapes"):
        loader.source_key(f"/data/local-files/?d={d}")


def test_local_files_without_document_root_download_from_ls(ls, make_loader, doc_root):
    ls.local_root = str(doc_root)
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    assert loader.load("/data/local-files/?d=sub/img.png")[0, 0].tolist() == [5, 6, 7]
    assert ls.count("/data/local-files/") == 1
    ls.local_root = None
    with pytest.raises(ImageError, match="LOCAL_FILES_SERVING_ENABLED") as err:
        loader.load("/data/local-files/?d=sub/img.png")
    assert "LOCAL_FILES_DOCUMENT_ROOT" in str(err.value)
    loader = make_loader(local_files_document_root=str(doc_root))
    with pytest.raises(ImageError, match="not found under LOCAL_FILES_DOCUMENT_ROOT"):
        loader.load("/data/local-files/?d=sub/nothing.png")


def test_plain_paths_and_file_urls_only_inside_the_document_root(make_loader, doc_root):
    path = doc_root / "sub" / "img.png"
    secret = doc_root.parent / "secret.png"
    off = make_loader()  # no document root: local files are off
    for url in (str(path), path.as_uri(), "sub/img.png"):
        with pytest.raises(ImageError, match="is not available"):
            off.load(url)
    loader = make_loader(local_files_document_root=str(doc_root))
    assert loader.load(str(path))[0, 0].tolist() == [5, 6, 7]
    assert loader.load(path.as_uri())[0, 0].tolist() == [5, 6, 7]
    assert loader.load("sub/img.png")[0, 0].tolist() == [5, 6, 7]  # relative to the root
    # outside the root, missing, a directory, a device, a FIFO, a NUL: one message for all
    fifo = doc_root / "sub" / "fifo.png"
    os.mkfifo(fifo)
    (doc_root / "sub" / "dev.png").symlink_to("/dev/zero")
    messages = set()
    for url in (str(secret), secret.as_uri(), "../secret.png", str(doc_root / "nope.png"),
                str(doc_root / "sub"), "/dev/zero", str(fifo), "sub/dev.png", "sub/img\x00.png",
                "/etc/passwd"):
        with pytest.raises(ImageError, match="is not available") as err:
            loader.load(url)
        messages.add(str(err.value).replace(url, "<url>").replace(redact_url(url), "<url>"))
    assert len(messages) == 1, messages
    assert "bytes" not in messages.pop()


def test_local_files_are_read_with_the_download_limit(make_loader, doc_root):
    big = doc_root / "sub" / "big.png"
    big.write_bytes(rgb_png() + b"\0" * 5000)
    loader = make_loader(local_files_document_root=str(doc_root), max_download_bytes=4000)
    with pytest.raises(ImageError, match="larger than 4,000 bytes"):
        loader.load(str(big))
    with pytest.raises(ImageError, match="larger than 4,000 bytes"):
        loader.load("/data/local-files/?d=sub/big.png")


def test_source_key(ls, make_loader, doc_root):
    loader = make_loader(label_studio_url=ls.url, local_files_document_root=str(doc_root))
    path = doc_root / "sub" / "img.png"
    key1 = loader.source_key(str(path))
    assert key1 == loader.source_key(path.as_uri()) == loader.source_key("/data/local-files/?d=sub/img.png")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert loader.source_key(str(path)) != key1  # changed file, new identity
    assert loader.source_key("/data/upload/1/x.jpg") == ls.url + "/data/upload/1/x.jpg"
    assert loader.source_key("s3://bucket/cat.jpg", task_id=1) == "s3://bucket/cat.jpg"
    signed = f"https://example.com/a.jpg?X-Amz-Signature={SIGNATURE}"
    key = loader.source_key(signed)
    assert SIGNATURE not in key and key != loader.source_key(signed + "x")
    assert ls.requests == []


# --------------------------------------------------------------------------------------------
# Disk cache


def test_disk_cache_survives_a_new_process(ls, make_loader, tmp_path):
    cache_dir = str(tmp_path / "shared-cache")
    loader = make_loader(label_studio_url=ls.url, api_key=ls.pat, cache_dir=cache_dir,
                         cache_max_bytes=10**7)
    first = loader.load("/data/upload/1/x.jpg")
    assert ls.count("/data/upload/1/x.jpg") == 1
    again = make_loader(label_studio_url=ls.url, api_key=ls.pat, cache_dir=cache_dir,
                        cache_max_bytes=10**7)
    n_requests = len(ls.requests)
    assert np.array_equal(again.load("/data/upload/1/x.jpg"), first)
    assert len(ls.requests) == n_requests  # neither a download nor a token refresh

    # HTML is never cached; a corrupt cache entry is replaced.
    loader.cache.put(ls.url + "/data/upload/1/y.png", b"garbage")
    loader.load("/data/upload/1/y.png")
    assert ls.count("/data/upload/1/y.png") == 1
    with pytest.raises(ImageError):
        loader.load("/data/upload/1/page.jpg")
    assert len(os.listdir(cache_dir)) == 2


def test_disk_cache_bound_evicts_least_recently_used(tmp_path):
    cache = DiskCache(str(tmp_path / "c"), max_bytes=250)
    cache.put("a", b"a" * 100)
    cache.put("b", b"b" * 100)
    os.utime(cache.path_for("a"), (1000, 1000))
    os.utime(cache.path_for("b"), (2000, 2000))
    assert cache.get("a") == b"a" * 100  # a hit makes "a" the most recent
    cache.put("c", b"c" * 100)
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.total_bytes() <= 250
    cache.put("huge", b"h" * 300)  # bigger than the bound: not cached, nothing evicted
    assert cache.get("huge") is None and cache.total_bytes() == 200


def test_loader_cache_stays_bounded(ls, make_loader, tmp_path):
    for i in range(4):
        ls.files[f"/data/upload/1/{i}.png"] = (rgb_png(colour=(i, i, i)), "image/png")
    size = len(ls.files["/data/upload/1/0.png"][0])
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN,
                         cache_dir=str(tmp_path / "c"), cache_max_bytes=2 * size + size // 2)
    for i in range(4):
        loader.load(f"/data/upload/1/{i}.png")
        os.utime(loader.cache.path_for(ls.url + f"/data/upload/1/{i}.png"), (1000 + i, 1000 + i))
    assert loader.cache.total_bytes() <= 2 * size + size // 2
    loader.load("/data/upload/1/3.png")
    loader.load("/data/upload/1/2.png")
    assert ls.count("/data/upload/1/3.png") == 1 and ls.count("/data/upload/1/2.png") == 1
    loader.load("/data/upload/1/0.png")  # evicted: downloaded again
    assert ls.count("/data/upload/1/0.png") == 2


# --------------------------------------------------------------------------------------------
# No token in the logs


def test_no_token_in_logs_or_errors(ls, storage, make_loader, clock, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    ls.cloud["s3://bucket/cat.jpg"] = storage.presigned("/bucket/cat.jpg")
    messages = []

    def attempt(fn):
        try:
            fn()
        except ImageError as exc:
            messages.append(str(exc))

    legacy = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    attempt(lambda: legacy.load("/data/upload/1/x.jpg"))
    attempt(lambda: legacy.load("s3://bucket/cat.jpg", task_id=1))
    pat = make_loader(label_studio_url=ls.url, api_key=ls.pat, cache_dir=str(tmp_path / "c"),
                      cache_max_bytes=10**6)
    attempt(lambda: pat.load("/data/upload/1/x.jpg"))
    clock.advance(ls.access_lifetime * 2)
    attempt(lambda: pat.load("/data/upload/1/y.png"))
    ls.revoked.update(ls.issued)
    attempt(lambda: pat.load("s3://bucket/cat.jpg", task_id=1))
    attempt(lambda: pat.load("/data/upload/1/page.jpg"))
    attempt(lambda: pat.load("/data/upload/1/missing.jpg"))
    setup = make_loader()
    setup.update_from_setup(ls.url, LEGACY_TOKEN)
    attempt(lambda: setup.load("/data/upload/1/y.png"))
    ls.legacy_enabled = False
    attempt(lambda: setup.load("/data/upload/1/x.jpg"))
    wrong = make_jwt({"token_type": "refresh", "exp": 4102444800, "jti": "wrong"})
    attempt(lambda: make_loader(label_studio_url=ls.url, api_key=wrong).load("/data/upload/1/x.jpg"))
    attempt(lambda: make_loader(label_studio_url=ls.url, api_key="Token " + LEGACY_TOKEN)
            .load("/data/upload/1/x.jpg"))

    assert len(messages) >= 4 and ls.refreshes >= 3
    secrets = [LEGACY_TOKEN, ls.pat, wrong, *ls.issued]
    everything = caplog.text + "\n".join(messages)
    for secret in secrets:
        assert secret not in everything
        assert secret.split(".")[-1] not in everything  # not even a JWT's signature part
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("sam_backend"))
    assert ours and SIGNATURE not in ours and SIGNATURE not in "\n".join(messages)
