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

* a ``TextArea`` prompt in the task (:func:`~sam_backend.concepts.phrases.parse_text_prompt`,
  :meth:`ConceptAnnotator.annotate_typed`);
* a task opened / "Retrieve predictions" with ``auto_annotate=true``
  (:meth:`ConceptAnnotator.auto_annotate`, bounded by ``concept_timeout``);
* ``sam-backend annotate`` (:mod:`sam_backend.commands.annotate`), a whole project through
  Label Studio's API;
* box exemplars (:class:`Exemplars`, :meth:`ConceptAnnotator.annotate_exemplars`): boxes drawn
  with a smart ``RectangleLabels`` marked ``exemplar="positive"`` / ``"negative"``, answered by
  engines that take them (:attr:`ConceptEngine.supports_exemplars`: SAM 3's concept model).
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
from typing import (TYPE_CHECKING, Any, Callable, Dict, Hashable, Iterable, Iterator, List,
                    Optional, Sequence, Tuple, Type, Union)

import numpy as np

from sam_backend.common.deadline import UNBOUNDED, WorkScope
from sam_backend.common.limits import Reservation, shown
from sam_backend.concepts.phrases import Concept, PhraseLimits, concepts_of, concepts_of_region
from sam_backend.errors import RequestError

if TYPE_CHECKING:  # the parsed config is handed in (sam_backend.labelstudio.label_config)
    from sam_backend.labelstudio.label_config import LabelConfig

log = logging.getLogger(__name__)

ImageLoaderFn = Callable[[], np.ndarray]


# -- instances ------------------------------------------------------------------------------------

@dataclass
class Instances:
    """N instances of one label (from one or more phrases) on one image.

    ``masks``: (N, H, W) bool, image frame, or None while not decoded yet (an engine that finds
    boxes first decodes the masks of the kept instances only); ``boxes``: (N, 4) float32
    (x0, y0, x1, y1) pixels of that frame; ``scores``: (N,) float32 in 0..1, highest first after
    :meth:`Selection.keep`."""

    masks: Optional[np.ndarray]
    boxes: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return int(len(self.scores))

    @classmethod
    def empty(cls, height: int, width: int) -> "Instances":
        return cls(np.zeros((0, height, width), bool), np.zeros((0, 4), np.float32),
                   np.zeros((0,), np.float32))

    def take(self, indices: np.ndarray) -> "Instances":
        """These instances (an index array into N), in that order."""
        return Instances(None if self.masks is None else self.masks[indices],
                         self.boxes[indices], self.scores[indices])

    def concat(self, other: "Instances") -> "Instances":
        masks = None if self.masks is None or other.masks is None else \
            np.concatenate([self.masks, other.masks])
        return Instances(masks, np.concatenate([self.boxes, other.boxes]).astype(np.float32),
                         np.concatenate([self.scores, other.scores]).astype(np.float32))


@dataclass(frozen=True)
class Exemplars:
    """Box exemplars of one label on one image, as the annotator drew them (all boxes of that
    label Label Studio sent, the newest last).

    ``boxes``: (N, 4) float64 (x0, y0, x1, y1) in percent (0-100) of the image's natural size
    (EXIF orientation applied), as Label Studio sends them; ``positive``: (N,) bool, True for
    "find all like this", False for a negative exemplar ("not like this"); ``phrase``: text sent
    with the boxes (the label's hint), or None; ``item_index``: which image of a multi-image
    task (None: the only one)."""

    label: str
    to_name: str
    boxes: np.ndarray
    positive: np.ndarray
    phrase: Optional[str] = None
    item_index: Optional[int] = None

    def pixel_boxes(self, height: int, width: int) -> np.ndarray:
        """(N, 4) float32 (x0, y0, x1, y1) pixels of an image ``height`` x ``width``."""
        scale = np.array([width, height, width, height], np.float64) / 100.0
        return (np.asarray(self.boxes, np.float64).reshape(-1, 4) * scale).astype(np.float32)

    @property
    def box_labels(self) -> np.ndarray:
        """(N,) int64: 1 for a positive exemplar, 0 for a negative one (SAM 3's box labels)."""
        return np.asarray(self.positive, bool).astype(np.int64)


EXEMPLARS_NEED_SAM3 = ("box exemplars need SAM 3's concept model: start the backend with "
                       "model_name=sam3 concept_model=sam3")


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
    click after a concept pass (or the other way round) encodes nothing again.

    An engine says what it needs of an image once (:meth:`image_state`), finds one phrase's
    instances on it (:meth:`find`), or several phrases' at once (:meth:`find_all`; by default
    one :meth:`find` per phrase) and, if it found boxes only, decodes the masks of the kept
    ones (:meth:`with_masks`); :meth:`detect` puts these together per label. Its text encoder
    takes at most :attr:`max_phrase_tokens` tokens: :meth:`check_phrases` refuses a longer phrase
    with a 400 before any work on the image."""

    name: str
    # whether :meth:`find_exemplars` is implemented (box exemplars)
    supports_exemplars: bool = False

    def __init__(self, processor, segmenter):
        """``processor``: the engine's transformers processor (text and image in, instances
        out); ``segmenter``: the click model's Segmenter, whose embedding cache it shares."""
        self.processor = processor
        self.segmenter = segmenter

    @abstractmethod
    def image_state(self, image_key: str, load_image: ImageLoaderFn) -> Tuple[Any, Tuple[int, int]]:
        """What :meth:`find` needs of the image (its pixels, its cached features), and its
        (height, width). ``image_key`` identifies the image in the embedding cache;
        ``load_image`` returns it as HxWx3 uint8 RGB and is called only if pixels are needed."""

    @abstractmethod
    def find(self, state: Any, phrase: str, threshold: float) -> Instances:
        """Every instance of ``phrase`` scoring above ``threshold`` (masks may be None)."""

    def phrase_key(self, phrase: str) -> Hashable:
        """What the model is asked for ``phrase``: phrases with the same key are one query, asked
        once (default: the phrase itself)."""
        return phrase

    def find_all(self, state: Any, phrases: Sequence[str], threshold: float,
                 scope: WorkScope = UNBOUNDED) -> Iterator[Tuple[str, Instances]]:
        """``(phrase, its instances)`` for each of ``phrases`` (distinct), as :meth:`find` would
        answer it, each phrase once, in any order; ``scope`` is checked before each model call.
        By default one :meth:`find` per phrase, in order (an engine whose model answers several
        phrases in one call overrides it: Grounding DINO's joined captions)."""
        for phrase in phrases:
            scope.check(f"the concept pass ({shown(phrase, 40)})")
            yield phrase, self.find(state, phrase, threshold)

    def find_exemplars(self, state: Any, phrase: Optional[str], boxes: np.ndarray,
                       labels: np.ndarray, threshold: float) -> Instances:
        """Every instance like the positive exemplars and unlike the negative ones, scoring
        above ``threshold``. ``boxes``: (N, 4) float32 (x0, y0, x1, y1) pixels of the image
        frame; ``labels``: (N,) int64, 1 positive, 0 negative; ``phrase``: text sent with them,
        or None. Engines without box exemplars answer a RequestError (400)."""
        self.check_exemplars()
        raise NotImplementedError(f"{type(self).__name__}.find_exemplars")

    def check_exemplars(self) -> None:
        """A RequestError (400) naming ``concept_model=sam3`` when this engine takes no box
        exemplars."""
        if not self.supports_exemplars:
            raise RequestError(f"{EXEMPLARS_NEED_SAM3} (this backend runs "
                               f"concept_model={self.name}, which takes phrases only)")

    def detect_exemplars(self, image_key: str, load_image: ImageLoaderFn, exemplars: Exemplars,
                         threshold: float, selection: Selection,
                         scope: WorkScope = UNBOUNDED) -> Instances:
        """The instances :meth:`find_exemplars` gives for ``exemplars`` on the image (cached
        image state reused), ``selection`` applied, with their masks."""
        state, (height, width) = self.image_state(image_key, load_image)
        scope.check(f"the exemplar pass ({shown(exemplars.label, 40)})")
        found = self.find_exemplars(state, exemplars.phrase,
                                    exemplars.pixel_boxes(height, width), exemplars.box_labels,
                                    threshold)
        found = found.take(selection.keep(found.boxes, found.scores))
        return self.with_masks(state, found, scope)

    def with_masks(self, state: Any, instances: Instances,
                   scope: WorkScope = UNBOUNDED) -> Instances:
        """``instances`` with their masks (engines that find masks directly have them)."""
        return instances

    @property
    @abstractmethod
    def max_phrase_tokens(self) -> int:
        """Tokens the text encoder takes, special tokens included (read from its config)."""

    @abstractmethod
    def phrase_tokens(self, phrase: str) -> int:
        """Tokens ``phrase`` becomes as this engine sends it, special tokens included."""

    def check_phrases(self, phrases: Iterable[str]) -> None:
        """A RequestError (400) naming the first phrase longer than the text encoder takes
        (asked as is, it would fail inside the model)."""
        limit = self.max_phrase_tokens
        for phrase in phrases:
            tokens = self.phrase_tokens(phrase)
            if tokens > limit:
                raise RequestError(
                    f"the phrase {shown(phrase)} is {tokens} tokens long; {self.name}'s text "
                    f"encoder takes at most {limit} (its start and end tokens included): use "
                    f"fewer words")

    def detect(self, image_key: str, load_image: ImageLoaderFn,
               phrases: Sequence[Union[str, Sequence[str]]], threshold: float,
               selection: Selection, scope: WorkScope = UNBOUNDED) -> List[Instances]:
        """One :class:`Instances` per entry of ``phrases``: score above ``threshold``,
        ``selection`` applied. An entry is a phrase, or the phrases of one label: their
        instances are pooled, so duplicate suppression and ``max_instances`` hold per label,
        across its phrases. Every distinct query (:meth:`phrase_key`) is asked once
        (:meth:`find_all`), however many labels ask it. ``scope`` is checked before each model
        call (and each mask decode)."""
        state, (height, width) = self.image_state(image_key, load_image)
        entries = [(entry,) if isinstance(entry, str) else tuple(entry) for entry in phrases]
        asked: Dict[Hashable, str] = {}  # one phrase per query the model sees
        askers: Dict[str, List[int]] = {}  # that phrase -> the entries that ask it
        for index, entry in enumerate(entries):
            for phrase in dict.fromkeys(asked.setdefault(self.phrase_key(p), p) for p in entry):
                askers.setdefault(phrase, []).append(index)
        pools = [Instances.empty(height, width) for _ in entries]
        for phrase, instances in self.find_all(state, list(askers), threshold, scope):
            for index in askers[phrase]:
                # kept as it goes: at most max_instances (+ one phrase's) instances held per label
                pool = pools[index].concat(instances)
                pools[index] = pool.take(selection.keep(pool.boxes, pool.scores))
        return [self.with_masks(state, pool, scope) for pool in pools]


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
                 max_results: int = 256, model_version: Optional[str] = None,
                 worker: Optional[concurrent.futures.Executor] = None,
                 threshold: Optional[float] = None):
        """``model_version``: what its predictions are named (default: the service's);
        ``worker``: the executor its background passes run on (default: one thread of its
        own; annotators that should not run at once share one); ``threshold``: the score an
        instance must pass (default: ``concept_threshold``)."""
        self.service = service
        self.settings = service.settings
        self._model_version = model_version
        self.threshold = self.settings.concept_threshold if threshold is None else threshold
        self._engine_factory = engine_factory
        self._engine: Optional[ConceptEngine] = None
        self._engine_lock = threading.Lock()
        self._results: "OrderedDict[Hashable, Dict[str, Any]]" = OrderedDict()
        self._pending: Dict[Hashable, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._worker = worker or concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="concepts")
        self.max_results = max_results
        # background passes waiting or running at once; more tasks are answered [] at once
        self.max_pending = self.settings.max_tasks

    @property
    def model_version(self) -> str:
        """The ``model_version`` its predictions carry."""
        return self._model_version or self.service.model_version

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

    def check_label_count(self, concepts: Sequence[Concept]) -> None:
        """A RequestError (400) when one pass would ask for more labels than
        ``max_concept_labels`` (the engine's cost grows with each label)."""
        labels = len({(c.to_name, c.label) for c in concepts})
        if labels > self.settings.max_concept_labels:
            raise RequestError(
                f"a concept pass would ask for {labels:,} labels, more than the limit of "
                f"{self.settings.max_concept_labels} (max_concept_labels): choose the labels "
                f"that take part with concept_labels=label1,label2,... or raise the limit")

    def configured_concepts(self, config: LabelConfig) -> List[Concept]:
        labels = [x.strip() for x in (self.settings.concept_labels or "").split(",") if x.strip()]
        concepts = concepts_of(config, labels or None)
        self.check_label_count(concepts)
        return concepts

    # -- a typed prompt ------------------------------------------------------------------------
    def annotate_typed(self, tasks: Sequence[Dict[str, Any]], config: LabelConfig,
                       region: Tuple[int, dict], scope: WorkScope = UNBOUNDED,
                       held: Optional["Reservation"] = None) -> List[Dict[str, Any]]:
        """The phrases of a textarea region (from
        :func:`~sam_backend.concepts.phrases.text_prompt_region`) on every task: the prompt is
        read within its bounds (``max_phrases``, ``max_phrase_chars``), each phrase checked
        against the engine's text encoder, then one pass per task, all under ``scope`` (the
        request's deadline and client). ``held``: the request's reservation of the service's
        memory budget; every task's masks and regions are counted in it (see
        :meth:`annotate_task`)."""
        concepts = concepts_of_region(region, config, PhraseLimits.from_settings(self.settings),
                                      scope)
        answers = []
        for task in tasks:
            scope.check("the concept pass")
            answers.append(self.annotate_task(task, config, concepts, scope, held))
        return answers

    # -- one task ------------------------------------------------------------------------------
    def annotate_task(self, task: Dict[str, Any], config: LabelConfig,
                      concepts: Sequence[Concept], scope: WorkScope = UNBOUNDED,
                      held: Optional["Reservation"] = None) -> Dict[str, Any]:
        """Every instance of every concept on the task's image(s) -> one prediction
        ``{"result": [regions], "score": mean instance score, "model_version": ...}``.

        Concepts of one label (several phrases typed for it) are one selection: duplicates are
        suppressed and ``max_instances`` kept per label, across its phrases. ``scope`` is checked
        between images, phrases, mask decodes and instances.

        ``held`` (a reservation of the service's ``image_memory_mb`` budget; one of this pass's
        own when None): the instances' full-size masks are counted while the regions are made,
        and the regions for as long as the reservation lives (the caller's: until the answer is
        sent), so many tasks or instances get a 503 after ``memory_wait`` instead of growing
        the process past the budget."""
        if held is None:
            with self.service.memory.reservation(self.settings.memory_wait) as own:
                return self.annotate_task(task, config, concepts, scope, own)
        self.check_label_count(concepts)
        engine = self.engine
        # a phrase the text encoder cannot take is refused before the image is touched
        engine.check_phrases(dict.fromkeys(c.phrase for c in concepts))
        regions: List[Dict[str, Any]] = []
        scores: List[float] = []
        # image -> label -> its phrases (each once), in the order asked
        by_image: "OrderedDict[str, OrderedDict[str, Dict[str, None]]]" = OrderedDict()
        for concept in concepts:
            by_image.setdefault(concept.to_name, OrderedDict()).setdefault(
                concept.label, {})[concept.phrase] = None
        for to_name, labels in by_image.items():
            scope.check("the concept pass")
            url, task_id = config.image_url(task, to_name), task.get("id")
            image = self.service.images.locate(url, task_id)  # resolved once
            found = engine.detect(image.key, image.load, [list(p) for p in labels.values()],
                                  self.threshold, self.selection, scope)
            for (label, phrases), instances in zip(labels.items(), found):
                log.info("task %s: %d instance(s) of %r (%s)", task_id, len(instances), label,
                         ", ".join(repr(p) for p in phrases))
            masks_bytes = self._add_regions(list(zip(labels, found)), config, to_name, task_id,
                                            scope, held, regions, scores)
            del found
            held.shrink(masks_bytes)  # the masks are gone; their regions stay counted
        return {"result": regions, "score": float(np.mean(scores)) if scores else 0.0,
                "model_version": self.model_version}

    def _add_regions(self, found: List[Tuple[str, Instances]], config: LabelConfig,
                     to_name: str, task_id: Any, scope: WorkScope, held: "Reservation",
                     regions: List[Dict[str, Any]], scores: List[float]) -> int:
        """Regions of ``found`` ((label, its instances with masks) on the image ``to_name``)
        appended to ``regions`` (their scores to ``scores``), through the click path's region
        code; ``scope`` is checked before each instance. The masks' bytes are counted in
        ``held`` (returned: the caller shrinks ``held`` by them once it drops the masks), the
        regions for as long as ``held`` lives."""
        masks_bytes = sum(int(m.nbytes) for _, instances in found for m in instances.masks)
        held.grow(masks_bytes, f"the masks of {sum(len(i) for _, i in found)} instance(s) of "
                  f"task {shown(task_id)}", wait=self.settings.memory_wait,
                  advice="ask for fewer labels or instances (max_instances), downscale it")
        for label, instances in found:
            for mask, box, score in zip(instances.masks, instances.boxes, instances.scores):
                scope.check("the concept pass's regions")
                made = self.service.mask_regions(
                    mask, float(score), config, label, to_name,
                    bbox=tuple(float(v) for v in box))
                held.grow(self.service.result_bytes(made), f"the regions of task "
                          f"{shown(task_id)}", wait=self.settings.memory_wait,
                          advice="ask for fewer tasks, labels or instances at once")
                regions += made
                scores.append(float(score))
        return masks_bytes

    # -- box exemplars -------------------------------------------------------------------------
    def annotate_exemplars(self, task: Dict[str, Any], config: LabelConfig,
                           exemplars: Exemplars, scope: WorkScope = UNBOUNDED,
                           held: Optional["Reservation"] = None) -> Dict[str, Any]:
        """Every instance like ``exemplars``' positive boxes (and unlike their negative ones)
        on the task's image, under ``exemplars.label`` in the output controls -> one prediction
        ``{"result": [regions], "score": mean instance score, "model_version": ...}``.

        The engine runs on the image state the click model cached (nothing is encoded again
        when the image was clicked or seen before); ``concept_threshold``, ``concept_nms_iou``,
        ``max_instances``, ``scope`` and ``held`` (the request's memory reservation) apply as in
        :meth:`annotate_task`. The instance inside a positive box is one of those found, so it
        comes back as a region too."""
        if held is None:
            with self.service.memory.reservation(self.settings.memory_wait) as own:
                return self.annotate_exemplars(task, config, exemplars, scope, own)
        engine = self.engine
        engine.check_exemplars()
        if exemplars.phrase:
            engine.check_phrases([exemplars.phrase])
        scope.check("the exemplar pass")
        task_id = task.get("id")
        url = config.image_url(task, exemplars.to_name, exemplars.item_index)
        image = self.service.images.locate(url, task_id)
        found = engine.detect_exemplars(image.key, image.load, exemplars, self.threshold,
                                        self.selection, scope)
        log.info("task %s: %d instance(s) like %d exemplar(s) (%d negative) of %r%s", task_id,
                 len(found), len(exemplars.boxes), int((~exemplars.positive).sum()),
                 exemplars.label, f" ({exemplars.phrase!r})" if exemplars.phrase else "")
        regions: List[Dict[str, Any]] = []
        scores: List[float] = []
        masks_bytes = self._add_regions([(exemplars.label, found)], config, exemplars.to_name,
                                        task_id, scope, held, regions, scores)
        del found
        held.shrink(masks_bytes)  # the masks are gone; their regions stay counted
        return {"result": regions, "score": float(np.mean(scores)) if scores else 0.0,
                "model_version": self.model_version}

    # -- task open / Retrieve predictions ------------------------------------------------------
    def _key(self, task: Dict[str, Any], config: LabelConfig,
             concepts: Sequence[Concept]) -> Hashable:
        images = []
        for to_name in sorted({c.to_name for c in concepts}):
            url, task_id = config.image_url(task, to_name), task.get("id")
            images.append(self.service.images.source_key(url, task_id))
        return (tuple(images), tuple(concepts), self.threshold,
                self.selection, self.settings.out_mask, self.settings.out_poly,
                self.settings.out_bbox, tuple(config.controls))

    def _submit(self, key: Hashable, task: Dict[str, Any], config: LabelConfig,
                concepts: Sequence[Concept]) -> Optional[concurrent.futures.Future]:
        """The pass for ``key``: finished, running, or queued now; None when ``max_pending``
        passes are already waiting (the task is answered [] and asked again later)."""
        with self._lock:
            future = self._pending.get(key)
            if future is not None:
                return future
            future = concurrent.futures.Future()
            if key in self._results:
                future.set_result(self._results[key])
                return future
            if len(self._pending) >= self.max_pending:
                return None

            def run() -> Dict[str, Any]:
                # a background pass has its own deadline, from its start: nobody may be
                # waiting for it, but it must not run unbounded either
                scope = WorkScope(self.settings.predict_timeout, None,
                                  "predict_timeout, for a background concept pass")
                try:
                    prediction = self.annotate_task(task, config, concepts, scope)
                    with self._lock:
                        self._results[key] = prediction
                        while len(self._results) > self.max_results:
                            self._results.popitem(last=False)
                    return prediction
                except Exception as exc:
                    log.warning("task %s: background concept pass failed: %s", task.get("id"),
                                exc)
                    raise
                finally:
                    with self._lock:
                        self._pending.pop(key, None)

            future = self._worker.submit(run)
            self._pending[key] = future
            return future

    def auto_annotate(self, tasks: List[Dict[str, Any]], config: LabelConfig,
                      scope: WorkScope = UNBOUNDED) -> List[Any]:
        """One entry per task, in order: its prediction when the concept pass finished within
        ``concept_timeout`` seconds (counted from this call; sooner if ``scope`` ends first),
        else ``[]`` (Label Studio stores nothing for that task, so it asks again later);
        unfinished passes go on in the background (each bounded by ``predict_timeout`` from its
        start) and their result answers the next ask at once."""
        concepts = self.configured_concepts(config)
        if not concepts:
            log.info("auto_annotate: no labels take part (concept_labels=%r)",
                     self.settings.concept_labels)
            return [[] for _ in tasks]
        # a missing concept model, or a hint longer than the text encoder takes, is reported
        # now, before anything is queued
        self.engine.check_phrases(dict.fromkeys(c.phrase for c in concepts))
        futures: List[Optional[concurrent.futures.Future]] = []
        for task in tasks:
            scope.check("queueing concept passes")
            try:
                key = self._key(task, config, concepts)
            except Exception as exc:  # e.g. a task without an image: the others still get theirs
                failed: concurrent.futures.Future = concurrent.futures.Future()
                failed.set_exception(exc)
                futures.append(failed)
                continue
            futures.append(self._submit(key, task, config, concepts))
        waiting = [f for f in futures if f is not None]
        until = time.monotonic() + min(self.settings.concept_timeout, max(scope.remaining(), 0))
        while waiting and time.monotonic() < until:
            _, pending = concurrent.futures.wait(
                waiting, timeout=min(0.5, max(until - time.monotonic(), 0)))
            if not pending:
                break
            if scope.client_gone():  # nobody to answer; the passes go on in the background
                scope.check("waiting for concept passes")
        answers: List[Any] = []
        for task, future in zip(tasks, futures):
            if future is None:
                log.info("task %s: %d concept passes already wait; asked again later",
                         task.get("id"), self.max_pending)
                answers.append([])
                continue
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
