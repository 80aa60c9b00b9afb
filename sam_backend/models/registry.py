"""The variants this backend can run: ``model_name`` x ``sam_config`` -> builder and checkpoint.

Adding a variant is adding an entry to ``VARIANTS``; nothing in the request path branches on the
variant. A builder returns the real architecture with uninitialised weights (``checkpoint=None``);
loading the checkpoint is :mod:`sam_backend.models.loading`'s job, so that every variant gets the same
strict key/shape check and the same error messages.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from sam_backend.errors import ConfigError


@dataclass(frozen=True)
class Variant:
    """One model variant.

    ``family`` picks the adapter that knows the variant's encoder output and decoder call
    (``sam``: plain SAM decoder; ``sam_hq``: HQ decoder, needs the encoder's intermediate
    features). ``sha256_prefix`` is the digest prefix SAM's official file names carry, if any.
    """

    model_name: str
    sam_config: str
    checkpoint_name: str
    url: str
    family: str
    builder: Callable[[], torch.nn.Module]
    sha256_prefix: Optional[str] = None
    # Families with their own runtime module (sam2, sam3) build their model here:
    # ``factory(variant, checkpoint, device, runtime) -> SegmentationModel``.
    factory: Optional[Callable[..., object]] = None

    @property
    def key(self) -> str:
        return f"{self.model_name}/{self.sam_config}"


def _build_sam(config: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from segment_anything import sam_model_registry

        return sam_model_registry[config](checkpoint=None)

    return build


def _build_sam_hq(config: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from segment_anything_hq import sam_model_registry

        return sam_model_registry[config](checkpoint=None)

    return build


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


def _build_mobile_sam() -> torch.nn.Module:
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


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/{}"
_HQ_URL = "https://huggingface.co/lkeab/hq-sam/resolve/main/{}"
_MOBILE_URL = "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/{}"


def _sam(config: str, file_name: str, sha_prefix: str) -> Variant:
    return Variant("sam", config, file_name, _SAM_URL.format(file_name), "sam",
                   _build_sam(config), sha_prefix)


def _hq(config: str) -> Variant:
    file_name = f"sam_hq_{config}.pth"
    return Variant("sam_hq", config, file_name, _HQ_URL.format(file_name), "sam_hq",
                   _build_sam_hq(config))


VARIANTS: Dict[Tuple[str, str], Variant] = {
    (v.model_name, v.sam_config): v
    for v in [
        _sam("vit_b", "sam_vit_b_01ec64.pth", "01ec64"),
        _sam("vit_l", "sam_vit_l_0b3195.pth", "0b3195"),
        _sam("vit_h", "sam_vit_h_4b8939.pth", "4b8939"),
        _hq("vit_b"),
        _hq("vit_l"),
        _hq("vit_h"),
        _hq("vit_tiny"),
        Variant("mobile_sam", "vit_t", "mobile_sam.pt", _MOBILE_URL.format("mobile_sam.pt"),
                "sam", _build_mobile_sam),
    ]
}


def _build_sam3_click_model() -> torch.nn.Module:
    # SAM 3's click model at its published size (~458M parameters), uninitialised weights.
    from transformers import Sam3TrackerConfig, Sam3TrackerModel

    return Sam3TrackerModel(Sam3TrackerConfig())


def _sam3_factory(variant, checkpoint, device, runtime):
    from sam_backend.models.sam3_runtime import create_sam3_model

    return create_sam3_model(variant, checkpoint, device, runtime)


# SAM 3 (transformers): its checkpoint is a hub-format directory, fetched from the hub repository
# its url names (sam_backend/models/hub.py), not a single file.
SAM3 = Variant("sam3", "default", "sam3", "https://huggingface.co/facebook/sam3", "sam3",
               _build_sam3_click_model, factory=_sam3_factory)
VARIANTS[(SAM3.model_name, SAM3.sam_config)] = SAM3

DEFAULT_CONFIG: Dict[str, str] = {"sam": "vit_b", "sam_hq": "vit_b", "mobile_sam": "vit_t"}
DEFAULT_CONFIG["sam3"] = "default"

# SAM 2.1 (model_name=sam2), run by sam_backend/models/sam2_runtime.py. The SAM 2.0 files
# (sam2_hiera_*.pt) have a slightly different layout: their own entries, ``<config>_v2.0``, so a
# file is recognised by its name and still loads strictly.
_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/{}/{}"
_SAM2_CONFIG_FILE = {"hiera_tiny": "t", "hiera_small": "s", "hiera_base_plus": "b+",
                     "hiera_large": "l"}


def _build_sam2(yaml: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from sam2.build_sam import build_sam2

        # As SAM2ImagePredictor users build it (apply_postprocessing=True: the decoder falls
        # back to its best multimask output when a single mask is unstable).
        return build_sam2(yaml, None, device="cpu")

    return build


def _sam2_factory(variant: "Variant", checkpoint, device, runtime):
    from sam_backend.models.sam2_runtime import create_sam2_model

    return create_sam2_model(variant, checkpoint, device, runtime)


def _sam2(config: str, legacy: bool = False) -> Variant:
    short = _SAM2_CONFIG_FILE[config]
    if legacy:
        file_name, yaml = f"sam2_{config}.pt", f"configs/sam2/sam2_hiera_{short}.yaml"
        url, config = _SAM2_URL.format("072824", file_name), f"{config}_v2.0"
    else:
        file_name, yaml = f"sam2.1_{config}.pt", f"configs/sam2.1/sam2.1_hiera_{short}.yaml"
        url = _SAM2_URL.format("092824", file_name)
    return Variant("sam2", config, file_name, url, "sam2", _build_sam2(yaml),
                   factory=_sam2_factory)


for _variant in [_sam2(c) for c in _SAM2_CONFIG_FILE] + [_sam2(c, True) for c in _SAM2_CONFIG_FILE]:
    VARIANTS[(_variant.model_name, _variant.sam_config)] = _variant
DEFAULT_CONFIG["sam2"] = "hiera_tiny"


def model_names() -> list:
    return sorted(DEFAULT_CONFIG)


def get_variant(model_name: str, sam_config: Optional[str] = None) -> Variant:
    """The variant for ``model_name`` and ``sam_config`` (the model's default config if None)."""
    if model_name not in DEFAULT_CONFIG:
        raise ConfigError(
            f"unknown model_name {model_name!r}: choose one of {', '.join(model_names())}"
        )
    config = sam_config or DEFAULT_CONFIG[model_name]
    variant = VARIANTS.get((model_name, config))
    if variant is None:
        known = sorted(c for (m, c) in VARIANTS if m == model_name)
        raise ConfigError(
            f"unknown sam_config {config!r} for model_name={model_name}: "
            f"choose one of {', '.join(known)}"
        )
    return variant


def variant_for_file(file_name: str) -> Optional[Variant]:
    """The variant whose official checkpoint file is called ``file_name`` (basename), if any."""
    base = os.path.basename(file_name)
    for variant in VARIANTS.values():
        if variant.checkpoint_name == base:
            return variant
    return None


# The source checkout this package runs from (an editable install or a clone run in place):
# ``<checkout>/sam_backend/models/registry.py``; it is a checkout when ``setup.py`` sits beside
# the package.
_CHECKOUT = Path(__file__).resolve().parents[2]


def weights_dir() -> Path:
    """Where checkpoints live; the first that applies:

    1. ``$SAM_BACKEND_WEIGHTS_DIR``;
    2. ``weights/`` of the source checkout the package runs from (a clone, editable install);
    3. ``weights/`` of the current directory, when it exists;
    4. ``$XDG_CACHE_HOME/sam_backend/weights`` (``~/.cache/sam_backend/weights``): an installed
       package never writes checkpoints into site-packages.
    """
    env = os.environ.get("SAM_BACKEND_WEIGHTS_DIR")
    if env:
        return Path(env).expanduser()
    if (_CHECKOUT / "setup.py").is_file() and (_CHECKOUT / "sam_backend").is_dir():
        return _CHECKOUT / "weights"
    here = Path.cwd() / "weights"
    if here.is_dir():
        return here
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "sam_backend" / "weights"


def default_checkpoint(variant: Variant) -> Path:
    return weights_dir() / variant.checkpoint_name
