"""The wiring, in one place: the model, the segmenter, the shared embedding store, the encode
queue, the image loader, the concept engine and the :class:`PredictionService`, each built from
the one :class:`~sam_backend.settings.Settings`.

The server (:func:`sam_backend.server.app.build_app`), the workers and every command ask this
module; the layers below receive what they use (a segmenter, a loader, a queue, a factory) and
never build it, nor import anything above them (``tests/test_layers.py`` walks the imports).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from sam_backend.common.limits import MIB, MemoryBudget
from sam_backend.concepts.base import NO_CONCEPT_MODEL, ConceptEngine
from sam_backend.embeddings.engine import Segmenter, get_segmenter
from sam_backend.embeddings.memory import EmbeddingCache
from sam_backend.embeddings.precompute import EncodeQueue
from sam_backend.embeddings.store import EmbeddingStore, model_identity
from sam_backend.errors import ConfigError
from sam_backend.images.config import ImageAccessSettings
from sam_backend.images.loader import ImageLoader
from sam_backend.labelstudio.api import LabelStudioAPI
from sam_backend.labelstudio.deliveries import TrackDeliveries
from sam_backend.labelstudio.service import PredictionService
from sam_backend.labelstudio.video_service import VideoPredictions
from sam_backend.settings import Settings
from sam_backend.video.jobs import TrackingJobs, VideoQueue

log = logging.getLogger(__name__)


# -- the model and the segmenter ------------------------------------------------------------------

def build_model(settings: Settings):
    """Load the variant the settings ask for, on the runtime they ask for."""
    from sam_backend.models.runtimes import create_model
    from sam_backend.models.checkpoints import ensure_checkpoint, infer_variant

    variant = infer_variant(settings.model_name, settings.sam_config,
                            settings.sam_checkpoint_file)
    checkpoint = ensure_checkpoint(variant, settings.sam_checkpoint_file, offline=settings.offline)
    return create_model(variant, checkpoint, settings.device, settings.runtime)


def keeps_vision_state(settings: Settings) -> bool:
    """Whether embeddings carry SAM 3's backbone output too (``concept_model=sam3``)."""
    return settings.concept_model == "sam3"


def segmenter_for(settings: Settings) -> Segmenter:
    """The process-wide segmenter for these settings (loaded on first use)."""
    key = (settings.model_name, settings.sam_config, settings.sam_checkpoint_file,
           settings.device, settings.runtime, settings.embedding_dtype, settings.embedding_cache_mb,
           settings.embedding_store, settings.embedding_store_ttl, settings.embedding_store_wait)

    def build() -> Segmenter:
        started = time.perf_counter()
        model = build_model(settings)
        if keeps_vision_state(settings) and hasattr(model, "keep_vision_state"):
            # SAM 3's concept model runs on the click model's backbone output: every process
            # that encodes (web replicas and precompute workers alike) keeps it in the embedding
            model.keep_vision_state = True
        log.info("model %s ready in %.1f s", model.describe(), time.perf_counter() - started)
        store = None
        if settings.embedding_store:
            store = store_for(settings, identity_for(settings, model))
        return Segmenter(model, EmbeddingCache(settings.embedding_cache_mb * 1024 * 1024, store),
                         store_float16=settings.embedding_dtype == "float16")

    return get_segmenter(key, build)


# -- the shared store and the encode queue --------------------------------------------------------

def identity_for(settings: Settings, model=None) -> str:
    """The store's model identity for ``settings`` (of the loaded ``model`` when given: its
    actual runtime; else the runtime ``settings`` resolve to), without loading anything else."""
    from sam_backend.models.checkpoints import ensure_checkpoint, infer_variant
    from sam_backend.models.families import choose_runtime

    variant = infer_variant(settings.model_name, settings.sam_config, settings.sam_checkpoint_file)
    sha = getattr(model, "sha256", None)
    if not sha:
        from sam_backend.models.onnx_export import HASH_SIDECAR, checkpoint_sha256, onnx_dir_for

        checkpoint = ensure_checkpoint(variant, settings.sam_checkpoint_file,
                                       offline=settings.offline)
        sha = checkpoint_sha256(checkpoint, onnx_dir_for(checkpoint) / HASH_SIDECAR)
    # the loaded model's runtime (it may have fallen back to torch), else the family table's choice
    runtime = model.runtime if model is not None else \
        choose_runtime(variant, settings.device, settings.runtime)
    identity = model_identity(variant.key, sha, runtime, settings.embedding_dtype)

    # entries with SAM 3's backbone output (concept_model=sam3) are not mixed with click-only ones
    return identity + ":vision" if keeps_vision_state(settings) else identity


def store_for(settings: Settings, identity: str) -> EmbeddingStore:
    store = EmbeddingStore(settings.embedding_store, identity, ttl_s=settings.embedding_store_ttl,
                           wait_s=settings.embedding_store_wait)
    if not store.check():
        log.warning("embedding store %s is not reachable at start: the backend works from memory "
                    "and its own encoder until it is", store.display_url)
    return store


def encode_queue(settings: Settings, store: Optional[EmbeddingStore]) -> Optional[EncodeQueue]:
    """The workers' queue for ``store``'s model identity (None without a store)."""
    return None if store is None else EncodeQueue(store, settings.precompute_job_timeout)


# -- images ---------------------------------------------------------------------------------------

def image_loader(settings: Settings, budget: bool = False, local_paths_anywhere: bool = False,
                 **overrides) -> ImageLoader:
    """The image loader ``settings`` describe (``overrides``: fields of
    :class:`ImageAccessSettings`). ``budget``: loads share the ``image_memory_mb`` budget (the
    web process; a worker or a command loads one image at a time)."""
    access = ImageAccessSettings.from_settings(settings, **overrides)
    return ImageLoader(access, budget=MemoryBudget(settings.image_memory_mb * MIB) if budget
                       else None, local_paths_anywhere=local_paths_anywhere)


# -- concepts -------------------------------------------------------------------------------------

def create_concept_engine(settings: Settings, segmenter: Segmenter) -> ConceptEngine:
    """The engine ``settings.concept_model`` names, loaded now (raises ConfigError with what to
    do when it cannot be). A new concept engine is a module in ``concepts/`` plus its name here."""
    if settings.concept_model == "grounding_dino":
        from sam_backend.concepts.grounding_dino import GroundingDinoEngine

        return GroundingDinoEngine.load(settings.concept_checkpoint, segmenter,
                                        image_size=settings.concept_image_size,
                                        passes=settings.concept_passes)
    if settings.concept_model == "sam3":
        try:
            from sam_backend.concepts.sam3_engine import Sam3ConceptEngine  # type: ignore
        except ImportError:
            raise ConfigError(
                "concept_model=sam3 is not available in this version of the backend (it needs "
                "model_name=sam3); use concept_model=grounding_dino") from None
        return Sam3ConceptEngine.load(settings, segmenter)
    raise ConfigError(NO_CONCEPT_MODEL)


def concept_engine_factory(settings: Settings, segmenter: Segmenter
                           ) -> Optional[Callable[[], ConceptEngine]]:
    """What loads the concept engine on first use; None with ``concept_model=none``."""
    if settings.concept_model == "none":
        return None
    return lambda: create_concept_engine(settings, segmenter)


# -- video ----------------------------------------------------------------------------------------

def create_tracker(settings: Settings, segmenter: Optional[Segmenter] = None):
    """The video tracker of ``settings.model_name`` (the tracker table's row; ConfigError for a
    family without one), from the click model's checkpoint. ``segmenter``: the loaded click
    model, whose weights the tracker shares instead of loading them a second time (SAM 2.1
    hiera_tiny: 39M parameters, 155 MB; SAM 3: its ViT, ~1.8 GB); without one (a worker, a
    command) the tracker loads the checkpoint itself."""
    from sam_backend.models.checkpoints import ensure_checkpoint, infer_variant
    from sam_backend.video.trackers import tracker_factory

    variant = infer_variant(settings.model_name, settings.sam_config, settings.sam_checkpoint_file)
    factory = tracker_factory(variant.model_name)
    checkpoint = ensure_checkpoint(variant, settings.sam_checkpoint_file, offline=settings.offline)
    click_model = getattr(segmenter, "model", None) if segmenter is not None else None
    if click_model is not None and getattr(click_model, "variant", None) != variant:
        click_model = None  # another model: nothing to share
    started = time.perf_counter()
    tracker = factory(variant, checkpoint, settings.device, click_model=click_model,
                      feature_cache_mb=settings.video_feature_cache_mb,
                      max_sessions=settings.video_sessions)
    log.info("video tracker %s ready in %.1f s", variant.key, time.perf_counter() - started)
    return tracker


def tracker_identity(settings: Settings, model=None) -> str:
    """What a tracking result depends on: ``track:<variant>:<checkpoint sha256[:16]>`` (the
    tracker runs on torch whatever the click model's runtime), the same in a replica (``model``:
    its loaded click model) and in a worker that loads no click model."""
    variant_key, _runtime, _dtype, sha = identity_for(settings, model).split(":vision")[0] \
        .rsplit(":", 3)
    return f"track:{variant_key}:{sha}"


def clip_opener(settings: Settings, images: ImageLoader):
    """(url, task id) -> an open clip, through ``images``' sources, under the video limits."""
    from sam_backend.video.clip import VideoLimits, fetch_clip

    limits = VideoLimits.from_settings(settings)
    return lambda url, task_id: fetch_clip(images, url, task_id, limits=limits)


def tracking_jobs(settings: Settings, images: ImageLoader, segmenter: Optional[Segmenter] = None,
                  identity: Optional[str] = None) -> TrackingJobs:
    """Background tracking (:mod:`sam_backend.video.jobs`): the tracker loaded on first use
    (sharing ``segmenter``'s weights when given), clips through ``images``; with
    ``video_background=worker``, the team's queue and results in ``embedding_store``'s Redis."""
    queue = None
    if settings.video_background == "worker":
        store = segmenter.cache.tier if segmenter is not None else None
        if store is None:
            store = store_for(settings, identity_for(settings))
        queue = VideoQueue(store, identity or tracker_identity(settings),
                           settings.video_job_timeout)
    return TrackingJobs(lambda: create_tracker(settings, segmenter),
                        clip_opener(settings, images), queue, settings.video_job_timeout,
                        max_pending=settings.max_tasks)


def video_predictions(settings: Settings, segmenter: Segmenter, images: ImageLoader,
                      model_version: str) -> VideoPredictions:
    """The service's video side (its tracker is loaded by the first video task)."""
    identity = tracker_identity(settings, segmenter.model)
    jobs = tracking_jobs(settings, images, segmenter, identity)
    deliveries = None
    if settings.video_deliver:
        deliveries = TrackDeliveries(jobs, lambda: LabelStudioAPI(images), model_version)
    return VideoPredictions(settings, images, jobs, identity, model_version, deliveries)


# -- the service ----------------------------------------------------------------------------------

def prediction_service(settings: Settings, segmenter: Optional[Segmenter] = None,
                       images: Optional[ImageLoader] = None) -> PredictionService:
    """The service /setup and /predict call: the process-wide segmenter, an image loader under
    the memory budget, the workers' queue when a store is configured, the concept engine
    ``concept_model`` names. ``segmenter`` / ``images``: use these instead (tests)."""
    segmenter = segmenter_for(settings) if segmenter is None else segmenter
    images = image_loader(settings, budget=True) if images is None else images
    service = PredictionService(settings, segmenter, images,
                                queue=encode_queue(settings, segmenter.cache.tier),
                                concept_engine=concept_engine_factory(settings, segmenter))
    # tracks carry the model_version /setup gives Label Studio, which then asks no more for a
    # task holding one (a partial track carries another: the task is asked for again)
    service.video = video_predictions(settings, segmenter, images, service.model_version)
    return service
