"""A task's video comes from the same places as its images, through the same code (the image
loader's sources, downloads, credentials, disk cache and network policy) with the video's byte
limit and names: Label Studio uploads with its token, presigned cloud URIs, local files under the
document root, and clear errors for what is not a video."""
from __future__ import annotations

import os

import numpy as np
import pytest

from sam_backend.errors import ImageError, VideoError
from sam_backend.video.clip import VideoLimits, fetch_clip

from tests.support.loopback_hosts import LEGACY_TOKEN, rgb_png
from tests.support.videos import shapes_clip_bytes


@pytest.fixture
def clip_bytes(tmp_path):
    return shapes_clip_bytes(tmp_path, frames=10, fps=5.0, width=96, height=64)


def _check(clip, data):
    with clip:
        assert (clip.info.frames, clip.info.width, clip.info.height) == (10, 96, 64)
        first = clip.frame(0)
        assert first.shape == (64, 96, 3) and first.dtype == np.uint8
    return clip


def test_an_upload_is_downloaded_with_the_label_studio_token(ls, make_loader, clip_bytes, tmp_path):
    ls.files["/data/upload/1/a1b2c3d4-clip.webm"] = (clip_bytes, "video/webm")
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN, cache_max_bytes=10**8)
    clip = _check(fetch_clip(loader, "/data/upload/1/a1b2c3d4-clip.webm",
                             directory=str(tmp_path)), clip_bytes)
    assert "/data/upload/1/a1b2c3d4-clip.webm" in clip.name
    assert ls.requests[-1] == ("GET", "/data/upload/1/a1b2c3d4-clip.webm", f"Token {LEGACY_TOKEN}")
    _check(fetch_clip(loader, "/data/upload/1/a1b2c3d4-clip.webm"), clip_bytes)
    assert ls.count("/data/upload/1/a1b2c3d4-clip.webm") == 1  # the second from the disk cache
    assert not [p for p in os.listdir(tmp_path) if p.startswith("sam_backend-clip-")]


def test_a_cloud_uri_is_presigned_by_label_studio(ls, storage, make_loader, clip_bytes):
    storage.files["/bucket/clip.webm"] = (clip_bytes, "video/webm")
    ls.cloud["s3://bucket/clip.webm"] = storage.presigned("/bucket/clip.webm")
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    _check(fetch_clip(loader, "s3://bucket/clip.webm", task_id=7), clip_bytes)
    assert ls.count("/tasks/7/presign/") == 1
    assert "authorization" not in storage.headers[-1]  # the token stays with Label Studio
    with pytest.raises(ImageError, match="needs the task id"):
        fetch_clip(loader, "s3://bucket/clip.webm")


def test_local_files_only_under_the_document_root(make_loader, doc_root, clip_bytes, tmp_path):
    (doc_root / "sub" / "clip.webm").write_bytes(clip_bytes)
    (tmp_path / "outside.webm").write_bytes(clip_bytes)
    loader = make_loader(local_files_document_root=str(doc_root))
    _check(fetch_clip(loader, "/data/local-files/?d=sub/clip.webm"), clip_bytes)
    _check(fetch_clip(loader, "sub/clip.webm"), clip_bytes)
    for url in (str(tmp_path / "outside.webm"), "/data/local-files/?d=../outside.webm"):
        with pytest.raises(ImageError, match="not available|escapes"):
            fetch_clip(loader, url)
    os.symlink(tmp_path / "outside.webm", doc_root / "link.webm")
    with pytest.raises(ImageError, match="not available"):
        fetch_clip(loader, "link.webm")


def test_the_video_byte_limit_is_its_own(ls, make_loader, doc_root, clip_bytes):
    ls.files["/data/upload/1/big.webm"] = (clip_bytes, "video/webm")
    (doc_root / "big.webm").write_bytes(clip_bytes)
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN,
                         local_files_document_root=str(doc_root),
                         max_download_bytes=len(clip_bytes) // 2)  # the image limit: not used
    _check(fetch_clip(loader, "/data/upload/1/big.webm"), clip_bytes)
    small = VideoLimits(max_bytes=len(clip_bytes) - 1)
    for url in ("/data/upload/1/big.webm", "big.webm"):
        with pytest.raises(ImageError, match=r"^video .*larger than .* bytes \(max_video_bytes"):
            fetch_clip(loader, url, limits=small)


def test_what_is_not_a_video_gets_a_clear_error(ls, make_loader, doc_root):
    ls.files["/data/upload/1/login.webm"] = (
        b"<!DOCTYPE html><html><head><title>Label Studio</title></head><body>login</body></html>",
        "text/html; charset=utf-8")
    ls.files["/data/upload/1/pic.webm"] = (rgb_png(), "image/png")
    (doc_root / "notes.webm").write_bytes(b"just some text, not a video" * 10)
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN, cache_max_bytes=10**8,
                         local_files_document_root=str(doc_root))
    with pytest.raises(ImageError, match="is an HTML page, not a video"):
        fetch_clip(loader, "/data/upload/1/login.webm")
    with pytest.raises(ImageError, match="is an image, not a video"):
        fetch_clip(loader, "/data/upload/1/pic.webm")
    with pytest.raises(ImageError, match="video notes.webm is not a supported video"):
        fetch_clip(loader, "notes.webm")
    assert loader.cache.total_bytes() == 0  # nothing that is not a video is cached
    # a corrupt file with a video's signature: refused when decoded, with the same kind of error
    (doc_root / "corrupt.webm").write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 4)
    with pytest.raises(VideoError, match="video corrupt.webm"):
        fetch_clip(loader, "corrupt.webm")


def test_a_video_download_has_its_own_deadline(ls, make_loader, clip_bytes):
    ls.files["/data/upload/1/slow.webm"] = (clip_bytes, "video/webm")
    ls.slow["/data/upload/1/slow.webm"] = 1.5
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN, timeout=0.5)
    _check(fetch_clip(loader, "/data/upload/1/slow.webm", limits=VideoLimits(timeout=5.0)),
           clip_bytes)  # the image timeout (0.5 s) does not apply
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN, timeout=5.0)
    with pytest.raises(ImageError, match=r"did not send the whole video within 0.3 s "
                                         r"\(video_timeout, SAM_BACKEND_VIDEO_TIMEOUT"):
        fetch_clip(loader, "/data/upload/1/slow.webm", limits=VideoLimits(timeout=0.3))
