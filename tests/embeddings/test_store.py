"""The shared embedding store: its wire format, and the Redis tier under the memory cache (a real
redis-server on loopback, real models with seeded random weights)."""
from __future__ import annotations

import json
import logging
import struct
import time

import numpy as np
import pytest
import torch

from tests.support.redis_utils import RedisServer, redis_server  # noqa: F401  (fixture)
from sam_backend.embeddings.memory import EmbeddingCache
from sam_backend.embeddings.engine import Segmenter
from sam_backend.common.text import redact_url
from sam_backend.errors import ConfigError
from sam_backend.models.base import Embedding, Prompt
from sam_backend.models.registry import get_variant
from sam_backend.settings import Settings
from sam_backend.embeddings.store import (EmbeddingStore, StoreFormatError, decode_embedding,
                               encode_embedding)
from sam_backend.models.torch_runtime import TorchSamModel
from tests.support.server_utils import free_port, run_together

KEY = "sam_backend:emb:v2:test:abc"


@pytest.fixture(scope="module")
def mobile_sam(checkpoint_factory):
    return TorchSamModel(get_variant("mobile_sam"), str(checkpoint_factory("mobile_sam")), "cpu")


@pytest.fixture(scope="module")
def image():
    from tests.support.random_weights import synthetic_image

    return synthetic_image(240, 320, seed=5)


@pytest.fixture(scope="module")
def embedding(mobile_sam, image):
    return mobile_sam.embed(image)


def as_numpy(e: Embedding) -> Embedding:
    return e.map_arrays(lambda a: a.numpy())


def same(a: Embedding, b: Embedding) -> None:
    """The same parts (names, list lengths), and arrays of the same kind, dtype, shape, values."""
    assert (a.original_size, a.input_size) == (b.original_size, b.input_size)
    assert {k: len(v) if isinstance(v, list) else None for k, v in a.parts().items()} == \
        {k: len(v) if isinstance(v, list) else None for k, v in b.parts().items()}
    for x, y in zip(a.arrays(), b.arrays()):
        assert type(x) is type(y)
        assert x.dtype == y.dtype and tuple(x.shape) == tuple(y.shape)
        assert np.array_equal(np.asarray(x), np.asarray(y))


# -- the wire format ------------------------------------------------------------------------------

def test_round_trip_keeps_arrays_kinds_dtypes_and_sizes(mobile_sam, embedding):
    for variant in (embedding, embedding.to_float16(), as_numpy(embedding),
                    as_numpy(embedding).to_float16()):
        back = decode_embedding(encode_embedding(variant, KEY), KEY)
        same(variant, back)
    # a decoded embedding decodes to the very same mask
    prompt = Prompt(np.array([[100.0, 80.0]], np.float32), np.array([1]))
    back = decode_embedding(encode_embedding(embedding, KEY), KEY)
    assert np.array_equal(mobile_sam.decode(back, prompt).mask,
                          mobile_sam.decode(embedding, prompt).mask)


def test_round_trip_of_an_embedding_with_extra_arrays(checkpoint_factory, image):
    """HQ-SAM's embedding carries the encoder's intermediate features (``interm_embeddings``, a
    list part); the format stores every named part, lists of any length."""
    hq = TorchSamModel(get_variant("sam_hq", "vit_tiny"), str(checkpoint_factory("sam_hq", "vit_tiny")),
                       "cpu")
    embedding = hq.embed(image)
    assert embedding.interm_embeddings and set(embedding.parts()) == {"image_embedding",
                                                                       "interm_embeddings"}
    back = decode_embedding(encode_embedding(embedding.to_float16(), KEY), KEY)
    same(embedding.to_float16(), back)
    prompt = Prompt(np.array([[50.0, 60.0], [200.0, 100.0]], np.float32), np.array([1, 0]))
    assert np.array_equal(hq.decode(back.to_float32(), prompt).mask,
                          hq.decode(embedding.to_float16().to_float32(), prompt).mask)
    # every part at once, mixed kinds, and an empty list part
    mixed = Embedding(np.zeros((1, 2, 3), np.float32), (3, 4), (5, 6),
                      high_res_features=[torch.ones(4, dtype=torch.int64), np.array([True])],
                      interm_embeddings=[], hq_features=torch.zeros(2, 2),
                      vision_state=np.ones((1, 3, 2), np.float16))
    back = decode_embedding(encode_embedding(mixed, KEY), KEY)
    same(mixed, back)
    assert back.interm_embeddings == [] and back.vision_state.shape == (1, 3, 2)
    empty = Embedding(np.zeros((2,), np.float16), (1, 1), (1, 1))
    same(empty, decode_embedding(encode_embedding(empty, KEY), KEY))


def test_bad_entries_are_refused(embedding):
    good = encode_embedding(embedding.to_float16(), KEY)
    header_len = struct.unpack_from("<I", good, 9)[0]
    header = json.loads(good[13:13 + header_len])

    def with_header(**changes):
        h = json.dumps(dict(header, **changes)).encode()
        return good[:9] + struct.pack("<I", len(h)) + h + good[13 + header_len:]

    flipped = bytearray(good)
    flipped[-100] ^= 0xFF
    bad = {
        "empty": b"",
        "garbage": b"not an embedding at all",
        "truncated header": good[:20],
        "truncated payload": good[:-1],
        "longer payload": good + b"\0",
        "flipped byte": bytes(flipped),
        "magic": b"PICKLE\0" + good[7:],
        "version": good[:7] + struct.pack("<H", 99) + good[9:],
        "version 1": good[:7] + struct.pack("<H", 1) + good[9:],
        "foreign key": with_header(key="sam_backend:emb:v2:other-model:abc"),
        "object dtype": with_header(arrays=[dict(header["arrays"][0], dtype="|O")]),
        "header not json": good[:13] + b"{" * header_len + good[13 + header_len:],
        "missing field": with_header(original_size=None),
        "unknown part": with_header(parts=dict(header["parts"], features=None)),
        "no image embedding": with_header(parts={"vision_state": None}),
        "list count on a single part": with_header(parts={"image_embedding": 1}),
        "array count": with_header(parts={"image_embedding": None, "high_res_features": 2}),
        "version 1 layout": with_header(parts=None, extra=None),
    }
    for name, data in bad.items():
        with pytest.raises(StoreFormatError):
            decode_embedding(data, KEY)
            pytest.fail(f"{name} was accepted")


def test_settings_and_urls():
    assert Settings.load({"embedding_store": "redis://127.0.0.1:6379/2"}, environ={}) \
        .embedding_store == "redis://127.0.0.1:6379/2"
    assert Settings.load({}, environ={"EMBEDDING_STORE": "redis://h:1/0"}).embedding_store
    with pytest.raises(ConfigError, match="Redis URL"):
        Settings.load({"embedding_store": "http://127.0.0.1:6379"}, environ={})
    with pytest.raises(ConfigError):
        Settings.load({"embedding_store_ttl": "-1"}, environ={})
    assert redact_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert "s3cret" not in redact_url("redis://user:s3cret@h/0")


# -- the Redis tier -------------------------------------------------------------------------------

def replica(model, url, **kw) -> Segmenter:
    """One replica's segmenter: its own memory cache over its own client of the shared store."""
    store = EmbeddingStore(url, "mobile_sam/vit_t:torch:float16:test", **kw)
    return Segmenter(model, EmbeddingCache(64 << 20, store), store_float16=True)


@pytest.mark.process
def test_a_second_replica_gets_the_first_ones_encode(mobile_sam, image, redis_server):
    a = replica(mobile_sam, redis_server.url, ttl_s=300)
    b = replica(mobile_sam, redis_server.url)
    ea = a.embedding("img-1", lambda: image)
    eb = b.embedding("img-1", lambda: image)
    assert (a.encodes, b.encodes) == (1, 0)
    assert b.cache.tier.hits == 1 and a.cache.tier.writes == 1
    same(ea, eb)
    # the entry is bytes of the documented format, under the model identity's key, with the TTL
    key = a.cache.tier.key_for("img-1")
    assert key.startswith("sam_backend:emb:v2:mobile_sam/vit_t:torch:float16:test:")
    assert redis_server.client().get(key)[:7] == b"SAMEMB\0"
    assert 0 < redis_server.client().ttl(key) <= 300


@pytest.mark.process
def test_eight_concurrent_first_requests_over_two_replicas_encode_once(mobile_sam, image,
                                                                      redis_server):
    replicas = [replica(mobile_sam, redis_server.url), replica(mobile_sam, redis_server.url)]
    results, errors = run_together(
        lambda i: replicas[i % 2].embedding("img-8", lambda: image), 8, timeout=60, barrier_timeout=10)
    assert not errors
    assert sum(r.encodes for r in replicas) == 1
    assert sum(r.cache.tier.hits for r in replicas) == 1  # the other replica read the entry
    assert sum(r.cache.tier.lock_waits for r in replicas) <= 1
    for r in results[1:]:
        same(results[0], r)


@pytest.mark.process
def test_garbage_under_a_key_is_recomputed_and_logged(mobile_sam, image, redis_server, caplog):
    a = replica(mobile_sam, redis_server.url)
    key = a.cache.tier.key_for("img-bad")
    redis_server.client().set(key, b"\x80\x04garbage that is not an entry")
    with caplog.at_level(logging.WARNING, logger="sam_backend.embeddings.store"):
        value = a.embedding("img-bad", lambda: image)
    assert a.encodes == 1 and a.cache.tier.corrupt == 1
    assert any("unusable" in r.getMessage() and "img-bad" in r.getMessage() for r in caplog.records)
    # the entry was replaced by a good one
    same(value, decode_embedding(redis_server.client().get(key), key))
    # a truncated entry too
    b = replica(mobile_sam, redis_server.url)
    redis_server.client().set(key, redis_server.client().get(key)[:-10])
    b.embedding("img-bad", lambda: image)
    assert b.encodes == 1 and b.cache.tier.corrupt == 1


@pytest.mark.process
def test_a_crashed_lock_holder_blocks_nobody_past_the_expiry(mobile_sam, image, redis_server):
    a = replica(mobile_sam, redis_server.url, wait_s=30)
    key = a.cache.tier.key_for("img-crash")
    # a holder that died after taking the lock: it expires in 1 s and is never released
    crashed = redis_server.client().lock(key + ":lock", timeout=1)
    assert crashed.acquire(blocking=False)
    a.embedding("img-crash", lambda: image)
    assert a.encodes == 1 and a.cache.tier.lock_waits == 1 and a.cache.tier.writes == 1
    # a holder that is merely slow: after the wait bound the replica encodes itself
    b = replica(mobile_sam, redis_server.url, wait_s=0.5)
    key = b.cache.tier.key_for("img-slow")
    assert redis_server.client().lock(key + ":lock", timeout=60).acquire(blocking=False)
    b.embedding("img-slow", lambda: image)
    assert b.encodes == 1 and b.cache.tier.lock_waits == 1


@pytest.mark.process
def test_redis_down_at_start_then_back(mobile_sam, image, tmp_path, caplog):
    port = free_port()
    server = RedisServer(tmp_path, port)
    a = replica(mobile_sam, server.url, retry_after=0.2)
    with caplog.at_level(logging.INFO, logger="sam_backend.embeddings.store"):
        for i in range(2):
            a.embedding(f"down-{i}", lambda: image)
        assert a.encodes == 2
        assert a.cache.tier.status()["state"] == "down"
        downs = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(downs) == 1  # logged once, not per request
        server.start()
        try:
            time.sleep(0.3)
            a.embedding("up-1", lambda: image)
            assert a.cache.tier.status()["state"] == "up" and a.cache.tier.writes == 1
            assert any("reachable again" in r.getMessage() for r in caplog.records)
            b = replica(mobile_sam, server.url)
            b.embedding("up-1", lambda: image)
            assert b.encodes == 0 and b.cache.tier.hits == 1
        finally:
            server.stop()
