"""A loaded model, its embedding cache and its memory of previous masks: what a request calls.

One :class:`Segmenter` per (variant, checkpoint, device, runtime) per process, shared by every
project and request (:func:`get_segmenter`). It is built lazily — never at import — and kept for
the life of the process.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from contextlib import contextmanager
from typing import Callable, Deque, Dict, Hashable, Iterator, Optional, Tuple

import numpy as np

from sam_backend.embeddings.memory import EmbeddingCache
from sam_backend.errors import SamBackendError
from sam_backend.models.base import Embedding, Prediction, Prompt, SegmentationModel

log = logging.getLogger(__name__)

ImageLoaderFn = Callable[[], np.ndarray]


class MaskMemory:
    """Low-res logits of recent predictions, keyed by (image, prompt sequence).

    Label Studio re-sends all of an object's points on every click, so the N-th request holds
    N points; the logits of the request made of its first N-1 points are the previous
    prediction on the same object, which SAM's interactive protocol feeds back as mask input.
    Bounded by entry count (each entry is 256 KiB).
    """

    def __init__(self, max_entries: int = 256):
        self.max_entries = max_entries
        self._items: "OrderedDict[Hashable, np.ndarray]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Optional[np.ndarray]:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, logits: np.ndarray) -> None:
        with self._lock:
            self._items[key] = logits
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)


def points_key(points: np.ndarray, labels: np.ndarray) -> Tuple:
    """A hashable identity of a point sequence (rounded to 1/100 px)."""
    return tuple((round(float(x), 2), round(float(y), 2), int(l))
                 for (x, y), l in zip(points, labels))


class EncoderGate:
    """At most ``slots`` image encoders run at once; interactive encodes go before background ones.

    An encoder already uses every core (intra-op threads), so running two at once only makes
    both slower. A waiting interactive encode (an annotator clicked on a new image) is let in
    before any waiting background encode (precompute of an opened task); a running encode is
    never interrupted.
    """

    def __init__(self, slots: int = 1):
        self.slots = slots
        self._running = 0
        self._interactive_waiting = 0
        self._cond = threading.Condition()

    @contextmanager
    def slot(self, interactive: bool) -> Iterator[None]:
        with self._cond:
            if interactive:
                self._interactive_waiting += 1
                try:
                    self._cond.wait_for(lambda: self._running < self.slots)
                finally:
                    self._interactive_waiting -= 1
            else:
                self._cond.wait_for(lambda: self._running < self.slots
                                    and self._interactive_waiting == 0)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()


class BackgroundEncoder:
    """A worker thread that encodes opened tasks' images, newest first.

    At most ``max_pending`` images wait; when more are queued, the oldest requests are dropped
    (an annotator who opened ten tasks in a row is looking at the last one).
    """

    def __init__(self, max_pending: int = 8):
        self.max_pending = max_pending
        self._pending: Deque[Tuple[Hashable, Callable[[], None]]] = deque()
        self._keys: set = set()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None

    def submit(self, key: Hashable, job: Callable[[], None]) -> bool:
        """Queue ``job`` under ``key`` unless that key is already queued."""
        with self._cond:
            if key in self._keys:
                return False
            self._pending.append((key, job))
            self._keys.add(key)
            while len(self._pending) > self.max_pending:
                old_key, _ = self._pending.popleft()
                self._keys.discard(old_key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="precompute", daemon=True)
                self._thread.start()
            self._cond.notify()
            return True

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending))
                key, job = self._pending.pop()  # newest first
            try:
                job()
            except SamBackendError as exc:  # the image's own problem: no trace needed
                log.warning("background encode of %r failed: %s", key, exc)
            except Exception:  # a background job must never kill the worker
                log.exception("background encode of %r failed", key)
            finally:
                with self._cond:
                    self._keys.discard(key)


class Segmenter:
    """Embeds images through the cache and decodes prompts on them with one loaded model.

    ``store_float16``: the cache holds embeddings in float16 (half the memory). Decoders take
    float32, so the float32 copy of the ``decode_images`` most recently clicked images is kept
    beside the cache: an image's embedding is converted once, not at every click.
    """

    def __init__(self, model: SegmentationModel, cache: EmbeddingCache,
                 memory: Optional[MaskMemory] = None, model_key: Optional[str] = None,
                 store_float16: bool = False, encoder_slots: int = 1, decode_images: int = 2):
        self.model = model
        self.cache = cache
        self.memory = memory or MaskMemory()
        self.model_key = model_key or model.describe()
        self.store_float16 = store_float16
        self.gate = EncoderGate(encoder_slots)
        self.background = BackgroundEncoder()
        self.encodes = 0  # image encoder runs in this process
        self.interactive_requests = 0  # embeddings a click asked for
        self.interactive_waits = 0  # ... and had to wait for an encoder (here or elsewhere)
        self._encodes_lock = threading.Lock()
        self._local = threading.local()
        # embedding key -> (the cached embedding, its float32 copy), most recently used last
        self._decodable: "OrderedDict[Tuple[str, str], Tuple[Embedding, Embedding]]" = OrderedDict()
        self._decodable_lock = threading.Lock()
        self.decode_images = decode_images

    def embedding_key(self, image_key: str) -> Tuple[str, str]:
        return (self.model_key, image_key)

    def embedding(self, image_key: str, load_image: ImageLoaderFn,
                  interactive: bool = True) -> Embedding:
        """The embedding of the image identified by ``image_key``; ``load_image`` (returning
        HxWx3 uint8 RGB) and the encoder run only when it is not cached."""

        def compute() -> Embedding:
            self._local.encoded = True
            image = load_image()  # I/O and decoding stay outside the encoder gate
            with self.gate.slot(interactive):
                with self._encodes_lock:
                    self.encodes += 1
                embedding = self.model.embed(image)
            return embedding.to_float16() if self.store_float16 else embedding

        key = self.embedding_key(image_key)
        ready = key in self.cache
        encoding = not ready and self.cache.pending(key)
        self._local.encoded = False
        value = self.cache.get_or_compute(key, compute)
        if interactive:
            tier_waited = getattr(self.cache.tier, "waited", None)
            waited = not ready and (encoding or self._local.encoded
                                    or bool(tier_waited and tier_waited()))
            with self._encodes_lock:
                self.interactive_requests += 1
                self.interactive_waits += int(waited)
        return value

    def precompute(self, image_key: str, load_image: ImageLoaderFn) -> bool:
        """Encode the image in the background unless it is cached or queued already."""
        if self.is_embedded(image_key) or self.cache.pending(self.embedding_key(image_key)):
            return False
        return self.background.submit(
            self.embedding_key(image_key),
            lambda: self.embedding(image_key, load_image, interactive=False))

    def is_embedded(self, image_key: str) -> bool:
        return self.embedding_key(image_key) in self.cache

    def is_pending(self, image_key: str) -> bool:
        """Whether the image's embedding is being computed in this process right now (a
        request asking for it waits for that one)."""
        return self.cache.pending(self.embedding_key(image_key))

    def segment(self, image_key: str, load_image: ImageLoaderFn, prompt: Prompt,
                memory_scope: Hashable = None) -> Prediction:
        """Embed (or reuse) the image, then :meth:`decode` ``prompt`` on it."""
        return self.decode(image_key, self.embedding(image_key, load_image), prompt, memory_scope)

    def decode(self, image_key: str, embedding: Embedding, prompt: Prompt,
               memory_scope: Hashable = None) -> Prediction:
        """Decode ``prompt`` on the image's embedding. With ``memory_scope`` (e.g. the control
        and label), a point prompt that extends a previous one on the same image and scope gets
        that prediction's low-res logits as mask input."""
        if prompt.box is None and len(prompt.points) > 1 and prompt.mask_input is None \
                and memory_scope is not None:
            previous = self.memory.get(
                (self.model_key, image_key, memory_scope,
                 points_key(prompt.points[:-1], prompt.labels[:-1])))
            if previous is not None:
                prompt = Prompt(prompt.points, prompt.labels, None, previous)
        prediction = self.model.decode(self.decodable(image_key, embedding), prompt)
        if prompt.box is None and memory_scope is not None:
            self.memory.put((self.model_key, image_key, memory_scope,
                             points_key(prompt.points, prompt.labels)),
                            prediction.low_res_logits)
        return prediction

    def decodable(self, image_key: str, embedding: Embedding) -> Embedding:
        """``embedding`` in float32, converted once per image: the same float32 copy while the
        cache hands out the same cached embedding (a re-encoded image is converted again)."""
        if not self.store_float16:
            return embedding.to_float32()  # already float32: no copy
        key = self.embedding_key(image_key)
        with self._decodable_lock:
            known = self._decodable.get(key)
            if known is not None and known[0] is embedding:
                self._decodable.move_to_end(key)
                return known[1]
        converted = embedding.to_float32()
        with self._decodable_lock:
            self._decodable[key] = (embedding, converted)
            self._decodable.move_to_end(key)
            while len(self._decodable) > self.decode_images:
                self._decodable.popitem(last=False)
        return converted


_SEGMENTERS: Dict[Tuple, Segmenter] = {}
_SEGMENTERS_LOCK = threading.Lock()


def get_segmenter(key: Tuple, build: Callable[[], Segmenter]) -> Segmenter:
    """The process-wide segmenter for ``key``, built once by ``build`` (thread-safe)."""
    with _SEGMENTERS_LOCK:
        segmenter = _SEGMENTERS.get(key)
        if segmenter is None:
            segmenter = build()
            _SEGMENTERS[key] = segmenter
        return segmenter
