"""Serving a project's promoted trained version: its task-open / *Retrieve predictions* answers
and ``sam-backend annotate`` come from it (README "Learn from your labels").

    VersionStore ``current`` pointer --(polled, at most once a second per project)--> loaded
    version --> concept engine --> the existing ConceptAnnotator --> Label Studio regions

* an ``rf_detr`` version is a closed-set detector + segmenter: :class:`DetectorEngine` answers a
  label with the instances of its class (its own masks and boxes); a label the version was not
  trained on gets nothing from it;
* a ``grounding_dino`` version is the concept detector fine-tuned on the project's boxes: it is
  loaded with :meth:`GroundingDinoEngine.load` and stays open-vocabulary (masks by the click
  model), so labels without annotations keep working.

Either runs through :class:`~sam_backend.concepts.base.ConceptAnnotator` (background passes,
``concept_timeout``, the memory budget, regions as clicks make them), under the model_version
``<click model's version>+<kind>@p<project>-v<N>``. Clicks and typed prompts are unchanged.

Replicas switch without a restart: each asks :meth:`VersionStore.pointer_stamp` at most once a
second per project; a changed pointer loads the new version (checksums verified first). A version
that cannot be loaded (corrupt, unreadable) is refused with a log line and the one served before
keeps serving. At most ``max_loaded`` versions stay loaded (least recently used out).
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from sam_backend.common.deadline import UNBOUNDED, WorkScope
from sam_backend.concepts.base import ConceptAnnotator, ConceptEngine, ImageLoaderFn, Instances
from sam_backend.models.base import Prompt
from sam_backend.training.base import Detector, Prediction
from sam_backend.training.versions import Version, VersionStore

log = logging.getLogger(__name__)

#: seconds between two looks at a project's ``current`` pointer
POLL_SECONDS = 1.0
#: trained versions kept loaded at once (each holds a model in memory)
MAX_LOADED = 2


def _phrase_key(text: str) -> str:
    return " ".join(str(text).lower().split()).rstrip(".")


# -- a trained detector as a concept engine -------------------------------------------------------

@dataclass
class _ImageState:
    """One image's pixels (HxWx3 uint8 RGB), and the detector's answer on it (computed once per
    threshold: one forward pass answers every label)."""

    image_key: str
    image: np.ndarray
    predictions: Dict[float, Prediction] = field(default_factory=dict)
    embedding: Any = None


class DetectorEngine(ConceptEngine):
    """A trained closed-set :class:`~sam_backend.training.base.Detector` behind the concept
    engine interface. A phrase selects the class it was trained with (the label's ``hint``, else
    its value; the label value itself matches too, case and a final period aside); one forward
    pass per image answers all of them. A detector without masks gets each box's mask from the
    click model, as the ``grounding_dino`` engine does."""

    def __init__(self, detector: Detector, segmenter, name: str):
        super().__init__(None, segmenter)
        self.detector = detector
        self.name = name
        self._classes: Dict[str, int] = {}
        for index, phrase in enumerate(detector.phrases):
            self._classes.setdefault(_phrase_key(phrase), index)
        for index, label in enumerate(detector.classes):
            self._classes.setdefault(_phrase_key(label), index)

    def class_of(self, phrase: str) -> Optional[int]:
        """The class index ``phrase`` names, or None (a label the version does not know)."""
        return self._classes.get(_phrase_key(phrase))

    @property
    def max_phrase_tokens(self) -> int:
        return 1 << 30  # no text encoder: a phrase only selects a class

    def phrase_tokens(self, phrase: str) -> int:
        return 0

    def image_state(self, image_key: str, load_image: ImageLoaderFn):
        image = load_image()
        return _ImageState(image_key, image), image.shape[:2]

    def _prediction(self, state: _ImageState, threshold: float) -> Prediction:
        if threshold not in state.predictions:
            state.predictions[threshold] = self.detector.predict(state.image, threshold)
        return state.predictions[threshold]

    def find(self, state: _ImageState, phrase: str, threshold: float) -> Instances:
        """The instances of ``phrase``'s class scoring above ``threshold``: boxes clipped to the
        image (empty ones dropped), masks (N, H, W) bool in the image's frame (None for a
        detector without masks)."""
        height, width = state.image.shape[:2]
        index = self.class_of(phrase)
        if index is None:
            return Instances.empty(height, width)
        prediction = self._prediction(state, threshold)
        labels = np.asarray(prediction.labels, np.int64).reshape(-1)
        boxes = np.asarray(prediction.boxes, np.float32).reshape(-1, 4)
        scores = np.asarray(prediction.scores, np.float32).reshape(-1)
        boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
        keep = (labels == index) & (scores > threshold) & \
            (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        masks = None
        if prediction.masks is not None:
            masks = _in_frame(np.asarray(prediction.masks)[keep], height, width)
        return Instances(masks, boxes[keep], scores[keep])

    def with_masks(self, state: _ImageState, instances: Instances,
                   scope: WorkScope = UNBOUNDED) -> Instances:
        if instances.masks is not None:
            return instances
        if state.embedding is None:
            state.embedding = self.segmenter.embedding(state.image_key, lambda: state.image)
        masks = []
        for box in instances.boxes:
            scope.check("the concept pass's masks")
            masks.append(self.segmenter.decode(state.image_key, state.embedding,
                                               Prompt(box=box)).mask)
        masks = np.stack(masks) if masks else np.zeros((0,) + state.image.shape[:2], bool)
        return Instances(masks, instances.boxes, instances.scores)


def _in_frame(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """``masks`` (N, h, w) as (N, height, width) bool (nearest-neighbour when a detector answers
    at another size)."""
    masks = masks.astype(bool, copy=False)
    if masks.shape[1:] == (height, width):
        return masks
    import cv2

    return np.stack([cv2.resize(m.astype(np.uint8), (width, height),
                                interpolation=cv2.INTER_NEAREST).astype(bool) for m in masks]) \
        if len(masks) else np.zeros((0, height, width), bool)


# -- which version a project is served from -------------------------------------------------------

@dataclass
class _Served:
    version: Version
    annotator: ConceptAnnotator
    model_version: str


@dataclass
class _Watch:
    """What this process knows of one project's pointer."""

    checked: float = float("-inf")  # clock time of the last look
    stamp: Optional[tuple] = None  # the pointer file's stamp then
    wanted: Optional[Version] = None  # the version it names
    serving: Optional[str] = None  # the version name answering now (may lag behind wanted)
    refused: Optional[str] = None  # a version name that failed to load (not retried)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one load at a time


class TrainedModels:
    """project -> the annotator of its promoted version (the
    :class:`~sam_backend.labelstudio.service.TrainedModels` protocol), for one
    :class:`~sam_backend.labelstudio.service.PredictionService`. Thread-safe.

    ``clock``: seconds, monotonic (the poll interval is measured with it)."""

    def __init__(self, service, versions: VersionStore, max_loaded: int = MAX_LOADED,
                 poll_seconds: float = POLL_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.service = service
        self.versions = versions
        self.max_loaded = max(1, max_loaded)
        self.poll_seconds = poll_seconds
        self.clock = clock
        self._watches: Dict[int, _Watch] = {}
        self._loaded: "OrderedDict[str, _Served]" = OrderedDict()  # version name -> served
        self._lock = threading.Lock()
        # trained passes run one at a time (each uses every core), beside the zero-shot engine's
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="trained")
        self.loads = 0
        self.load_failures = 0

    # -- the protocol --------------------------------------------------------------------------
    def annotator(self, project: int) -> Optional[Tuple[ConceptAnnotator, str]]:
        served = self._served(project)
        return None if served is None else (served.annotator, served.model_version)

    def model_version(self, project: int) -> Optional[str]:
        watch = self._look(project)
        if watch.wanted is not None and watch.wanted.name != watch.refused:
            return self.model_version_of(watch.wanted)
        with self._lock:
            served = self._loaded.get(watch.serving or "")
        return None if served is None else served.model_version

    def model_version_of(self, version: Version) -> str:
        """``<click model's version>+<kind>@p<project>-v<N>``, e.g.
        ``sam_backend-1.2.0:mobile_sam/vit_t+rf_detr@p7-v3`` (the zero-shot concept engine,
        which does not answer these, is not named)."""
        return f"{self.service.click_model_version}+{version.kind}@{version.name}"

    # -- for /metrics --------------------------------------------------------------------------
    def serving(self) -> Dict[str, str]:
        """project id (as text) -> the version name answering its auto-annotations here."""
        with self._lock:
            return {str(p): w.serving for p, w in self._watches.items() if w.serving}

    def metrics(self) -> Dict[str, Any]:
        with self._lock:
            loaded = list(self._loaded)
        return {"trained_versions_loaded": loaded, "trained_served": self.serving(),
                "trained_loads": self.loads, "trained_load_failures": self.load_failures}

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    # -- internals -----------------------------------------------------------------------------
    def _look(self, project: int) -> _Watch:
        """The project's watch, its pointer re-read if the last look is ``poll_seconds`` old."""
        with self._lock:
            watch = self._watches.setdefault(project, _Watch())
            now = self.clock()
            if now - watch.checked < self.poll_seconds:
                return watch
            watch.checked = now
        try:
            stamp = self.versions.pointer_stamp(project)
            if stamp == watch.stamp:
                return watch
            wanted = self.versions.current(project) if stamp is not None else None
        except Exception as exc:  # a pointer naming a missing version, an unreadable volume
            log.warning("project %s: cannot read the served trained version (%s); serving what "
                        "was served before", project, exc)
            return watch
        with self._lock:
            # a new pointer is tried once, even if it names a version refused before (its
            # files may have been repaired and it promoted again)
            watch.stamp, watch.wanted, watch.refused = stamp, wanted, None
        if wanted is not None and wanted.name != watch.serving:
            log.info("project %s: trained version %s promoted", project, wanted.name)
        return watch

    def _served(self, project: int) -> Optional[_Served]:
        watch = self._look(project)
        wanted = watch.wanted
        if wanted is None:
            if watch.serving is not None:
                log.info("project %s: no promoted trained version any more; auto-annotations "
                         "from the zero-shot engine", project)
                watch.serving = None
            return None
        with self._lock:
            served = self._loaded.get(wanted.name)
            if served is not None:
                self._loaded.move_to_end(wanted.name)
                watch.serving = wanted.name
                return served
        if wanted.name != watch.refused:
            with watch.lock:  # one load per project at a time; the others wait for it
                with self._lock:
                    served = self._loaded.get(wanted.name)
                if served is None:
                    served = self._load(wanted)
                if served is not None:
                    with self._lock:
                        watch.serving = wanted.name
                    return served
                watch.refused = wanted.name
        # the promoted version cannot be loaded: the one served before keeps serving
        with self._lock:
            served = self._loaded.get(watch.serving or "")
        return served

    def _load(self, version: Version) -> Optional[_Served]:
        started = time.perf_counter()
        try:
            engine = self._engine(version)
        except Exception as exc:  # CorruptVersion, unreadable weights, a missing file
            self.load_failures += 1
            log.error("project %s: trained version %s refused, not served: %s", version.project,
                      version.name, exc)
            return None
        model_version = self.model_version_of(version)
        annotator = ConceptAnnotator(self.service, lambda: engine, model_version=model_version,
                                     worker=self._worker,
                                     threshold=self.service.settings.trained_threshold)
        served = _Served(version, annotator, model_version)
        with self._lock:
            self._loaded[version.name] = served
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
        self.loads += 1
        log.info("project %s: serving trained version %s (%s) from %s, loaded in %.1f s",
                 version.project, version.name, version.kind, version.path,
                 time.perf_counter() - started)
        return served

    def _engine(self, version: Version) -> ConceptEngine:
        """The version's concept engine on the click model's device, its files verified first."""
        segmenter = self.service.segmenter
        device = str(getattr(segmenter.model, "device", "cpu"))
        if version.kind == "grounding_dino":
            from sam_backend.concepts.grounding_dino import GroundingDinoEngine

            self.versions.verify(version)
            # its own input size (the one it was trained at), the pass mode of the backend
            engine = GroundingDinoEngine.load(version.model_dir, segmenter,
                                              passes=self.service.settings.concept_passes)
            engine.name = f"grounding_dino@{version.name}"
            return engine
        detector = self.versions.load_detector(version, device)
        return DetectorEngine(detector, segmenter, f"{version.kind}@{version.name}")


def attach(service) -> Optional[TrainedModels]:
    """Serve promoted trained versions from ``service`` (a
    :class:`~sam_backend.labelstudio.service.PredictionService`) when its settings'
    ``serve_trained`` is on; the provider, or None."""
    if not service.settings.serve_trained:
        return None
    trained = TrainedModels(service, VersionStore.from_settings(service.settings))
    service.trained = trained
    return trained
