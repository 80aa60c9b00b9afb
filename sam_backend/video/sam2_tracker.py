"""SAM 2.1 video tracking (``model_name=sam2``, every hiera size): the ``sam2`` package's own
``SAM2VideoPredictor`` (``add_new_points_or_box``, ``propagate_in_video``), built from the same
config yaml and checkpoint as the click model, with two changes to where things live:

- frames: ``init_state`` loads every frame of a path into memory; here the inference state's
  ``images`` is a :class:`~sam_backend.video.streaming.StreamedFrames` decoding from the
  :class:`~sam_backend.video.base.Clip` when the predictor indexes ``images[i]``, preprocessed
  exactly as ``sam2.utils.misc._load_img_as_tensor`` does (PIL resize to 1024x1024, /255,
  ImageNet mean/std);
- features: the predictor keeps the features of the last frame only; :class:`CachedFeaturePredictor`
  keeps each frame's backbone output (``backbone_fpn``: 1x32x256x256, 1x64x128x128, 1x256x64x64 =
  16 MiB in float32; the position encodings, the same for every frame, once) in the tracker's
  :class:`~sam_backend.video.streaming.FeatureCache`, so tracking again (a correction) encodes no
  frame that is still cached.

Everything else (memory attention, memory encoder, mask decoder, the video predictor's
post-processing: hole filling, binarised masks for the memory of prompted frames) is the
library's. A frame's mask is the predictor's video-resolution logits > 0; its box the mask's bounds.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from sam2.sam2_video_predictor import SAM2VideoPredictor

from sam_backend.models.loading import check_fits, read_state_dict, resolve_device
from sam_backend.models.registry import Variant, default_checkpoint
from sam_backend.video.base import BoxPrompt, Clip
from sam_backend.video.streaming import (MIB, FeatureCache, LibrarySession, SessionTracker,
                                         StreamedFrames, tensor_bytes)

log = logging.getLogger(__name__)

_IMG_MEAN = (0.485, 0.456, 0.406)  # sam2.utils.misc.load_video_frames' defaults
_IMG_STD = (0.229, 0.224, 0.225)


class CachedFeaturePredictor(SAM2VideoPredictor):
    """``SAM2VideoPredictor`` whose frame features come from the session's feature cache
    (``inference_state["feature_cache"]``: a :class:`_FrameFeatures`)."""

    def _get_image_feature(self, inference_state, frame_idx, batch_size):
        features: _FrameFeatures = inference_state["feature_cache"]
        backbone_out = features.get(frame_idx)
        if backbone_out is None:
            device = inference_state["device"]
            image = inference_state["images"][frame_idx].to(device).float().unsqueeze(0)
            backbone_out = self.forward_image(image)
            features.put(frame_idx, backbone_out)
        expanded = {
            "backbone_fpn": [f.to(inference_state["device"]).expand(batch_size, -1, -1, -1)
                             for f in backbone_out["backbone_fpn"]],
            "vision_pos_enc": [p.to(inference_state["device"]).expand(batch_size, -1, -1, -1)
                               for p in backbone_out["vision_pos_enc"]],
        }
        # the predictor's callers never read the image itself (the first item)
        return (None,) + self._prepare_backbone_features(expanded)


class _FrameFeatures:
    """One clip's view of the tracker's feature cache: ``backbone_fpn`` per frame, on the storage
    device; ``vision_pos_enc`` kept once (it depends on the input size only)."""

    def __init__(self, cache: FeatureCache, clip_key: str, storage: torch.device):
        self.cache, self.clip_key, self.storage = cache, clip_key, storage
        self.pos_enc = None

    def get(self, frame: int):
        fpn = self.cache.get((self.clip_key, frame))
        if fpn is None or self.pos_enc is None:
            return None
        return {"backbone_fpn": fpn, "vision_pos_enc": self.pos_enc}

    def put(self, frame: int, backbone_out) -> None:
        fpn = [f.to(self.storage) for f in backbone_out["backbone_fpn"]]
        if self.pos_enc is None:
            self.pos_enc = [p.to(self.storage) for p in backbone_out["vision_pos_enc"]]
        self.cache.put((self.clip_key, frame), fpn, tensor_bytes(fpn))


def sam2_yaml(variant: Variant) -> str:
    """The package config of a sam2 variant (``hiera_tiny`` -> configs/sam2.1/sam2.1_hiera_t.yaml,
    ``hiera_tiny_v2.0`` -> configs/sam2/sam2_hiera_t.yaml)."""
    from sam_backend.models.families import _SAM2_CONFIG_FILE

    config = variant.sam_config
    legacy = config.endswith("_v2.0")
    short = _SAM2_CONFIG_FILE[config[:-len("_v2.0")] if legacy else config]
    return f"configs/sam2/sam2_hiera_{short}.yaml" if legacy else \
        f"configs/sam2.1/sam2.1_hiera_{short}.yaml"


def build_video_predictor(variant: Variant) -> CachedFeaturePredictor:
    """The package's video predictor for ``variant`` (``build_sam2_video_predictor`` with its
    post-processing defaults), as :class:`CachedFeaturePredictor`, uninitialised weights, CPU."""
    from sam2.build_sam import build_sam2_video_predictor

    target = f"{CachedFeaturePredictor.__module__}.{CachedFeaturePredictor.__qualname__}"
    return build_sam2_video_predictor(sam2_yaml(variant), None, device="cpu",
                                      hydra_overrides_extra=[f"++model._target_={target}"])


def load_video_predictor(variant: Variant, checkpoint: Union[str, Path, None] = None,
                         device: Optional[str] = "cpu",
                         click_model: Optional[torch.nn.Module] = None) -> CachedFeaturePredictor:
    """The video predictor with ``checkpoint``'s weights (strict), or with ``click_model``'s own
    tensors (the loaded ``SAM2Base`` of the click model: the same state dict, shared, not copied)."""
    dev = resolve_device(device)
    predictor = build_video_predictor(variant)
    if click_model is not None:
        state = click_model.state_dict()
        source = "the click model's weights"
    else:
        path = Path(checkpoint) if checkpoint else default_checkpoint(variant)
        state = read_state_dict(path)
        check_fits(predictor, state, variant, path)
        source = str(path)
    # no gradients, before the weights are assigned: a click model loaded under
    # torch.inference_mode() holds inference tensors, which cannot become parameters that
    # require grad
    predictor.requires_grad_(False)
    predictor.load_state_dict(state, strict=True, assign=True)
    predictor.eval()
    log.info("SAM 2 video predictor %s ready from %s on %s", variant.key, source, dev)
    return predictor.to(dev)


class Sam2Session(LibrarySession):
    tracker_name = "sam2"

    def __init__(self, tracker: "Sam2Tracker", clip: Clip):
        super().__init__(clip, tracker.features)
        self.predictor = tracker.predictor
        self.device = tracker.device
        self.storage = torch.device("cpu")  # features and state offloaded (no-op on a CPU)
        size = int(self.predictor.image_size)
        mean = torch.tensor(_IMG_MEAN, dtype=torch.float32)[:, None, None]
        std = torch.tensor(_IMG_STD, dtype=torch.float32)[:, None, None]

        def preprocess(frame: np.ndarray) -> torch.Tensor:
            # sam2.utils.misc._load_img_as_tensor, from an RGB array instead of a file
            from PIL import Image

            pixels = np.array(Image.fromarray(frame).resize((size, size))) / 255.0
            image = torch.from_numpy(pixels).permute(2, 0, 1).float()
            return (image - mean) / std

        self.frames = StreamedFrames(clip, preprocess)
        self.frame_features = _FrameFeatures(tracker.features, clip.key, self.storage)

    def use_clip(self, clip: Clip) -> None:
        super().use_clip(clip)
        self.frames.reset(clip)

    def _new_state(self) -> dict:
        """What ``SAM2VideoPredictor.init_state`` (sam2 1.1.0) builds, over the streamed frames
        and the shared features instead of a path's frames all loaded."""
        info = self.clip.info
        return {
            "images": self.frames, "num_frames": info.frames,
            "offload_video_to_cpu": True, "offload_state_to_cpu": True,
            "video_height": info.height, "video_width": info.width,
            "device": self.device, "storage_device": self.storage,
            "point_inputs_per_obj": {}, "mask_inputs_per_obj": {},
            "cached_features": {}, "constants": {},
            "obj_id_to_idx": OrderedDict(), "obj_idx_to_id": OrderedDict(), "obj_ids": [],
            "output_dict_per_obj": {}, "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
            "feature_cache": self.frame_features,
        }

    def _add_box(self, state: dict, prompt: BoxPrompt) -> None:
        # A box on a frame already tracked is a correction: it becomes a conditioning frame like
        # the first box (its output kept by later propagations and in every frame's memory),
        # not the predictor's default for a tracked frame (a non-conditioning output that the
        # next propagate_in_video recomputes without the box).
        obj_idx = self.predictor._obj_id_to_idx(state, int(prompt.object_id))
        state["frames_tracked_per_obj"][obj_idx].pop(int(prompt.frame), None)
        state["output_dict_per_obj"][obj_idx]["non_cond_frame_outputs"].pop(int(prompt.frame), None)
        with torch.inference_mode():
            self.predictor.add_new_points_or_box(state, frame_idx=int(prompt.frame),
                                                 obj_id=int(prompt.object_id),
                                                 box=np.asarray(prompt.box, np.float32))

    def _propagate(self, state: dict, start: int, last: int
                   ) -> Iterator[Tuple[int, np.ndarray, Optional[float]]]:
        outputs = state["output_dict_per_obj"]
        for frame, _, masks in self.predictor.propagate_in_video(
                state, start_frame_idx=start, max_frame_num_to_track=last - start):
            out = outputs[0]["cond_frame_outputs"].get(frame) or \
                outputs[0]["non_cond_frame_outputs"].get(frame)
            score = None
            if out is not None and out.get("object_score_logits") is not None:
                score = float(torch.sigmoid(out["object_score_logits"].float()).flatten()[0])
            yield frame, (masks[0, 0] > 0.0).cpu().numpy(), score


class Sam2Tracker(SessionTracker):
    """SAM 2.1's video predictor behind :class:`~sam_backend.video.base.Tracker`."""

    name = "sam2"

    def __init__(self, predictor: CachedFeaturePredictor, feature_cache_mb: int = 2048,
                 max_sessions: int = 2):
        super().__init__(feature_cache_mb * MIB, max_sessions)
        self.predictor = predictor
        self.device = predictor.device

    def _new_session(self, clip: Clip) -> Sam2Session:
        return Sam2Session(self, clip)


def create_sam2_tracker(variant: Variant, checkpoint, device: Optional[str] = "cpu",
                        click_model: Any = None, feature_cache_mb: int = 2048,
                        max_sessions: int = 2) -> Sam2Tracker:
    """The tracker table's factory: ``click_model`` is the loaded click model
    (:class:`~sam_backend.models.sam2_runtime.Sam2Model`, either runtime) whose weights are
    shared, or None to load ``checkpoint``."""
    module = getattr(click_model, "model", None)
    predictor = load_video_predictor(variant, checkpoint, device, click_model=module)
    return Sam2Tracker(predictor, feature_cache_mb, max_sessions)
