"""The PyTorch runtime: the variant's own modules, called the way ``SamPredictor`` calls them.

The steps mirror ``segment_anything.SamPredictor`` (and segment_anything_hq's, which passes the
encoder's intermediate features to the HQ decoder) so masks are pixel-identical to the packages'
predictors on the same weights; the difference is that the per-image state lives in an
:class:`~sam_backend.models.base.Embedding` instead of in the predictor, so one loaded model serves any
number of images and threads.
"""
from __future__ import annotations

import threading
from typing import Optional, Union

import numpy as np
import torch

from sam_backend.models.loading import load_model, resolve_device
from sam_backend.models.base import (Embedding, Prediction, Prompt, SegmentationModel,
                                     best_candidate, check_image, resize_longest_side)
from sam_backend.models.registry import Variant


class TorchSamModel(SegmentationModel):
    runtime = "torch"

    def __init__(self, variant: Variant, checkpoint: Union[str, None] = None,
                 device: Optional[str] = "cpu", sam: Optional[torch.nn.Module] = None):
        self.variant = variant
        dev = resolve_device(device)
        self.device = str(dev)
        self.sam = sam if sam is not None else load_model(variant, checkpoint, dev)
        self.transform = resize_longest_side(self.sam.image_encoder.img_size)
        self._hq = variant.family == "sam_hq"
        # The decoder is small; running several at once on the same module is safe in
        # inference mode, but the prompt encoder's dense positional encoding is cached here.
        self._dense_pe_lock = threading.Lock()
        self._dense_pe: Optional[torch.Tensor] = None

    # -- image ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> Embedding:
        check_image(image)
        resized = self.transform.apply_image(image)
        x = torch.as_tensor(resized, device=self.sam.device).permute(2, 0, 1).contiguous()[None]
        input_size = tuple(x.shape[-2:])
        out = self.sam.image_encoder(self.sam.preprocess(x))
        if self._hq:
            features, interm = out
            extra = list(interm)
        else:
            features, extra = out, None
        return Embedding(features, extra, tuple(image.shape[:2]), input_size)

    # -- prompt --------------------------------------------------------------------------------
    def dense_pe(self) -> torch.Tensor:
        with self._dense_pe_lock:
            if self._dense_pe is None:
                self._dense_pe = self.sam.prompt_encoder.get_dense_pe()
            return self._dense_pe

    @torch.inference_mode()
    def decode_low_res(self, embedding: Embedding, prompt: Prompt):
        """Low-res logits (Kx256x256 torch) and IoU predictions (K) for ``prompt``; K is 3 for
        an ambiguous single-point prompt (1 for HQ-SAM), else 1."""
        device = self.sam.device
        points = None
        if len(prompt.points):
            coords = self.transform.apply_coords(np.asarray(prompt.points, np.float32),
                                                 embedding.original_size)
            points = (torch.as_tensor(coords, dtype=torch.float, device=device)[None],
                      torch.as_tensor(prompt.labels, dtype=torch.int, device=device)[None])
        boxes = None
        if prompt.box is not None:
            box = self.transform.apply_boxes(np.asarray(prompt.box, np.float32)[None],
                                             embedding.original_size)
            boxes = torch.as_tensor(box, dtype=torch.float, device=device)
        masks = None
        if prompt.mask_input is not None:
            masks = torch.as_tensor(prompt.mask_input, dtype=torch.float, device=device)[None]
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=masks)
        kwargs = dict(
            image_embeddings=embedding.features.to(device=device, dtype=torch.float32),
            image_pe=self.dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=prompt.multimask,
        )
        if self._hq:
            kwargs.update(hq_token_only=False,
                          interm_embeddings=[t.to(device=device, dtype=torch.float32)
                                             for t in embedding.extra])
        low_res, iou = self.sam.mask_decoder(**kwargs)
        return low_res[0], iou[0]

    @torch.inference_mode()
    def decode(self, embedding: Embedding, prompt: Prompt) -> Prediction:
        def to_mask(chosen: torch.Tensor) -> np.ndarray:
            upscaled = self.sam.postprocess_masks(chosen[None], embedding.input_size,
                                                  embedding.original_size)
            return (upscaled[0, 0] > self.sam.mask_threshold).cpu().numpy()

        return best_candidate(*self.decode_low_res(embedding, prompt), to_mask)
