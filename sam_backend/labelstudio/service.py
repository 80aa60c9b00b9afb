"""The Label Studio layer's service: /setup and /predict, from parsed JSON to Label Studio
results (:class:`PredictionService`, one per process; the HTTP routes call it directly).

    label config -> prompt -> image -> embedding -> mask -> regions

This layer knows Label Studio's shapes and the project's options; it does not know which SAM
variant or runtime runs (that is the engine layer's business, the
:class:`~sam_backend.embeddings.engine.Segmenter`), nor how images are fetched (the
:class:`~sam_backend.images.loader.ImageLoader`'s).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Tuple

import numpy as np

from sam_backend import __version__
from sam_backend.concepts.base import (EXEMPLARS_NEED_SAM3, NO_CONCEPT_MODEL, ConceptAnnotator,
                                       ConceptEngine, Exemplars)
from sam_backend.concepts.phrases import text_prompt_region
from sam_backend.errors import ConfigError, RequestError
from sam_backend.labelstudio.label_config import LabelConfig, LabelConfigCache
from sam_backend.common.deadline import UNBOUNDED, WorkScope
from sam_backend.common.limits import MIB, LoadGate, MemoryBudget, Reservation, check_count, shown
from sam_backend.labelstudio.prompts import PromptRequest, parse_context
from sam_backend.labelstudio.regions import brush_region, mask_bbox, mask_polygons, polygon_region, rectangle_region
from sam_backend.embeddings.store import StoreUnavailable
from sam_backend.models.base import Embedding

if TYPE_CHECKING:  # handed in by sam_backend.assembly, never built here
    from sam_backend.embeddings.engine import Segmenter
    from sam_backend.embeddings.precompute import EncodeQueue
    from sam_backend.images.loader import ImageLoader, ImageRef
    from sam_backend.labelstudio.video_service import VideoPredictions
    from sam_backend.settings import Settings

log = logging.getLogger(__name__)

# A task's working memory while its mask is made: the full-size logits, mask and RLE buffers,
# ~24 bytes per image pixel at the peak.
MASK_BYTES_PER_PIXEL = 24
# What a kept result costs until its answer is sent: a brush RLE value is a pointer in a Python
# list (the small ints themselves are shared) and up to 4 characters of JSON ("255,"), twice
# while the JSON text is turned into the response's bytes; a polygon point is a list of two
# floats and ~2 x 20 characters; each region has a few dicts and strings.
RLE_VALUE_BYTES = 8 + 2 * 4
POINT_BYTES = 56 + 16 + 2 * 24 + 2 * 20
REGION_BYTES = 2048


def project_id(value: Any) -> Optional[int]:
    """A Label Studio project id from what its requests carry: ``7``, ``"7"``, the
    ``"<id>.<created timestamp>"`` of /setup, /predict and /train (``"7.1700000000"``), or a
    project object (``{"id": 7, ...}``, webhooks). None when ``value`` names no project."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 < value < 2 ** 63 else None
    if isinstance(value, str):
        head = value.strip().split(".", 1)[0]
        if head.isdigit() and len(head) <= 18:
            return int(head) or None
    return None


class TrainedModels(Protocol):
    """What serves a project's promoted trained version (the training layer implements it:
    :class:`sam_backend.training.serving.TrainedModels`; this layer only calls it)."""

    def annotator(self, project: int) -> Optional[Tuple[ConceptAnnotator, str]]:
        """The project's trained version as a concept annotator and the ``model_version`` its
        predictions carry; None when the project has none (may load it: seconds, once)."""

    def model_version(self, project: int) -> Optional[str]:
        """The ``model_version`` :meth:`annotator` would answer with, without loading
        anything (for /setup, which Label Studio gives 3 s)."""


def result_bytes(regions: List[Dict[str, Any]]) -> int:
    """An upper estimate of the memory ``regions`` (Label Studio regions) take as Python objects
    plus their JSON text: what a /predict's answer holds until it is sent."""
    total = 0
    for region in regions:
        value = region.get("value") or {}
        total += REGION_BYTES + RLE_VALUE_BYTES * len(value.get("rle") or ()) \
            + POINT_BYTES * len(value.get("points") or ())
    return total


class PredictionService:
    # what a kept answer's regions cost until it is sent (the concept side counts its own with it)
    result_bytes = staticmethod(result_bytes)

    """Answers Label Studio's /setup and /predict (clicks, opened tasks, concept prompts) for any
    number of projects with one segmenter and one image loader: the Label Studio layer.

    Built by :func:`sam_backend.assembly.prediction_service`, which hands it what it uses:
    ``queue``, the workers' :class:`~sam_backend.embeddings.precompute.EncodeQueue` (with a
    shared store: opened tasks go there); ``concept_engine``, what loads the concept engine on
    first use (None: no concept model)."""

    def __init__(self, settings: "Settings", segmenter: "Segmenter", images: "ImageLoader",
                 queue: Optional["EncodeQueue"] = None,
                 concept_engine: Optional[Callable[[], ConceptEngine]] = None,
                 video: Optional["VideoPredictions"] = None):
        self.settings = settings
        self.segmenter = segmenter
        self.images = images
        #: the click model's name; the concept engine's or a trained version's follows it
        self.click_model_version = f"sam_backend-{__version__}:{segmenter.model.variant.key}"
        self.model_version = self.click_model_version
        self.concepts: Optional[ConceptAnnotator] = None
        if concept_engine is not None:
            self.model_version += f"+{settings.concept_model}"
            self.concepts = ConceptAnnotator(self, concept_engine)
        # project -> label config sent in /setup, least recently used first out
        self._projects: "OrderedDict[str, str]" = OrderedDict()
        self._projects_chars = 0
        self._projects_lock = threading.Lock()
        self.store = segmenter.cache.tier  # the shared embedding store, or None
        self.queue = queue  # with a store, opened tasks go to the workers' queue
        self.label_configs = LabelConfigCache(int(settings.label_config_cache_mb * MIB))
        # new images decoding and encoding at once (their bytes fetched before, under the
        # loader's download slots); the memory of loads, of masks being made and of results
        self.loads = LoadGate(settings.max_concurrent_loads, "max_concurrent_loads",
                              "decoding and encoding {held} new images")
        self.memory = images.budget or MemoryBudget(settings.image_memory_mb * MIB)
        # a project's promoted trained version (set by the server and `annotate` when
        # serve_trained is on): its task-open / Retrieve predictions answers come from it
        self.trained: Optional[TrainedModels] = None
        # video tasks (a VideoRectangle on a Video): their tracks (None: video is not served)
        self.video = video

    # -- /setup --------------------------------------------------------------------------------
    def setup(self, project: Optional[str], schema: Optional[str], hostname: Optional[str],
              access_token: Optional[str], authenticated: bool = False) -> None:
        """``authenticated``: the request came with valid basic auth (see ImageLoader)."""
        if schema:
            self.parse_config(schema)  # a bad config is reported at setup already
            key = str(project)
            with self._projects_lock:
                self._projects_chars -= len(self._projects.pop(key, ""))
                self._projects[key] = schema
                self._projects_chars += len(schema)
                # bounded in count and in size (the parsed-config budget counts the texts too)
                while len(self._projects) > self.settings.max_projects or (
                        len(self._projects) > 1 and self._projects_chars > self.label_configs.max_bytes):
                    _, old = self._projects.popitem(last=False)
                    self._projects_chars -= len(old)
        self.images.update_from_setup(hostname or None, access_token or None, authenticated)

    def parse_config(self, text: Any) -> LabelConfig:
        limit = self.settings.max_label_config_kb * 1024
        if isinstance(text, str) and len(text) > limit:
            raise RequestError(f"the labeling config has {len(text):,} characters, more than the "
                               f"limit of {limit:,} (max_label_config_kb)")
        return self.label_configs.parse(text)

    def label_config_for(self, project: Any, label_config: Optional[str]) -> LabelConfig:
        return self.parse_config(self.config_text_for(project, label_config))

    def config_text_for(self, project: Any, label_config: Optional[str]) -> Any:
        """The request's labeling config, else the one /setup gave for ``project`` ("")."""
        if not label_config:
            with self._projects_lock:
                label_config = self._projects.get(str(project))
        return label_config or ""

    # -- /predict ------------------------------------------------------------------------------
    def predict(self, tasks: Any, label_config: Optional[str], context: Any,
                project: Any = None, scope: WorkScope = UNBOUNDED,
                held: Optional[Reservation] = None) -> List[Dict[str, Any]]:
        """One result per task (Label Studio uses the first), or [] when there is no prompt.
        ``scope``: the request's deadline and whether its client is still there; long steps
        check it between units of work. ``held``: a reservation of :attr:`memory` that counts
        the results until the caller has sent them (and then releases it); without one, they
        are counted while they are made only."""
        if held is None:
            with self.memory.reservation(self.settings.memory_wait) as own:
                return self.predict(tasks, label_config, context, project, scope, own)
        if not isinstance(tasks, list) or not tasks:
            raise RequestError("the request has no tasks: /predict expects {\"tasks\": [{...}], "
                               "\"label_config\": \"<View>...</View>\", \"params\": {\"context\": "
                               "{...}}}")
        check_count(tasks, self.settings.max_tasks, "the request", "tasks", "max_tasks")
        for index, task in enumerate(tasks):
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                raise RequestError(f"tasks[{index}] is not a task object with 'data'")
            task_id = task.get("id")
            if task_id is not None and (isinstance(task_id, bool) or not (
                    isinstance(task_id, str) and len(task_id) <= 100
                    or isinstance(task_id, int) and abs(task_id) < 2 ** 63)):
                raise RequestError(f"tasks[{index}].id must be an integer, got {shown(task_id)}")
        typed = text_prompt_region(context, self.settings.max_points)
        # without a concept model a typed prompt is refused before the prompt or the config is read
        concepts = self.concept_annotator() if typed is not None else None
        config = self.label_config_for(project, label_config)
        if self.video is not None and self.video.handles(config):
            return self.video.predict(tasks, config, context, scope)  # tracks
        if typed is not None:
            return concepts.annotate_typed(tasks, config, typed, scope, held)
        prompt = parse_context(context, config, self.settings.max_points)
        if isinstance(prompt, Exemplars):
            exemplars = self.exemplar_annotator()
            return [exemplars.annotate_exemplars(task, config, prompt, scope, held)
                    for task in tasks]
        if prompt is None:
            trained = self.trained_annotator(project)
            if trained is not None:
                answers = trained[0].auto_annotate(tasks, config, scope)
                self._precompute_all(tasks, config, scope)  # for the clicks that correct it
                return answers
            if self.settings.auto_annotate:
                return self.concept_annotator().auto_annotate(tasks, config, scope)
            self._precompute_all(tasks, config, scope)
            return []
        return [self.predict_task(task, config, prompt, scope, held) for task in tasks]

    def _precompute_all(self, tasks: List[Dict[str, Any]], config: LabelConfig,
                        scope: WorkScope) -> None:
        if self.settings.precompute:
            for task in tasks:
                scope.check("precomputing the tasks' images")
                self.precompute(task, config)

    # -- a project's trained version -----------------------------------------------------------
    def trained_annotator(self, project: Any) -> Optional[Tuple[ConceptAnnotator, str]]:
        """The annotator of ``project``'s promoted trained version and its model_version, or
        None (no provider, no project id, no version)."""
        number = project_id(project)
        if self.trained is None or number is None:
            return None
        return self.trained.annotator(number)

    def model_version_for(self, project: Any) -> str:
        """What ``project``'s auto-annotations are named: its trained version's model_version
        when it has one (never loads it), else :attr:`model_version`. Clicks always carry
        :attr:`model_version`."""
        number = project_id(project)
        if self.trained is not None and number is not None:
            return self.trained.model_version(number) or self.model_version
        return self.model_version

    def concept_annotator(self) -> ConceptAnnotator:
        """The concept side; a clear error when the backend runs without one."""
        if self.concepts is None:
            raise ConfigError(NO_CONCEPT_MODEL)
        return self.concepts

    def exemplar_annotator(self) -> ConceptAnnotator:
        """The concept side for box exemplars: a 400 naming ``concept_model=sam3`` when the
        backend runs without a concept model, or with one that takes phrases only (told from
        the option, so that such an engine is not loaded only to refuse)."""
        if self.concepts is None:
            raise RequestError(f"{EXEMPLARS_NEED_SAM3} (this backend runs without a concept "
                               f"model)")
        if self.settings.concept_model != "sam3":
            raise RequestError(f"{EXEMPLARS_NEED_SAM3} (this backend runs "
                               f"concept_model={self.settings.concept_model}, which takes "
                               f"phrases only)")
        return self.concepts

    def predict_task(self, task: Dict[str, Any], config: LabelConfig,
                     prompt_request: PromptRequest, scope: WorkScope = UNBOUNDED,
                     held: Optional[Reservation] = None) -> Dict[str, Any]:
        """One task's prediction for a click. ``held``: the request's reservation, which keeps
        the task's result counted after this returns (a reservation of its own otherwise)."""
        if held is None:
            with self.memory.reservation(self.settings.memory_wait) as own:
                return self.predict_task(task, config, prompt_request, scope, own)
        scope.check("the prediction")
        url, task_id = config.image_url(task, prompt_request.to_name,
                                        prompt_request.item_index), task.get("id")
        image = self.images.locate(url, task_id)  # resolved once; loaded only if not embedded
        image_key = image.key
        embedding = self.embedding_for(image, scope)
        height, width = embedding.original_size
        if prompt_request.original_width and prompt_request.original_height and \
                (prompt_request.original_width, prompt_request.original_height) != (width, height):
            log.warning("task %s: Label Studio reports the image as %dx%d, the decoded image is "
                        "%dx%d; using the decoded size", task_id, prompt_request.original_width,
                        prompt_request.original_height, width, height)
        scope.check("the prediction")
        # the task's working memory, then only its result stays counted (with the results of
        # the request's earlier tasks): no room within memory_wait -> 503, early
        work = width * height * MASK_BYTES_PER_PIXEL
        wait = min(self.settings.memory_wait, max(0.0, scope.remaining()))
        if held.held == 0:
            held.grow(work, f"a mask of {width}x{height} pixels", wait=wait,
                      advice="downscale the image")
        else:
            held.grow(work, f"a mask of {width}x{height} pixels with the results before it in "
                      f"this request", wait=wait, advice="send fewer tasks at once")
        prediction = self.segmenter.decode(
            image_key, embedding, prompt_request.to_prompt(width, height),
            memory_scope=(prompt_request.from_name, prompt_request.label))
        score = prediction.score
        regions = self.regions(prediction.mask, score, config, prompt_request)
        del prediction
        kept = result_bytes(regions)
        if kept <= work:
            held.shrink(work - kept)
        else:
            held.grow(kept - work, f"the results of task {shown(task_id)}", wait=wait,
                      advice="send fewer tasks at once")
        return {"result": regions, "score": score, "model_version": self.model_version}

    def embedding_for(self, image: ImageRef, scope: WorkScope = UNBOUNDED) -> Embedding:
        """The image's embedding: from the cache; or its bytes fetched first (a download waits
        under one of ``max_concurrent_downloads`` slots, never a load slot), then decoded and
        encoded under one of the few ``max_concurrent_loads`` slots (503 when all are taken).
        The bytes, the decode's peak and then the pixels are counted in :attr:`memory` until
        the embedding is made."""
        image_key = image.key
        if self.segmenter.is_embedded(image_key):
            return self.segmenter.embedding(image_key, image.load)
        if self.segmenter.is_pending(image_key):
            # another request is loading it: waiting for that is waiting on its download
            with self.images.downloads.admit():
                return self.segmenter.embedding(image_key, image.load)
        self.loads.check()  # no slot would be free: 503 now, not after reading the image
        with self.memory.reservation(self.images.settings.timeout) as held:
            header = image.fetch(held)
            scope.check("loading the image")

            def decode() -> np.ndarray:
                pixels = image.decode(header, held)
                held.shrink(held.held - pixels.nbytes)  # the bytes and the decode's buffers are gone
                return pixels

            with self.loads.admit():
                return self.segmenter.embedding(image_key, decode)

    def regions(self, mask: np.ndarray, score: float, config: LabelConfig,
                prompt: PromptRequest) -> List[Dict[str, Any]]:
        """Label Studio regions for a click's ``mask`` (HxW bool), under the prompt's label."""
        skip = prompt.from_name if prompt.kind == "rectanglelabels" else None
        return self.mask_regions(mask, score, config, prompt.label, prompt.to_name,
                                 prompt.image_rotation, skip_box_control=skip)

    def mask_regions(self, mask: np.ndarray, score: float, config: LabelConfig, label: str,
                     to_name: str, rotation: float = 0, skip_box_control: Optional[str] = None,
                     bbox: Optional[Tuple[float, float, float, float]] = None
                     ) -> List[Dict[str, Any]]:
        """Regions for ``mask`` (HxW bool, image frame): brush, polygons and box as the output
        options say, each under the control of its type on ``to_name`` that has ``label``.

        ``skip_box_control``: a rectangle control that gets no box (the annotator's own box is
        already there). ``bbox``: (x0, y0, x1, y1) pixels for the box output instead of the
        mask's tight box (a detector's box)."""
        height, width = mask.shape
        mask_box = mask_bbox(mask)
        if mask_box is None:
            log.info("the mask for %r is empty: nothing to return", label)
            return []
        bbox = mask_box if bbox is None else bbox
        wanted = [("brushlabels", self.settings.out_mask), ("polygonlabels", self.settings.out_poly),
                  ("rectanglelabels", self.settings.out_bbox)]
        regions: List[Dict[str, Any]] = []
        for kind, enabled in wanted:
            if not enabled:
                continue
            control = config.output_for(kind, to_name, label)
            if control is None:
                log.info("no %s control on %r with label %r: %s output skipped", kind, to_name,
                         label, kind)
                continue
            if kind == "rectanglelabels" and control.name == skip_box_control:
                continue
            if kind == "brushlabels":
                regions.append(brush_region(mask, label, control.name, to_name, rotation, score))
            elif kind == "polygonlabels":
                for polygon in mask_polygons(mask, self.settings.poly_min_area,
                                             self.settings.poly_tolerance):
                    regions.append(polygon_region(polygon, label, control.name, to_name, width,
                                                  height, rotation, score))
            else:
                regions.append(rectangle_region(bbox, label, control.name, to_name, width,
                                                height, rotation, score))
        return regions

    # -- precompute ----------------------------------------------------------------------------
    def precompute(self, task: Dict[str, Any], config: LabelConfig) -> None:
        """Start encoding the task's image(s) in the background (newest first, behind any
        interactive encode), unless cached or queued."""
        for to_name in config.images:
            if not any(c.to_name == to_name for c in config.controls):
                continue
            try:
                url, task_id = config.image_url(task, to_name), task.get("id")
                image = self.images.locate(url, task_id)
                image_key = image.key
            except Exception as exc:  # an opened task must never fail because of this
                log.info("task %s: no precompute (%s)", task.get("id"), exc)
                continue
            if self.queue is not None and self._enqueue(image_key, url, task_id):
                continue
            self.segmenter.precompute(image_key, image.load)

    def _enqueue(self, image_key: str, url: str, task_id: Any) -> bool:
        """Hand the image to the workers (at the front: an annotator is looking at it); False
        when Redis is unreachable (the caller encodes in this process instead)."""
        if self.segmenter.is_embedded(image_key):
            return True
        try:
            outcome = self.queue.submit(image_key, url, task_id, self.images.label_studio_url,
                                        at_front=True)
        except StoreUnavailable:
            return False
        log.debug("precompute of %s: %s", image_key, outcome)
        return True

    # -- the shared store, for /health and /metrics --------------------------------------------
    def store_status(self) -> Dict[str, Any]:
        if self.store is None:
            return {"state": "off"}
        self.store.check()  # a down store is retried at most every few seconds
        return self.store.status()

    def store_metrics(self) -> Dict[str, Any]:
        if self.store is None:
            return {}
        return {**self.store.counters(), "queue_length": self.queue.length(),
                "queue_enqueued": self.queue.enqueued}
