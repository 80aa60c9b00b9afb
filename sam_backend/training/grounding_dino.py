"""Trainer ``grounding_dino``: fine-tune the concept detector (Grounding DINO, ``transformers``'
``GroundingDinoForObjectDetection`` + ``GroundingDinoProcessor``) on a project's boxes, with each
label's phrase as its text, so that the labels learnt get better and the others keep working
open-vocabulary.

**Text and loss.** A prompt is phrases in Grounding DINO's query form joined by spaces
(``"circle. square."``, see :func:`prompt_text`). The model's token-aware loss
(``forward(..., labels=[{"class_labels", "boxes"}])``) splits the prompt's tokens into groups at
the delimiters ``[CLS]``, ``[SEP]``, ``.``, ``?`` (BERT ids 101, 102, 1012, 1029, hard-coded in
``transformers``) and ``[PAD]``; ``class_labels`` k means "the k-th group", i.e. the k-th phrase of
*that* prompt, and a matched query is taught to light up all of its tokens (focal loss), every
other token of the prompt being a negative. Each training step gets its own prompt (one for
the whole batch): the phrases of a random subset of the classes (all of them half of the time),
shuffled, within the model's text length; an object whose class is not in the prompt is
background for it. So a phrase works alone (as the concept engine asks, one phrase at a time)
and next to others, and a phrase learns not to fire on the other classes' objects.

**What is frozen.** The text encoder (BERT) is frozen: a label without annotations keeps the
text features it had, so it stays as open-vocabulary as the starting checkpoint (the fusion
layers still adapt). The image backbone learns at a tenth of the learning rate when starting
from trained weights (pretrained or a parent version), at the full rate from random weights
(``options.reduced``). Everything else (feature enhancer, decoder, heads) learns at the
options' rate (AdamW, weight decay 1e-4, gradient norm clipped to 0.1, as DETR-family recipes;
a short linear warm-up, then a cosine decay to 5 % of the rate). Every decoder layer is
supervised during training (``auxiliary_loss``), as in pre-training; the saved config keeps the
starting point's setting.

**Images.** Every image is resized to a square ``image_size`` (aspect not kept, no padding): the
normalised boxes the loss takes are then exactly the objects' boxes divided by the image size,
and the saved processor resizes the same way, so :class:`~sam_backend.concepts.grounding_dino.
GroundingDinoEngine` (which serves the directory) sees what training saw. Augmentation:
:func:`sam_backend.training.augment.augment` (boxes are the augmented masks' bounds). Mixed
precision (autocast) on CUDA only.

**Starting point.** ``options.start`` (a directory in ``transformers``' format: the concept
checkpoint or a parent version); else ``options.reduced``: a reduced random seeded Grounding
DINO (:func:`build_reduced`: a tiny Swin and BERT, a word-level tokenizer laid out like BERT's so
the delimiters have their ids); else the concept engine's default directory
(``<weights>/grounding-dino-tiny``), an error saying how to get it when missing.

**Output.** The directory holds the model and processor (``save_pretrained``: it loads with
``GroundingDinoEngine.load(out, segmenter)``) and :data:`~.base.MODEL_FILE` (kind, classes,
phrases, image size, ...). :class:`GroundingDinoDetector` answers boxes only (``segments``
False): served, the click model makes the masks.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from sam_backend.concepts.grounding_dino import DEFAULT_DIRECTORY, HUB_ID, query_text
from sam_backend.models.registry import weights_dir
from sam_backend.training.augment import augment, mask_boxes
from sam_backend.training.base import (MODEL_FILE, Detector, EpochLog, ImageSample, Prediction,
                                       Trainer, TrainingStopped, read_model_file, seed_everything)

log = logging.getLogger(__name__)

KIND = "grounding_dino"
#: the square side images are resized to: from trained weights / for the reduced model
DEFAULT_IMAGE_SIZE = 800
REDUCED_IMAGE_SIZE = 160
#: the backbone's learning rate relative to the options' when starting from trained weights
BACKBONE_LR_FACTOR = 0.1
WEIGHT_DECAY = 1e-4
MAX_GRAD_NORM = 0.1
#: the learning-rate schedule: warm-up share of the steps, the final rate's share
WARMUP_SHARE = 0.05
FINAL_LR_SHARE = 0.05
#: the share of training prompts holding every class (the others hold a random subset)
FULL_PROMPT_SHARE = 0.5
#: most detections per image (COCO's maxDets)
MAX_DETECTIONS = 100
#: objects whose augmented box is narrower or lower than this (pixels) are dropped
MIN_BOX_PIXELS = 2.0

# BERT (uncased) layout: Grounding DINO's text side knows its delimiters by these ids
_BERT_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012,
             "?": 1029}
_BASE_WORDS = ("a", "an", "the", "of", "and", "with", ",", "red", "blue", "green", "big",
               "small", "object", "thing", "person", "car", "cat", "dog", "circle", "square")

#: the recipe the learning test, the end-to-end loop and the benchmark share: the reduced model
#: on tests/support/shapes.py's 160x120 images (28 of them: held-out bbox mAP50 0.15-0.26
#: against 0.000 untrained, ~1 s an epoch on 2 idle cores; see tests/training/
#: test_grounding_dino_trainer.py)
REDUCED_RECIPE: Dict[str, Any] = {"epochs": 60, "batch_size": 2, "learning_rate": 1e-3,
                                  "image_size": REDUCED_IMAGE_SIZE, "reduced": True}


# -- the reduced model ---------------------------------------------------------------------------

def _words(phrases: Iterable[str]) -> List[str]:
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, split = BertNormalizer(lowercase=True), BertPreTokenizer()
    return [w for p in phrases for w, _ in split.pre_tokenize_str(normalizer.normalize_str(p))]


def reduced_vocabulary(words: Iterable[str] = ()) -> List[str]:
    """A word-level vocabulary laid out like BERT's where Grounding DINO looks (``[PAD]`` 0,
    ``[UNK]`` 100, ``[CLS]`` 101, ``[SEP]`` 102, ``.`` 1012, ``?`` 1029), holding a few common
    words and ``words`` (lower case) in free slots; the rest ``[unusedN]``."""
    vocab: List[Optional[str]] = [None] * 1030
    for token, index in _BERT_IDS.items():
        vocab[index] = token
    free = (i for i in range(len(vocab) + 10_000) if i >= len(vocab) or vocab[i] is None)
    seen = set(_BERT_IDS)
    for word in list(_BASE_WORDS) + [w.lower() for w in words]:
        if word not in seen:
            seen.add(word)
            index = next(free)
            if index >= len(vocab):
                vocab.extend([None] * (index + 1 - len(vocab)))
            vocab[index] = word
    return [v if v is not None else f"[unused{i}]" for i, v in enumerate(vocab)]


def reduced_config(vocab_size: int):
    """A reduced ``GroundingDinoConfig`` (the same classes: a 24-wide Swin of one block per
    stage, a one-layer 32-wide BERT, a 32-wide encoder of one layer and decoder of two, 30
    queries, 32 text tokens) for tests and smoke runs."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    return GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=24, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                                   window_size=7, out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=37,
                               max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=30, max_text_len=32)


def build_reduced(words: Iterable[str], seed: int, image_size: int = REDUCED_IMAGE_SIZE):
    """``(model, processor)``: a reduced Grounding DINO (:func:`reduced_config`) with weights
    drawn from ``seed`` and a word-level tokenizer of :func:`reduced_vocabulary` (``words``:
    the phrases' words), its processor resizing to ``image_size`` squared. No download."""
    from transformers import (BertTokenizerFast, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor)

    from sam_backend.models.random_init import seeded_random_model

    vocab = reduced_vocabulary(words)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_text("\n".join(vocab) + "\n")
        # `vocab=`: transformers 5 ignores `vocab_file=` here
        tokenizer = BertTokenizerFast(vocab=str(path), do_lower_case=True)
    processor = GroundingDinoProcessor(
        GroundingDinoImageProcessor(size={"height": image_size, "width": image_size}), tokenizer)
    config = reduced_config(len(vocab))
    model = seeded_random_model(lambda: GroundingDinoForObjectDetection(config), seed)
    return model, processor


# -- prompts -------------------------------------------------------------------------------------

def _clean(phrase: str) -> str:
    text = query_text(phrase.replace("?", " ").replace(".", " "))
    if text == ".":
        raise ValueError(f"the phrase {phrase!r} has no word to detect")
    return text


def prompt_text(phrases: Sequence[str]) -> str:
    """The prompt of ``phrases``: each in the query form (lower case, ending with a period; a
    period or question mark inside a phrase becomes a space, as it would split the phrase),
    joined by spaces: ``["Circle", "red car"]`` -> ``"circle. red car."``."""
    return " ".join(_clean(p) for p in phrases)


def _text_budget(model) -> int:
    config = model.config
    return min(config.max_text_len, config.text_config.max_position_embeddings)


def prompt_chunks(phrases: Sequence[str], tokenizer, budget: int) -> List[List[int]]:
    """Class indices grouped into prompts of at most ``budget`` tokens (with ``[CLS]`` and
    ``[SEP]``), in order. ValueError when one phrase alone is too long."""
    chunks: List[List[int]] = []
    used = 2
    for index, phrase in enumerate(phrases):
        size = len(tokenizer(_clean(phrase), add_special_tokens=False)["input_ids"])
        if size + 2 > budget:
            raise ValueError(f"the phrase {phrase!r} takes {size} tokens: the detector reads "
                             f"at most {budget - 2} per prompt")
        if not chunks or used + size > budget:
            chunks.append([])
            used = 2
        chunks[-1].append(index)
        used += size
    return chunks


# -- the detector --------------------------------------------------------------------------------

def _class_scores(logits, input_ids, n_phrases: int):
    """(Q, n_phrases) per-phrase scores of one image: the mean sigmoid over each phrase's tokens
    (the groups between delimiters, as the loss reads them). ``logits`` (Q, T), ``input_ids``
    (L,)."""
    import torch
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

    label_map = build_label_maps(logits[None], input_ids[None])[0].to(logits.dtype)  # (P, T)
    if label_map.shape[0] != n_phrases:
        raise RuntimeError(f"the prompt splits into {label_map.shape[0]} phrases, not "
                           f"{n_phrases}: its tokenizer does not use BERT's delimiter ids")
    probs = torch.sigmoid(logits.float()).nan_to_num(0.0)
    return probs @ (label_map / label_map.sum(dim=1, keepdim=True)).T


class GroundingDinoDetector(Detector):
    """A fine-tuned (or any) Grounding DINO answering for fixed classes: every class's phrase in
    one prompt (several when they exceed the text length), each query's best phrase as its
    label. ``model``/``processor``: ``transformers``' objects (on ``device``)."""

    kind = KIND
    segments = False

    def __init__(self, model, processor, classes: Sequence[str], phrases: Sequence[str]):
        if len(classes) != len(phrases):
            raise ValueError(f"{len(classes)} classes but {len(phrases)} phrases")
        self.model = model.eval()
        self.processor = processor
        self.classes = list(classes)
        self.phrases = list(phrases)
        self.device = next(model.parameters()).device
        self.chunks = prompt_chunks(self.phrases, processor.tokenizer, _text_budget(model))

    def predict(self, image: np.ndarray, threshold: float = 0.3) -> Prediction:
        """Detections on ``image`` (HxWx3 uint8 RGB) scoring above ``threshold``, best first, at
        most :data:`MAX_DETECTIONS`: boxes (N, 4) float32 xyxy pixels of ``image`` (clipped),
        scores (N,) float32 (the mean token probability of the label's phrase), labels (N,)
        int64 class indices, masks None."""
        import torch

        height, width = image.shape[:2]
        all_boxes, all_scores, all_labels = [], [], []
        for chunk in self.chunks:
            text = prompt_text([self.phrases[i] for i in chunk])
            inputs = self.processor(images=image, text=text, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                outputs = self.model(**inputs)
            scores = _class_scores(outputs.logits[0], inputs["input_ids"][0], len(chunk))
            best, which = scores.max(dim=1)
            boxes = outputs.pred_boxes[0].float()
            cx, cy, w, h = boxes.unbind(-1)
            xyxy = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height,
                                (cx + w / 2) * width, (cy + h / 2) * height], dim=-1)
            all_boxes.append(xyxy.cpu().numpy())
            all_scores.append(best.cpu().numpy())
            all_labels.append(np.asarray(chunk, np.int64)[which.cpu().numpy()])
        boxes = np.concatenate(all_boxes).astype(np.float32).reshape(-1, 4)
        boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
        scores = np.concatenate(all_scores).astype(np.float32)
        labels = np.concatenate(all_labels).astype(np.int64)
        keep = ((scores > threshold) & (boxes[:, 2] > boxes[:, 0])
                & (boxes[:, 3] > boxes[:, 1]))
        order = np.argsort(-scores[keep], kind="stable")[:MAX_DETECTIONS]
        return Prediction(boxes=boxes[keep][order], scores=scores[keep][order],
                          labels=labels[keep][order], masks=None)


# -- the trainer ---------------------------------------------------------------------------------

def _load_directory(directory: Path, device: str = "cpu"):
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} holds no Grounding DINO (no config.json)")
    try:
        processor = GroundingDinoProcessor.from_pretrained(str(directory), local_files_only=True)
        model, loading = GroundingDinoForObjectDetection.from_pretrained(
            str(directory), local_files_only=True, output_loading_info=True)
    except Exception as exc:  # transformers raises many kinds for a damaged file
        raise ValueError(f"cannot load Grounding DINO from {directory}: "
                         f"{type(exc).__name__}: {exc}") from None
    missing = list(loading.get("missing_keys") or []) + list(loading.get("mismatched_keys") or [])
    if missing:  # transformers would fill them with random weights
        raise ValueError(f"cannot load Grounding DINO from {directory}: its weights lack "
                         f"{len(missing)} tensors ({', '.join(map(str, missing[:3]))}, ...)")
    return model.to(device), processor


def _lr_factor(step: int, total: int) -> float:
    """The learning rate's factor at ``step`` of ``total``: a linear warm-up over the first
    :data:`WARMUP_SHARE` of the steps, then a cosine decay to :data:`FINAL_LR_SHARE`."""
    warmup = max(1, int(total * WARMUP_SHARE))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * progress))


class GroundingDinoTrainer(Trainer):
    """Fine-tunes Grounding DINO on the project's boxes (see the module docstring)."""

    kind = KIND
    metric = "bbox"
    #: after :meth:`train`, the model it wrote, ready to answer (no reload needed)
    detector: Optional[GroundingDinoDetector] = None

    # -- starting point ------------------------------------------------------------------------
    def _start(self, phrases: Sequence[str], image_size: int):
        """``(model, processor, from_trained, source)``."""
        options = self.options
        if options.start is not None:
            model, processor = _load_directory(Path(options.start).expanduser())
            return model, processor, True, str(options.start)
        if options.reduced:
            model, processor = build_reduced(_words(phrases), options.seed, image_size)
            return model, processor, False, "reduced random weights"
        default = weights_dir() / DEFAULT_DIRECTORY
        if not (default / "config.json").is_file():
            raise ValueError(
                f"no Grounding DINO to start from: {default} is missing (no config.json); "
                f"download it with `huggingface-cli download {HUB_ID} --local-dir {default}`, "
                f"or set train_start=<directory> (train_random_init for a reduced random model)")
        model, processor = _load_directory(default)
        return model, processor, True, str(default)

    def _optimiser(self, model, from_trained: bool):
        import torch

        for param in model.model.text_backbone.parameters():
            param.requires_grad_(False)
        backbone, rest = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (backbone if name.startswith("model.backbone.") else rest).append(param)
        lr = self.options.learning_rate
        groups = [{"params": rest, "lr": lr},
                  {"params": backbone, "lr": lr * (BACKBONE_LR_FACTOR if from_trained else 1.0)}]
        return torch.optim.AdamW(groups, lr=lr, weight_decay=WEIGHT_DECAY)

    # -- one image -----------------------------------------------------------------------------
    @staticmethod
    def _prompt(n_classes: int, chunks: List[List[int]], rng: np.random.Generator) -> List[int]:
        """The classes of one training prompt, in prompt order."""
        if rng.random() < FULL_PROMPT_SHARE:
            chosen = list(chunks[int(rng.integers(len(chunks)))])
        else:
            pool = chunks[int(rng.integers(len(chunks)))]
            size = int(rng.integers(1, len(pool) + 1))
            chosen = [pool[i] for i in sorted(rng.choice(len(pool), size, replace=False))]
        return [chosen[i] for i in rng.permutation(len(chosen))]

    @staticmethod
    def _example(item: ImageSample, rng: np.random.Generator
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One augmented image (HxWx3 uint8), its boxes (N, 4) float32 xyxy pixels and class
        indices (N,)."""
        image = item.load()
        sample = item.sample
        height, width = image.shape[:2]
        if sample.objects:
            masks = np.stack([o.mask() for o in sample.objects])
            if masks.shape[1:] != (height, width):
                raise ValueError(f"task {sample.task_id}: masks are {masks.shape[2]}x"
                                 f"{masks.shape[1]} but the image is {width}x{height}")
        else:
            masks = np.zeros((0, height, width), bool)
        labels = np.asarray([o.label for o in sample.objects], np.int64)
        image, masks, boxes, labels = augment(image, masks, labels, rng)
        keep = ((boxes[:, 2] - boxes[:, 0] >= MIN_BOX_PIXELS)
                & (boxes[:, 3] - boxes[:, 1] >= MIN_BOX_PIXELS))
        return image, boxes[keep], labels[keep]

    def train(self, train: Sequence[ImageSample], classes: Sequence[str],
              phrases: Sequence[str], out: Path,
              on_epoch: Callable[[EpochLog], None] = lambda log: None,
              stop: Callable[[], bool] = lambda: False) -> List[EpochLog]:
        import torch

        options = self.options
        classes, phrases = list(classes), list(phrases)
        self.check_inputs(train, classes, phrases, out)
        image_size = options.image_size or (REDUCED_IMAGE_SIZE if options.reduced and
                                            options.start is None else DEFAULT_IMAGE_SIZE)
        seed_everything(options.seed)
        model, processor, from_trained, source = self._start(phrases, image_size)
        processor.image_processor.size = {"height": image_size, "width": image_size}
        device = torch.device(options.device)
        model.to(device).train()
        auxiliary_loss = model.config.auxiliary_loss
        model.config.auxiliary_loss = True  # every decoder layer supervised, as in pre-training
        chunks = prompt_chunks(phrases, processor.tokenizer, _text_budget(model))
        optimiser = self._optimiser(model, from_trained)
        params = [p for group in optimiser.param_groups for p in group["params"]]
        cuda = device.type == "cuda"
        amp_dtype = (torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16)
        scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
        rng = np.random.default_rng(options.seed)
        batch = max(1, options.batch_size)
        total_steps = options.epochs * math.ceil(len(train) / batch)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda step: _lr_factor(step, total_steps))
        logs: List[EpochLog] = []
        log.info("grounding_dino: %d images, classes %s, from %s, %d epochs at %dpx on %s",
                 len(train), classes, source, options.epochs, image_size, device)
        for epoch in range(1, options.epochs + 1):
            started = time.perf_counter()
            order = rng.permutation(len(train))
            totals: Dict[str, float] = {}
            steps = seen = 0
            for first in range(0, len(order), batch):
                if stop():
                    raise TrainingStopped("stopped")
                images, targets = [], []
                # one prompt per step: transformers 5.23's loss offsets the class labels of the
                # batch's i-th image by the i-th image's own number of phrases (not the sum of
                # those before it), which is right only when every image has the same prompt
                chosen = self._prompt(len(classes), chunks, rng)
                position = {c: k for k, c in enumerate(chosen)}
                text = prompt_text([phrases[c] for c in chosen])
                for index in order[first:first + batch]:
                    image, boxes, labels = self._example(train[int(index)], rng)
                    keep = np.asarray([int(c) in position for c in labels], bool)
                    h, w = image.shape[:2]
                    xyxy = boxes[keep] / np.asarray([w, h, w, h], np.float32)
                    cxcywh = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2,
                                       (xyxy[:, 1] + xyxy[:, 3]) / 2,
                                       xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]],
                                      axis=-1).reshape(-1, 4)
                    images.append(image)
                    targets.append({
                        "class_labels": torch.as_tensor([position[int(c)] for c in labels[keep]],
                                                        dtype=torch.long, device=device),
                        "boxes": torch.as_tensor(cxcywh, dtype=torch.float32, device=device)})
                inputs = processor(images=images, text=[text] * len(images),
                                   return_tensors="pt").to(device)
                with torch.autocast("cuda", dtype=amp_dtype, enabled=cuda):
                    outputs = model(**inputs, labels=targets)
                loss = outputs.loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training diverged in epoch {epoch}: the loss is {loss.item()}; lower "
                        f"train_learning_rate (it is {options.learning_rate:g})")
                optimiser.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimiser)
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                scaler.step(optimiser)
                scaler.update()
                schedule.step()
                steps += 1
                seen += len(images)
                totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
                for name in ("loss_ce", "loss_bbox", "loss_giou"):  # the last decoder layer's
                    if name in outputs.loss_dict:
                        value = float(outputs.loss_dict[name].detach())
                        totals[name] = totals.get(name, 0.0) + value
            entry = EpochLog(epoch=epoch, epochs=options.epochs, loss=totals["loss"] / steps,
                             seconds=time.perf_counter() - started, images=seen,
                             parts={k: v / steps for k, v in totals.items() if k != "loss"})
            logs.append(entry)
            on_epoch(entry)
        if stop():
            raise TrainingStopped("stopped")
        model.config.auxiliary_loss = auxiliary_loss
        self._save(model, processor, classes, phrases, Path(out), image_size, source, logs)
        self.detector = GroundingDinoDetector(model, processor, classes, phrases)
        return logs

    def _save(self, model, processor, classes, phrases, out: Path, image_size: int,
              source: str, logs: List[EpochLog]) -> None:
        import transformers

        out.mkdir(parents=True, exist_ok=True)
        model.eval().to("cpu")
        model.save_pretrained(str(out))
        processor.save_pretrained(str(out))
        info = {"kind": KIND, "classes": classes, "phrases": phrases,
                "image_size": image_size, "reduced": bool(self.options.reduced),
                "start": source, "frozen": ["model.text_backbone"],
                "epochs": len(logs), "options": self.options.as_dict(),
                "transformers": transformers.__version__}
        (out / MODEL_FILE).write_text(json.dumps(info, indent=2))

    def load(self, directory: Path, device: str = "cpu") -> GroundingDinoDetector:
        directory = Path(directory)
        info = read_model_file(directory)
        if info.get("kind") != KIND:
            raise ValueError(f"{directory} holds a {info.get('kind')!r} model, not {KIND}")
        classes, phrases = info.get("classes"), info.get("phrases")
        if not isinstance(classes, list) or not isinstance(phrases, list):
            raise ValueError(f"{directory / MODEL_FILE} names no classes and phrases")
        model, processor = _load_directory(directory, device)
        return GroundingDinoDetector(model, processor, classes, phrases)


__all__ = ["DEFAULT_IMAGE_SIZE", "GroundingDinoDetector", "GroundingDinoTrainer", "KIND",
           "REDUCED_IMAGE_SIZE", "REDUCED_RECIPE", "build_reduced", "prompt_chunks",
           "prompt_text", "reduced_config", "reduced_vocabulary"]
