"""SAM, HQ-SAM and MobileSAM (the SAM 1 decoder families): their builders, how their state dicts
are recognised, which runtime runs them (:func:`create_sam_model`, with :mod:`.onnx_runtime`), and
the PyTorch runtime: the variant's own modules, called the way ``SamPredictor`` calls them.

The steps mirror ``segment_anything.SamPredictor`` (and segment_anything_hq's, which passes the
encoder's intermediate features to the HQ decoder) so masks are pixel-identical to the packages'
predictors on the same weights; the difference is that the per-image state lives in an
:class:`~sam_backend.models.base.Embedding` instead of in the predictor, so one loaded model serves any
number of images and threads.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import torch

from sam_backend.models.loading import load_model, resolve_device
from sam_backend.models.base import (Candidates, Embedding, Prompt, SegmentationModel,
                                     candidates_of, check_image, resize_longest_side)
from sam_backend.models.registry import Variant

log = logging.getLogger(__name__)


# -- builders (the family table's ``Variant.builder``) ---------------------------------------------
def build_sam(config: str) -> torch.nn.Module:
    from segment_anything import sam_model_registry

    return sam_model_registry[config](checkpoint=None)


def build_sam_hq(config: str) -> torch.nn.Module:
    from segment_anything_hq import sam_model_registry

    return sam_model_registry[config](checkpoint=None)


def _mobile_sam_encoder_class():
    from segment_anything_hq.modeling.tiny_vit_sam import TinyViT

    class MobileSamEncoder(TinyViT):
        """segment_anything_hq's TinyViT returns ``(features, interm_embeddings)``; MobileSAM's
        image encoder returns the features only. Subclassing keeps every parameter name, so the
        official ``mobile_sam.pt`` (``image_encoder.patch_embed.*``, ``image_encoder.layers.*``,
        ``image_encoder.neck.*``) loads as is."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features, _interm = super().forward(x)
            return features

    return MobileSamEncoder


def build_mobile_sam() -> torch.nn.Module:
    # MobileSAM = SAM's prompt encoder + mask decoder around a TinyViT image encoder.
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    image_encoder = _mobile_sam_encoder_class()(
        img_size=1024, in_chans=3, num_classes=1000,
        embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
        use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
    )
    return Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


# -- state-dict recognisers (the family table's ``recognise``) ---------------------------------------
def _sam1_layout(state: Mapping[str, torch.Tensor]):
    """(is HQ-SAM, is TinyViT, ViT width or None) of a SAM 1 state dict, or None if it is not one."""
    if not any(k.startswith("mask_decoder.") for k in state) or \
            any(k.startswith("image_encoder.trunk.") for k in state):
        return None
    hq = any(k.startswith("mask_decoder.hf_token") for k in state)
    tiny = any(k.startswith("image_encoder.layers.") for k in state)
    pos = state.get("image_encoder.pos_embed")
    width = int(pos.shape[-1]) if pos is not None and pos.dim() == 4 else None
    return hq, tiny, width


_VIT_CONFIGS = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}


def recognise_sam(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    layout = _sam1_layout(state)
    if layout is None or layout[0] or layout[1] or layout[2] not in _VIT_CONFIGS:
        return None
    return f"sam/{_VIT_CONFIGS[layout[2]]}"


def recognise_sam_hq(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    layout = _sam1_layout(state)
    if layout is None or not layout[0]:
        return None
    if layout[1]:
        return "sam_hq/vit_tiny"
    return f"sam_hq/{_VIT_CONFIGS[layout[2]]}" if layout[2] in _VIT_CONFIGS else None


def recognise_mobile_sam(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    layout = _sam1_layout(state)
    return "mobile_sam/vit_t" if layout is not None and layout[1] and not layout[0] else None


# -- the runtime (the family table's ``create``) -------------------------------------------------------
def create_sam_model(variant: Variant, checkpoint: Union[str, Path, None], device: str,
                     runtime: str) -> SegmentationModel:
    """The variant's checkpoint loaded on ``device`` by ``runtime`` (torch or onnx, as
    :func:`~sam_backend.models.families.choose_runtime` chose it).

    onnx falls back to torch (with a logged warning) when onnxruntime is not installed or the
    checkpoint cannot be exported faithfully; it is a ConfigError on a device onnxruntime cannot
    use."""
    sam = None
    if runtime == "onnx":
        try:
            from sam_backend.models.onnx_runtime import OnnxExportError, OnnxSamModel
        except ImportError as exc:
            log.warning("onnxruntime cannot be imported (%s): running %s with torch", exc,
                        variant.key)
        else:
            try:
                return OnnxSamModel(variant, checkpoint, device)
            except OnnxExportError as exc:
                log.warning("cannot run %s with onnxruntime (%s): running it with torch",
                            variant.key, exc)
                sam = exc.sam
    if sam is not None:
        sam = sam.to(resolve_device(device))
    return TorchSamModel(variant, str(checkpoint) if checkpoint else None, device, sam=sam)


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
        interm = None
        if self._hq:
            out, interm = out[0], list(out[1])
        return Embedding(out, tuple(image.shape[:2]), input_size, interm_embeddings=interm)

    # -- prompt --------------------------------------------------------------------------------
    def dense_pe(self) -> torch.Tensor:
        with self._dense_pe_lock:
            if self._dense_pe is None:
                self._dense_pe = self.sam.prompt_encoder.get_dense_pe()
            return self._dense_pe

    @torch.inference_mode()
    def decode_low_res(self, embedding: Embedding, prompt: Prompt) -> Candidates:
        """Kx256x256 candidates in the padded 1024 input's low-res frame; K is 3 for an
        ambiguous single-point prompt (1 for HQ-SAM), else 1."""
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
            image_embeddings=embedding.image_embedding.to(device=device, dtype=torch.float32),
            image_pe=self.dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=prompt.multimask,
        )
        if self._hq:
            kwargs.update(hq_token_only=False,
                          interm_embeddings=[t.to(device=device, dtype=torch.float32)
                                             for t in embedding.interm_embeddings])
        low_res, iou = self.sam.mask_decoder(**kwargs)
        return candidates_of(low_res[0], iou[0])

    @torch.inference_mode()
    def upscale_mask(self, logits: np.ndarray, embedding: Embedding) -> np.ndarray:
        """``Sam.postprocess_masks`` (upscale to 1024, crop the input, resize to the image),
        thresholded at the model's mask_threshold."""
        chosen = torch.from_numpy(logits).to(self.sam.device)
        upscaled = self.sam.postprocess_masks(chosen[None], embedding.input_size,
                                              embedding.original_size)
        return (upscaled[0, 0] > self.sam.mask_threshold).cpu().numpy()
