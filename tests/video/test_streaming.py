"""The trackers' shared pieces without a model: frames decoded as the predictor indexes them
(sequential reads continue one reader, nothing decoded twice in a row), the feature cache's byte
bound, boxes from masks."""
from __future__ import annotations

import numpy as np
import torch

from sam_backend.video.streaming import FeatureCache, StreamedFrames, mask_box, tensor_bytes
from tests.support.video import JpegFolderClip, moving_shapes, write_jpeg_folder


def test_frames_are_decoded_when_indexed_and_sequential_reads_continue_one_reader(tmp_path):
    frames, _ = moving_shapes(6, 40, 60)
    clip = JpegFolderClip(write_jpeg_folder(tmp_path / "f", frames))
    opened = []
    original = clip.frames

    def counting(start=0, stop=None):
        opened.append(start)
        return original(start, stop)

    clip.frames = counting
    streamed = StreamedFrames(clip, lambda f: torch.from_numpy(f.copy()), keep=2)
    assert len(streamed) == 6 and clip.reads == 0  # nothing decoded up front
    for i in range(6):
        assert torch.equal(streamed[i], torch.from_numpy(np.array(clip.frame(i))))
    clip.reads = 0
    opened.clear()
    streamed = StreamedFrames(clip, lambda f: torch.from_numpy(f.copy()), keep=2)
    for i in [0, 1, 1, 2, 3, 5, 4]:
        streamed[i]
    assert opened == [0, 5, 4]  # one reader for 0..3, reopened for the jumps
    assert streamed.decoded == 6  # frame 1 asked twice, decoded once


def test_the_feature_cache_is_bounded_in_bytes_least_recently_used_first():
    feature = [torch.zeros(1, 32, 16, 16)]  # 32 KiB
    size = tensor_bytes(feature)
    cache = FeatureCache(3 * size)
    for frame in range(3):
        cache.put(("clip", frame), feature, size)
    assert cache.get(("clip", 0)) is not None  # 0 is now the most recent
    cache.put(("clip", 3), feature, size)
    assert cache.get(("clip", 1)) is None and cache.bytes == 3 * size and cache.encoded == 4
    cache.put(("other", 0), feature, size)
    cache.drop("clip")
    assert len(cache) == 1 and cache.bytes == size


def test_a_box_is_the_masks_bounds_and_none_when_empty():
    mask = np.zeros((10, 20), bool)
    assert mask_box(mask) is None
    mask[2:5, 7:12] = True
    mask[8, 3] = True
    assert mask_box(mask) == (3.0, 2.0, 12.0, 9.0)
