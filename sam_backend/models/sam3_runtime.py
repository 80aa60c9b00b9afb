"""SAM 3 for clicks and boxes: the ``transformers`` implementation, one code path on CPU and GPU.

A click runs SAM 3's interactive (SAM-1-style) task: ``Sam3TrackerModel``, a SAM 2-style prompt
encoder and mask decoder on SAM 3's Perception Encoder ViT backbone. The official ``sam3`` package
hard-codes CUDA and imports triton, so it does not run on a CPU-only machine; transformers' port
runs on both.

Checkpoint: a hub-format **directory** (``config.json`` + ``*.safetensors``, as ``facebook/sam3``
on the model hub is laid out). Two layouts are read:

- the official one (``model_type: sam3_video``): ``detector_model.*`` (the concept model,
  ``Sam3Model``), ``tracker_model.*`` (prompt encoder, mask decoder, video memory) and
  ``tracker_neck.*``. There is a single copy of the ViT backbone, under
  ``detector_model.vision_encoder.backbone.*``: the concept model and the click model share it,
  each with its own FPN neck (``detector_model.vision_encoder.neck`` vs ``tracker_neck``). The
  renaming is transformers' own for ``sam3_tracker`` (``conversion_mapping.py``); it is applied
  here explicitly so that loading is strict (every expected tensor present, no shape mismatch);
- a click-model-only layout (``model_type: sam3_tracker``), as ``Sam3TrackerModel.save_pretrained``
  writes it.

The steps mirror transformers' interactive pipeline (``Sam3TrackerProcessor`` -> ``Sam3TrackerModel``
-> ``post_process_masks``), so masks are the library's own pixel for pixel; the per-image state lives
in an :class:`~sam_backend.models.base.Embedding` instead of being recomputed:

- image: ``Sam3ImageProcessor`` (resize to 1008x1008 whatever the aspect ratio, bilinear, rescale,
  normalise with mean = std = 0.5);
- embedding: ``image_embedding`` = the lowest-resolution FPN level plus the tracker's
  ``no_memory_embedding`` (1x256x72x72), ``high_res_features`` = the two high-resolution levels
  already projected by the mask decoder's ``conv_s0``/``conv_s1`` (1x32x288x288 and 1x64x144x144):
  21.2 MB in float32, 10.6 MB in float16 per image, whatever the image size;
- prompt: points and boxes scaled by (1008 / W, 1008 / H), as the processor does;
- mask: low-res logits 1x288x288, upscaled bilinearly to the image size and thresholded at 0
  (``post_process_masks``). The previous prediction's logits go back as ``input_masks``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from sam_backend.errors import CheckpointError
from sam_backend.models.loading import check_fits, resolve_device
from sam_backend.models.base import (Candidates, Embedding, Prompt, SegmentationModel,
                                     candidates_of, check_image)
from sam_backend.models.registry import Variant

log = logging.getLogger(__name__)

# transformers' renaming for loading the click model from the official layout
# (conversion_mapping.py, "sam3_tracker"): the tracker's own tensors carry a ``tracker_model.``
# prefix, the backbone is the detector's, the neck is ``tracker_neck``. transformers 5.23 also
# applies it in reverse when saving, on top of the names it saves (a Sam3VideoModel's tracker
# becomes ``tracker_model.tracker_model.*``; Sam3TrackerModel.save_pretrained writes
# ``tracker_model.detector_model.vision_encoder.backbone.*``), so the prefix is stripped as often
# as it occurs before the two renamings.
TRACKER_PREFIX = "tracker_model."
OFFICIAL_RENAMES: Tuple[Tuple[str, str], ...] = (
    ("detector_model.vision_encoder.backbone.", "vision_encoder.backbone."),
    ("tracker_neck.", "vision_encoder.neck."),
)
# Tensors of the video tracker that the image click model does not have
# (Sam3TrackerModel._keys_to_ignore_on_load_unexpected).
VIDEO_ONLY_PREFIXES = ("memory_", "mask_downsample", "object_pointer_proj",
                       "temporal_positional_encoding_projection_layer", "no_memory_positional_encoding",
                       "no_object_pointer", "occlusion_spatial_embedding_parameter")

CLICK_LAYOUTS = ("sam3_video", "sam3_tracker", "sam3_tracker_video")


# -- the family table's builder, recogniser and random-init recipe ------------------------------
def build_click_model() -> torch.nn.Module:
    """SAM 3's click model at its published size (~458M parameters), uninitialised weights."""
    from transformers import Sam3TrackerConfig, Sam3TrackerModel

    return Sam3TrackerModel(Sam3TrackerConfig())


def recognise_sam3(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """``sam3/default`` for the click model's tensors (Sam3TrackerModel's names, as
    :func:`click_model_state` reads them) or the official layout's."""
    if any(k.startswith(("detector_model.", TRACKER_PREFIX)) for k in state) or \
            ("no_memory_embedding" in state
             and any(k.startswith("vision_encoder.backbone.") for k in state)):
        return "sam3/default"
    return None


def write_random_checkpoint_dir(variant: Variant, path: Union[str, Path], seed: int = 0,
                                config: Optional[Dict[str, Any]] = None) -> Path:
    """A seeded random-weight SAM 3 checkpoint directory in the official layout
    (``Sam3VideoModel.save_pretrained``: config.json + model.safetensors, ~3.4 GB at full size;
    building it needs about twice that in memory). ``config``: Sam3VideoConfig keyword arguments
    (None: the published architecture; tests pass a reduced one). Masks from it are meaningless."""
    from transformers import Sam3VideoConfig, Sam3VideoModel

    from sam_backend.models.random_init import write_random_pretrained_dir

    video_config = Sam3VideoConfig(**(config or {}))
    return write_random_pretrained_dir(lambda: Sam3VideoModel(video_config), path, seed,
                                       what=variant.key)


# -- checkpoint directory ----------------------------------------------------------------------
def read_config(directory: Union[str, Path]) -> Dict:
    """``config.json`` of a hub-format checkpoint directory, as a dict."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"SAM 3 checkpoint {directory} is not a directory: SAM 3 loads from a "
                              f"hub-format directory (config.json + *.safetensors), e.g. what "
                              f"`sam-backend weights download sam3` writes")
    if not config_path.is_file():
        raise CheckpointError(f"SAM 3 checkpoint directory {directory} has no config.json: it is not "
                              f"a hub-format checkpoint; download it again with `sam-backend weights "
                              f"download sam3`")
    try:
        return json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path} cannot be read ({exc}): download the checkpoint again")


def safetensors_files(directory: Path) -> List[Path]:
    """The weight files of a hub-format directory (one file, or the shards its index names)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{index} cannot be read ({exc}): download the checkpoint again")
        files = [directory / name for name in names]
    else:
        files = sorted(directory.glob("*.safetensors"))
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        raise CheckpointError(f"SAM 3 checkpoint directory {directory} has no weights"
                              f"{' (missing ' + ', '.join(missing) + ')' if missing else ''}: "
                              f"expected model.safetensors; download it again")
    return files


def official_tracker_dict(config: Dict) -> Dict:
    """The tracker's config of an official ``sam3_video`` ``config.json`` as a dict, with the
    vision config of the detector: in this layout the tracker (clicks and video alike) runs on the
    detector's backbone (see the module docstring)."""
    from transformers import Sam3VideoConfig

    video = Sam3VideoConfig.from_dict(config)
    tracker = video.tracker_config
    tracker.vision_config = video.detector_config.vision_config
    return tracker.to_dict()


def tracker_config(config: Dict):
    """The ``Sam3TrackerConfig`` of the click model for a checkpoint's ``config.json``."""
    from transformers import Sam3TrackerConfig

    model_type = config.get("model_type")
    if model_type == "sam3_video":
        return Sam3TrackerConfig.from_dict(official_tracker_dict(config))
    if model_type in ("sam3_tracker", "sam3_tracker_video"):
        return Sam3TrackerConfig.from_dict(config)
    if model_type == "sam3":
        raise CheckpointError("this SAM 3 checkpoint holds only the concept model (Sam3Model, "
                              "model_type sam3): clicks need SAM 3's tracker as well; use the full "
                              "facebook/sam3 repository")
    raise CheckpointError(f"config.json says model_type={model_type!r}, not a SAM 3 checkpoint "
                          f"(expected one of {', '.join(CLICK_LAYOUTS)})")


def click_model_state(directory: Path) -> Dict[str, torch.Tensor]:
    """The click model's tensors from the directory's safetensors, renamed to Sam3TrackerModel's
    names; tensors of other parts (the concept model's heads, the video memory) are not read."""
    from safetensors import safe_open

    state: Dict[str, torch.Tensor] = {}
    for path in safetensors_files(directory):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    name = _click_model_name(key)
                    if name is not None:
                        tensor = handle.get_tensor(key)
                        if tensor.is_floating_point() and tensor.dtype != torch.float32:
                            tensor = tensor.float()  # the model runs in float32
                        state[name] = tensor
        except CheckpointError:
            raise
        except Exception as exc:  # truncated file, not safetensors, ...
            raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {exc}): the file is "
                                  f"truncated or not a safetensors file; download it again") from None
    return state


def _click_model_name(key: str) -> Optional[str]:
    """Sam3TrackerModel's name for a tensor of the file, or None when the click model has no
    such tensor (the concept model's own parts, the video memory)."""
    while key.startswith(TRACKER_PREFIX):
        key = key[len(TRACKER_PREFIX):]
    for old, new in OFFICIAL_RENAMES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    else:
        if key.startswith("detector_model."):
            return None
    if key.startswith(VIDEO_ONLY_PREFIXES):
        return None
    return key


def load_click_model(variant: Variant, directory: Union[str, Path],
                     device: Union[str, torch.device] = "cpu"):
    """``Sam3TrackerModel`` with the directory's weights (strict), in eval mode on ``device``."""
    from transformers import Sam3TrackerModel

    directory = Path(directory)
    config = read_config(directory)
    tracker_cfg = tracker_config(config)
    state = click_model_state(directory)
    model = Sam3TrackerModel(tracker_cfg)
    check_fits(model, state, variant, directory)
    # assign: the parameters become the file's tensors, with no second copy of the weights in
    # memory (peak RSS: "Memory notes" in benchmarks/README.md)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    log.info("loaded %s (Sam3TrackerModel, %.0fM parameters) from %s on %s", variant.key,
             sum(p.numel() for p in model.parameters()) / 1e6, directory, dev)
    return model.to(dev)


def image_processor(directory: Union[str, Path, None] = None):
    """The checkpoint's ``Sam3ImageProcessor`` (its ``processor_config.json`` /
    ``preprocessor_config.json`` when the directory has one), else the library's defaults."""
    from transformers import Sam3ImageProcessor

    if directory is not None:
        for name in ("preprocessor_config.json", "processor_config.json"):
            path = Path(directory) / name
            if path.is_file():
                settings = json.loads(path.read_text())
                settings = settings.get("image_processor", settings)
                settings = {k: v for k, v in settings.items()
                            if k not in ("image_processor_type", "processor_class", "_processor_class")}
                return Sam3ImageProcessor(**settings)
    return Sam3ImageProcessor()


# -- the model -----------------------------------------------------------------------------------
class Sam3ClickModel(SegmentationModel):
    """SAM 3's interactive prediction behind the embed/decode interface.

    ``keep_vision_state``: also keep the ViT backbone's output (1x5184x1024 for a 1008 px input)
    in the embedding (``vision_state``), for a second consumer of the same image (SAM 3's concept
    model runs its own FPN neck on the same backbone output).
    """

    runtime = "torch"

    def __init__(self, variant: Variant, checkpoint: Union[str, Path, None], device: str = "cpu",
                 keep_vision_state: bool = False):
        from transformers import Sam3TrackerProcessor

        if checkpoint is None:
            from sam_backend.models.registry import default_checkpoint

            checkpoint = default_checkpoint(variant)
        self.variant = variant
        dev = resolve_device(device)
        self.device = str(dev)
        self.checkpoint = Path(checkpoint)
        self.model = load_click_model(variant, self.checkpoint, dev)
        self.processor = Sam3TrackerProcessor(image_processor(self.checkpoint))
        self.keep_vision_state = keep_vision_state

    # -- image ---------------------------------------------------------------------------------
    def pixel_values(self, image: np.ndarray) -> torch.Tensor:
        """1x3x1008x1008 float32: the processor's resize and normalisation of an HxWx3 uint8 RGB
        image."""
        check_image(image)
        inputs = self.processor(images=image, return_tensors="pt")
        return inputs["pixel_values"].to(self.model.device)

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> Embedding:
        pixels = self.pixel_values(image)
        # Sam3TrackerModel.get_image_embeddings, keeping the backbone output at hand.
        outputs = self.model.get_image_features(pixels, return_dict=True)
        maps = list(outputs.fpn_hidden_states)
        maps[-1] = maps[-1] + self.model.no_memory_embedding
        levels = [feat.permute(1, 2, 0).reshape(1, -1, *size)
                  for feat, size in zip(maps, self.model.backbone_feature_sizes)]
        return Embedding(levels[-1], tuple(image.shape[:2]), tuple(pixels.shape[-2:]),
                         high_res_features=list(levels[:-1]),
                         vision_state=outputs.last_hidden_state if self.keep_vision_state else None)

    # -- prompt --------------------------------------------------------------------------------
    def prompt_inputs(self, embedding: Embedding, prompt: Prompt) -> Dict[str, torch.Tensor]:
        """The processor's point/box tensors for ``prompt`` (coordinates scaled to 1008x1008)."""
        kwargs: Dict = {"original_sizes": [list(embedding.original_size)], "return_tensors": "pt"}
        if len(prompt.points):
            kwargs["input_points"] = [[np.asarray(prompt.points, np.float32).tolist()]]
            kwargs["input_labels"] = [[np.asarray(prompt.labels, np.int64).tolist()]]
        if prompt.box is not None:
            kwargs["input_boxes"] = [[np.asarray(prompt.box, np.float32).tolist()]]
        inputs = self.processor(**kwargs)
        return {k: v.to(self.model.device) for k, v in inputs.items()
                if k in ("input_points", "input_labels", "input_boxes")}

    @torch.inference_mode()
    def decode_low_res(self, embedding: Embedding, prompt: Prompt) -> Candidates:
        """Kx288x288 candidates in the squashed 1008x1008 input's low-res frame; K is 3 for a
        single point without a box, else 1 (the decoder then falls back to its best multimask
        output when its single mask is unstable, as SAM 2 does)."""
        device = self.model.device
        levels = [t.to(device=device, dtype=torch.float32)
                  for t in list(embedding.high_res_features) + [embedding.image_embedding]]
        masks = None
        if prompt.mask_input is not None:
            masks = torch.as_tensor(prompt.mask_input, dtype=torch.float32, device=device)[None]
        outputs = self.model(image_embeddings=levels, input_masks=masks,
                             multimask_output=prompt.multimask,
                             **self.prompt_inputs(embedding, prompt))
        low_res, iou = outputs.pred_masks, outputs.iou_scores
        return candidates_of(low_res[0, 0], iou[0, 0])

    @torch.inference_mode()
    def upscale_mask(self, logits: np.ndarray, embedding: Embedding) -> np.ndarray:
        """``post_process_masks``: bilinear to the image size, thresholded at 0."""
        chosen = torch.from_numpy(logits).to(self.model.device)
        # (image, object, mask, h, w) in, a list over images of (object, mask, H, W) bool out
        masks = self.processor.post_process_masks(chosen[None, None],
                                                  [list(embedding.original_size)])[0]
        return masks[0, 0].cpu().numpy()


def create_sam3_model(variant: Variant, checkpoint, device: str, runtime: str = "torch"):
    """The family table's ``create`` for SAM 3: torch only (an onnx export of a 1008 px ViT-L with
    rotary attention is not attempted; the table lists no onnx runtime for it)."""
    return Sam3ClickModel(variant, checkpoint, device)
