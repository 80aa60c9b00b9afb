"""A /predict request, from parsed JSON to Label Studio results.

    label config -> prompt -> image -> embedding -> mask -> regions

This layer knows Label Studio's shapes and the project's options; it does not know which SAM
variant or runtime runs (that is the :class:`~sam_backend.engine.Segmenter`'s business), nor how
images are fetched (the :class:`~sam_backend.images.ImageLoader`'s).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import __version__
from .cache import EmbeddingCache
from .concepts import ConceptAnnotator, create_concept_engine, parse_text_prompt
from .engine import Segmenter, get_segmenter
from .errors import ImageError, RequestError
from .images import ImageAccessSettings, ImageLoader
from .label_config import LabelConfig, parse_label_config
from .prompts import PromptRequest, parse_context
from .regions import brush_region, mask_bbox, mask_polygons, polygon_region, rectangle_region
from .settings import Settings

log = logging.getLogger(__name__)


def build_model(settings: Settings):
    """Load the variant the settings ask for, on the runtime they ask for."""
    from .runtimes import create_model
    from .weights import ensure_checkpoint, infer_variant

    variant = infer_variant(settings.model_name, settings.sam_config,
                            settings.sam_checkpoint_file)
    checkpoint = ensure_checkpoint(variant, settings.sam_checkpoint_file, offline=settings.offline)
    return create_model(variant, checkpoint, settings.device, settings.runtime)


def segmenter_for(settings: Settings) -> Segmenter:
    """The process-wide segmenter for these settings (loaded on first use)."""
    key = (settings.model_name, settings.sam_config, settings.sam_checkpoint_file,
           settings.device, settings.runtime, settings.embedding_dtype, settings.embedding_cache_mb)

    def build() -> Segmenter:
        started = time.perf_counter()
        model = build_model(settings)
        log.info("model %s ready in %.1f s", model.describe(), time.perf_counter() - started)
        return Segmenter(model, EmbeddingCache(settings.embedding_cache_mb * 1024 * 1024),
                         store_float16=settings.embedding_dtype == "float16")

    return get_segmenter(key, build)


class SegmentationService:
    """Answers /predict for any number of projects with one segmenter and one image loader."""

    def __init__(self, settings: Settings, segmenter: Segmenter, images: ImageLoader):
        self.settings = settings
        self.segmenter = segmenter
        self.images = images
        self.model_version = f"sam_backend-{__version__}:{segmenter.model.variant.key}"
        self.concepts: Optional[ConceptAnnotator] = None
        if settings.concept_model != "none":
            self.model_version += f"+{settings.concept_model}"
            if settings.concept_model == "sam3" and hasattr(segmenter.model, "keep_vision_state"):
                # the concept model runs on the click model's backbone output: cache it too
                segmenter.model.keep_vision_state = True
            self.concepts = ConceptAnnotator(
                self, lambda: create_concept_engine(self.settings, self.segmenter))
        self._projects: Dict[str, str] = {}  # project -> label config sent in /setup
        self._projects_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> "SegmentationService":
        return cls(settings, segmenter_for(settings), ImageLoader(ImageAccessSettings.from_env()))

    # -- /setup --------------------------------------------------------------------------------
    def setup(self, project: Optional[str], schema: Optional[str], hostname: Optional[str],
              access_token: Optional[str]) -> None:
        if schema:
            parse_label_config(schema)  # a bad config is reported at setup already
            with self._projects_lock:
                self._projects[str(project)] = schema
        self.images.update_from_setup(hostname or None, access_token or None)

    def label_config_for(self, project: Any, label_config: Optional[str]) -> LabelConfig:
        if not label_config:
            with self._projects_lock:
                label_config = self._projects.get(str(project))
        return parse_label_config(label_config or "")

    # -- /predict ------------------------------------------------------------------------------
    def predict(self, tasks: Any, label_config: Optional[str], context: Any,
                project: Any = None) -> List[Dict[str, Any]]:
        """One result per task (Label Studio uses the first), or [] when there is no prompt."""
        if not isinstance(tasks, list) or not tasks:
            raise RequestError("the request has no tasks: /predict expects {\"tasks\": [{...}], "
                               "\"label_config\": \"<View>...</View>\", \"params\": {\"context\": "
                               "{...}}}")
        for index, task in enumerate(tasks):
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                raise RequestError(f"tasks[{index}] is not a task object with 'data'")
        config = self.label_config_for(project, label_config)
        typed = parse_text_prompt(context, config)
        if typed is not None:
            return [self.concept_annotator().annotate_task(task, config, typed) for task in tasks]
        prompt = parse_context(context, config)
        if prompt is None:
            if self.settings.auto_annotate:
                return self.concept_annotator().auto_annotate(tasks, config)
            if self.settings.precompute:
                for task in tasks:
                    self.precompute(task, config)
            return []
        return [self.predict_task(task, config, prompt) for task in tasks]

    def concept_annotator(self) -> ConceptAnnotator:
        """The concept side; a clear error when the backend runs without one."""
        if self.concepts is None:
            create_concept_engine(self.settings, self.segmenter)  # raises: what to start with
        return self.concepts

    def image_of(self, task: Dict[str, Any], config: LabelConfig, to_name: str,
                 item_index: Optional[int] = None) -> Tuple[str, Optional[int]]:
        key = config.data_key(to_name)
        url = task["data"].get(key)
        if isinstance(url, list):
            if not url:
                raise RequestError(f"task {task.get('id')}: data.{key} is an empty list")
            url = url[item_index or 0] if (item_index or 0) < len(url) else None
        if not isinstance(url, str) or not url.strip():
            raise ImageError(f"task {task.get('id')} has no image in data.{key}: the labeling "
                             f"config's Image tag reads ${key}")
        return url, task.get("id")

    def predict_task(self, task: Dict[str, Any], config: LabelConfig,
                     prompt_request: PromptRequest) -> Dict[str, Any]:
        url, task_id = self.image_of(task, config, prompt_request.to_name,
                                     prompt_request.item_index)
        image_key = self.images.source_key(url, task_id)
        embedding = self.segmenter.embedding(image_key, lambda: self.images.load(url, task_id))
        height, width = embedding.original_size
        if prompt_request.original_width and prompt_request.original_height and \
                (prompt_request.original_width, prompt_request.original_height) != (width, height):
            log.warning("task %s: Label Studio reports the image as %dx%d, the decoded image is "
                        "%dx%d; using the decoded size", task_id, prompt_request.original_width,
                        prompt_request.original_height, width, height)
        prediction = self.segmenter.decode(
            image_key, embedding, prompt_request.to_prompt(width, height),
            memory_scope=(prompt_request.from_name, prompt_request.label))
        regions = self.regions(prediction.mask, prediction.score, config, prompt_request)
        return {"result": regions, "score": prediction.score, "model_version": self.model_version}

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
                url, task_id = self.image_of(task, config, to_name)
                image_key = self.images.source_key(url, task_id)
            except Exception as exc:  # an opened task must never fail because of this
                log.info("task %s: no precompute (%s)", task.get("id"), exc)
                continue
            self.segmenter.precompute(image_key,
                                      lambda url=url, task_id=task_id: self.images.load(url, task_id))
