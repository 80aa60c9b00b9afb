"""The embedding cache: hits skip the encoder, the byte bound evicts LRU, single-flight."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sam_backend.embeddings.memory import EmbeddingCache
from sam_backend.embeddings.engine import Segmenter
from sam_backend.models.base import Prompt
from sam_backend.models.registry import get_variant
from sam_backend.models.torch_runtime import TorchSamModel


class Blob:
    def __init__(self, nbytes):
        self.nbytes = nbytes


class CountingModel(TorchSamModel):
    """The real MobileSAM runtime, counting encoder runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder_calls = 0
        self._count_lock = threading.Lock()

    def embed(self, image):
        with self._count_lock:
            self.encoder_calls += 1
        return super().embed(image)


@pytest.fixture(scope="module")
def mobile_sam(checkpoint_factory):
    return CountingModel(get_variant("mobile_sam"), str(checkpoint_factory("mobile_sam")), "cpu")


def test_cache_hit_does_not_run_the_encoder(mobile_sam, image_factory):
    segmenter = Segmenter(mobile_sam, EmbeddingCache(1 << 30))
    image = image_factory(240, 320)
    loads = []

    def load():
        loads.append(1)
        return image

    before = mobile_sam.encoder_calls
    prompt = Prompt(np.array([[100.0, 120.0]]), np.array([1]))
    first = segmenter.segment("img-a", load, prompt)
    second = segmenter.segment("img-a", load, Prompt(np.array([[200.0, 60.0]]), np.array([1])))
    third = segmenter.segment("img-a", load, prompt)
    assert mobile_sam.encoder_calls - before == 1
    assert len(loads) == 1  # the image is not even loaded again
    assert np.array_equal(first.mask, third.mask)
    assert second.mask.shape == (240, 320)
    segmenter.segment("img-b", lambda: image_factory(200, 200, seed=5), prompt)
    assert mobile_sam.encoder_calls - before == 2


def test_byte_bound_evicts_least_recently_used():
    cache = EmbeddingCache(max_bytes=300)
    for key in "abc":
        cache.put(key, Blob(100))
    assert cache.nbytes == 300
    assert cache.get("a") is not None  # a is now the most recently used; b the least
    cache.put("d", Blob(100))
    assert "b" not in cache
    assert all(k in cache for k in "acd")
    cache.put("e", Blob(250))  # needs room of 3 entries: c, a, d leave in LRU order
    assert [k for k in "abcde" if k in cache] == ["e"]
    assert cache.nbytes == 250


def test_value_larger_than_the_bound_is_not_cached():
    cache = EmbeddingCache(max_bytes=100)
    cache.put("a", Blob(50))
    assert cache.get_or_compute("big", lambda: Blob(101)).nbytes == 101
    assert "big" not in cache and "a" in cache


def test_real_embeddings_are_counted_in_bytes(mobile_sam, image_factory):
    embedding = mobile_sam.embed(image_factory(64, 96))
    assert embedding.nbytes == 256 * 64 * 64 * 4  # 1x256x64x64 float32
    cache = EmbeddingCache(max_bytes=2 * embedding.nbytes)
    for key in "xyz":
        cache.put(key, embedding)
    assert len(cache) == 2 and "x" not in cache


def test_eight_concurrent_requests_for_one_new_image_run_the_encoder_once(mobile_sam,
                                                                        image_factory):
    segmenter = Segmenter(mobile_sam, EmbeddingCache(1 << 30))
    image = image_factory(300, 400, seed=9)
    barrier = threading.Barrier(8)
    before = mobile_sam.encoder_calls

    def click(i):
        barrier.wait()
        return segmenter.segment("same-image", lambda: image,
                                 Prompt(np.array([[50.0 + 30 * i, 100.0]]), np.array([1])))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(click, range(8)))
    assert mobile_sam.encoder_calls - before == 1
    assert all(r.mask.shape == (300, 400) for r in results)


def test_single_flight_failure_reaches_every_waiter_and_is_not_cached():
    cache = EmbeddingCache(1000)
    started = threading.Event()
    calls = []

    def failing():
        calls.append(1)
        started.set()
        time.sleep(0.2)
        raise RuntimeError("encoder failed")

    def waiter():
        started.wait()
        return cache.get_or_compute("k", lambda: Blob(1))

    with ThreadPoolExecutor(4) as pool:
        owner = pool.submit(cache.get_or_compute, "k", failing)
        waiters = [pool.submit(waiter) for _ in range(3)]
        with pytest.raises(RuntimeError):
            owner.result()
        outcomes = []
        for w in waiters:
            try:
                outcomes.append(w.result())
            except RuntimeError:
                outcomes.append("failed")
    assert len(calls) == 1
    # waiters that joined the failed flight see the failure; the key is not poisoned
    assert "k" not in cache or cache.get("k").nbytes == 1
    assert cache.get_or_compute("k", lambda: Blob(7)).nbytes in (1, 7)
