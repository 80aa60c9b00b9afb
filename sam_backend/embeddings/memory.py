"""The process-wide embedding cache.

Policy: bounded in bytes (the sum of the cached embeddings' ``nbytes``), least-recently-used
eviction, thread-safe, and single-flight — concurrent requests for the same missing key run the
compute function once and all receive its result (or its exception; failures are not cached).

The cache knows nothing of models or images: keys are hashable values, values anything with an
``nbytes`` attribute. A second tier (``tier``: anything with ``get_or_compute(key, compute)``,
e.g. the shared Redis store of :mod:`sam_backend.embeddings.store`) sits under it: a miss in memory asks the
tier, which answers from its own storage or runs ``compute``; callers never know which tier
answered.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, Dict, Hashable, TypeVar

log = logging.getLogger(__name__)

V = TypeVar("V")


class EmbeddingCache:
    def __init__(self, max_bytes: int, tier=None):
        if max_bytes <= 0:
            raise ValueError("the embedding cache needs a positive byte bound")
        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[Hashable, object]" = OrderedDict()
        self._bytes = 0
        self._inflight: Dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self.tier = tier
        self.hits = 0
        self.misses = 0

    # -- reads ---------------------------------------------------------------------------------
    def get(self, key: Hashable):
        """The cached value (marking it most recently used), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def pending(self, key: Hashable) -> bool:
        """True while some thread is computing ``key``."""
        with self._lock:
            return key in self._inflight

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    # -- compute -------------------------------------------------------------------------------
    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> V:
        """The value for ``key``, computing it once if missing (single-flight)."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return value
            future = self._inflight.get(key)
            owner = future is None
            if owner:
                future = Future()
                self._inflight[key] = future
                self.misses += 1
        if not owner:
            return future.result()
        try:
            value = compute() if self.tier is None else self.tier.get_or_compute(key, compute)
        except BaseException as exc:
            with self._lock:
                del self._inflight[key]
            future.set_exception(exc)
            raise
        with self._lock:
            del self._inflight[key]
            self._put_locked(key, value)
        future.set_result(value)
        return value

    def put(self, key: Hashable, value) -> None:
        with self._lock:
            self._put_locked(key, value)

    def _put_locked(self, key: Hashable, value) -> None:
        size = int(value.nbytes)
        if key in self._items:
            self._bytes -= int(self._items.pop(key).nbytes)
        if size > self.max_bytes:
            log.warning("an embedding of %d bytes exceeds the cache bound of %d bytes: not cached",
                        size, self.max_bytes)
            return
        self._items[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            old_key, old = self._items.popitem(last=False)
            self._bytes -= int(old.nbytes)
            log.debug("evicted embedding %r (%d bytes)", old_key, old.nbytes)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
