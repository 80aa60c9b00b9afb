"""sam_backend.labelstudio.rle against Label Studio's reference brush encoder/decoder (label_studio_converter)."""
import numpy as np
import pytest
from label_studio_converter.brush import decode_rle, mask2rle

from sam_backend.labelstudio import rle as rle_mod
from sam_backend.labelstudio.rle import mask_to_rle, rle_to_mask


def reference(mask):
    return mask2rle((np.asarray(mask) != 0).astype(np.uint8) * 255)


def _rng(seed):
    return np.random.default_rng(seed)


def _disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _cases():
    rng = _rng(1234)
    cases = {
        "1x1 off": np.zeros((1, 1), bool),
        "1x1 on": np.ones((1, 1), bool),
        "1x2 on-off": np.array([[True, False]]),
        "empty 64x48": np.zeros((64, 48), bool),
        "full 64x48": np.ones((64, 48), bool),
        # 90000 pixels = 360000 values: one run many times the largest size class (65536 values)
        "full 300x300": np.ones((300, 300), bool),
        "empty 300x300": np.zeros((300, 300), bool),
        "checkerboard 61x47": (np.indices((61, 47)).sum(0) % 2).astype(bool),
        "checkerboard 2x2 blocks": ((np.indices((40, 60)) // 2).sum(0) % 2).astype(bool),
    }
    for h, w in [(1, 1), (1, 37), (37, 1), (7, 13), (2, 3), (31, 1000), (333, 517)]:
        for p in (0.02, 0.5, 0.98):
            cases[f"random {h}x{w} p={p}"] = rng.random((h, w)) < p
    for k in range(30):  # random sizes and densities
        h, w = (int(v) for v in rng.integers(1, 80, 2))
        cases[f"random#{k} {h}x{w}"] = rng.random((h, w)) < rng.random()
    m = np.zeros((120, 200), bool)
    m[60, :] = True  # thin horizontal line, full width
    m[:, 77] = True  # thin vertical line
    m[5, 3:5] = True  # 2-pixel run: 8 values, the class-0 limit
    m[7, 3:6] = True  # 3 pixels: 12 values, class 1
    m[9, 3:7] = True  # 4 pixels: 16 values, class 1 limit
    m[11, 3:8] = True  # 5 pixels: 20 values, class 2
    m[13, 100:164] = True  # 64 pixels: 256 values, class 2 limit
    m[15, 100:165] = True  # 65 pixels: 257 values, class 3
    cases["thin lines and class limits"] = m
    blobs = _disc(240, 320, 60, 80, 40) | _disc(240, 320, 170, 250, 55)
    blobs[200:230, 10:60] = True
    blobs[_disc(240, 320, 170, 250, 20)] = False  # a hole
    cases["multi-part blobs"] = blobs
    # a background run of exactly k * 65536 values (16384 pixels), and one just over
    m = np.zeros((2, 16384), bool)
    m[1, -1] = True
    cases["run of 16383 px"] = m
    m = np.zeros((3, 16384), bool)
    m[1, :] = True
    cases["runs of 16384 px"] = m
    m = np.zeros((3, 16385), bool)
    m[2, 1:] = True
    cases["runs of 16385 px"] = m
    # stream lengths hitting every padding case (bits % 8) show up among the random ones
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_equals_reference_encoder(name):
    mask = CASES[name]
    assert mask_to_rle(mask) == reference(mask)


@pytest.mark.parametrize("name", ["multi-part blobs", "full 300x300", "random 333x517 p=0.5",
                                  "thin lines and class limits", "1x1 on"])
def test_round_trip_through_reference_decoder(name):
    mask = CASES[name]
    rle = mask_to_rle(mask)
    values = decode_rle(rle)
    assert values.size == mask.size * 4
    rgba = values.reshape(mask.shape[0], mask.shape[1], 4)
    assert np.array_equal(rgba[:, :, 3] != 0, mask)
    assert np.array_equal(rgba, np.repeat((mask * 255).astype(np.uint8)[:, :, None], 4, axis=2))


@pytest.mark.parametrize("name", list(CASES))
def test_rle_to_mask_round_trip(name):
    mask = CASES[name]
    out = rle_to_mask(mask_to_rle(mask), *mask.shape)
    assert out.dtype == bool and out.shape == mask.shape
    assert np.array_equal(out, mask)


def test_output_is_plain_ints():
    rle = mask_to_rle(CASES["multi-part blobs"])
    assert isinstance(rle, list)
    assert all(type(v) is int and 0 <= v <= 255 for v in rle)


def test_padding_whole_zero_byte_when_aligned():
    # Label Studio's encoder pads 8 - bits % 8 zero bits: a whole byte when already aligned.
    # 53 header bits + 19-bit record (17..256 values) = 72 bits = 9 bytes -> 10 bytes.
    mask = np.ones((1, 10), bool)  # 40 values, class 2
    rle = mask_to_rle(mask)
    assert rle == reference(mask)
    assert len(rle) == 10 and rle[-1] == 0


@pytest.mark.parametrize("dtype,on", [(np.uint8, 1), (np.uint8, 255), (np.int64, 1), (np.float32, 1.0)])
def test_numeric_masks(dtype, on):
    mask = CASES["multi-part blobs"]
    numeric = mask.astype(dtype) * dtype(on)
    assert mask_to_rle(numeric) == mask_to_rle(mask) == reference(mask)


def test_non_contiguous_view():
    big = CASES["multi-part blobs"]
    view = big[::2, 5:-3]
    assert not view.flags.c_contiguous
    assert mask_to_rle(view) == reference(np.ascontiguousarray(view))
    assert mask_to_rle(big.T) == reference(np.ascontiguousarray(big.T))


def test_chunked_encoding_matches(monkeypatch):
    monkeypatch.setattr(rle_mod, "_CHUNK_RUNS", 5)
    for name in ["random 31x1000 p=0.5", "multi-part blobs", "runs of 16385 px", "1x1 on"]:
        mask = CASES[name]
        assert mask_to_rle(mask) == reference(mask), name


def test_large_mask_is_fast_enough():
    # not a benchmark: a coarse guard against accidental per-pixel Python loops
    import time

    mask = np.zeros((2160, 3840), bool)
    mask[_disc(2160, 3840, 800, 1200, 400)] = True
    mask[1500:2000, 3000:3500] = True
    mask_to_rle(mask)
    start = time.perf_counter()
    rle = mask_to_rle(mask)
    assert time.perf_counter() - start < 0.5
    assert np.array_equal(rle_to_mask(rle, 2160, 3840), mask)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (3,), (2, 2, 2)])
def test_bad_mask_shapes(shape):
    with pytest.raises(ValueError):
        mask_to_rle(np.zeros(shape, bool))


def test_rle_to_mask_wrong_size():
    rle = mask_to_rle(np.ones((4, 6), bool))
    with pytest.raises(ValueError, match="values"):
        rle_to_mask(rle, 6, 4 + 1)
    assert rle_to_mask(rle, 6, 4).shape == (6, 4)  # same pixel count, other shape: decodes


def test_rle_to_mask_truncated():
    rle = mask_to_rle(CASES["random 7x13 p=0.5"])
    with pytest.raises(ValueError, match="truncated"):
        rle_to_mask(rle[: len(rle) // 2], 7, 13)


@pytest.mark.parametrize("bad", [[1, 2, 300], [[1, 2]], [-1, 0, 0, 0]])
def test_rle_to_mask_rejects_non_bytes(bad):
    with pytest.raises(ValueError):
        rle_to_mask(bad, 1, 1)


def test_rle_to_mask_accepts_bytes_and_literal_records():
    # a stream with literal records (the reference encoder writes 1-value runs as literals)
    from label_studio_converter.brush import encode_rle

    values = np.array([0, 0, 0, 7, 0, 0, 0, 0, 255, 255, 255, 255], dtype=np.uint8)
    rle = encode_rle(values)
    assert np.array_equal(rle_to_mask(bytes(rle), 1, 3), np.array([[True, False, True]]))
