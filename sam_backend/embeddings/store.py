"""The shared embedding store: embeddings in Redis, shared by every replica and worker of a team.

It is the second tier under the in-process LRU (:class:`~sam_backend.embeddings.memory.EmbeddingCache` calls
:meth:`EmbeddingStore.get_or_compute` on a memory miss): a miss in memory looks in Redis before
encoding, and every encode is written to Redis. The engine never knows which tier answered.

Keys
    ``sam_backend:emb:v<FORMAT_VERSION>:<model identity>:<sha256 of the image key>`` where the
    model identity is ``<variant>:<runtime>:<embedding dtype>:<checkpoint sha256[:16]>``
    (:func:`model_identity`), so deployments with different models never read each other's
    entries. The device is not part of it: a GPU replica and a CPU worker share embeddings.

Wire format (version 2), little-endian::

    b"SAMEMB\\0"  (7 bytes, magic)
    u16          format version (2)
    u32          header length N
    N bytes      header, UTF-8 JSON:
                 {"key": <the Redis key it was written under>,
                  "original_size": [H, W], "input_size": [h, w],
                  "parts": {"image_embedding": null, "high_res_features": 2, ...},
                  "arrays": [{"dtype": "<f2", "shape": [1, 256, 64, 64], "kind": "numpy"|"torch"}, ...],
                  "crc32": <zlib.crc32 of the payload>}
    payload      the arrays' bytes in C order, one after another, part by part in the header's order

``parts`` names the :class:`~sam_backend.models.base.Embedding`'s parts that are set, in
``Embedding.PARTS`` order: ``null`` for a single array, the list's length for a list part
(``high_res_features``, ``interm_embeddings``). Version 1 stored ``features`` + a positional
``extra`` list; its entries are under ``v1`` keys, which this version never reads. The format is
written over the parts generically (torch tensors are stored as numpy and come back as CPU
tensors), so a model family that fills more parts needs no change here; a part name this code does
not know is refused. Only numeric dtypes are accepted when reading (never pickle, never object
arrays). An entry that is truncated, corrupt (CRC), of another format version, or written under
another key is logged, deleted and recomputed — never served.

One encode per image across replicas: the first replica (or worker) to miss takes a Redis lock
(redis-py's :class:`~redis.lock.Lock`, expiring after ``wait_s`` so a crashed holder cannot block
anyone past it) and encodes; the others poll for the entry and take over the lock if it is freed or
expires without an entry; after ``wait_s`` they encode themselves.

Faults: when Redis cannot be reached (at start or mid-run) every call falls back to the local
encoder at once; this is logged once, not per request, Redis is tried again every
``retry_after`` seconds, and its return is logged.
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
import time
import zlib
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple
from urllib.parse import urlsplit

import numpy as np

from sam_backend.common.text import redact_url
from sam_backend.errors import ConfigError, SamBackendError
from sam_backend.models.base import Embedding

log = logging.getLogger(__name__)

MAGIC = b"SAMEMB\0"
FORMAT_VERSION = 2  # 2: named embedding parts (1: features + a positional extra list)
_PREFIX = struct.Struct("<7sHI")  # magic, version, header length
_ALLOWED_KINDS = "fiub"  # float, signed/unsigned int, bool: plain numbers only
KEY_ROOT = "sam_backend"


class StoreFormatError(SamBackendError):
    """A stored entry that cannot be decoded (truncated, corrupt, foreign, another version)."""


class StoreUnavailable(SamBackendError):
    """Redis cannot be reached right now (the caller falls back to the local encoder)."""


# -- the wire format ------------------------------------------------------------------------------

def _to_numpy(array: Any) -> Tuple[np.ndarray, str]:
    if isinstance(array, np.ndarray):
        return np.ascontiguousarray(array), "numpy"
    return np.ascontiguousarray(array.detach().cpu().numpy()), "torch"  # a torch.Tensor


def encode_embedding(embedding: Embedding, key: str) -> bytes:
    """``embedding`` as bytes (the module's wire format), stamped with the Redis ``key``."""
    parts: Dict[str, Optional[int]] = {}
    metas: List[Dict[str, Any]] = []
    chunks: List[bytes] = []
    for name, value in embedding.parts().items():
        is_list = name in Embedding.LIST_PARTS
        parts[name] = len(value) if is_list else None
        for array in (value if is_list else [value]):
            data, kind = _to_numpy(array)
            data = data.astype(data.dtype.newbyteorder("<"), copy=False)
            metas.append({"dtype": data.dtype.str, "shape": list(data.shape), "kind": kind})
            chunks.append(data.tobytes())
    payload = b"".join(chunks)
    header = json.dumps({
        "key": key,
        "original_size": [int(v) for v in embedding.original_size],
        "input_size": [int(v) for v in embedding.input_size],
        "parts": parts,
        "arrays": metas,
        "crc32": zlib.crc32(payload),
    }, separators=(",", ":")).encode("utf-8")
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + payload


def decode_embedding(data: bytes, key: str) -> Embedding:
    """The :class:`Embedding` stored in ``data`` under ``key``; :class:`StoreFormatError` when
    ``data`` is not a complete, intact entry of this format version written under ``key``."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < _PREFIX.size:
        raise StoreFormatError("entry too short for the header")
    magic, version, header_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise StoreFormatError("not an embedding entry (bad magic)")
    if version != FORMAT_VERSION:
        raise StoreFormatError(f"format version {version}, this code reads {FORMAT_VERSION}")
    start = _PREFIX.size + header_len
    if header_len > 1 << 20 or start > len(data):
        raise StoreFormatError("truncated header")
    try:
        header = json.loads(bytes(data[_PREFIX.size:start]).decode("utf-8"))
        stored_key = header["key"]
        original_size = tuple(int(v) for v in header["original_size"])
        input_size = tuple(int(v) for v in header["input_size"])
        parts = header["parts"]
        metas = header["arrays"]
        crc = int(header["crc32"])
        if not isinstance(parts, dict):
            raise StoreFormatError("header's parts are not a mapping")
        counts = []
        for name, count in parts.items():
            if name not in Embedding.PARTS:
                raise StoreFormatError(f"unknown embedding part {str(name)[:60]!r}")
            if name in Embedding.LIST_PARTS:
                ok = isinstance(count, int) and not isinstance(count, bool) and count >= 0
            else:
                ok = count is None
            if not ok:
                raise StoreFormatError(f"header's part {name} has a bad count {count!r}")
            counts.append((name, count))
        specs = []
        for meta in metas:
            dtype = np.dtype(str(meta["dtype"]))
            shape = tuple(int(v) for v in meta["shape"])
            if dtype.kind not in _ALLOWED_KINDS or dtype.hasobject or any(v < 0 for v in shape):
                raise StoreFormatError(f"refused array dtype/shape {meta['dtype']} {shape}")
            specs.append((dtype, shape, meta.get("kind", "numpy")))
    except StoreFormatError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise StoreFormatError(f"unreadable header ({type(exc).__name__}: {exc})") from None
    if stored_key != key:
        raise StoreFormatError(f"entry written under another key ({str(stored_key)[:120]!r})")
    if len(original_size) != 2 or len(input_size) != 2 or "image_embedding" not in parts:
        raise StoreFormatError("header lacks sizes or the image embedding")
    if sum(1 if count is None else count for _, count in counts) != len(specs):
        raise StoreFormatError("header's array count does not match")
    sizes = [int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for dtype, shape, _ in specs]
    if len(data) - start != sum(sizes):
        raise StoreFormatError(f"payload is {len(data) - start} bytes, the header says {sum(sizes)}")
    payload = bytearray(data[start:])  # writable: decoders may take the arrays as they are
    if zlib.crc32(payload) != crc:
        raise StoreFormatError("payload checksum mismatch")
    arrays = []
    offset = 0
    for (dtype, shape, kind), size in zip(specs, sizes):
        array = np.frombuffer(payload, dtype=dtype, count=size // dtype.itemsize,
                              offset=offset).reshape(shape)
        offset += size
        if kind == "torch":
            import torch

            array = torch.from_numpy(array)
        arrays.append(array)
    values: Dict[str, Any] = {}
    taken = 0
    for name, count in counts:
        if count is None:
            values[name] = arrays[taken]
            taken += 1
        else:
            values[name] = arrays[taken:taken + count]
            taken += count
    return Embedding(original_size=original_size, input_size=input_size, **values)


# -- identities -----------------------------------------------------------------------------------

def model_identity(variant_key: str, checkpoint_sha256: str, runtime: str,
                   embedding_dtype: str) -> str:
    """What an embedding depends on besides the image: ``variant:runtime:dtype:sha256[:16]``."""
    return f"{variant_key}:{runtime}:{embedding_dtype}:{checkpoint_sha256[:16]}"


def check_store_url(url: str) -> None:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"embedding_store={redact_url(url)!r}: use a Redis URL, e.g. "
                          "redis://127.0.0.1:6379/0 (rediss:// for TLS, unix:///path.sock)")


def connect(url: str, socket_timeout: Optional[float] = 10.0):
    """A redis-py client for ``url`` that fails fast: no retries, 1 s to connect."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    check_store_url(url)
    return redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=socket_timeout,
                                retry=Retry(NoBackoff(), 0), health_check_interval=0)


def _default_image_key(cache_key: Hashable) -> str:
    """The engine's cache keys are ``(model description, image key)``; the store keys by its own
    model identity and the image key only."""
    if isinstance(cache_key, tuple) and len(cache_key) == 2:
        return str(cache_key[1])
    return str(cache_key)


# -- the store ------------------------------------------------------------------------------------

class EmbeddingStore:
    """Embeddings of one model identity in one Redis database (thread-safe)."""

    def __init__(self, url: str, identity: str, ttl_s: int = 0, wait_s: float = 30.0,
                 retry_after: float = 2.0, poll_s: float = 0.05,
                 image_key_of: Callable[[Hashable], str] = _default_image_key):
        self.url = url
        self.display_url = redact_url(url)
        self.identity = identity
        self.ttl_s = int(ttl_s)
        self.wait_s = float(wait_s)
        self.retry_after = float(retry_after)
        self.poll_s = float(poll_s)
        self.image_key_of = image_key_of
        self._thread = threading.local()  # did this thread's last call wait for an encoder?
        self.client = connect(url)
        self.prefix = f"{KEY_ROOT}:emb:v{FORMAT_VERSION}:{identity}:"
        self._lock = threading.Lock()
        self._up: Optional[bool] = None  # None: not tried yet
        self._since = time.time()
        self._retry_at = 0.0
        self._last_error: Optional[str] = None
        # counters (per process)
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self.corrupt = 0
        self.lock_waits = 0
        self.errors = 0

    # -- keys ---------------------------------------------------------------------------------
    def key_for(self, image_key: str) -> str:
        return self.prefix + hashlib.sha256(image_key.encode("utf-8", "surrogatepass")).hexdigest()

    # -- availability ---------------------------------------------------------------------------
    @property
    def up(self) -> bool:
        return bool(self._up)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` against Redis; :class:`StoreUnavailable` (at once, without a network call
        while Redis is known to be down) when Redis cannot be reached."""
        import redis

        with self._lock:
            if self._up is False and time.monotonic() < self._retry_at:
                raise StoreUnavailable(f"the embedding store {self.display_url} is unreachable")
        try:
            result = fn()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._mark_down(exc)
            raise StoreUnavailable(f"the embedding store {self.display_url} is unreachable "
                                   f"({exc})") from None
        self._mark_up()
        return result

    def _mark_down(self, exc: BaseException) -> None:
        with self._lock:
            self.errors += 1
            self._retry_at = time.monotonic() + self.retry_after
            self._last_error = f"{type(exc).__name__}: {exc}"
            if self._up is False:
                return
            self._up = False
            self._since = time.time()
        log.warning("embedding store %s unreachable (%s): answering from memory and the local "
                    "encoder, retrying every %.0f s", self.display_url, self._last_error,
                    self.retry_after)

    def _mark_up(self) -> None:
        with self._lock:
            if self._up:
                return
            was = self._up
            self._up = True
            self._since = time.time()
            self._last_error = None
        if was is False:
            log.warning("embedding store %s reachable again: using it", self.display_url)
        else:
            log.info("embedding store %s connected (model %s)", self.display_url, self.identity)

    def check(self) -> bool:
        """Ping Redis (respecting the retry delay when it is down); True when it answered."""
        try:
            self._call(self.client.ping)
            return True
        except StoreUnavailable:
            return False

    def status(self) -> Dict[str, Any]:
        """What /health shows."""
        with self._lock:
            state = {None: "connecting", True: "up", False: "down"}[self._up]
            return {"url": self.display_url, "state": state, "since": self._since,
                    "model": self.identity, "ttl_s": self.ttl_s, "last_error": self._last_error}

    def counters(self) -> Dict[str, int]:
        return {"store_hits": self.hits, "store_misses": self.misses, "store_writes": self.writes,
                "store_corrupt": self.corrupt, "store_lock_waits": self.lock_waits,
                "store_errors": self.errors}

    # -- entries --------------------------------------------------------------------------------
    def load(self, image_key: str) -> Optional[Embedding]:
        """The stored embedding of ``image_key``, or None (a bad entry is logged and deleted)."""
        key = self.key_for(image_key)
        data = self._call(lambda: self.client.get(key))
        if data is None:
            return None
        try:
            return decode_embedding(data, key)
        except StoreFormatError as exc:
            with self._lock:
                self.corrupt += 1
            log.warning("embedding store entry %s (image %s) is unusable (%s): deleted, "
                        "recomputing", key, image_key, exc)
            try:
                self._call(lambda: self.client.delete(key))
            except StoreUnavailable:
                pass
            return None

    def contains(self, image_key: str) -> bool:
        key = self.key_for(image_key)
        return bool(self._call(lambda: self.client.exists(key)))

    def save(self, image_key: str, embedding: Embedding) -> bool:
        """Write ``embedding``; False (logged) when Redis refused it or is unreachable."""
        import redis

        key = self.key_for(image_key)
        data = encode_embedding(embedding, key)
        try:
            self._call(lambda: self.client.set(key, data, ex=self.ttl_s or None))
        except StoreUnavailable:
            return False
        except redis.ResponseError as exc:  # e.g. OOM with maxmemory and a noeviction policy
            log.warning("embedding store %s refused an entry of %d bytes: %s", self.display_url,
                        len(data), exc)
            return False
        with self._lock:
            self.writes += 1
        return True

    # -- the tier: one encode per image across replicas -----------------------------------------
    def get_or_compute(self, cache_key: Hashable, compute: Callable[[], Embedding]) -> Embedding:
        """The stored embedding, or ``compute()`` run once across every process sharing the
        store (and written to it). Falls back to ``compute()`` when Redis is unreachable."""
        image_key = self.image_key_of(cache_key)
        self._thread.waited = False
        try:
            value, lock = self._find_or_lock(image_key)
        except StoreUnavailable:
            return compute()
        if value is not None:
            return value
        try:
            value = compute()
            self.save(image_key, value)
            return value
        finally:
            if lock is not None:
                self._release(lock)

    def _find_or_lock(self, image_key: str):
        """(stored embedding, None), or (None, held lock), or (None, None) when the wait bound
        passed and the caller should encode without the lock."""
        from redis.exceptions import LockError

        value = self.load(image_key)
        if value is not None:
            with self._lock:
                self.hits += 1
            return value, None
        with self._lock:
            self.misses += 1
        key = self.key_for(image_key)
        deadline = time.monotonic() + self.wait_s
        waited = False
        while True:
            lock = self.client.lock(key + ":lock", timeout=max(self.wait_s, 1.0),
                                    blocking=False, thread_local=False)
            try:
                acquired = self._call(lock.acquire)
            except LockError:
                acquired = False
            if acquired:
                value = self.load(image_key)  # written between our miss and the lock
                if value is not None:
                    self._release(lock)
                    with self._lock:
                        self.hits += 1
                    return value, None
                return None, lock
            if not waited:
                waited = self._thread.waited = True
                with self._lock:
                    self.lock_waits += 1
                log.debug("image %s is being encoded elsewhere: waiting for it", image_key)
            if time.monotonic() >= deadline:
                log.info("waited %.0f s for another process to encode %s: encoding here",
                         self.wait_s, image_key)
                return None, None
            time.sleep(self.poll_s)
            value = self.load(image_key)
            if value is not None:
                with self._lock:
                    self.hits += 1
                return value, None

    def waited(self) -> bool:
        """Whether this thread's last :meth:`get_or_compute` waited for another's encode."""
        return bool(getattr(self._thread, "waited", False))

    def _release(self, lock) -> None:
        from redis.exceptions import LockError

        try:
            self._call(lock.release)
        except (LockError, StoreUnavailable):  # expired, taken over, or Redis gone: harmless
            pass
