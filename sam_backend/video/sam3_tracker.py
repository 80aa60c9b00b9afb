"""SAM 3 video tracking (``model_name=sam3``): transformers' ``Sam3TrackerVideoModel`` and
``Sam3TrackerVideoProcessor``, loaded from the same checkpoint directory as the click model
(the official layout's ``tracker_model.*`` memory modules on the detector's backbone with
``tracker_neck``; see :mod:`sam_backend.models.sam3_runtime`).

The steps are the library's documented video flow (``init_video_session``,
``add_inputs_to_inference_session``, ``model(inference_session, frame_idx)`` on the prompted
frame, ``propagate_in_video_iterator``, ``post_process_masks``), with two changes to where
things live:

- frames: the session's ``processed_frames`` is a
  :class:`~sam_backend.video.streaming.StreamedFrames` decoding from the clip when the model asks
  for frame ``i`` (each frame through the processor's own video processor, as a one-frame video),
  instead of the whole video preprocessed up front (12 MiB per frame) or appended frame by frame
  in streaming mode (which keeps every frame it was given);
- features: the session's vision-feature cache (one frame by default) is replaced by the
  tracker's byte-bounded :class:`~sam_backend.video.streaming.FeatureCache` (21 MiB per frame:
  1x32x288x288 + 1x64x144x144 + 1x256x72x72 float32; the position encodings, the same for every
  frame, kept once), so tracking again (a correction) encodes no frame still cached.

A frame's mask is ``post_process_masks`` (bilinear to the video size) of the object's logits
> 0; its score the sigmoid of the object score logit.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch

from sam_backend.models.loading import check_fits, resolve_device
from sam_backend.models.registry import Variant
from sam_backend.video.base import BoxPrompt, Clip
from sam_backend.video.streaming import (MIB, FeatureCache, LibrarySession, SessionTracker,
                                         StreamedFrames, tensor_bytes)

log = logging.getLogger(__name__)


# -- loading ---------------------------------------------------------------------------------------
def tracker_video_config(config: Dict):
    """The ``Sam3TrackerVideoConfig`` for a checkpoint's ``config.json`` (official layout: the
    tracker runs on the detector's backbone, as the click model does)."""
    from transformers import Sam3TrackerVideoConfig

    from sam_backend.errors import CheckpointError
    from sam_backend.models.sam3_runtime import official_tracker_dict

    model_type = config.get("model_type")
    if model_type == "sam3_video":
        return Sam3TrackerVideoConfig.from_dict(official_tracker_dict(config))
    if model_type == "sam3_tracker_video":
        return Sam3TrackerVideoConfig.from_dict(config)
    raise CheckpointError(f"config.json says model_type={model_type!r}: video tracking with "
                          f"model_name=sam3 needs the full SAM 3 checkpoint (model_type sam3_video, "
                          f"the facebook/sam3 repository), which holds the tracker's memory modules")


def _video_model_name(key: str) -> Optional[str]:
    """Sam3TrackerVideoModel's name for a tensor of the file (None: not one of its tensors)."""
    from sam_backend.models.sam3_runtime import OFFICIAL_RENAMES, TRACKER_PREFIX

    while key.startswith(TRACKER_PREFIX):
        key = key[len(TRACKER_PREFIX):]
    for old, new in OFFICIAL_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return None if key.startswith("detector_model.") else key


def video_model_state(directory: Path, skip=frozenset()) -> Dict[str, torch.Tensor]:
    """The tracker's tensors from the directory's safetensors (float32), names not in ``skip``."""
    from safetensors import safe_open

    from sam_backend.errors import CheckpointError
    from sam_backend.models.sam3_runtime import safetensors_files

    state: Dict[str, torch.Tensor] = {}
    for path in safetensors_files(directory):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    name = _video_model_name(key)
                    if name is not None and name not in skip:
                        tensor = handle.get_tensor(key)
                        state[name] = tensor.float() if tensor.is_floating_point() else tensor
        except Exception as exc:
            raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {exc}): download "
                                  f"the checkpoint again") from None
    return state


def load_video_model(variant: Variant, directory: Union[str, Path], device: Optional[str] = "cpu",
                     click_model: Optional[torch.nn.Module] = None):
    """``Sam3TrackerVideoModel`` with the directory's weights (strict), eval mode, on ``device``.
    ``click_model``: the loaded ``Sam3TrackerModel`` of the click model; its tensors (the ViT
    backbone, neck, prompt encoder, mask decoder: all but the memory modules) are shared, and
    only the memory modules are read from the file."""
    from transformers import Sam3TrackerVideoModel

    from sam_backend.models.sam3_runtime import read_config

    directory = Path(directory)
    model = Sam3TrackerVideoModel(tracker_video_config(read_config(directory)))
    shared = dict(click_model.state_dict()) if click_model is not None else {}
    state = video_model_state(directory, skip=frozenset(shared))
    state.update(shared)
    check_fits(model, state, variant, directory)
    model.requires_grad_(False)  # before assigning: a click model's inference tensors can't need grad
    model.load_state_dict(state, strict=True, assign=True)
    del state, shared
    model.eval()
    dev = resolve_device(device)
    log.info("SAM 3 video tracker ready from %s%s on %s", directory,
             " (sharing the click model's weights)" if click_model is not None else "", dev)
    return model.to(dev)


def video_processor(directory: Union[str, Path, None] = None):
    """``Sam3TrackerVideoProcessor``: the checkpoint's image processor
    (:func:`~sam_backend.models.sam3_runtime.image_processor`) and a video processor with the
    same size, resampling and normalisation."""
    from transformers import Sam2VideoVideoProcessor, Sam3TrackerVideoProcessor

    from sam_backend.models.sam3_runtime import image_processor

    images = image_processor(directory)
    videos = Sam2VideoVideoProcessor(size=dict(images.size), image_mean=images.image_mean,
                                     image_std=images.image_std, resample=images.resample)
    return Sam3TrackerVideoProcessor(images, videos)


# -- the session -------------------------------------------------------------------------------------
class _SharedVisionCache:
    """What a transformers video session asks of its ``cache`` (``get_vision_features``,
    ``cache_vision_features``, ``clear_all``), backed by the tracker's feature cache for one
    clip; position encodings kept once."""

    def __init__(self, cache: FeatureCache, clip_key: str, device: torch.device,
                 storage: torch.device):
        self.cache, self.clip_key, self.device, self.storage = cache, clip_key, device, storage
        self.pos = None

    def get_vision_features(self, frame_idx: int):
        feats = self.cache.get((self.clip_key, frame_idx))
        if feats is None or self.pos is None:
            return None
        return {"vision_feats": [f.to(self.device) for f in feats],
                "vision_pos_embeds": [p.to(self.device) for p in self.pos]}

    def cache_vision_features(self, frame_idx: int, features: dict) -> None:
        feats = [f.to(self.storage) for f in features["vision_feats"]]
        if self.pos is None:
            self.pos = [p.to(self.storage) for p in features["vision_pos_embeds"]]
        self.cache.put((self.clip_key, frame_idx), feats, tensor_bytes(feats))

    def clear_all(self) -> None:
        pass  # the frames stay cached for the clip's other objects and later corrections


class Sam3Session(LibrarySession):
    tracker_name = "sam3"

    def __init__(self, tracker: "Sam3Tracker", clip: Clip):
        super().__init__(clip, tracker.features)
        self.model, self.processor = tracker.model, tracker.processor
        self.device = self.model.device
        self.storage = torch.device("cpu")

        def preprocess(frame: np.ndarray) -> torch.Tensor:
            # the processor's video path, for a one-frame video (3xSxS float32)
            out = self.processor.video_processor(videos=[frame[None]], return_tensors="pt")
            return out.pixel_values_videos[0][0]

        self.frames = StreamedFrames(clip, preprocess)
        self.vision = _SharedVisionCache(tracker.features, clip.key, self.device, self.storage)

    def use_clip(self, clip: Clip) -> None:
        super().use_clip(clip)
        self.frames.reset(clip)

    def _new_state(self):
        session = self.processor.init_video_session(
            inference_device=self.device, inference_state_device=self.storage,
            video_storage_device=self.storage, dtype=torch.float32)
        session.processed_frames = self.frames
        session.video_height, session.video_width = self.clip.info.height, self.clip.info.width
        session.cache = self.vision
        return session

    def _add_box(self, state, prompt: BoxPrompt) -> None:
        # A box on a frame already tracked is a correction: it becomes a conditioning frame like
        # the first box (kept by later propagations and in every frame's memory), not the
        # library's default for a tracked frame (a non-conditioning output that the next
        # propagation recomputes without the box).
        obj_idx = state.obj_id_to_idx(int(prompt.object_id))
        state.frames_tracked_per_obj[obj_idx].pop(int(prompt.frame), None)
        state.output_dict_per_obj[obj_idx]["non_cond_frame_outputs"].pop(int(prompt.frame), None)
        self.processor.add_inputs_to_inference_session(
            inference_session=state, frame_idx=int(prompt.frame), obj_ids=int(prompt.object_id),
            input_boxes=[[list(map(float, prompt.box))]])
        with torch.inference_mode():
            self.model(inference_session=state, frame_idx=int(prompt.frame))

    def _propagate(self, state, start: int, last: int
                   ) -> Iterator[Tuple[int, np.ndarray, Optional[float]]]:
        size = [[state.video_height, state.video_width]]
        with torch.inference_mode():
            for out in self.model.propagate_in_video_iterator(
                    state, start_frame_idx=start, max_frame_num_to_track=last - start):
                logits = self.processor.post_process_masks([out.pred_masks], original_sizes=size,
                                                           binarize=False)[0]
                score = float(torch.sigmoid(out.object_score_logits.float()).flatten()[0])
                yield int(out.frame_idx), (logits[0, 0] > 0.0).cpu().numpy(), score


class Sam3Tracker(SessionTracker):
    """SAM 3's tracker video model behind :class:`~sam_backend.video.base.Tracker`."""

    name = "sam3"

    def __init__(self, model, processor, feature_cache_mb: int = 2048, max_sessions: int = 2):
        super().__init__(feature_cache_mb * MIB, max_sessions)
        self.model, self.processor = model, processor

    def _new_session(self, clip: Clip) -> Sam3Session:
        return Sam3Session(self, clip)


def create_sam3_tracker(variant: Variant, checkpoint, device: Optional[str] = "cpu",
                        click_model: Any = None, feature_cache_mb: int = 2048,
                        max_sessions: int = 2) -> Sam3Tracker:
    """The tracker table's factory: ``click_model`` is the loaded
    :class:`~sam_backend.models.sam3_runtime.Sam3ClickModel` whose weights are shared, or None."""
    if checkpoint is None:
        from sam_backend.models.registry import default_checkpoint

        checkpoint = default_checkpoint(variant)
    model = load_video_model(variant, checkpoint, device,
                             click_model=getattr(click_model, "model", None))
    return Sam3Tracker(model, video_processor(checkpoint), feature_cache_mb, max_sessions)
