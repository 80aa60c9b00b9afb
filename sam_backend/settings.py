"""Start-up options: ``--with key=value`` (label-studio-ml style), environment variables, defaults.

Precedence: an explicit option (``--with`` / ``sam-backend serve --option``) beats the environment
variable of the same name in upper case (``MODEL_NAME=sam``), which beats the default.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional

from sam_backend.server.auth import BasicAuth
from sam_backend.errors import ConfigError
from sam_backend.images.netpolicy import parse_image_hosts

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean: use true or false")


@dataclass
class Settings:
    """Every option, its default, and what it does (the README's option table mirrors this)."""

    model_name: Optional[str] = field(default=None, metadata={
        "help": "sam, sam_hq, mobile_sam or sam2 (default: inferred from sam_checkpoint_file, "
                "else mobile_sam)"})
    sam_config: Optional[str] = field(default=None, metadata={
        "help": "vit_b/vit_l/vit_h (sam), + vit_tiny (sam_hq), vit_t (mobile_sam), "
                "hiera_tiny/hiera_small/hiera_base_plus/hiera_large (sam2); default per model: "
                "vit_b, vit_b, vit_t, hiera_tiny"})
    sam_checkpoint_file: Optional[str] = field(default=None, metadata={
        "help": "checkpoint path (default: weights/<official file name>, downloaded at start "
                "when missing)"})
    device: str = field(default="auto", metadata={
        "help": "auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps"})
    runtime: str = field(default="auto", metadata={
        "help": "torch, onnx, or auto (the fastest runtime that is faithful for the variant)"})
    out_mask: bool = field(default=True, metadata={
        "help": "return a BrushLabels mask (Label Studio RLE)"})
    out_bbox: bool = field(default=True, metadata={
        "help": "return the mask's tight RectangleLabels box"})
    out_poly: bool = field(default=False, metadata={
        "help": "return PolygonLabels, one per connected component"})
    poly_tolerance: float = field(default=1.5, metadata={
        "help": "polygon simplification tolerance in pixels (Douglas-Peucker epsilon)"})
    poly_min_area: float = field(default=64.0, metadata={
        "help": "connected components smaller than this many pixels get no polygon"})
    embedding_cache_mb: int = field(default=1024, metadata={
        "help": "bound of the in-memory embedding cache, MiB (per image in float16: SAM and "
                "MobileSAM 2 MiB; HQ-SAM 6 MiB with onnx, 26 MiB for vit_b with torch; SAM 2 "
                "8 MiB)"})
    embedding_dtype: str = field(default="float16", metadata={
        "help": "how cached embeddings are stored: float16 (half the memory; masks within the "
                "tolerance the README gives) or float32 (bit-exact)"})
    offline: bool = field(default=False, metadata={
        "help": "never download checkpoints (also SAM_BACKEND_OFFLINE=1)"})
    precompute: bool = field(default=True, metadata={
        "help": "start encoding a task's image when Label Studio asks for predictions without a "
                "prompt (task opened)"})
    basic_auth_user: Optional[str] = field(default=None, metadata={
        "help": "require HTTP basic auth with this user (also BASIC_AUTH_USER); enter it in Label "
                "Studio's Connect Model dialog"})
    basic_auth_pass: Optional[str] = field(default=None, repr=False, metadata={
        "help": "the basic auth password (better set as BASIC_AUTH_PASS: a command line is "
                "visible to other users of the machine)"})
    image_hosts: Optional[str] = field(default=None, metadata={
        "help": "comma-separated hosts images may be downloaded from besides Label Studio "
                "(host, host:port, *.domain); default: any host"})
    allow_link_local_images: bool = field(default=False, metadata={
        "help": "allow image downloads from link-local / cloud metadata addresses (169.254.0.0/16, "
                "fe80::/10); off by default"})

    embedding_store: Optional[str] = field(default=None, metadata={
        "help": "redis://host:port/db: a shared embedding store (second tier under the memory "
                "cache) and precompute queue for replicas and `sam-backend worker`s; unset = off"})
    embedding_store_ttl: int = field(default=7 * 24 * 3600, metadata={
        "help": "seconds an embedding lives in the store (0 = until Redis evicts it; bound "
                "Redis with maxmemory + allkeys-lru)"})
    embedding_store_wait: float = field(default=30.0, metadata={
        "help": "seconds a replica waits for another replica's or a worker's encode of the same "
                "image before encoding itself (also the expiry of that encode's lock)"})
    precompute_job_timeout: int = field(default=120, metadata={
        "help": "seconds a worker may spend on one queued encode; the job of a killed worker "
                "is retried this + 60 s after it started"})
    # -- limits (README "Limits"): each bounds one resource; past it a request gets a 4xx -------
    local_files_document_root: Optional[str] = field(default=None, metadata={
        "help": "the only directory local paths, file:// URLs and /data/local-files/?d= are read "
                "from (regular files only); unset: local files are off"})
    max_points: int = field(default=512, metadata={
        "help": "regions per prompt (context.result); more is refused with 400"})
    max_tasks: int = field(default=64, metadata={
        "help": "tasks per /predict request; more is refused with 400"})
    max_request_mb: float = field(default=32.0, metadata={
        "help": "request body size, MiB; a larger body is refused with 413"})
    max_label_config_kb: int = field(default=1024, metadata={
        "help": "size of a labeling config, KiB; a larger one is refused with 400"})
    label_config_cache_mb: float = field(default=16.0, metadata={
        "help": "memory bound of the parsed labeling-config cache, MiB"})
    max_projects: int = field(default=1000, metadata={
        "help": "projects whose /setup config is remembered (least recently used forgotten)"})
    image_memory_mb: int = field(default=4096, metadata={
        "help": "downloaded bytes plus decoded pixels of all images being loaded at once, MiB; "
                "a load waits for room (up to the image timeout), an image larger than the "
                "whole budget is refused with 400"})
    max_concurrent_loads: int = field(default=4, metadata={
        "help": "requests loading or encoding a new image at once; more get 503 at once, so "
                "clicks on embedded images and /health always find a free thread"})
    request_timeout: float = field(default=10.0, metadata={
        "help": "sam-backend serve: seconds to receive a request's headers and body; a slower "
                "client is disconnected"})

    concept_model: str = field(default="none", metadata={
        "help": "label by concept (text -> every instance): none, grounding_dino (an "
                "open-vocabulary detector's boxes -> the click model's masks), sam3"})
    concept_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "the concept model's directory (transformers format: config, weights, "
                "processor/tokenizer); default weights/<engine's default directory>"})
    concept_threshold: float = field(default=0.5, metadata={
        "help": "keep instances whose score is above this (0..1)"})
    concept_nms_iou: float = field(default=0.7, metadata={
        "help": "of two instances of one label whose boxes overlap with IoU above this, the "
                "lower-scored one is dropped (1 = keep all)"})
    max_instances: int = field(default=50, metadata={
        "help": "at most this many instances per label, highest scores first"})
    concept_labels: Optional[str] = field(default=None, metadata={
        "help": "comma-separated labels that take part in auto-annotation (default: all)"})
    auto_annotate: bool = field(default=False, metadata={
        "help": "a task opened / 'Retrieve predictions' gets every instance of every label as "
                "its prediction (needs concept_model)"})
    concept_timeout: float = field(default=20.0, metadata={
        "help": "seconds an auto-annotation /predict waits for the concept pass; later it "
                "finishes in the background and the next ask is answered from its result"})

    @classmethod
    def option_names(cls):
        return [f.name for f in fields(cls)]

    @classmethod
    def load(cls, options: Optional[Mapping[str, Any]] = None,
             environ: Optional[Mapping[str, str]] = None) -> "Settings":
        """Settings from explicit ``options`` over environment variables over defaults.

        Unknown option names are an error (a typo must not be silently ignored).
        """
        options = dict(options or {})
        environ = os.environ if environ is None else environ
        names = cls.option_names()
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}: known options are "
                              f"{', '.join(names)}")
        values: Dict[str, Any] = {}
        for f in fields(cls):
            if f.name in options and options[f.name] is not None:
                raw = options[f.name]
            elif f.name.upper() in environ:
                raw = environ[f.name.upper()]
            else:
                continue
            values[f.name] = _coerce(f, raw)
        if "offline" not in values and "SAM_BACKEND_OFFLINE" in environ:
            values["offline"] = parse_bool("SAM_BACKEND_OFFLINE", environ["SAM_BACKEND_OFFLINE"])
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.runtime not in ("auto", "torch", "onnx"):
            raise ConfigError(f"runtime={self.runtime!r}: use auto, torch or onnx")
        if self.embedding_dtype not in ("float16", "float32"):
            raise ConfigError(f"embedding_dtype={self.embedding_dtype!r}: use float16 or float32")
        if self.embedding_cache_mb <= 0:
            raise ConfigError("embedding_cache_mb must be positive")
        if self.poly_tolerance < 0 or self.poly_min_area < 0:
            raise ConfigError("poly_tolerance and poly_min_area must not be negative")
        BasicAuth(self.basic_auth_user, self.basic_auth_pass)  # both or neither
        parse_image_hosts(self.image_hosts)
        if self.embedding_store:
            from sam_backend.embeddings.store import check_store_url

            check_store_url(self.embedding_store)
        if self.embedding_store_ttl < 0 or self.embedding_store_wait < 0 \
                or self.precompute_job_timeout <= 0:
            raise ConfigError("embedding_store_ttl and embedding_store_wait must not be negative, "
                              "precompute_job_timeout must be positive")
        for name in ("max_points", "max_tasks", "max_request_mb", "max_label_config_kb",
                     "label_config_cache_mb", "max_projects", "image_memory_mb",
                     "max_concurrent_loads", "request_timeout"):
            value = getattr(self, name)
            if not (value > 0 and value < float("inf")):
                raise ConfigError(f"{name}={value!r} must be a positive number")
        if self.concept_model not in ("none", "grounding_dino", "sam3"):
            raise ConfigError(f"concept_model={self.concept_model!r}: use none, grounding_dino "
                              f"or sam3")
        if not 0 <= self.concept_threshold <= 1 or not 0 <= self.concept_nms_iou <= 1:
            raise ConfigError("concept_threshold and concept_nms_iou must be between 0 and 1")
        if self.max_instances <= 0 or self.concept_timeout <= 0:
            raise ConfigError("max_instances and concept_timeout must be positive")
        if self.auto_annotate and self.concept_model == "none":
            raise ConfigError("auto_annotate=true needs a concept model: add "
                              "concept_model=grounding_dino (or sam3)")

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)


def _coerce(f: dataclasses.Field, raw: Any) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if isinstance(raw, str):
        raw = raw.strip()
    try:
        if "bool" in kind:
            return parse_bool(f.name, raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{f.name}={raw!r} is not a valid {kind}") from None
    if raw in ("", None):
        return None if "Optional" in kind else f.default
    return str(raw)
