"""Reading clips with OpenCV: honest frame count, frame rate, size, seeking, the content key,
and the clear errors (corrupt, unsupported, empty, past a limit) a task's video gets."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from sam_backend.errors import ConfigError, ImageError, VideoError
from sam_backend.settings import Settings
from sam_backend.video.clip import (VideoLimits, clip_from_bytes, open_clip, sniff_video_format)

from tests.support.videos import (AVI_MJPEG, MP4_MPEG4, WEBM_VP8, shapes_clip_bytes,
                                  shapes_frame, write_shapes_clip)


def _red_square_x(frame: np.ndarray) -> float:
    """Mean column of the red square's pixels (RGB frame)."""
    red = (frame[..., 0] > 160) & (frame[..., 1] < 90) & (frame[..., 2] < 90)
    return float(np.nonzero(red)[1].mean())


@pytest.mark.parametrize("codec", [WEBM_VP8, MP4_MPEG4, AVI_MJPEG])
def test_a_clip_has_its_frames_rate_and_size(tmp_path, codec):
    path = tmp_path / f"clip{codec[1]}"
    boxes = write_shapes_clip(path, frames=17, fps=8.0, width=160, height=96, codec=codec)
    with open_clip(str(path)) as clip:
        assert (clip.info.frames, clip.info.width, clip.info.height) == (17, 160, 96)
        assert clip.info.fps == pytest.approx(8.0, rel=1e-3)
        assert clip.info.duration == pytest.approx(17 / 8.0, rel=1e-3)
        frames = list(clip.frames())
    assert [i for i, _ in frames] == list(range(17))
    for index, frame in frames:
        assert frame.shape == (96, 160, 3) and frame.dtype == np.uint8
        x0, _, x1, _ = boxes[index]["square"]
        # RGB order and the right frame: the red square is where frame `index` drew it
        assert _red_square_x(frame) == pytest.approx((x0 + x1 - 1) / 2, abs=1.5)
        expected, _ = shapes_frame(index, 160, 96)
        assert np.abs(frame.astype(int) - expected).mean() < 12  # lossy codecs


def test_seeking_gives_the_same_frames_as_reading_through(tmp_path):
    data = shapes_clip_bytes(tmp_path, frames=30, fps=10.0, width=128, height=96)
    with clip_from_bytes(data) as clip:
        every = [frame for _, frame in clip.frames()]
        part = list(clip.frames(11, 15))
        assert [i for i, _ in part] == [11, 12, 13, 14]
        for index, frame in part:
            assert np.array_equal(frame, every[index])
        assert np.array_equal(clip.frame(29), every[29])
        assert [i for i, _ in clip.frames(28)] == [28, 29]
        assert list(clip.frames(5, 5)) == [] and [i for i, _ in clip.frames(25, 99)] == list(
            range(25, 30))
        with pytest.raises(IndexError):
            clip.frame(30)


def test_the_key_is_the_content(tmp_path):
    data = shapes_clip_bytes(tmp_path, frames=6, width=64, height=48)
    other = shapes_clip_bytes(tmp_path / "..", frames=7, width=64, height=48)
    with clip_from_bytes(data) as a, clip_from_bytes(data) as b, clip_from_bytes(other) as c:
        assert a.key == b.key and a.key.startswith("video:sha256:") and a.key != c.key
        assert a.path != b.path  # each clip has its own file


def test_closing_deletes_the_temporary_file(tmp_path):
    clip = clip_from_bytes(shapes_clip_bytes(tmp_path, frames=4, width=64, height=48),
                           directory=str(tmp_path))
    assert os.path.exists(clip.path) and clip.path.endswith(".webm")
    clip.close()
    assert not os.path.exists(clip.path)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("sam_backend-clip-")]


def test_a_failed_open_leaves_no_temporary_file(tmp_path):
    data = shapes_clip_bytes(tmp_path, frames=24, width=64, height=48)
    with pytest.raises(VideoError):
        clip_from_bytes(data, limits=VideoLimits(max_frames=10), directory=str(tmp_path))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("sam_backend-clip-")]


def test_a_cut_file_counts_the_frames_that_decode(tmp_path):
    data = shapes_clip_bytes(tmp_path, frames=40, fps=10.0, width=160, height=120)
    cut = data[: len(data) * 2 // 3]
    (tmp_path / "cut.webm").write_bytes(cut)
    header = cv2.VideoCapture(str(tmp_path / "cut.webm"))
    assert header.get(cv2.CAP_PROP_FRAME_COUNT) == 40  # the container's claim: not what decodes
    header.release()
    with clip_from_bytes(cut) as clip:
        count = clip.info.frames
        assert 0 < count < 40
        assert len(list(clip.frames())) == count  # every counted frame decodes


@pytest.mark.parametrize("data, words", [
    (b"", "is empty"),
    (b"hello, this is plain text and no video at all" * 4, "is not a supported video"),
    (b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 8, "cannot be decoded|no frame that decodes"),
    (b"\x00\x00\x00\x18ftypisom" + b"\x00" * 500, "cannot be decoded|no frame that decodes"),
])
def test_bad_videos_get_a_clear_error(data, words):
    with pytest.raises(VideoError, match=words) as caught:
        clip_from_bytes(data, name="video /data/upload/1/bad.mp4")
    assert isinstance(caught.value, ImageError)  # answered 400 like a bad image
    assert "video /data/upload/1/bad.mp4" in str(caught.value)


def test_limits_are_checked_with_their_option_named(tmp_path):
    data = shapes_clip_bytes(tmp_path, frames=24, fps=12.0, width=160, height=120)
    with pytest.raises(VideoError, match=r"larger than the limit of 100 \(max_video_bytes\)"):
        clip_from_bytes(data, limits=VideoLimits(max_bytes=100))
    with pytest.raises(VideoError, match=r"more than the limit of 10 \(max_video_frames\)"):
        clip_from_bytes(data, limits=VideoLimits(max_frames=10))
    with pytest.raises(VideoError, match=r"longer than the limit of 1.5 s \(max_video_seconds\)"):
        clip_from_bytes(data, limits=VideoLimits(max_seconds=1.5))
    with pytest.raises(VideoError, match=r"160x120 = 19,200 pixels.*max_video_frame_pixels"):
        clip_from_bytes(data, limits=VideoLimits(max_frame_pixels=160 * 119))
    with clip_from_bytes(data, limits=VideoLimits(max_frames=24, max_seconds=2.0,
                                                  max_frame_pixels=160 * 120)) as clip:
        assert clip.info.frames == 24  # exactly at every limit is fine


def test_the_limits_are_options():
    settings = Settings.load({"max_video_frames": "100"},
                             environ={"SAM_BACKEND_MAX_VIDEO_SECONDS": "12.5"})
    limits = VideoLimits.from_settings(settings)
    assert (limits.max_frames, limits.max_seconds) == (100, 12.5)
    assert limits.max_bytes == 1024 ** 3 and limits.max_frame_pixels == 3840 * 2160
    with pytest.raises(ConfigError, match="max_video_frames"):
        Settings.load({"max_video_frames": "0"}, environ={})


def test_container_sniffing(tmp_path):
    for codec, kind in ((WEBM_VP8, "webm"), (MP4_MPEG4, "mp4"), (AVI_MJPEG, "avi")):
        assert sniff_video_format(shapes_clip_bytes(tmp_path, frames=2, width=32, height=32,
                                                    codec=codec)) == kind
    assert sniff_video_format(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40) is None
    assert sniff_video_format(b"") is None
