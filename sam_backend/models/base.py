"""One interface for every SAM variant: embed an image once, decode masks from prompts.

Coordinate conventions (shared by every runtime):
- images are ``HxWx3 uint8`` RGB arrays in the frame Label Studio's coordinates refer to
  (EXIF orientation already applied);
- points are ``Nx2 float`` arrays of ``(x, y)`` in pixels of that image; labels ``N int``
  (1 = positive / foreground, 0 = negative / background);
- a box is ``4 float`` ``(x0, y0, x1, y1)`` in pixels;
- masks are ``HxW bool`` at the image's size; low-res logits ``1xhxw float32`` in the decoder's
  low-res frame: 1x256x256 for SAM, HQ-SAM, MobileSAM and SAM 2, 1x288x288 for SAM 3. That frame
  covers the model input, not the image: SAM's 1024 square with the image resized (long side
  1024) in its top-left corner and zero padding; SAM 2's 1024 and SAM 3's 1008 square the image
  is squashed to. Only a runtime's own ``upscale_mask`` maps it back to the image.

The decode contract, the same for every runtime (:class:`SegmentationModel`):
``decode_low_res(embedding, prompt) -> Candidates`` (Kxhxw float32 numpy logits in the low-res
frame, K float32 predicted IoUs); ``upscale_mask(logits 1xhxw, embedding) -> HxW bool``;
``decode(embedding, prompt) -> Prediction`` = the best candidate, upscaled.

Multimask policy (SAM's own guidance): a prompt of a single point and no box is ambiguous, so the
decoder is asked for its 3 candidate masks and the one with the highest predicted IoU is kept;
several points, or a box, ask for a single mask. HQ-SAM's decoder already picks its best
candidate itself and returns one mask either way.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

import numpy as np

from sam_backend.errors import RequestError
from sam_backend.models.registry import Variant


@dataclass(frozen=True)
class Prompt:
    """What the annotator asked for on one object.

    ``points``: Nx2 float (x, y) pixels; ``labels``: N int (1 positive, 0 negative);
    ``box``: (x0, y0, x1, y1) pixels or None; ``mask_input``: the previous prediction's low-res
    logits on the same object (its :attr:`Prediction.low_res_logits`, 1xhxw float32), or None.
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    box: Optional[np.ndarray] = None
    mask_input: Optional[np.ndarray] = None

    def __post_init__(self):
        if len(self.points) != len(self.labels):
            raise RequestError("every prompt point needs a label")
        if len(self.points) == 0 and self.box is None:
            raise RequestError("a prompt needs at least one point or a box")

    @property
    def multimask(self) -> bool:
        return len(self.points) == 1 and self.box is None


@dataclass
class Embedding:
    """A variant's encoding of one image, made by one runtime's ``embed`` for the same runtime's
    ``decode`` (caches key embeddings by variant, runtime and dtype, so they never cross).

    Each part is a named field; a runtime fills the parts its decoder reads (the family table's
    ``embedding_parts`` lists them per runtime) and leaves the others None. They are computed from
    the image once, so that a click does not redo them:

    ======================  =================================================================
    part                    shape, and which families fill it
    ======================  =================================================================
    ``image_embedding``     1x256xSxS, the decoder's main input: every family (S = 64;
                            SAM 3: 72); SAM 2 / SAM 3 with their no-memory embedding added
    ``high_res_features``   the decoder's upscaling path, finest first: SAM 2
                            ``[1x32x256x256, 1x64x128x128]``; SAM 3 ``[1x32x288x288,
                            1x64x144x144]`` (FPN levels after the decoder's conv_s0/conv_s1)
    ``interm_embeddings``   HQ-SAM, torch runtime: the ViT's intermediate features, a list of
                            1x64x64xC (C: the encoder's width)
    ``hq_features``         HQ-SAM, onnx runtime: 1x32x256x256, the HQ decoder's image-only
                            first step, run by the encoder graph (see onnx_runtime)
    ``vision_state``        SAM 3 with ``keep_vision_state`` (concept_model=sam3): the ViT's
                            last hidden state 1x5184x1024, which the concept model's own neck
                            reads
    ======================  =================================================================

    ``original_size``: (H, W) of the image; ``input_size``: (h, w) of the model input the image
    was resized to (SAM: long side 1024, before padding; SAM 2 / SAM 3: the square input).
    Arrays are torch tensors or numpy arrays, as the runtime made them; float32 from ``embed``,
    float16 when cached so (:meth:`to_float16`); decoders take float32.
    """

    image_embedding: Any
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]
    high_res_features: Optional[List[Any]] = None
    interm_embeddings: Optional[List[Any]] = None
    hq_features: Optional[Any] = None
    vision_state: Optional[Any] = None

    #: every part, in a fixed order (the store writes them in it); list-valued ones in LIST_PARTS
    PARTS: ClassVar[Tuple[str, ...]] = ("image_embedding", "high_res_features",
                                        "interm_embeddings", "hq_features", "vision_state")
    LIST_PARTS: ClassVar[Tuple[str, ...]] = ("high_res_features", "interm_embeddings")

    def parts(self) -> Dict[str, Any]:
        """The parts that are set, by name, in :attr:`PARTS` order (a list part as its list)."""
        return {name: getattr(self, name) for name in self.PARTS
                if getattr(self, name) is not None}

    def arrays(self) -> List[Any]:
        """Every array of every part, flat."""
        flat: List[Any] = []
        for name, value in self.parts().items():
            flat.extend(value if name in self.LIST_PARTS else [value])
        return flat

    @property
    def nbytes(self) -> int:
        return int(sum(_nbytes(a) for a in self.arrays()))

    def map_arrays(self, fn: Callable[[Any], Any]) -> "Embedding":
        """A copy with ``fn`` applied to every array (sizes kept)."""
        changes = {name: [fn(a) for a in value] if name in self.LIST_PARTS else fn(value)
                   for name, value in self.parts().items()}
        return dataclasses.replace(self, **changes)

    def _cast(self, dtype_name: str) -> "Embedding":
        def cast(a):
            if isinstance(a, np.ndarray):
                return a.astype(dtype_name, copy=False)
            import torch

            return a.to(getattr(torch, dtype_name))

        return self.map_arrays(cast)

    def to_float16(self) -> "Embedding":
        """Half the bytes, for storage in the cache (see the measured tolerance in the README)."""
        return self._cast("float16")

    def to_float32(self) -> "Embedding":
        """What decoders take; a no-op (no copy) when already float32."""
        return self._cast("float32")


def _nbytes(array: Any) -> int:
    if isinstance(array, np.ndarray):
        return array.nbytes
    return array.element_size() * array.nelement()  # torch.Tensor


@dataclass
class Prediction:
    """The chosen mask (HxW bool), its predicted IoU, and its low-res logits (1xhxw float32, see
    the module docstring)."""

    mask: np.ndarray
    score: float
    low_res_logits: np.ndarray


@dataclass
class Candidates:
    """What a decoder proposes for one prompt (:meth:`SegmentationModel.decode_low_res`).

    ``logits``: Kxhxw float32 numpy, the candidate masks' logits in the decoder's low-res frame
    (h = w = 256; SAM 3: 288; the frame covers the model input: SAM's padded 1024 square, SAM 2's
    and SAM 3's squashed square); ``scores``: K float32 numpy, their predicted IoUs. K is 3 for an
    ambiguous prompt (:attr:`Prompt.multimask`), else 1; HQ-SAM gives 1 either way (its decoder
    picks its best candidate itself).
    """

    logits: np.ndarray
    scores: np.ndarray

    def best(self) -> int:
        """The candidate with the highest predicted IoU (the first of equal ones)."""
        return int(np.argmax(self.scores))


class SegmentationModel(ABC):
    """A loaded variant on a device, behind the calls every runtime provides.

    One decode contract for every runtime: :meth:`decode_low_res` (prompt -> :class:`Candidates`
    in the low-res frame) and :meth:`upscale_mask` (chosen logits -> HxW bool mask at the image's
    size); :meth:`decode` is the two together with SAM's multimask policy.
    """

    variant: Variant
    device: str
    runtime: str
    #: the returned logits are clamped to +-this (SAM 2's predictor returns them so); None: not
    logit_bound: Optional[float] = None

    @abstractmethod
    def embed(self, image: np.ndarray) -> Embedding:
        """Encode an HxWx3 uint8 RGB image (the expensive step, once per image)."""

    @abstractmethod
    def decode_low_res(self, embedding: Embedding, prompt: Prompt) -> Candidates:
        """The decoder's candidate masks for ``prompt`` (points and box in pixels of the image
        ``embedding`` was computed from) on that image (see :class:`Candidates`)."""

    @abstractmethod
    def upscale_mask(self, logits: np.ndarray, embedding: Embedding) -> np.ndarray:
        """1xhxw float32 low-res logits (one candidate) -> the HxW bool mask at
        ``embedding.original_size``."""

    def decode(self, embedding: Embedding, prompt: Prompt) -> Prediction:
        """The mask for ``prompt``: the candidate with the highest predicted IoU, upscaled."""
        candidates = self.decode_low_res(embedding, prompt)
        best = candidates.best()
        chosen = np.ascontiguousarray(candidates.logits[best:best + 1], dtype=np.float32)
        mask = self.upscale_mask(chosen, embedding)
        if self.logit_bound is not None:
            chosen = np.clip(chosen, -self.logit_bound, self.logit_bound)
        return Prediction(mask, float(candidates.scores[best]), chosen)

    def describe(self) -> str:
        return f"{self.variant.key} ({self.runtime}, {self.device})"


def candidates_of(low_res: Any, iou: Any) -> Candidates:
    """:class:`Candidates` from a torch decoder's Kxhxw logits and K scores."""
    return Candidates(low_res.detach().float().cpu().numpy(), iou.detach().float().cpu().numpy())


def check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 \
            or image.dtype != np.uint8:
        raise ValueError("images must be HxWx3 uint8 RGB arrays")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError("the image is empty (zero width or height)")


def resize_longest_side(target_length: int):
    """segment_anything's ``ResizeLongestSide`` (the long side to ``target_length``), except that
    the short side is never rounded to 0 pixels: an image wider than 2048:1 (3000x1, 5000x2)
    keeps a 1-pixel short side, and points, boxes and masks scale by the same factors. For every
    other image the sizes, and so the results, are the original's."""
    from segment_anything.utils.transforms import ResizeLongestSide

    class _ResizeLongestSide(ResizeLongestSide):
        @staticmethod
        def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> Tuple[int, int]:
            newh, neww = ResizeLongestSide.get_preprocess_shape(oldh, oldw, long_side_length)
            return max(1, newh), max(1, neww)

    return _ResizeLongestSide(target_length)
