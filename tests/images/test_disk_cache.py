"""The disk cache of downloaded images: across processes, bounded, least recently used out."""
from __future__ import annotations

import os

import numpy as np
import pytest

from sam_backend.errors import ImageError
from sam_backend.images.disk_cache import DiskCache

from tests.support.loopback_hosts import LEGACY_TOKEN, rgb_png


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

