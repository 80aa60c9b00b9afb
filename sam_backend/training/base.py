"""What every trainer implements, and what a trained model answers (the interface the runner,
the version store and the server share).

A **trainer** (:class:`Trainer`; one module per kind: :mod:`.rf_detr`, :mod:`.grounding_dino`)
fine-tunes one architecture on a project's training set and writes the result into a directory
(:meth:`Trainer.train`); :meth:`Trainer.load` reads such a directory back as a
:class:`Detector`, which answers one image at a time with boxes, scores, label indices and (for
a trainer that segments) masks, as :class:`Prediction`. The runner evaluates
detectors on the held-out tasks; the server serves a promoted version through a concept engine
(:mod:`.serving`).

Coordinates: boxes are ``(x0, y0, x1, y1)`` pixels of the image as given; masks (N, H, W) bool
in the same frame; images HxWx3 uint8 RGB.
"""
from __future__ import annotations

import importlib
import json
import random
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # a hint only: the server imports this module, never the dataset's export code
    from sam_backend.training.dataset import Sample

#: the file in a trained model's directory that says what it is (kind, classes, phrases,
#: image size, reduced or not), written by the trainer next to its weights
MODEL_FILE = "sam_backend_model.json"


@dataclass
class Prediction:
    """One image's predictions (what :meth:`Detector.predict` answers and :mod:`.evaluate`
    scores): ``boxes`` (N, 4) ``[x0, y0, x1, y1]`` pixels, ``scores`` (N,), ``labels`` (N,)
    label indices (into the classes), ``masks`` (N, H, W) bool or None."""

    boxes: Any
    scores: Any
    labels: Any
    masks: Any = None


@dataclass
class TrainOptions:
    """How one run trains. ``image_size`` 0: the trainer's default. ``reduced``: a reduced
    configuration of the same architecture, from random weights (tests, smoke runs; no
    download). ``start``: a directory in the trainer's format to start from (a parent version's
    model, or pretrained weights); None: the trainer's default starting point (the pretrained
    model through the hub, or random weights when ``reduced``)."""

    epochs: int = 30
    batch_size: int = 4
    learning_rate: float = 1e-4
    image_size: int = 0
    seed: int = 0
    device: str = "cpu"
    reduced: bool = False
    start: Optional[Path] = None

    def as_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["start"] = None if self.start is None else str(self.start)
        return data


@dataclass
class ImageSample:
    """A training or held-out sample whose image is on disk (the runner downloads each task's
    image once into the run's work directory; a task whose image cannot be had is left out and
    counted in the report)."""

    sample: Sample
    path: Path

    def load(self) -> np.ndarray:
        """The image, HxWx3 uint8 RGB (its size is the sample's ``width`` x ``height``)."""
        import cv2

        pixels = cv2.imread(str(self.path), cv2.IMREAD_COLOR)
        if pixels is None:
            raise ValueError(f"cannot decode {self.path}")
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


@dataclass
class EpochLog:
    """One epoch's figures: mean training loss (and its parts by name), wall time, throughput."""

    epoch: int
    epochs: int
    loss: float
    seconds: float
    images: int
    parts: Dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "epochs": self.epochs, "loss": self.loss,
                "seconds": self.seconds, "images": self.images,
                "images_per_second": self.images_per_second, "parts": dict(self.parts)}


class TrainingStopped(Exception):
    """The run was asked to stop (``stop()`` became true); nothing was written."""


class Detector(ABC):
    """A trained model, loaded for inference. ``classes``: the label values (a prediction's
    ``labels`` index them); ``phrases``: the text each class was trained with (its ``hint``, else
    its value); ``segments``: whether :meth:`predict` returns masks (else boxes only: masks come
    from the click model when served)."""

    kind: str
    classes: List[str]
    phrases: List[str]
    segments: bool

    @abstractmethod
    def predict(self, image: np.ndarray, threshold: float = 0.3) -> Prediction:
        """Every detection on ``image`` (HxWx3 uint8 RGB) scoring above ``threshold``, best
        first: boxes (N, 4) float32 xyxy pixels, scores (N,) float32, labels (N,) int64 class
        indices, masks (N, H, W) bool or None."""


class Trainer(ABC):
    """One architecture's fine-tuning. ``kind``: its name (``trainer=`` option, model_version
    suffix); ``metric``: the COCO IoU type that decides promotion (``"segm"`` or ``"bbox"``)."""

    kind: str
    metric: str

    def __init__(self, options: TrainOptions):
        self.options = options

    @abstractmethod
    def train(self, train: Sequence[ImageSample], classes: Sequence[str],
              phrases: Sequence[str], out: Path,
              on_epoch: Callable[[EpochLog], None] = lambda log: None,
              stop: Callable[[], bool] = lambda: False) -> List[EpochLog]:
        """Train on ``train`` (objects' ``label`` index ``classes``; ``phrases[i]`` is the text
        for ``classes[i]``) from ``options.start`` (see :class:`TrainOptions`), seeded by
        ``options.seed``; call ``on_epoch`` after each epoch; raise :class:`TrainingStopped` as
        soon as ``stop()`` is true. Writes the model into the empty directory ``out`` (its
        weights in the architecture's own format plus :data:`MODEL_FILE`) and returns the
        epochs' logs."""

    @staticmethod
    def check_inputs(train: Sequence[ImageSample], classes: Sequence[str],
                     phrases: Sequence[str], out: Path) -> None:
        """A ValueError naming what is wrong with :meth:`train`'s arguments: no class, not one
        phrase per class, no sample, an object whose label index is not a class, or an ``out``
        directory that is not empty."""
        if not classes or len(phrases) != len(classes):
            raise ValueError(f"{len(classes)} classes and {len(phrases)} phrases: one phrase "
                             f"per class, at least one class")
        if not train:
            raise ValueError("no training sample")
        for item in train:
            for obj in item.sample.objects:
                if not 0 <= obj.label < len(classes):
                    raise ValueError(f"task {item.sample.task_id}: label index {obj.label} is "
                                     f"not one of the {len(classes)} classes")
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"the output directory {out} is not empty")

    @abstractmethod
    def load(self, directory: Path, device: str = "cpu") -> Detector:
        """The model in ``directory`` (written by :meth:`train`) for inference; a ValueError
        naming the directory when it cannot be read."""


#: kind -> "module:class" of its trainer (imported on first use: torch and transformers are heavy)
TRAINERS: Dict[str, str] = {
    "rf_detr": "sam_backend.training.rf_detr:RfDetrTrainer",
    "grounding_dino": "sam_backend.training.grounding_dino:GroundingDinoTrainer",
}


def trainer_for(kind: str, options: TrainOptions) -> Trainer:
    """The trainer of ``kind`` (a key of :data:`TRAINERS`)."""
    if kind not in TRAINERS:
        raise ValueError(f"unknown trainer {kind!r}: use {' or '.join(TRAINERS)}")
    module, name = TRAINERS[kind].split(":")
    return getattr(importlib.import_module(module), name)(options)


def read_model_file(directory: Path) -> Dict[str, Any]:
    """The :data:`MODEL_FILE` of a trained model's directory; ValueError when it is missing or
    not JSON."""
    path = Path(directory) / MODEL_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read: {exc}") from None


def seed_everything(seed: int) -> None:
    """The same seed for Python, numpy and torch (CPU and CUDA): a run is reproducible on one
    machine."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
