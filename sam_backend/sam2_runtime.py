"""SAM 2 / 2.1 (``model_name=sam2``): the official ``sam2`` package's modules, called the way
``sam2.sam2_image_predictor.SAM2ImagePredictor`` calls them.

Masks are pixel-identical to ``SAM2ImagePredictor`` on the same weights
(tests/test_sam2.py); what differs is where the per-image state lives: the predictor keeps
``_features`` and ``_orig_hw`` on itself, this model returns them in an
:class:`~sam_backend.model.Embedding`, so one loaded model serves any number of images, threads
and cached embeddings, and a click never re-runs the image encoder.

The embedding of an image (1024x1024 model input, whatever the aspect ratio):

- ``features``: ``image_embed``, ``1x256x64x64`` (with SAM 2's ``no_mem_embed`` added, as the
  predictor does for single images);
- ``extra``: ``high_res_feats``, ``[1x32x256x256, 1x64x128x128]``, which the mask decoder's
  upscaling path uses.

16 MiB per image in float32, 8 MiB in float16 (MobileSAM/SAM: 4 / 2 MiB).

Prompts follow the predictor exactly: point coordinates are divided by the image's width/height
and multiplied by 1024 (SAM 2 squashes the image to a square, it does not pad); a box becomes
two points labelled 2 and 3 put *before* the clicks; the previous prediction's low-res logits
(clamped to [-32, 32], as the predictor returns them) are the mask input; masks are the
bilinear upscaling of the low-res logits to the image size, thresholded at 0.

Runtime: torch only. The mask decoder's ``dynamic_multimask_via_stability`` branch and the
Hiera encoder's windowed attention export to ONNX only with per-model work that has not been
checked against torch on every aspect ratio, so ``runtime=auto`` and ``runtime=onnx`` run torch,
saying why in the log (:data:`ONNX_REASON`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch

from .loading import load_model, resolve_device
from .model import Embedding, Prediction, Prompt, SegmentationModel, check_image
from .registry import Variant

log = logging.getLogger(__name__)

ONNX_REASON = ("no onnxruntime path for SAM 2 yet: its graphs (Hiera encoder, mask decoder with "
               "high-resolution features and the stability fallback) have not been exported and "
               "checked against torch on every aspect ratio")

# Backbone feature map sizes of a 1024x1024 input, finest first (SAM2ImagePredictor's
# ``_bb_feat_sizes``).
_FEAT_SIZES = [(256, 256), (128, 128), (64, 64)]


def create_sam2_model(variant: Variant, checkpoint: Union[str, Path, None], device: str,
                      runtime: str = "auto") -> "Sam2Model":
    """The registry's factory for ``family == "sam2"`` (see registry.Variant.factory)."""
    from .errors import ConfigError

    if runtime not in ("auto", "torch", "onnx"):
        raise ConfigError(f"runtime={runtime!r}: use auto, torch or onnx")
    if runtime != "torch":
        log.info("%s runs with torch (runtime=%s): %s", variant.key, runtime, ONNX_REASON)
    return Sam2Model(variant, str(checkpoint) if checkpoint else None, device)


class Sam2Model(SegmentationModel):
    runtime = "torch"

    def __init__(self, variant: Variant, checkpoint: Optional[str] = None,
                 device: Optional[str] = "cpu", model: Optional[torch.nn.Module] = None):
        from sam2.utils.transforms import SAM2Transforms

        self.variant = variant
        dev = resolve_device(device)
        self.device = str(dev)
        self.model = model if model is not None else load_model(variant, checkpoint, dev)
        self._dev = dev
        self.resolution = int(self.model.image_size)
        # The predictor's own transforms (resize to a square, ImageNet normalisation, coordinate
        # scaling, mask upscaling), with its defaults: threshold 0, no hole/sprinkle filling.
        self.transforms = SAM2Transforms(resolution=self.resolution, mask_threshold=0.0,
                                         max_hole_area=0.0, max_sprinkle_area=0.0)
        self.mask_threshold = 0.0
        with torch.inference_mode():
            self._dense_pe = self.model.sam_prompt_encoder.get_dense_pe()

    # -- image ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> Embedding:
        """Encode an HxWx3 uint8 RGB image; see the module docstring for the shapes."""
        check_image(image)
        x = self.transforms(image)[None].to(self._dev)
        backbone_out = self.model.forward_image(x)
        _, vision_feats, _, _ = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        feats = [feat.permute(1, 2, 0).reshape(1, -1, *size)
                 for feat, size in zip(vision_feats[::-1], _FEAT_SIZES[::-1])][::-1]
        return Embedding(feats[-1], list(feats[:-1]), tuple(image.shape[:2]),
                         (self.resolution, self.resolution))

    # -- prompt --------------------------------------------------------------------------------
    def _prompt_tensors(self, embedding: Embedding, prompt: Prompt):
        """(coords 1xNx2 float, labels 1xN int) in the 1024x1024 input frame, the box first."""
        coords: List[torch.Tensor] = []
        labels: List[torch.Tensor] = []
        orig_hw = embedding.original_size
        if prompt.box is not None:
            box = torch.as_tensor(np.asarray(prompt.box, np.float32), dtype=torch.float,
                                  device=self._dev)
            coords.append(self.transforms.transform_boxes(box, normalize=True, orig_hw=orig_hw))
            labels.append(torch.tensor([[2, 3]], dtype=torch.int, device=self._dev))
        if len(prompt.points):
            points = torch.as_tensor(np.asarray(prompt.points, np.float32), dtype=torch.float,
                                     device=self._dev)
            coords.append(self.transforms.transform_coords(points, normalize=True,
                                                           orig_hw=orig_hw)[None])
            labels.append(torch.as_tensor(np.asarray(prompt.labels), dtype=torch.int,
                                          device=self._dev)[None])
        return torch.cat(coords, dim=1), torch.cat(labels, dim=1)

    @torch.inference_mode()
    def decode_low_res(self, embedding: Embedding, prompt: Prompt):
        """Low-res logits (Kx256x256 float32 torch, unclamped) and IoU predictions (K); K is 3
        for an ambiguous single-point prompt, else 1."""
        masks = None
        if prompt.mask_input is not None:
            masks = torch.as_tensor(prompt.mask_input, dtype=torch.float, device=self._dev)
            if masks.dim() == 3:
                masks = masks[None]
        sparse, dense = self.model.sam_prompt_encoder(
            points=self._prompt_tensors(embedding, prompt), boxes=None, masks=masks)
        high_res = [f.to(device=self._dev, dtype=torch.float32) for f in embedding.extra]
        low_res, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=embedding.features.to(device=self._dev, dtype=torch.float32),
            image_pe=self._dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=prompt.multimask,
            repeat_image=False,
            high_res_features=high_res,
        )
        return low_res[0], iou[0]

    @torch.inference_mode()
    def decode(self, embedding: Embedding, prompt: Prompt) -> Prediction:
        low_res, iou = self.decode_low_res(embedding, prompt)
        best = int(torch.argmax(iou))
        chosen = low_res[best:best + 1]
        upscaled = self.transforms.postprocess_masks(chosen[None], embedding.original_size)
        mask = (upscaled[0, 0] > self.mask_threshold).cpu().numpy()
        logits = torch.clamp(chosen, -32.0, 32.0).float().cpu().numpy()
        return Prediction(mask, float(iou[best]), logits)
