"""The limit mechanisms on their own: memory budget, load gate, echo sanitising, the resize's
short side, block-wise pixel scaling, the label-config cache. tests/server/test_hardening.py replays the
attacks against a running backend."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from sam_backend.images import decode as images
from sam_backend.errors import BusyError, ImageError, RequestError
from sam_backend.labelstudio.label_config import LabelConfigCache, parse_label_config
from sam_backend.common.limits import LoadGate, MemoryBudget, printable, shown
from sam_backend.models.base import resize_longest_side


def test_budget_waits_for_room_then_refuses_busy_and_too_large():
    budget = MemoryBudget(100)
    with budget.reservation(5) as first:
        first.grow(80, "a")
        released = threading.Event()

        def later():
            time.sleep(0.2)
            first.release()
            released.set()

        threading.Thread(target=later).start()
        with budget.reservation(5) as second:
            second.grow(50, "b")  # waits until the first gives its 80 back
            assert released.is_set() and budget.used == 50
    assert budget.used == 0
    with budget.reservation(0.1) as held:
        held.grow(90, "c")
        with budget.reservation(0.1) as other:
            with pytest.raises(BusyError, match="retry"):
                other.grow(20, "d")
    with budget.reservation(1) as held:
        with pytest.raises(ImageError, match="more than 0 MiB"):
            held.grow(101, "too big")
    assert budget.used == 0 and budget.peak == 90


def test_load_gate_refuses_at_once_when_full():
    gate = LoadGate(2)
    with gate.admit(), gate.admit():
        with pytest.raises(BusyError, match="max_concurrent_loads=2"):
            with gate.admit():
                pass
        with pytest.raises(BusyError, match="max_concurrent_loads=2"):
            gate.check()
    gate.check()
    with gate.admit():
        pass


def test_echoed_values_are_printable_and_short():
    assert printable("a\x00b\x1b[31m\r\nc", 100) == "a?b?[31m c"
    assert printable("x" * 50, 10) == "xxxxxxx..."
    text = shown("L" * 10_000_000)
    assert len(text) <= 60 and text.startswith("'LLL")
    assert shown(["a"] * 1000).isprintable() and len(shown(["a"] * 1000)) <= 60


@pytest.mark.parametrize("size", [(1, 3000), (2, 5000), (3000, 1), (1, 1), (1080, 1920), (7, 5)])
def test_resize_keeps_one_pixel_and_otherwise_matches_segment_anything(size):
    from segment_anything.utils.transforms import ResizeLongestSide

    h, w = size
    ours, theirs = resize_longest_side(1024), ResizeLongestSide(1024)
    new_h, new_w = ours.get_preprocess_shape(h, w, 1024)
    assert min(new_h, new_w) >= 1 and max(new_h, new_w) == 1024
    if min(theirs.get_preprocess_shape(h, w, 1024)) > 0:
        assert (new_h, new_w) == theirs.get_preprocess_shape(h, w, 1024)
    image = np.zeros((h, w, 3), np.uint8)
    assert ours.apply_image(image).shape == (new_h, new_w, 3)
    coords = ours.apply_coords(np.array([[w / 2, h / 2]], np.float32), (h, w))
    assert np.allclose(coords, [[new_w / 2, new_h / 2]])


@pytest.mark.parametrize("mode,values", [
    ("F", np.linspace(0, 1, 600, dtype=np.float32)),
    ("F", np.linspace(-5, 1e6, 600, dtype=np.float32)),
    ("F", np.array([np.nan, np.inf, 3.0, -2.0] * 150, np.float32)),
    ("I", np.arange(0, 60000, 100, dtype=np.int32)),
    ("I", np.arange(-300, 300, dtype=np.int32) * 1000),
    ("I;16", np.linspace(0, 65535, 600).astype(np.uint16)),
])
def test_blockwise_scaling_equals_the_whole_image_at_once(monkeypatch, mode, values):
    array = values.reshape(20, 30)
    whole = images._scale_to_uint8(array, mode)
    monkeypatch.setattr(images, "_SCALE_BLOCK_PIXELS", 7)  # 1 row per block
    assert np.array_equal(images._scale_to_uint8(array, mode), whole)


def test_label_config_cache_is_bounded_in_bytes_and_refuses_dtds():
    config = '<View><Image name="i" value="$image"/><BrushLabels name="b" toName="i">' \
             '<Label value="x"/></BrushLabels></View>'
    cache = LabelConfigCache(max_bytes=4 * LabelConfigCache.cost(config))
    for i in range(50):
        cache.parse(config.replace('value="x"', f'value="x{i}"'))
    assert len(cache) <= 4 and cache.nbytes <= cache.max_bytes
    assert cache.parse(config) is cache.parse(config)
    with pytest.raises(RequestError, match="DTD"):
        parse_label_config('<!DOCTYPE View [<!ENTITY a "aaaa">]><View>&a;</View>')
    for bad in (5, ["<View/>"], None):
        with pytest.raises(RequestError, match="label_config"):
            parse_label_config(bad)


def test_a_reservation_shrinks_outlives_its_block_and_waits_as_long_as_each_grow_says():
    budget = MemoryBudget(100)
    held = budget.hold(60)  # a long default wait ...
    held.grow(70, "a mask")
    held.shrink(50)  # ... the mask is gone, its 20-byte result stays
    assert held.held == 20 and budget.used == 20
    with budget.reservation(60) as other:
        other.grow(80, "another")
        started = time.monotonic()
        with pytest.raises(BusyError, match="image_memory_mb=0"):
            held.grow(10, "more", wait=0.2)  # ... but this grow waits 0.2 s only
        assert time.monotonic() - started < 2
    with pytest.raises(ImageError, match="send fewer tasks, or raise image_memory_mb"):
        held.grow(90, "the results", advice="send fewer tasks")
    held.shrink(1000)  # at most what it holds
    assert held.held == 0 and budget.used == 0
    held.grow(5, "again")
    held.release()
    assert budget.used == 0


def test_load_gate_names_what_its_holders_do():
    gate = LoadGate(1, "max_concurrent_downloads", "downloading {held} images")
    with gate.admit():
        assert gate.held == 1
        with pytest.raises(BusyError, match=r"downloading 1 images already "
                                            r"\(max_concurrent_downloads=1\)"):
            with gate.admit():
                pass
    assert gate.held == 0
