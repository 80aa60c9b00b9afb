"""Trainer ``rf_detr``: RF-DETR instance segmentation (``transformers``'
``RfDetrForInstanceSegmentation``, Apache-2.0), a closed-set real-time detector + segmenter
trained on the project's objects (one object = one instance, a mask and its box), one class per
label of the config.

**Starting point** (:attr:`TrainOptions.start`):

- a directory this trainer wrote (a parent version): its weights; its class head is kept when
  its classes are the project's (same labels, same order), else a new head is made;
- a directory in the hub's format (``config.json`` + ``*.safetensors``, e.g. a copy of
  ``Roboflow/rf-detr-seg-small``): its weights with a new class head;
- a hub repository id ``owner/name`` that is not a local path (e.g.
  ``Roboflow/rf-detr-seg-medium``): downloaded once into ``<weights dir>/<name>/`` and used as
  above;
- None: :data:`DEFAULT_PRETRAINED` downloaded the same way (``HF_ENDPOINT`` for a mirror,
  huggingface_hub's progress bars, verified by loading it, nothing half-written: see
  :func:`sam_backend.models.hub.download_repo`); with :attr:`TrainOptions.reduced`, the
  reduced configuration (:func:`reduced_config`) from random weights seeded by the run's seed,
  no download.

**Input.** Every image (and its masks) is resized to ``image_size`` x ``image_size`` (no aspect
kept, as RF-DETR trains), then augmented (:func:`.augment.augment`: flip, crop, colour), then
normalised by the library's ``RfDetrImageProcessor`` (ImageNet mean and std). ``image_size``:
:attr:`TrainOptions.image_size`, else the start's (its processor's size; 384 for
``rf-detr-seg-small``, :data:`REDUCED_IMAGE_SIZE` for the reduced configuration), rounded to a
multiple of the backbone's patch size x windows (:func:`input_multiple`; 24 for the seg
family, 16 for the reduced one), which the backbone's patching needs, and at least as large as
the queries need (:func:`fit_size`). Targets: class index,
box ``(cx, cy, w, h)`` normalised, taken from the augmented mask's bounds, and the mask; an
object whose mask vanishes at the training size is dropped, an image without objects is a
negative.

**Training.** Seeded (:func:`.base.seed_everything` and a numpy Generator for the
augmentations and the order of the samples): the same seed on the same machine gives the same
losses. AdamW (weight decay 1e-4), the learning rate on a cosine from ``learning_rate`` to a
tenth of it over the run, gradients clipped to norm 0.1 (RF-DETR's recipe); mixed precision
(``torch.autocast``, bfloat16 where supported, else float16 with a gradient scaler) on CUDA
only. The loss is the library's (Hungarian matching; focal class loss, L1 + GIoU box loss,
point-sampled mask BCE + dice, on every decoder layer and the encoder proposals).
``stop()`` is asked before every step: :class:`.base.TrainingStopped`, nothing written.

**Output** (:meth:`RfDetrTrainer.train` into an empty directory): ``config.json`` +
``model.safetensors`` (``save_pretrained``), ``preprocessor_config.json`` (the processor with
the training size) and :data:`.base.MODEL_FILE` (written last: a directory without it is not a
model). :meth:`RfDetrTrainer.load` reads local files only; a missing or corrupt file is a
ValueError naming the directory.

**Inference** (:meth:`RfDetrDetector.predict`): the image resized to the training size, the
library's ``post_process_instance_segmentation`` (sigmoid scores, top queries, mask logits
resized bilinearly to the image and cut at 0); each box is its mask's bounds (as the training
boxes are), so box and mask never disagree; an instance whose mask is empty is dropped.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from sam_backend.training.augment import augment, mask_boxes
from sam_backend.training.base import (MODEL_FILE, Detector, EpochLog, ImageSample, Prediction,
                                       TrainingStopped, TrainOptions, Trainer, read_model_file,
                                       seed_everything)

log = logging.getLogger(__name__)

KIND = "rf_detr"
#: the pretrained start when :attr:`TrainOptions.start` is None (COCO instance segmentation,
#: 384 px, ~34M parameters: the smallest of the family that keeps 4 decoder layers)
DEFAULT_PRETRAINED = "Roboflow/rf-detr-seg-small"
#: the training size of the reduced configuration (images are resized to it, square)
REDUCED_IMAGE_SIZE = 160
#: the loss parts reported per epoch (the last decoder layer's; the total has every layer's)
LOSS_PARTS = ("loss_ce", "loss_bbox", "loss_giou", "loss_mask_ce", "loss_mask_dice")
GRAD_CLIP = 0.1
WEIGHT_DECAY = 1e-4

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


# -- configurations ------------------------------------------------------------------------------
def reduced_config(classes: Sequence[str], image_size: int = REDUCED_IMAGE_SIZE):
    """The reduced RF-DETR instance-segmentation configuration (tests, smoke runs): the same
    architecture (windowed DINOv2-style ViT backbone, C2f projector, deformable two-stage
    decoder with group DETR, segmentation head) with a 4-layer 96-wide backbone (patch 16, one
    window), d_model 64, 2 decoder layers, 20 queries, 3 query groups: 0.61M parameters
    (607,353 for two classes) against 33.6M for ``rf-detr-seg-small``."""
    from transformers import RfDetrConfig

    return RfDetrConfig(
        backbone_config=dict(
            model_type="rf_detr_dinov2", hidden_size=96, num_hidden_layers=4,
            num_attention_heads=3, mlp_ratio=2, image_size=image_size, patch_size=16,
            num_windows=1, out_features=["stage3", "stage4"], num_register_tokens=0),
        d_model=64, num_queries=20, group_detr=3, decoder_layers=2,
        decoder_self_attention_heads=4, decoder_cross_attention_heads=4, decoder_ffn_dim=128,
        decoder_n_points=2, intermediate_size=128, c2f_num_blocks=1,
        **_label_maps(classes))


def _label_maps(classes: Sequence[str]) -> Dict[str, Any]:
    return {"num_labels": len(classes),
            "id2label": {i: c for i, c in enumerate(classes)},
            "label2id": {c: i for i, c in enumerate(classes)}}


def input_multiple(config) -> int:
    """The side of a training image must be a multiple of this: the backbone's patch size times
    its windows per side (24 for the seg family: patch 12, 2 windows; 56 for rf-detr-base)."""
    backbone = config.backbone_config
    patch = backbone.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return int(patch) * max(1, int(getattr(backbone, "num_windows", 1)))


def fit_size(size: int, config) -> int:
    """``size`` rounded to the nearest multiple of :func:`input_multiple`, and at least the
    smallest side whose patches outnumber the queries (the encoder proposes one query per
    patch: 80 px for the reduced configuration's 20 queries, 120 for the seg family's 100)."""
    multiple = input_multiple(config)
    patch = config.backbone_config.patch_size
    patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    smallest = math.ceil(math.sqrt(config.num_queries)) * patch
    smallest = math.ceil(smallest / multiple) * multiple
    return max(smallest, int(round(size / multiple)) * multiple)


def _processor(image_size: int):
    from transformers import RfDetrImageProcessor

    return RfDetrImageProcessor(size={"height": image_size, "width": image_size})


def _start_size(directory: Path, config) -> int:
    """The start's own training size: its processor's square size, else its backbone's."""
    try:
        size = json.loads((directory / "preprocessor_config.json").read_text()).get("size")
    except (OSError, ValueError):
        size = None
    if isinstance(size, dict) and size.get("height"):
        return int(size["height"])
    if isinstance(size, (list, tuple)) and size:
        return int(size[0])
    image = config.backbone_config.image_size
    return int(image[0] if isinstance(image, (list, tuple)) else image)


# -- the starting point --------------------------------------------------------------------------
def pretrained_dir(repo: str, weights: Optional[Path] = None, progress: bool = True) -> Path:
    """``<weights dir>/<name>/`` for the hub repository ``repo`` (``owner/name``), downloaded
    once (see :func:`sam_backend.models.hub.download_repo`) and checked to load as RF-DETR
    instance segmentation. Raises CheckpointError when it cannot be had."""
    from sam_backend.models import hub
    from sam_backend.models.registry import weights_dir

    dest = Path(weights or weights_dir()) / repo.split("/")[-1]
    return hub.download_repo(repo, dest, _check_download, what=f"RF-DETR {repo}",
                             progress=progress)


def _check_download(directory: Path) -> None:
    from sam_backend.errors import CheckpointError

    try:
        _load_model(directory)
    except ValueError as exc:
        raise CheckpointError(f"the download failed its check: {exc}. The download was "
                              f"removed") from None


def _load_model(directory: Path, **kwargs):
    """``RfDetrForInstanceSegmentation`` from the local ``directory``; ValueError naming it."""
    from transformers import RfDetrForInstanceSegmentation

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} is not an RF-DETR model directory (no config.json)")
    if not any(directory.glob("*.safetensors")):
        raise ValueError(f"{directory} has no weights (*.safetensors)")
    try:
        return RfDetrForInstanceSegmentation.from_pretrained(
            str(directory), local_files_only=True, **kwargs)
    except Exception as exc:  # safetensors, json and shape errors alike: name the directory
        raise ValueError(f"cannot load the RF-DETR model in {directory}: "
                         f"{type(exc).__name__}: {exc}") from None


def _reset_class_heads(model) -> None:
    """New, freshly initialised class heads (decoder and encoder proposals) for the model's
    ``num_labels`` classes, as the library initialises them (normal(0, init_std), bias
    -log(99): every class starts at a 1 % score)."""
    import torch
    from torch import nn

    config = model.config
    detector = model.model  # RfDetrForObjectDetection

    def head() -> nn.Linear:
        layer = nn.Linear(config.d_model, config.num_labels)
        with torch.no_grad():
            layer.weight.normal_(0.0, config.init_std)
            layer.bias.fill_(-math.log(99))
        return layer

    detector.class_embed = head()
    detector.model.enc_out_class_embed = nn.ModuleList(
        [head() for _ in range(config.group_detr)])


def _resolve_start(start: Optional[Path]) -> Tuple[Optional[Path], Optional[str]]:
    """(directory, hub repo it came from or None) of a start option."""
    if start is None:
        return pretrained_dir(DEFAULT_PRETRAINED), DEFAULT_PRETRAINED
    path = Path(start).expanduser()
    if path.is_dir():
        return path, None
    text = str(start)
    if not path.is_absolute() and _HUB_ID.match(text) and not text.startswith("."):
        return pretrained_dir(text), text
    raise ValueError(f"the start {start} is not a directory (nor a hub repository id "
                     f"owner/name)")


def build_model(classes: Sequence[str], options: TrainOptions):
    """(model, image size, facts about the start) for a run: see the module docstring."""
    classes = list(classes)
    seed_everything(options.seed)  # a new head and the reduced weights are seeded
    if options.start is None and options.reduced:
        from transformers import RfDetrForInstanceSegmentation

        size = options.image_size or REDUCED_IMAGE_SIZE
        config = reduced_config(classes, size)
        model = RfDetrForInstanceSegmentation(config)
        return model, fit_size(size, config), \
            {"start": None, "pretrained": None, "head": "new"}
    directory, repo = _resolve_start(options.start)
    try:
        parent = read_model_file(directory)
    except ValueError:
        parent = None
    same = bool(parent) and parent.get("kind") == KIND and list(parent.get("classes", [])) == classes
    if same:
        model = _load_model(directory)
    else:
        model = _load_model(directory, ignore_mismatched_sizes=True, **_label_maps(classes))
        _reset_class_heads(model)
    size = options.image_size or (int(parent["image_size"]) if same else
                                  _start_size(directory, model.config))
    return model, fit_size(size, model.config), \
        {"start": str(directory), "pretrained": repo, "head": "kept" if same else "new"}


# -- data ----------------------------------------------------------------------------------------
def _resize(image: np.ndarray, masks: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """``image`` HxWx3 uint8 and ``masks`` (N, h, w) bool (any size: they cover the image) ->
    ``size`` x ``size`` (bilinear / nearest)."""
    import cv2

    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    if len(masks):
        masks = np.stack([cv2.resize(m.astype(np.uint8), (size, size),
                                     interpolation=cv2.INTER_NEAREST) for m in masks]).astype(bool)
    else:
        masks = np.zeros((0, size, size), bool)
    return image, masks


def _target(masks: np.ndarray, labels: np.ndarray, size: int) -> Dict[str, Any]:
    """The library's label format for one image: ``class_labels`` (N,) int64, ``boxes`` (N, 4)
    float32 ``(cx, cy, w, h)`` normalised by ``size``, ``masks`` (N, size, size) float32."""
    import torch

    boxes = mask_boxes(masks) / float(size)
    cxcywh = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                       boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1) \
        if len(boxes) else np.zeros((0, 4), np.float32)
    return {"class_labels": torch.as_tensor(np.asarray(labels, np.int64)),
            "boxes": torch.as_tensor(cxcywh, dtype=torch.float32),
            "masks": torch.as_tensor(masks, dtype=torch.float32)}


def _example(image: np.ndarray, item: ImageSample, size: int, rng: np.random.Generator
             ) -> Tuple[np.ndarray, Dict[str, Any]]:
    """One augmented training example of ``item`` whose ``image`` (HxWx3 uint8) is given: the
    image (size x size x 3 uint8) and its target."""
    objects = item.sample.objects
    masks = np.stack([o.mask() for o in objects]) if objects else np.zeros((0, 1, 1), bool)
    labels = np.array([o.label for o in objects], np.int64)
    image, masks = _resize(image, masks, size)
    image, masks, _, labels = augment(image, masks, labels, rng)
    return image, _target(masks, labels, size)


# -- the trainer ---------------------------------------------------------------------------------
class RfDetrTrainer(Trainer):
    kind = KIND
    metric = "segm"

    def train(self, train: Sequence[ImageSample], classes: Sequence[str],
              phrases: Sequence[str], out: Path,
              on_epoch: Callable[[EpochLog], None] = lambda log: None,
              stop: Callable[[], bool] = lambda: False) -> List[EpochLog]:
        import torch

        options = self.options
        classes, phrases, out = list(classes), list(phrases), Path(out)
        self.check_inputs(train, classes, phrases, out)
        device = torch.device(options.device)
        model, size, start = build_model(classes, options)
        model.to(device).train()
        processor = _processor(size)
        rng = np.random.default_rng(options.seed)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=options.learning_rate, weight_decay=WEIGHT_DECAY)
        batch = max(1, int(options.batch_size))
        steps_per_epoch = math.ceil(len(train) / batch)
        total = max(1, steps_per_epoch * options.epochs)

        def lr_at(step: int) -> float:  # cosine from lr to lr / 10
            return options.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * step / total)))

        amp_dtype = None
        if device.type == "cuda":
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        logs: List[EpochLog] = []
        step = 0
        for epoch in range(1, options.epochs + 1):
            began = time.perf_counter()
            order = rng.permutation(len(train))
            sums: Dict[str, float] = {}
            seen = batches = 0
            for first in range(0, len(order), batch):
                if stop():
                    raise TrainingStopped(f"stopped in epoch {epoch} of {options.epochs}")
                examples = []
                for index in order[first:first + batch]:
                    item = train[int(index)]
                    try:
                        image = item.load()
                    except ValueError as exc:  # an image that cannot be decoded
                        log.warning("rf_detr: task %s skipped: %s", item.sample.task_id, exc)
                        continue
                    examples.append(_example(image, item, size, rng))
                if not examples:
                    continue
                inputs = processor(images=[e[0] for e in examples], return_tensors="pt")
                labels = [{k: v.to(device) for k, v in e[1].items()} for e in examples]
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                try:
                    with torch.autocast(device.type, dtype=amp_dtype,
                                        enabled=amp_dtype is not None):
                        output = model(pixel_values=inputs["pixel_values"].to(device),
                                       pixel_mask=inputs["pixel_mask"].to(device), labels=labels)
                except ValueError:
                    # diverged weights make NaN boxes, which the matcher refuses by their format:
                    # the same forward without the loss tells that case from a real error
                    with torch.no_grad():
                        boxes = model(pixel_values=inputs["pixel_values"].to(device),
                                      pixel_mask=inputs["pixel_mask"].to(device)).pred_boxes
                    if not bool(torch.isfinite(boxes).all()):
                        raise _diverged(epoch, options.learning_rate) from None
                    raise
                loss = _total_loss(output, model.config)
                if not torch.isfinite(loss):
                    raise _diverged(epoch, options.learning_rate)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
                    optimizer.step()
                step += 1
                batches += 1
                seen += len(examples)
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                for part in LOSS_PARTS:
                    value = output.loss_dict.get(part)
                    if value is not None and value.numel() == 1:
                        sums[part] = sums.get(part, 0.0) + float(value.detach())
            n = max(1, batches)
            entry = EpochLog(epoch=epoch, epochs=options.epochs, loss=sums.get("loss", 0.0) / n,
                             seconds=time.perf_counter() - began, images=seen,
                             parts={k: v / n for k, v in sums.items() if k != "loss"})
            log.info("rf_detr epoch %d/%d: loss %.4f (%s), %.1f s, %.2f images/s", epoch,
                     options.epochs, entry.loss,
                     ", ".join(f"{k} {v:.3f}" for k, v in entry.parts.items()), entry.seconds,
                     entry.images_per_second)
            logs.append(entry)
            on_epoch(entry)
        if stop():
            raise TrainingStopped(f"stopped after epoch {options.epochs}")
        self._save(model, processor, out, classes, phrases, size, start,
                   {"epochs_run": len(logs)})
        return logs

    def _save(self, model, processor, out: Path, classes: List[str], phrases: List[str],
              size: int, start: Dict[str, Any], extra: Dict[str, Any]) -> None:
        import transformers

        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out), safe_serialization=True)
        processor.save_pretrained(str(out))
        facts = {"kind": KIND, "classes": classes, "phrases": phrases, "image_size": size,
                 "reduced": bool(self.options.reduced and self.options.start is None),
                 "seed": self.options.seed,
                 "parameters": int(sum(p.numel() for p in model.parameters())),
                 "transformers": transformers.__version__, **start, **extra}
        (out / MODEL_FILE).write_text(json.dumps(facts, indent=2))

    def load(self, directory: Path, device: str = "cpu") -> "RfDetrDetector":
        return RfDetrDetector.load(directory, device)


def _diverged(epoch: int, learning_rate: float) -> FloatingPointError:
    return FloatingPointError(
        f"training diverged in epoch {epoch}: the loss or the weights are no longer finite; "
        f"lower train_learning_rate (it is {learning_rate:g})")


def _total_loss(output, config):
    """The run's loss: the library's weighted sum; recomputed without the empty mask terms when
    the batch holds no object at all (the library's sum is then an empty tensor)."""
    loss = output.loss
    if loss.numel() == 1:
        return loss.reshape(())
    weights = {"loss_ce": config.class_loss_coefficient, "loss_bbox": config.bbox_loss_coefficient,
               "loss_giou": config.giou_loss_coefficient,
               "loss_mask_ce": config.mask_class_loss_coefficient,
               "loss_mask_dice": config.mask_dice_loss_coefficient}
    total = None
    for name, value in output.loss_dict.items():
        base = re.sub(r"_(\d+|enc)$", "", name)
        if base in weights and value.numel() == 1:
            term = value.reshape(()) * weights[base]
            total = term if total is None else total + term
    return total


# -- the detector --------------------------------------------------------------------------------
class RfDetrDetector(Detector):
    """A trained RF-DETR for inference (see the module docstring)."""

    kind = KIND
    segments = True

    def __init__(self, model, processor, classes: List[str], phrases: List[str],
                 image_size: int, facts: Dict[str, Any]):
        self.model = model
        self.processor = processor
        self.classes = classes
        self.phrases = phrases
        self.image_size = image_size
        self.facts = facts
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, directory: Path, device: str = "cpu") -> "RfDetrDetector":
        """The model :meth:`RfDetrTrainer.train` wrote into ``directory`` (local files only);
        ValueError naming the directory when it cannot be read."""
        directory = Path(directory)
        facts = read_model_file(directory)
        if facts.get("kind") != KIND:
            raise ValueError(f"{directory} holds a {facts.get('kind')!r} model, not {KIND}")
        classes = [str(c) for c in facts.get("classes") or []]
        if not classes:
            raise ValueError(f"{directory / MODEL_FILE} names no classes")
        model = _load_model(directory)
        if model.config.num_labels != len(classes):
            raise ValueError(f"{directory}: the weights have {model.config.num_labels} classes, "
                             f"{MODEL_FILE} names {len(classes)}")
        size = int(facts.get("image_size") or _start_size(directory, model.config))
        model = model.to(device).eval()
        return cls(model, _processor(size), classes,
                   [str(p) for p in facts.get("phrases") or classes], size, facts)

    def predict(self, image: np.ndarray, threshold: float = 0.3) -> Prediction:
        """Detections on ``image`` (HxWx3 uint8 RGB) scoring above ``threshold``, best first:
        boxes (N, 4) float32 xyxy pixels of ``image`` (each its mask's bounds), scores (N,)
        float32, labels (N,) int64 class indices, masks (N, H, W) bool at ``image``'s size."""
        import torch

        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image must be HxWx3 uint8, got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            output = self.model(pixel_values=inputs["pixel_values"],
                                pixel_mask=inputs["pixel_mask"])
            result = self.processor.post_process_instance_segmentation(
                output, threshold=threshold, target_sizes=[(height, width)],
                return_binary_maps=True)[0]
        info = result["segments_info"]
        # with no detection the post-processing answers one empty (H, W) map, not (0, H, W)
        masks = result["segmentation"].cpu().numpy().astype(bool).reshape(-1, height, width) \
            if info else np.zeros((0, height, width), bool)
        scores = np.array([s["score"] for s in info], np.float32)
        labels = np.array([s["label_id"] for s in info], np.int64)
        return Prediction(boxes=mask_boxes(masks), scores=scores, labels=labels, masks=masks)


__all__ = ["DEFAULT_PRETRAINED", "REDUCED_IMAGE_SIZE", "RfDetrDetector", "RfDetrTrainer",
           "build_model", "fit_size", "input_multiple", "pretrained_dir", "reduced_config"]
