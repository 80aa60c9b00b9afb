"""The model families, one row each: everything that asks "which family?" reads this table.

A row (:class:`Family`) says, for one ``model_name``:

- ``variants``: its ``sam_config`` values, each with its checkpoint file name, download URL and
  builder (the real architecture, uninitialised); ``default_config`` is the one used when
  ``sam_config`` is not given;
- ``runtimes``: the runtimes it can run (``torch``, ``onnx``) and ``onnx_by_default``: the configs
  for which ``runtime=auto`` picks onnx on a CPU device (measured faster with the same masks;
  :func:`choose_runtime` is the one place that decides);
- ``create``: its runtime module's factory, ``create(variant, checkpoint, device, runtime) ->
  SegmentationModel`` with ``runtime`` already chosen (``torch`` or ``onnx``; a runtime module
  that cannot honour ``onnx`` for this checkpoint falls back to torch and logs why);
- ``read_state`` and ``recognise``: how to read a checkpoint's tensors and how to recognise a state
  dict of this family (the variant key it looks like, or None): the hint that loading's mismatch
  errors give;
- ``random_init``: the recipe ``sam-backend weights random`` runs, ``random_init(variant, path,
  seed, **architecture) -> path`` (seeded random weights in the official layout; ``architecture``:
  family-specific overrides for a reduced model in tests, e.g. SAM 3's config);
- ``embedding_parts``: per runtime, the named :class:`~sam_backend.models.base.Embedding` fields
  its ``embed`` fills (the contract test checks them);
- ``title`` and ``help_configs``: the words the options' help uses.

Builders and factories are referenced lazily (:func:`_lazy`): reading the table imports neither
torch nor any model package, so ``settings`` can derive its help text from it.

Adding a family = its ``*_runtime.py`` module (embed/decode, builder, state-dict recogniser) and one
row in :data:`FAMILIES`. Nothing else in the package branches on the family.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional, Tuple

RUNTIME_NAMES = ("auto", "torch", "onnx")
DEFAULT_MODEL_NAME = "mobile_sam"  # what a start without model_name or checkpoint runs


@dataclass(frozen=True)
class Variant:
    """One ``model_name`` x ``sam_config``: its checkpoint and how to build its architecture.

    ``family`` is the row's name (= ``model_name``). ``builder()`` returns the architecture with
    uninitialised weights; loading the checkpoint is :mod:`sam_backend.models.loading`'s job, so
    that every variant gets the same strict key/shape check. ``sha256_prefix`` is the digest
    prefix the official file name carries, if any.
    """

    model_name: str
    sam_config: str
    checkpoint_name: str
    url: str
    builder: Callable[[], Any] = field(compare=False, repr=False)
    sha256_prefix: Optional[str] = None

    @property
    def key(self) -> str:
        return f"{self.model_name}/{self.sam_config}"

    @property
    def family(self) -> str:
        return self.model_name


@dataclass(frozen=True)
class Family:
    """One row of the family table (see the module docstring for each field)."""

    name: str
    title: str
    variants: Tuple[Variant, ...]
    default_config: str
    runtimes: Tuple[str, ...]
    onnx_by_default: FrozenSet[str]
    create: Callable[..., Any]
    read_state: Callable[[Any], Dict[str, Any]]
    recognise: Callable[[Mapping[str, Any]], Optional[str]]
    random_init: Callable[..., Any]
    embedding_parts: Mapping[str, Tuple[str, ...]]
    smallest_config: Optional[str] = None  # None: the default config
    help_configs: Optional[str] = None  # how the options' help lists the configs (None: all)

    @property
    def configs(self) -> Tuple[str, ...]:
        return tuple(v.sam_config for v in self.variants)

    def variant(self, sam_config: str) -> Optional[Variant]:
        return next((v for v in self.variants if v.sam_config == sam_config), None)

    @property
    def smallest(self) -> Variant:
        """The smallest variant (what the contract test runs)."""
        return self.variant(self.smallest_config or self.default_config)


def _lazy(module: str, name: str, *args: Any, **fixed: Any) -> Callable[..., Any]:
    """``module.name(*args, *call_args, **fixed, **call_kwargs)``, importing ``module`` at the
    first call only."""

    def call(*more: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, *more, **fixed, **kwargs)

    call.__qualname__ = f"{module}.{name}"
    return call


_TORCH = "sam_backend.models.torch_runtime"
_SAM2 = "sam_backend.models.sam2_runtime"
_SAM3 = "sam_backend.models.sam3_runtime"
_LOADING = "sam_backend.models.loading"
_RANDOM = "sam_backend.models.random_init"

_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/{}"
_HQ_URL = "https://huggingface.co/lkeab/hq-sam/resolve/main/{}"
_MOBILE_URL = "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/{}"
_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/{}/{}"
_SAM2_CONFIG_FILE = {"hiera_tiny": "t", "hiera_small": "s", "hiera_base_plus": "b+",
                     "hiera_large": "l"}


def _sam_variant(config: str, file_name: str, sha_prefix: str) -> Variant:
    return Variant("sam", config, file_name, _SAM_URL.format(file_name),
                   _lazy(_TORCH, "build_sam", config), sha_prefix)


def _hq_variant(config: str) -> Variant:
    file_name = f"sam_hq_{config}.pth"
    return Variant("sam_hq", config, file_name, _HQ_URL.format(file_name),
                   _lazy(_TORCH, "build_sam_hq", config))


def _sam2_variant(config: str, legacy: bool = False) -> Variant:
    """SAM 2.1 files, and SAM 2.0's (a slightly different layout: their own entries,
    ``<config>_v2.0``, so a file is recognised by its name and still loads strictly)."""
    short = _SAM2_CONFIG_FILE[config]
    if legacy:
        file_name, yaml = f"sam2_{config}.pt", f"configs/sam2/sam2_hiera_{short}.yaml"
        url, config = _SAM2_URL.format("072824", file_name), f"{config}_v2.0"
    else:
        file_name, yaml = f"sam2.1_{config}.pt", f"configs/sam2.1/sam2.1_hiera_{short}.yaml"
        url = _SAM2_URL.format("092824", file_name)
    return Variant("sam2", config, file_name, url, _lazy(_SAM2, "build_sam2", yaml))


# SAM and MobileSAM decoders read the image embedding only, with either runtime (HQ-SAM's row
# says what its decoder reads besides)
_SAM_PARTS = {"torch": ("image_embedding",), "onnx": ("image_embedding",)}
_SAM_STATE_FILE = _lazy(_LOADING, "read_state_dict")
_STATE_DICT_RECIPE = _lazy(_RANDOM, "write_random_state_dict")

FAMILIES: Dict[str, Family] = {f.name: f for f in [
    Family(
        name="sam", title="SAM",
        variants=(_sam_variant("vit_b", "sam_vit_b_01ec64.pth", "01ec64"),
                  _sam_variant("vit_l", "sam_vit_l_0b3195.pth", "0b3195"),
                  _sam_variant("vit_h", "sam_vit_h_4b8939.pth", "4b8939")),
        default_config="vit_b", runtimes=("torch", "onnx"),
        # vit_h stays torch: exporting it needs more memory than measured machines have
        onnx_by_default=frozenset({"vit_b", "vit_l"}),
        create=_lazy(_TORCH, "create_sam_model"), read_state=_SAM_STATE_FILE,
        recognise=_lazy(_TORCH, "recognise_sam"), random_init=_STATE_DICT_RECIPE,
        embedding_parts=_SAM_PARTS),
    Family(
        name="sam_hq", title="HQ-SAM",
        variants=(_hq_variant("vit_b"), _hq_variant("vit_l"), _hq_variant("vit_h"),
                  _hq_variant("vit_tiny")),
        smallest_config="vit_tiny",
        default_config="vit_b", runtimes=("torch", "onnx"),
        onnx_by_default=frozenset({"vit_tiny", "vit_b", "vit_l"}),
        create=_lazy(_TORCH, "create_sam_model"), read_state=_SAM_STATE_FILE,
        recognise=_lazy(_TORCH, "recognise_sam_hq"), random_init=_STATE_DICT_RECIPE,
        # torch: the ViT's intermediate features; onnx: the HQ decoder's image-only first step,
        # which its encoder graph runs
        embedding_parts={"torch": ("image_embedding", "interm_embeddings"),
                         "onnx": ("image_embedding", "hq_features")}),
    Family(
        name="mobile_sam", title="MobileSAM",
        variants=(Variant("mobile_sam", "vit_t", "mobile_sam.pt",
                          _MOBILE_URL.format("mobile_sam.pt"), _lazy(_TORCH, "build_mobile_sam")),),
        default_config="vit_t", runtimes=("torch", "onnx"), onnx_by_default=frozenset({"vit_t"}),
        create=_lazy(_TORCH, "create_sam_model"), read_state=_SAM_STATE_FILE,
        recognise=_lazy(_TORCH, "recognise_mobile_sam"), random_init=_STATE_DICT_RECIPE,
        embedding_parts=_SAM_PARTS),
    Family(
        name="sam2", title="SAM 2.1",
        variants=tuple([_sam2_variant(c) for c in _SAM2_CONFIG_FILE]
                       + [_sam2_variant(c, legacy=True) for c in _SAM2_CONFIG_FILE]),
        default_config="hiera_tiny", runtimes=("torch", "onnx"),
        help_configs="hiera_tiny/hiera_small/hiera_base_plus/hiera_large (+ <config>_v2.0 for "
                     "SAM 2.0 files)",
        # the decoder in onnxruntime, the Hiera encoder in torch (sam2_runtime's docstring)
        onnx_by_default=frozenset(list(_SAM2_CONFIG_FILE) + [f"{c}_v2.0" for c in _SAM2_CONFIG_FILE]),
        create=_lazy(_SAM2, "create_sam2_model"), read_state=_SAM_STATE_FILE,
        recognise=_lazy(_SAM2, "recognise_sam2"),
        random_init=_lazy(_RANDOM, "write_random_state_dict", wrap="model"),
        embedding_parts={"torch": ("image_embedding", "high_res_features"),
                         "onnx": ("image_embedding", "high_res_features")}),
    Family(
        name="sam3", title="SAM 3",
        # its checkpoint is a hub-format directory, fetched from the hub repository its url names
        variants=(Variant("sam3", "default", "sam3", "https://huggingface.co/facebook/sam3",
                          _lazy(_SAM3, "build_click_model")),),
        default_config="default", runtimes=("torch",), onnx_by_default=frozenset(),
        create=_lazy(_SAM3, "create_sam3_model"), read_state=_lazy(_SAM3, "click_model_state"),
        recognise=_lazy(_SAM3, "recognise_sam3"),
        random_init=_lazy(_SAM3, "write_random_checkpoint_dir"),
        # + vision_state with keep_vision_state (concept_model=sam3)
        embedding_parts={"torch": ("image_embedding", "high_res_features")}),
]}


def family_of(variant: Variant) -> Family:
    return FAMILIES[variant.model_name]


def recognise(state: Mapping[str, Any]) -> Optional[str]:
    """The variant key a state dict looks like (each family's recogniser asked in turn), or None."""
    for family in FAMILIES.values():
        key = family.recognise(state)
        if key:
            return key
    return None


# -- the runtime choice -----------------------------------------------------------------------------
def _is_cpu(device: Optional[str]) -> bool:
    from sam_backend.errors import ConfigError
    from sam_backend.models.loading import resolve_device

    try:
        return resolve_device(device).type == "cpu"
    except ConfigError:
        return True  # create_model reports the bad device itself


def choose_runtime(variant: Variant, device: Optional[str] = "cpu", asked: str = "auto") -> str:
    """The runtime (``torch`` or ``onnx``) that runs ``variant`` on ``device`` when ``asked``
    (auto, torch or onnx): the one place this is decided (model creation, the store's model
    identity, /health all ask here).

    ``auto``: onnx for the row's ``onnx_by_default`` configs on a CPU device, else torch.
    ``onnx`` for a family without an onnx runtime: torch. A runtime module may still fall back
    from onnx to torch for one checkpoint (an export that fails or disagrees); the loaded model's
    ``runtime`` says what runs."""
    from sam_backend.errors import ConfigError

    if asked not in RUNTIME_NAMES:
        raise ConfigError(f"runtime={asked!r}: use {', '.join(RUNTIME_NAMES[:-1])} or "
                          f"{RUNTIME_NAMES[-1]}")
    family = family_of(variant)
    if asked == "auto":
        return "onnx" if variant.sam_config in family.onnx_by_default and _is_cpu(device) \
            else "torch"
    return asked if asked in family.runtimes else family.runtimes[0]


# -- words for the options' help ------------------------------------------------------------------
def model_name_help() -> str:
    names = ", ".join(f"{f.name} ({f.title})" for f in FAMILIES.values())
    return f"{names}; default: inferred from sam_checkpoint_file, else {DEFAULT_MODEL_NAME}"


def sam_config_help() -> str:
    configs = "; ".join(f"{f.help_configs or '/'.join(f.configs)} ({f.name})"
                        for f in FAMILIES.values())
    defaults = ", ".join(f"{f.name}: {f.default_config}" for f in FAMILIES.values())
    return f"{configs}. Default per model: {defaults}"


def runtime_help() -> str:
    onnx = ", ".join(f.name for f in FAMILIES.values() if "onnx" in f.runtimes)
    return (f"torch, onnx ({onnx}), or auto (per variant and device: the fastest runtime whose "
            f"masks match torch's)")
