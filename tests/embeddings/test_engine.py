"""The engine's scheduling and storage: encoder priority, background precompute, float16 cache."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from sam_backend.embeddings.memory import EmbeddingCache
from sam_backend.embeddings.engine import BackgroundEncoder, EncoderGate, Segmenter
from sam_backend.models.base import Prompt
from sam_backend.models.registry import get_variant
from sam_backend.models.torch_runtime import TorchSamModel


def test_interactive_encode_goes_before_waiting_background_encodes():
    gate = EncoderGate(slots=1)
    order = []
    release = threading.Event()

    def hold():
        with gate.slot(interactive=False):
            release.wait(5)

    def worker(name, interactive):
        with gate.slot(interactive):
            order.append(name)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.05)
    background = [threading.Thread(target=worker, args=(f"bg{i}", False)) for i in range(2)]
    for t in background:
        t.start()
    time.sleep(0.05)
    interactive = threading.Thread(target=worker, args=("click", True))
    interactive.start()
    time.sleep(0.05)
    release.set()
    for t in [holder, interactive, *background]:
        t.join(5)
    assert order[0] == "click"
    assert sorted(order[1:]) == ["bg0", "bg1"]


def test_gate_limits_concurrent_encoders():
    gate = EncoderGate(slots=1)
    running, peak = [0], [0]
    lock = threading.Lock()

    def work(interactive):
        with gate.slot(interactive):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.02)
            with lock:
                running[0] -= 1

    threads = [threading.Thread(target=work, args=(i % 2 == 0,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert peak[0] == 1


def test_background_encoder_runs_newest_first_and_drops_the_oldest():
    encoder = BackgroundEncoder(max_pending=2)
    started, release, done = threading.Event(), threading.Event(), []
    all_done = threading.Event()

    def first():
        started.set()
        release.wait(5)
        done.append("first")

    def job(name):
        def run():
            done.append(name)
            if len(done) == 3:
                all_done.set()
        return run

    encoder.submit("first", first)
    started.wait(5)
    for name in ["a", "b", "c"]:  # "a" is dropped: only the 2 newest wait
        encoder.submit(name, job(name))
    assert not encoder.submit("c", job("c"))  # already queued
    release.set()
    assert all_done.wait(5)
    assert done == ["first", "c", "b"]


@pytest.fixture(scope="module")
def mobile_sam(checkpoint_factory):
    return TorchSamModel(get_variant("mobile_sam"), str(checkpoint_factory("mobile_sam")), "cpu")


def test_precompute_embeds_in_the_background_then_clicks_only_decode(mobile_sam, image_factory):
    segmenter = Segmenter(mobile_sam, EmbeddingCache(1 << 30))
    image = image_factory(200, 300, seed=2)
    loads = []
    assert segmenter.precompute("opened", lambda: loads.append(1) or image)
    deadline = time.monotonic() + 60
    while not segmenter.is_embedded("opened") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert segmenter.is_embedded("opened")
    assert not segmenter.precompute("opened", lambda: image)  # cached: nothing queued
    segmenter.segment("opened", lambda: pytest.fail("must not load again"),
                      Prompt(np.array([[50.0, 50.0]]), np.array([1])))
    assert loads == [1]


def test_float16_storage_halves_bytes_and_keeps_masks(mobile_sam, image_factory):
    exact = Segmenter(mobile_sam, EmbeddingCache(1 << 30))
    half = Segmenter(mobile_sam, EmbeddingCache(1 << 30), store_float16=True)
    image = image_factory(300, 500, seed=4)
    rng = np.random.default_rng(0)
    ious = []
    for i in range(12):
        n = 1 + i % 3
        prompt = Prompt(rng.uniform([0, 0], [500, 300], size=(n, 2)), np.array([1] + [0] * (n - 1)))
        a = exact.segment("img", lambda: image, prompt)
        b = half.segment("img", lambda: image, prompt)
        union = (a.mask | b.mask).sum()
        ious.append((a.mask & b.mask).sum() / union if union else 1.0)
        assert abs(a.score - b.score) < 1e-3
    assert half.cache.nbytes * 2 == exact.cache.nbytes
    assert min(ious) >= 0.99, ious


def test_float16_cache_is_converted_to_float32_once_per_image(mobile_sam, image_factory,
                                                              monkeypatch):
    """Clicks on an image cached in float16 hand the decoder the same float32 embedding: it is
    converted at the first click, not at every one."""
    import torch

    seen = []
    real_decode = mobile_sam.decode
    monkeypatch.setattr(mobile_sam, "decode", lambda e, p: seen.append(e) or real_decode(e, p))
    segmenter = Segmenter(mobile_sam, EmbeddingCache(1 << 30), store_float16=True,
                          decode_images=2)
    images = {name: image_factory(120, 160, seed=seed) for seed, name in enumerate("abc")}
    click = Prompt(np.array([[60.0, 50.0]]), np.array([1]))
    two = Prompt(np.array([[60.0, 50.0], [100.0, 80.0]]), np.array([1, 0]))
    first = segmenter.segment("a", lambda: images["a"], click)
    second = segmenter.segment("a", lambda: images["a"], two)
    cached = segmenter.cache.get(segmenter.embedding_key("a"))
    assert cached.image_embedding.dtype == torch.float16  # the cache keeps half the bytes
    assert seen[0].image_embedding.dtype == torch.float32
    assert seen[1].image_embedding is seen[0].image_embedding  # not converted again
    assert all(b is a for a, b in zip(seen[0].arrays(), seen[1].arrays()))
    assert np.array_equal(first.mask, real_decode(cached.to_float32(), click).mask)
    assert second.mask.shape == (120, 160)

    segmenter.segment("b", lambda: images["b"], click)  # two images are kept converted
    segmenter.segment("a", lambda: images["a"], click)
    assert seen[-1].image_embedding is seen[0].image_embedding
    segmenter.segment("c", lambda: images["c"], click)  # "b" is now the oldest: dropped
    segmenter.segment("b", lambda: images["b"], click)
    assert seen[-1].image_embedding is not seen[2].image_embedding
    assert len(segmenter._decodable) == 2
