"""Label by concept: a phrase in, every instance of it out, as Label Studio regions.

    label config -> concepts (label, phrase) -> concept engine -> instances -> NMS -> regions

A *concept* is one label of an output control (BrushLabels / PolygonLabels / RectangleLabels) on
an image; the text sent to the model is the label's ``hint`` attribute when the config gives one
(``<Label value="Car" hint="red car"/>``: Label Studio 1.23 accepts it and shows it as the label's
tooltip), else the label's value. A *concept engine* turns phrases into instances on one image;
this module does not know which engine runs (see
:func:`sam_backend.assembly.create_concept_engine`). Instances become
regions through the same code as clicks (:meth:`PredictionService.mask_regions`).

Three ways to ask, all answered here:

* a ``TextArea`` prompt in the task (:func:`parse_text_prompt`);
* a task opened / "Retrieve predictions" with ``auto_annotate=true``
  (:meth:`ConceptAnnotator.auto_annotate`, bounded by ``concept_timeout``);
* ``sam-backend annotate`` (:mod:`sam_backend.commands.annotate`), a whole project through
  Label Studio's API.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple, Type

import numpy as np

from sam_backend.errors import RequestError

if TYPE_CHECKING:  # the parsed config is handed in (sam_backend.labelstudio.label_config)
    from sam_backend.labelstudio.label_config import LabelConfig

log = logging.getLogger(__name__)

ImageLoaderFn = Callable[[], np.ndarray]


# -- concepts from the label config ---------------------------------------------------------------

@dataclass(frozen=True)
class Concept:
    """One label on one image, and the phrase the model is asked for."""

    label: str
    phrase: str
    to_name: str


def concepts_of(config: LabelConfig, only_labels: Optional[Sequence[str]] = None) -> List[Concept]:
    """Every label of the config's output controls, once per image (config order).

    ``only_labels``: keep these labels only (``concept_labels``); None keeps all."""
    wanted = set(only_labels) if only_labels else None
    found: "OrderedDict[Tuple[str, str], str]" = OrderedDict()
    for control in config.controls:
        if not control.is_output or control.to_name not in config.images:
            continue
        for label in control.labels:
            if wanted is not None and label not in wanted:
                continue
            key = (control.to_name, label)
            hint = control.hint(label)
            if key not in found or (hint and found[key] == label):
                found[key] = hint or label
    return [Concept(label, phrase, to_name) for (to_name, label), phrase in found.items()]


def _labels_on(config: LabelConfig, to_name: str) -> List[Concept]:
    return [c for c in concepts_of(config) if c.to_name == to_name]


def resolve_phrase(text: str, config: LabelConfig, to_name: str) -> Concept:
    """What an annotator typed -> (label, phrase).

    ``phrase_Label`` names the label explicitly (the part after the last ``_`` is a label of the
    image's output controls); otherwise a phrase equal to a label's value or hint (case-insensitive)
    takes that label; a config with a single label takes any phrase under it."""
    text = " ".join(text.split())
    candidates = _labels_on(config, to_name)
    if not candidates:
        raise RequestError(f"the labeling config has no BrushLabels, PolygonLabels or "
                           f"RectangleLabels control on {to_name!r}: nowhere to put instances")
    by_label = {c.label: c for c in candidates}
    if "_" in text:
        phrase, _, label = text.rpartition("_")
        label = label.strip()
        matched = by_label.get(label) or next(
            (c for c in candidates if c.label.lower() == label.lower()), None)
        if matched and phrase.strip():
            return Concept(matched.label, phrase.strip(), to_name)
    for concept in candidates:
        if text.lower() in (concept.label.lower(), concept.phrase.lower()):
            return concept
    if len(candidates) == 1:
        return Concept(candidates[0].label, text, to_name)
    raise RequestError(
        f"which label is {text!r}? Type a label's name, or phrase_label (e.g. "
        f"'{text}_{candidates[0].label}'); labels: {', '.join(c.label for c in candidates)}")


def parse_text_prompt(context: Any, config: LabelConfig) -> Optional[List[Concept]]:
    """The concepts typed into a ``TextArea`` (``params.context`` of /predict), or None when the
    context holds no text region. Label Studio sends ``{"result": [{"type": "textarea",
    "from_name": ..., "to_name": "image", "value": {"text": ["red car"]}}]}``; several phrases
    may be separated by commas or lines."""
    if not isinstance(context, dict) or not isinstance(context.get("result"), list):
        return None
    items = [item for item in context["result"]
             if isinstance(item, dict) and item.get("type") == "textarea"]
    if not items:
        return None
    item = items[-1]
    value = item.get("value") if isinstance(item.get("value"), dict) else {}
    text = value.get("text")
    if isinstance(text, str):
        text = [text]
    if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
        raise RequestError("context.result: a textarea region needs value.text, a list of strings")
    to_name = item.get("to_name")
    if not to_name:
        inputs = [t for t in config.text_inputs if t.name == item.get("from_name")]
        to_name = inputs[0].to_name if inputs else next(iter(config.images), None)
    if to_name not in config.images:
        raise RequestError(f"the text prompt's to_name {to_name!r} is not an Image of the "
                           f"labeling config")
    parts = [p.strip() for t in text for line in t.splitlines() for p in line.split(",")]
    parts = [p for p in parts if p]
    if not parts:
        raise RequestError("the text prompt is empty: type a phrase (e.g. 'car', or 'red car_Car')")
    return [resolve_phrase(part, config, to_name) for part in parts]


# -- instances ------------------------------------------------------------------------------------

@dataclass
class Instances:
    """N instances of one phrase on one image.

    ``masks``: (N, H, W) bool, image frame; ``boxes``: (N, 4) float32 (x0, y0, x1, y1) pixels of
    that frame; ``scores``: (N,) float32 in 0..1, highest first after :func:`select`."""

    masks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return int(len(self.scores))

    @classmethod
    def empty(cls, height: int, width: int) -> "Instances":
        return cls(np.zeros((0, height, width), bool), np.zeros((0, 4), np.float32),
                   np.zeros((0,), np.float32))


@dataclass(frozen=True)
class Selection:
    """Which instances of one label are kept: overlapping duplicates suppressed (greedy NMS on
    boxes, IoU above ``nms_iou``, the higher score wins), at most ``max_instances``."""

    nms_iou: float = 0.7
    max_instances: int = 50

    def keep(self, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Indices into ``boxes`` (N, 4 float xyxy) / ``scores`` (N,) to keep, best first."""
        if len(scores) == 0:
            return np.zeros((0,), np.int64)
        import torch
        from torchvision.ops import nms

        keep = nms(torch.as_tensor(np.asarray(boxes, np.float32)),
                   torch.as_tensor(np.asarray(scores, np.float32)), float(self.nms_iou))
        return keep.numpy()[: self.max_instances]


class ConceptEngine(ABC):
    """Phrases -> instances on one image. Engines share the click model's embedding cache, so a
    click after a concept pass (or the other way round) encodes nothing again."""

    name: str

    def __init__(self, processor, segmenter):
        """``processor``: the engine's transformers processor (text and image in, instances
        out); ``segmenter``: the click model's Segmenter, whose embedding cache it shares."""
        self.processor = processor
        self.segmenter = segmenter

    @abstractmethod
    def detect(self, image_key: str, load_image: ImageLoaderFn, phrases: Sequence[str],
               threshold: float, selection: Selection) -> List[Instances]:
        """One :class:`Instances` per phrase: score above ``threshold``, ``selection`` applied.

        ``image_key`` identifies the image in the embedding cache; ``load_image`` returns it as
        HxWx3 uint8 RGB and is called only if the engine needs pixels."""


def load_pretrained(directory: Path, classes: Sequence[type], error: Type[Exception],
                    failure: str) -> list:
    """Each of ``classes`` (transformers classes: model, processor, ...) loaded with
    ``from_pretrained`` from the local ``directory``, never downloaded. A directory they cannot
    read raises ``error(f"{failure}: <cause>")``."""
    try:
        return [cls.from_pretrained(str(directory), local_files_only=True) for cls in classes]
    except (OSError, ValueError, TypeError) as exc:
        raise error(f"{failure}: {exc}") from None


NO_CONCEPT_MODEL = ("this backend runs without a concept model: start it with "
                    "concept_model=grounding_dino (or sam3) to label by concept")


# -- answering ------------------------------------------------------------------------------------

class ConceptAnnotator:
    """Concept passes for one service: the engine (loaded on first use), a cache of finished
    passes, and one worker that runs them (a pass already uses every core)."""

    def __init__(self, service, engine_factory: Callable[[], ConceptEngine],
                 max_results: int = 256):
        self.service = service
        self.settings = service.settings
        self._engine_factory = engine_factory
        self._engine: Optional[ConceptEngine] = None
        self._engine_lock = threading.Lock()
        self._results: "OrderedDict[Hashable, Dict[str, Any]]" = OrderedDict()
        self._pending: Dict[Hashable, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="concepts")
        self.max_results = max_results

    @property
    def engine(self) -> ConceptEngine:
        """Loaded on first use; a failure is reported to that request (clicks keep working) and
        retried by the next one."""
        with self._engine_lock:
            if self._engine is None:
                started = time.perf_counter()
                self._engine = self._engine_factory()
                log.info("concept model %s ready in %.1f s", self._engine.name,
                         time.perf_counter() - started)
            return self._engine

    @property
    def selection(self) -> Selection:
        return Selection(self.settings.concept_nms_iou, self.settings.max_instances)

    def configured_concepts(self, config: LabelConfig) -> List[Concept]:
        labels = [x.strip() for x in (self.settings.concept_labels or "").split(",") if x.strip()]
        return concepts_of(config, labels or None)

    # -- one task ------------------------------------------------------------------------------
    def annotate_task(self, task: Dict[str, Any], config: LabelConfig,
                      concepts: Sequence[Concept]) -> Dict[str, Any]:
        """Every instance of every concept on the task's image(s) -> one prediction
        ``{"result": [regions], "score": mean instance score, "model_version": ...}``."""
        engine = self.engine
        regions: List[Dict[str, Any]] = []
        scores: List[float] = []
        by_image: "OrderedDict[str, List[Concept]]" = OrderedDict()
        for concept in concepts:
            by_image.setdefault(concept.to_name, []).append(concept)
        for to_name, group in by_image.items():
            url, task_id = config.image_url(task, to_name), task.get("id")
            image = self.service.images.locate(url, task_id)  # resolved once
            found = engine.detect(image.key, image.load, [c.phrase for c in group],
                                  self.settings.concept_threshold, self.selection)
            for concept, instances in zip(group, found):
                log.info("task %s: %d instance(s) of %r (%r)", task_id, len(instances),
                         concept.label, concept.phrase)
                for mask, box, score in zip(instances.masks, instances.boxes, instances.scores):
                    regions += self.service.mask_regions(
                        mask, float(score), config, concept.label, to_name,
                        bbox=tuple(float(v) for v in box))
                    scores.append(float(score))
        return {"result": regions, "score": float(np.mean(scores)) if scores else 0.0,
                "model_version": self.service.model_version}

    # -- task open / Retrieve predictions ------------------------------------------------------
    def _key(self, task: Dict[str, Any], config: LabelConfig,
             concepts: Sequence[Concept]) -> Hashable:
        images = []
        for to_name in sorted({c.to_name for c in concepts}):
            url, task_id = config.image_url(task, to_name), task.get("id")
            images.append(self.service.images.source_key(url, task_id))
        return (tuple(images), tuple(concepts), self.settings.concept_threshold,
                self.selection, self.settings.out_mask, self.settings.out_poly,
                self.settings.out_bbox, tuple(config.controls))

    def _submit(self, key: Hashable, task: Dict[str, Any], config: LabelConfig,
                concepts: Sequence[Concept]) -> concurrent.futures.Future:
        with self._lock:
            future = self._pending.get(key)
            if future is not None:
                return future
            future = concurrent.futures.Future()
            if key in self._results:
                future.set_result(self._results[key])
                return future

            def run() -> Dict[str, Any]:
                try:
                    prediction = self.annotate_task(task, config, concepts)
                    with self._lock:
                        self._results[key] = prediction
                        while len(self._results) > self.max_results:
                            self._results.popitem(last=False)
                    return prediction
                finally:
                    with self._lock:
                        self._pending.pop(key, None)

            future = self._worker.submit(run)
            self._pending[key] = future
            return future

    def auto_annotate(self, tasks: List[Dict[str, Any]], config: LabelConfig) -> List[Any]:
        """One entry per task, in order: its prediction when the concept pass finished within
        ``concept_timeout`` seconds (counted from this call), else ``[]`` (Label Studio stores
        nothing for that task, so it asks again later); unfinished passes go on in the background
        and their result answers the next ask at once."""
        concepts = self.configured_concepts(config)
        if not concepts:
            log.info("auto_annotate: no labels take part (concept_labels=%r)",
                     self.settings.concept_labels)
            return [[] for _ in tasks]
        self.engine  # a missing concept model is reported now, before anything is queued
        futures = []
        for task in tasks:
            try:
                key = self._key(task, config, concepts)
            except Exception as exc:  # e.g. a task without an image: the others still get theirs
                failed: concurrent.futures.Future = concurrent.futures.Future()
                failed.set_exception(exc)
                futures.append(failed)
                continue
            futures.append(self._submit(key, task, config, concepts))
        concurrent.futures.wait(futures, timeout=self.settings.concept_timeout)
        answers: List[Any] = []
        for task, future in zip(tasks, futures):
            if not future.done():
                log.info("task %s: concept pass still running after %.0f s; it finishes in the "
                         "background", task.get("id"), self.settings.concept_timeout)
                answers.append([])
                continue
            try:
                answers.append(future.result())
            except Exception as exc:  # one task's failure must not fail the others
                log.warning("task %s: auto-annotation failed: %s", task.get("id"), exc)
                answers.append([])
        return answers
