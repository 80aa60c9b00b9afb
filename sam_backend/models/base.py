"""One interface for every SAM variant: embed an image once, decode masks from prompts.

Coordinate conventions (shared by every runtime):
- images are ``HxWx3 uint8`` RGB arrays in the frame Label Studio's coordinates refer to
  (EXIF orientation already applied);
- points are ``Nx2 float`` arrays of ``(x, y)`` in pixels of that image; labels ``N int``
  (1 = positive / foreground, 0 = negative / background);
- a box is ``4 float`` ``(x0, y0, x1, y1)`` in pixels;
- masks are ``HxW bool`` at the image's size; low-res logits ``1xhxw float32`` in the decoder's
  low-res frame: 1x256x256 for SAM, HQ-SAM, MobileSAM and SAM 2, 1x288x288 for SAM 3.

Multimask policy (SAM's own guidance): a prompt of a single point and no box is ambiguous, so the
decoder is asked for its 3 candidate masks and the one with the highest predicted IoU is kept;
several points, or a box, ask for a single mask. HQ-SAM's decoder already picks its best
candidate itself and returns one mask either way.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

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

    ``features``: the image embedding, 1x256xSxS (S = 64; SAM 3: 72), the decoder's main input.
    ``extra``: the other per-image arrays that runtime's decoder reads, in this fixed order
    (None when there are none); the arrays are precomputed from the image once so that a click
    does not redo them:

    ======================  =========  ==============================================================
    family                  runtime    ``extra``
    ======================  =========  ==============================================================
    sam, mobile_sam         any        None
    sam_hq                  torch      the encoder's intermediate features (``interm_embeddings``),
                                       a list of 1x64x64xC (C: the encoder's width)
    sam_hq                  onnx       ``[hq_features]`` 1x32x256x256: the HQ decoder's image-only
                                       first step, run by the encoder graph (see onnx_runtime)
    sam2                    any        ``high_res_feats`` ``[1x32x256x256, 1x64x128x128]``
    sam3                    torch      ``[1x32x288x288, 1x64x144x144]`` (FPN levels after the
                                       decoder's conv_s0/conv_s1), + the ViT output 1x5184x1024
                                       when the concept model shares it (``keep_vision_state``)
    ======================  =========  ==============================================================

    ``original_size``: (H, W) of the image; ``input_size``: (h, w) of the model input the image
    was resized to (SAM: long side 1024, before padding; SAM 2 / SAM 3: the square input).
    Arrays are torch tensors or numpy arrays, as the runtime made them; float32 from ``embed``,
    float16 when cached so (:meth:`to_float16`); decoders take float32.
    """

    features: Any
    extra: Optional[List[Any]]
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]

    @property
    def nbytes(self) -> int:
        arrays = [self.features] + list(self.extra or [])
        return int(sum(_nbytes(a) for a in arrays))

    def _cast(self, dtype_name: str) -> "Embedding":
        def cast(a):
            if isinstance(a, np.ndarray):
                return a.astype(dtype_name, copy=False)
            import torch

            return a.to(getattr(torch, dtype_name))

        return Embedding(cast(self.features), [cast(a) for a in self.extra] if self.extra else
                         self.extra, self.original_size, self.input_size)

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


def best_candidate(low_res: Any, iou: Any, to_mask: Callable[[Any], np.ndarray],
                   logit_bound: Optional[float] = None) -> Prediction:
    """The prediction of the candidate mask with the highest predicted IoU.

    ``low_res``: Kxhxw torch logits, ``iou``: K torch scores (the decoder's output for one prompt);
    ``to_mask``: the chosen 1xhxw logits -> HxW bool mask at the image's size (the runtime's own
    upscaling and threshold); ``logit_bound``: clamp the returned logits to +-bound (SAM 2's
    predictor returns them so)."""
    best = int(iou.argmax())
    chosen = low_res[best:best + 1]
    mask = to_mask(chosen)
    if logit_bound is not None:
        chosen = chosen.clamp(-logit_bound, logit_bound)
    return Prediction(mask, float(iou[best]), chosen.float().cpu().numpy())


class SegmentationModel(ABC):
    """A loaded variant on a device, behind the two calls every runtime provides."""

    variant: Variant
    device: str
    runtime: str

    @abstractmethod
    def embed(self, image: np.ndarray) -> Embedding:
        """Encode an HxWx3 uint8 RGB image (the expensive step, once per image)."""

    @abstractmethod
    def decode(self, embedding: Embedding, prompt: Prompt) -> Prediction:
        """The mask for ``prompt`` on the image ``embedding`` was computed from."""

    def describe(self) -> str:
        return f"{self.variant.key} ({self.runtime}, {self.device})"


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
