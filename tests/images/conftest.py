"""Fixtures of the image tests: loopback hosts (a fake Label Studio, a storage), a loader factory,
a document root, and an environment without proxies or Label Studio settings."""
from __future__ import annotations

import os

import pytest

from sam_backend.images.config import ImageAccessSettings
from sam_backend.images.loader import ImageLoader

from tests.support.loopback_hosts import Clock, FakeLabelStudio, FakeStorage, exif_rotated_jpeg, rgb_png


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


@pytest.fixture
def doc_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "img.png").write_bytes(rgb_png(colour=(5, 6, 7)))
    (tmp_path / "secret.png").write_bytes(rgb_png(colour=(66, 66, 66)))
    return root

