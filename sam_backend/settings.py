"""The one place options are read: ``--with key=value`` (label-studio-ml style), a command's
``--option value`` flags, environment variables, defaults.

Precedence: an explicit option (``--with`` / ``sam-backend serve --option``) beats the environment
variable of the same name in upper case (``MODEL_NAME=sam``), which beats the default. Some options
have further environment names, tried after that one (``option(..., env=...)``): for example
``SAM_BACKEND_OFFLINE=1`` for ``offline``, ``LABEL_STUDIO_HOST`` for ``label_studio_url``. An empty
variable counts as unset.

The start commands' own flags (``-p/--port``, ``--host``, ``--log-level``) are not options: they
default to ``PORT``, ``HOST`` and ``LOG_LEVEL``, the variables label-studio-ml's template reads
(:func:`add_listen_arguments`, :func:`from_environment`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from sam_backend.common.text import parse_bool
from sam_backend.errors import ConfigError, SamBackendError
from sam_backend.images.config import (DEFAULT_CACHE_MAX_BYTES, DEFAULT_MAX_CONCURRENT_DOWNLOADS,
                                       DEFAULT_MAX_DOWNLOAD_BYTES, DEFAULT_TIMEOUT)
from sam_backend.images.decode import DEFAULT_MAX_PIXELS
from sam_backend.images.netpolicy import parse_image_hosts
from sam_backend.models import families
from sam_backend.video.clip import (DEFAULT_MAX_VIDEO_BYTES, DEFAULT_MAX_VIDEO_FRAME_PIXELS,
                                    DEFAULT_MAX_VIDEO_FRAMES, DEFAULT_MAX_VIDEO_SECONDS,
                                    DEFAULT_VIDEO_TIMEOUT)


def check_basic_auth(user: Optional[str], password: Optional[str]) -> None:
    """Basic auth's options: both a user and a password, or neither; no ':' in the user (the
    HTTP layer's :class:`~sam_backend.server.auth.BasicAuth` checks them with this too)."""
    user = user or None
    password = password or None
    if (user is None) != (password is None):
        missing = "basic_auth_pass (BASIC_AUTH_PASS)" if password is None else \
            "basic_auth_user (BASIC_AUTH_USER)"
        raise ConfigError(f"basic auth needs both a user and a password: {missing} is not "
                          "set. Set both, or neither to run without authentication")
    if user is not None and ":" in user:
        raise ConfigError("basic_auth_user must not contain ':' (HTTP basic auth separates "
                          "user and password with it)")


def option(default: Any, help: str, env: Sequence[str] = (),  # noqa: A002 - argparse's word
           **kwargs) -> Any:
    """A settings field: its default, its ``--help`` text (the README's option table too) and
    ``env``: environment names read after the field's own upper-case name, in this order."""
    return dataclasses.field(default=default, metadata={"help": help, "env": tuple(env)},
                             **kwargs)


def env_names(f: dataclasses.Field) -> Tuple[str, ...]:
    """The environment variables a settings field is read from, first one first."""
    return (f.name.upper(),) + tuple(f.metadata.get("env", ()))


@dataclass
class Settings:
    """Every option, its default, and what it does (the README's option table mirrors this)."""

    # model_name, sam_config and runtime: their values come from the family table
    model_name: Optional[str] = option(None, families.model_name_help())
    sam_config: Optional[str] = option(None, families.sam_config_help())
    sam_checkpoint_file: Optional[str] = option(
        None, "checkpoint path (default: weights/<official file name>, downloaded at start when "
        "missing)")
    device: str = option("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps")
    runtime: str = option("auto", families.runtime_help())
    out_mask: bool = option(True, "return a BrushLabels mask (Label Studio RLE)")
    out_bbox: bool = option(True, "return the mask's tight RectangleLabels box")
    out_poly: bool = option(False, "return PolygonLabels, one per connected component")
    poly_tolerance: float = option(
        1.5, "polygon simplification tolerance in pixels (Douglas-Peucker epsilon)")
    poly_min_area: float = option(
        64.0, "connected components smaller than this many pixels get no polygon")
    embedding_cache_mb: int = option(
        1024, "bound of the in-memory embedding cache, MiB (per image in float16: SAM and "
        "MobileSAM 2 MiB; HQ-SAM 6 MiB with onnx, 26 MiB for vit_b with torch; SAM 2 8 MiB)")
    embedding_dtype: str = option(
        "float16", "how cached embeddings are stored: float16 (half the memory; masks within the "
        "tolerance the README gives) or float32 (bit-exact)")
    video_feature_cache_mb: int = option(
        2048, "bound of the video trackers' per-frame feature cache, MiB, over all clips (per "
        "frame: SAM 2.1 16 MiB, SAM 3 21 MiB; a frame still cached is not encoded again when a "
        "correction re-tracks)")
    video_sessions: int = option(
        2, "clips kept open per tracker (their features and tracking state), least recently "
        "used closed first")
    offline: bool = option(False, "never download checkpoints", env=("SAM_BACKEND_OFFLINE",))
    precompute: bool = option(
        True, "start encoding a task's image when Label Studio asks for predictions without a "
        "prompt (task opened)")
    basic_auth_user: Optional[str] = option(
        None, "require HTTP basic auth with this user (also BASIC_AUTH_USER); enter it in Label "
        "Studio's Connect Model dialog")
    basic_auth_pass: Optional[str] = option(
        None, "the basic auth password (better set as BASIC_AUTH_PASS: a command line is visible "
        "to other users of the machine)", repr=False)
    image_hosts: Optional[str] = option(
        None, "comma-separated hosts images may be downloaded from besides Label Studio (host, "
        "host:port, *.domain); default: any host")
    allow_link_local_images: bool = option(
        False, "allow image downloads from link-local / cloud metadata addresses (169.254.0.0/16, "
        "fe80::/10); off by default")

    embedding_store: Optional[str] = option(
        None, "redis://host:port/db: a shared embedding store (second tier under the memory cache)"
        " and precompute queue for replicas and `sam-backend worker`s; unset = off")
    embedding_store_ttl: int = option(
        7 * 24 * 3600, "seconds an embedding lives in the store (0 = until Redis evicts it; bound "
        "Redis with maxmemory + allkeys-lru)")
    embedding_store_wait: float = option(
        30.0, "seconds a replica waits for another replica's or a worker's encode of the same "
        "image before encoding itself (also the expiry of that encode's lock)")
    precompute_job_timeout: int = option(
        120, "seconds a worker may spend on one queued encode; the job of a killed worker is "
        "retried this + 60 s after it started")
    # -- where images come from (README "Images: where they come from") -----------------------
    label_studio_url: Optional[str] = option(
        None, "Label Studio's address as the backend reaches it; else the hostname Label Studio "
        "sends in /setup", env=("LABEL_STUDIO_HOST",))
    label_studio_api_key: Optional[str] = option(
        None, "a legacy or personal access token for Label Studio, else the token sent in /setup "
        "(better set in the environment: a command line is visible to other users)",
        env=("LABEL_STUDIO_ACCESS_TOKEN",), repr=False)
    image_cache_dir: Optional[str] = option(
        None, "disk cache of downloaded images (default ~/.cache/sam_backend/images)",
        env=("SAM_BACKEND_IMAGE_CACHE_DIR",))
    image_cache_bytes: int = option(DEFAULT_CACHE_MAX_BYTES, "bound of that cache, bytes; 0 = off",
                                    env=("SAM_BACKEND_IMAGE_CACHE_BYTES",))
    # -- limits (README "Limits"): each bounds one resource; past it a request gets a 4xx -------
    max_image_pixels: int = option(
        DEFAULT_MAX_PIXELS, "larger images are refused from their header, before decoding",
        env=("SAM_BACKEND_MAX_IMAGE_PIXELS",))
    max_image_bytes: int = option(DEFAULT_MAX_DOWNLOAD_BYTES, "bytes of a download or local file",
                                  env=("SAM_BACKEND_MAX_IMAGE_BYTES",))
    image_timeout: float = option(
        DEFAULT_TIMEOUT, "seconds for a whole image download, redirects and body included",
        env=("SAM_BACKEND_IMAGE_TIMEOUT",))
    max_video_bytes: int = option(
        DEFAULT_MAX_VIDEO_BYTES, "bytes of a video download or local video file",
        env=("SAM_BACKEND_MAX_VIDEO_BYTES",))
    max_video_seconds: float = option(
        DEFAULT_MAX_VIDEO_SECONDS, "seconds of a video (frames that decode / frame rate)",
        env=("SAM_BACKEND_MAX_VIDEO_SECONDS",))
    max_video_frame_pixels: int = option(
        DEFAULT_MAX_VIDEO_FRAME_PIXELS, "pixels of one video frame (width x height), checked "
        "from the header before decoding", env=("SAM_BACKEND_MAX_VIDEO_FRAME_PIXELS",))
    max_video_frames: int = option(
        DEFAULT_MAX_VIDEO_FRAMES, "frames of a video (counted as they decode, not as the header "
        "claims)", env=("SAM_BACKEND_MAX_VIDEO_FRAMES",))
    video_timeout: float = option(
        DEFAULT_VIDEO_TIMEOUT, "seconds for a whole video download, redirects and body included",
        env=("SAM_BACKEND_VIDEO_TIMEOUT",))
    local_files_document_root: Optional[str] = option(
        None, "the only directory local paths, file:// URLs and /data/local-files/?d= are read "
        "from (regular files only); unset: local files are off")
    max_points: int = option(512, "regions per prompt (context.result); more is refused with 400")
    max_tasks: int = option(64, "tasks per /predict request; more is refused with 400")
    max_request_mb: float = option(
        32.0, "request body size, MiB; a larger body is refused with 413")
    max_label_config_kb: int = option(
        1024, "size of a labeling config, KiB; a larger one is refused with 400")
    label_config_cache_mb: float = option(
        16.0, "memory bound of the parsed labeling-config cache, MiB")
    max_projects: int = option(
        1000, "projects whose /setup config is remembered (least recently used forgotten)")
    image_memory_mb: int = option(
        4096, "memory of what requests build, MiB: downloaded bytes and decoded pixels of the "
        "images being loaded, each task's full-size mask while it is made, and every /predict's "
        "results (regions and their JSON) until its answer is sent; a load waits for room (up to "
        "the image timeout), a mask or a result up to memory_wait, then 503; an image larger "
        "than the whole budget is refused with 400")
    memory_wait: float = option(
        5.0, "seconds a task's mask or result waits for room in image_memory_mb before the "
        "/predict is answered 503 (early, rather than after minutes of work)")
    max_concurrent_loads: int = option(
        4, "requests decoding and encoding a new image at once (its bytes are already fetched: "
        "waiting on a host holds a download slot, not this); more get 503 at once, so clicks on "
        "embedded images and /health always find a free thread")
    max_concurrent_downloads: int = option(
        DEFAULT_MAX_CONCURRENT_DOWNLOADS, "image downloads at once (hosts that are slow or never "
        "answer hold these, up to image_timeout); more get 503 at once. Local files and "
        "disk-cache hits take none")
    request_timeout: float = option(
        10.0, "seconds from a request's first byte to its last (headers and body); a slower "
        "client is answered 408 and disconnected (a deadline: trickling bytes do not extend it)")
    max_connections: int = option(
        1000, "open client connections at once; more wait in the listen backlog (slow or idle "
        "clients hold a connection, never a thread)")
    predict_timeout: float = option(
        90.0, "seconds a /predict may work (Label Studio gives up after 100 s); past it the work "
        "stops and the answer is 503, and work whose client disconnected stops too")

    concept_model: str = option(
        "none", "label by concept (text -> every instance): none, grounding_dino (an "
        "open-vocabulary detector's boxes -> the click model's masks), sam3")
    concept_checkpoint: Optional[str] = option(
        None, "the concept model's directory (transformers format: config, weights, "
        "processor/tokenizer); default weights/<engine's default directory>")
    concept_threshold: float = option(0.5, "keep instances whose score is above this (0..1)")
    concept_nms_iou: float = option(
        0.7, "of two instances of one label whose boxes overlap with IoU above this, the "
        "lower-scored one is dropped (1 = keep all)")
    max_instances: int = option(50, "at most this many instances per label, highest scores first")
    concept_passes: str = option(
        "joined", "how grounding_dino asks for a pass's labels: joined (all phrases in one "
        "caption, 'cat. dog. red car.', one detector pass per caption, as many captions as its "
        "text encoder's token limit needs) or per_label (one detector pass per phrase)")
    concept_image_size: int = option(
        0, "the shorter side, in pixels, of grounding_dino's detector input (0: its processor's "
        "own, 800 with the longer side at most 1333; smaller is faster and misses small objects)")
    concept_labels: Optional[str] = option(
        None, "comma-separated labels that take part in auto-annotation (default: all)")
    auto_annotate: bool = option(
        False, "a task opened / 'Retrieve predictions' gets every instance of every label as its "
        "prediction (needs concept_model)")
    concept_timeout: float = option(
        20.0, "seconds an auto-annotation /predict waits for the concept pass; later it finishes "
        "in the background and the next ask is answered from its result")
    max_phrases: int = option(
        32, "phrases in one typed concept prompt (split at commas and lines); more is refused with "
        "400")
    max_phrase_chars: int = option(
        200, "characters of one typed phrase; a longer one is refused with 400 (and so is a phrase "
        "longer than the concept model's text encoder takes, in tokens)")
    max_concept_labels: int = option(
        100, "labels one concept pass asks for (auto-annotation: the config's labels, or "
        "concept_labels); more is refused with 400")

    # video (README "Video"): tracking the boxes of a video task
    max_track_frames: int = option(
        0, "frames tracked from the first box of a video task (never short of its last box); "
        "0 = to the clip's end")
    video_answer_frames: int = option(
        16, "frames a video /predict answers with first (from the first box); the rest of the "
        "clip is tracked in the background and answers the next ask. 0 = the whole range at once")
    video_answer_timeout: float = option(
        20.0, "seconds a video /predict waits for those frames; later it answers [] (Label "
        "Studio asks again) while the tracking goes on")
    video_background: str = option(
        "thread", "where tracking runs: thread (a thread of the serving process) or worker (an "
        "RQ queue in embedding_store's Redis, served by `sam-backend worker --queue video`)")
    video_deliver: bool = option(
        True, "when a video /predict answered the first frames only (or nothing in time), write "
        "the whole tracks to the task in Label Studio once they are done (replacing the partial "
        "prediction); needs Label Studio's address and token (LABEL_STUDIO_URL / "
        "LABEL_STUDIO_API_KEY, or what /setup sends). false: Retrieve Predictions fetches them")
    video_job_timeout: int = option(
        3600, "seconds one tracking pass (a clip's objects to the end) may take, in a thread or "
        "a worker")

    # learning from the labels (README "Learn from your labels")
    trainer: str = option(
        "rf_detr", "what a training run fine-tunes: rf_detr (a closed-set real-time detector + "
        "segmenter of the project's labels) or grounding_dino (the concept detector, kept "
        "open-vocabulary)")
    trained_dir: Optional[str] = option(
        None, "where trained versions live (a shared volume for a team); default "
        "<weights directory>/trained")
    train_every: int = option(
        0, "start a training run after every N new or updated annotations of a project "
        "(Label Studio's annotation webhooks); 0 = off")
    train_epochs: int = option(30, "epochs of one training run")
    train_batch_size: int = option(4, "images per training step")
    train_learning_rate: float = option(1e-4, "the optimiser's learning rate")
    train_image_size: int = option(
        0, "the side images are resized to for training (0: the trainer's default; rf_detr "
        "rounds it to a multiple of its patch grid: 24 px for the rf-detr-seg models, whose "
        "default is 384 for rf-detr-seg-small)")
    train_seed: int = option(0, "the seed of a run (split, initialisation, augmentation, order)")
    train_min_tasks: int = option(10, "a run needs at least this many usable annotated tasks")
    train_held_out: float = option(
        0.2, "the fraction of tasks held out to evaluate a candidate (at least 2 tasks)")
    train_start: Optional[str] = option(
        None, "the starting weights of a project's first run: a directory in the trainer's "
        "format, or (rf_detr) a hub repository such as Roboflow/rf-detr-seg-medium (default: "
        "the pretrained model, Roboflow/rf-detr-seg-small for rf_detr, downloaded once into the "
        "weights directory)")
    train_random_init: bool = option(
        False, "start a project's first run from random weights of a reduced configuration "
        "(tests and smoke runs only: no download)")
    train_device: Optional[str] = option(
        None, "the device a run trains on (default: the backend's device)")
    train_threads: int = option(
        0, "CPU threads a run started by the server uses (0: all cores but one, so clicks keep "
        "a core; sam-backend train and a train worker use all)")
    promote: str = option(
        "if_better", "which candidates are served: if_better (held-out mAP not worse than the "
        "served version's, or the zero-shot engine's) or always")
    trained_threshold: float = option(
        0.3, "keep a trained version's instances whose score is above this (0..1; the "
        "zero-shot engine's is concept_threshold)")
    serve_trained: bool = option(
        True, "a project with a promoted version gets its task-open / Retrieve predictions / "
        "annotate predictions from it (false: from the concept model)")

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
                source, raw = f.name, options[f.name]
            else:
                found = [(name, environ[name]) for name in env_names(f)
                         if (environ.get(name) or "").strip()]
                if not found:
                    continue
                source, raw = found[0]
            values[f.name] = _coerce(f, raw, source)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.runtime not in families.RUNTIME_NAMES:
            raise ConfigError(f"runtime={self.runtime!r}: use auto, torch or onnx")
        if self.embedding_dtype not in ("float16", "float32"):
            raise ConfigError(f"embedding_dtype={self.embedding_dtype!r}: use float16 or float32")
        if self.embedding_cache_mb <= 0:
            raise ConfigError("embedding_cache_mb must be positive")
        if self.video_feature_cache_mb <= 0 or self.video_sessions <= 0:
            raise ConfigError("video_feature_cache_mb and video_sessions must be positive")
        if self.poly_tolerance < 0 or self.poly_min_area < 0:
            raise ConfigError("poly_tolerance and poly_min_area must not be negative")
        check_basic_auth(self.basic_auth_user, self.basic_auth_pass)  # both or neither
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
                     "max_concurrent_loads", "max_concurrent_downloads", "memory_wait",
                     "request_timeout", "max_connections", "predict_timeout", "max_image_pixels",
                     "max_image_bytes", "image_timeout", "max_video_bytes", "max_video_seconds",
                     "max_video_frame_pixels", "max_video_frames", "video_timeout"):
            value = getattr(self, name)
            if not (value > 0 and value < float("inf")):
                raise ConfigError(f"{name}={value!r} must be a positive number")
        if self.max_track_frames < 0 or self.video_answer_frames < 0:
            raise ConfigError("max_track_frames and video_answer_frames must not be negative "
                              "(0 = no bound)")
        if not (0 < self.video_answer_timeout < float("inf")) or self.video_job_timeout <= 0:
            raise ConfigError("video_answer_timeout and video_job_timeout must be positive")
        if self.video_background not in ("thread", "worker"):
            raise ConfigError(f"video_background={self.video_background!r}: use thread or "
                              f"worker")
        if self.video_background == "worker" and not self.embedding_store:
            raise ConfigError("video_background=worker needs embedding_store=redis://... (the "
                              "queue and the results live in that Redis)")
        if self.concept_model not in ("none", "grounding_dino", "sam3"):
            raise ConfigError(f"concept_model={self.concept_model!r}: use none, grounding_dino "
                              f"or sam3")
        if not 0 <= self.concept_threshold <= 1 or not 0 <= self.concept_nms_iou <= 1 or \
                not 0 <= self.trained_threshold <= 1:
            raise ConfigError("concept_threshold, trained_threshold and concept_nms_iou must be "
                              "between 0 and 1")
        if self.concept_passes not in ("joined", "per_label"):
            raise ConfigError(f"concept_passes={self.concept_passes!r}: use joined or per_label")
        if self.concept_image_size < 0:
            raise ConfigError(f"concept_image_size={self.concept_image_size!r} must not be "
                              f"negative (0: the detector's own input size)")
        if self.max_instances <= 0 or self.concept_timeout <= 0:
            raise ConfigError("max_instances and concept_timeout must be positive")
        for name in ("max_phrases", "max_phrase_chars", "max_concept_labels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive number")
        if self.trainer not in ("rf_detr", "grounding_dino"):
            raise ConfigError(f"trainer={self.trainer!r}: use rf_detr or grounding_dino")
        if self.promote not in ("if_better", "always"):
            raise ConfigError(f"promote={self.promote!r}: use if_better or always")
        if self.train_every < 0:
            raise ConfigError("train_every must not be negative (0 = off)")
        for name in ("train_epochs", "train_batch_size", "train_learning_rate", "train_min_tasks"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive number")
        if not 0 < self.train_held_out < 1 or self.train_image_size < 0 or self.train_threads < 0:
            raise ConfigError("train_held_out must be between 0 and 1 (exclusive), "
                              "train_image_size and train_threads must not be negative")
        if self.auto_annotate and self.concept_model == "none":
            raise ConfigError("auto_annotate=true needs a concept model: add "
                              "concept_model=grounding_dino (or sam3)")


def _coerce(f: dataclasses.Field, raw: Any, source: str) -> Any:
    """``raw`` typed as field ``f`` wants it; ``source``: the option or environment variable it
    came from, named in the error."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if isinstance(raw, str):
        raw = raw.strip()
    try:
        if "bool" in kind:
            return parse_bool(source, raw)
        if kind == "int":
            return _as_int(raw)
        if kind == "float":
            return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}={raw!r} is not a valid {kind}") from None
    if raw in ("", None):
        return None if "Optional" in kind else f.default
    return str(raw)


def _as_int(raw: Any) -> int:
    """An int, also from a whole number written as a float (``2e9``); ValueError otherwise."""
    try:
        return int(raw)
    except ValueError:
        value = float(raw)
        if not (math.isfinite(value) and value == int(value)):
            raise
        return int(value)


# -- the command line: ``--with k=v``, ``--option value``, and the start commands' flags ----------

def parse_with(pairs: Optional[List[str]]) -> Dict[str, str]:
    """``["k=v", ...]`` -> dict; values stay strings and Settings types them."""
    options: Dict[str, str] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SamBackendError(f"--with expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key.strip()] = value
    return options


def settings_from_args(args) -> Settings:
    """Settings from a command's ``--with k=v`` pairs (``args.kwargs``) and ``--option value``
    flags (:func:`add_option_arguments`); a flag beats the same option in ``--with``."""
    options = parse_with(args.kwargs)
    for name in Settings.option_names():
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    return Settings.load(options)


def add_option_arguments(parser) -> None:
    """``--with k=v ...`` and one ``--option value`` flag per setting."""
    parser.add_argument("--with", "--kwargs", dest="kwargs", nargs="+", metavar="KEY=VALUE",
                        help="options as label-studio-ml's --with takes them, e.g. "
                             "model_name=mobile_sam device=cpu")
    for f in fields(Settings):
        also = f.metadata.get("env")
        parser.add_argument(f"--{f.name}", default=None, help=f.metadata.get("help") + (
            f" (env {', '.join(env_names(f))})" if also else ""))


def from_environment(name: str, default: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """A start command's flag default: the environment variable ``name`` (``PORT``, ``HOST``,
    ``LOG_LEVEL``, as label-studio-ml's template reads them), else ``default``."""
    return (os.environ if environ is None else environ).get(name, default)


def add_listen_arguments(parser) -> None:
    """``-p/--port`` (default ``PORT``, else 9090) and ``--host`` (default ``HOST``, else
    0.0.0.0): where a start command listens."""
    parser.add_argument("-p", "--port", type=int, default=int(from_environment("PORT", "9090")))
    parser.add_argument("--host", default=from_environment("HOST", "0.0.0.0"))
