"""Concept engine ``grounding_dino``: an open-vocabulary detector gives boxes, the click model
turns each box into a mask.

Grounding DINO (``transformers``' ``GroundingDinoForObjectDetection`` and its processor) finds the
boxes; the backend's configured click model (MobileSAM by default) decodes each box into a mask on
the image's cached embedding — the same embedding clicks use, so a click after a concept pass
encodes nothing. It works with every click model: the detector is Swin-T + BERT-base for
``grounding-dino-tiny``, and each mask costs one click decode (sizes and timings: the README's
"Engines" table).

**One detector pass for every label** (``concept_passes=joined``, the default). The phrases of a
pass are asked together, in the caption form the model is trained on: their query forms joined
by spaces, ``"car. red car. dog."`` (tokens ``[CLS] car . red car . dog . [SEP]``; the model's
text encoder attends within each phrase only, between the periods, and restarts positions at
each). They are packed greedily, in the order asked, into as few captions as the text encoder's
limit (:attr:`~GroundingDinoEngine.max_phrase_tokens`, start and end tokens included) allows:
one processor + model + post-processing call per caption (:class:`Caption`). The boxes and
scores are the processor's ``post_process_grounded_object_detection``'s; its ``text_labels`` are
the decoded tokens above the threshold (``"car red car"``), which cannot tell "car" from the
"car" of "red car". So each kept box goes to the phrase holding its most probable word token,
read by the token span of each phrase in the caption (from the tokenizer's character offsets),
never by matching strings. ``concept_passes=per_label`` asks one phrase per detector pass (the
way before joined captions; kept to compare).

The detector's input is the processor's own size (shorter side 800, longer side at most 1333 for
``grounding-dino-tiny``) unless ``concept_image_size`` asks for a smaller one (faster, coarser).

The checkpoint is a directory in ``transformers``' format (``config.json``, weights, the
processor's ``preprocessor_config.json`` and tokenizer files), e.g. the hub's
``IDEA-Research/grounding-dino-tiny`` downloaded with
``huggingface-cli download IDEA-Research/grounding-dino-tiny --local-dir weights/grounding-dino-tiny``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from sam_backend.common.deadline import UNBOUNDED, WorkScope
from sam_backend.common.limits import shown
from sam_backend.concepts.base import ConceptEngine, ImageLoaderFn, Instances, load_pretrained
from sam_backend.errors import ConfigError
from sam_backend.models.base import Prompt
from sam_backend.models.registry import weights_dir

log = logging.getLogger(__name__)

DEFAULT_DIRECTORY = "grounding-dino-tiny"
HUB_ID = "IDEA-Research/grounding-dino-tiny"
#: how a concept pass asks the detector (``concept_passes``): every phrase in as few joined
#: captions as the text encoder holds, or one detector pass per phrase
PASSES = ("joined", "per_label")


def query_text(phrase: str) -> str:
    """Grounding DINO's query form: lower case, ending with a period (``"red car."``)."""
    return " ".join(phrase.lower().split()).rstrip(".") + "."


@dataclass(frozen=True)
class Caption:
    """Phrases asked in one detector call. ``text``: their query forms (:func:`query_text`)
    joined by spaces, ``"car. red car."``; ``phrases``: those query forms, in order;
    ``input_ids``: ``text`` tokenized as the processor sends it (``[CLS] car . red car . [SEP]``);
    ``spans[i]``: the token positions ``[start, end)`` of ``phrases[i]``'s words in
    ``input_ids`` (``(1, 2)`` and ``(3, 5)`` here; the closing period is no phrase's)."""

    text: str
    phrases: Tuple[str, ...]
    input_ids: Tuple[int, ...]
    spans: Tuple[Tuple[int, int], ...]


class GroundingDinoEngine(ConceptEngine):
    name = "grounding_dino"

    def __init__(self, model, processor, segmenter, image_size: int = 0,
                 passes: str = "joined"):
        """``image_size``: the shorter side of the detector's input in pixels (0: the
        processor's own; see :func:`image_size_kwargs`); ``passes``: ``joined`` (every phrase
        of a pass in as few captions as the text encoder holds) or ``per_label`` (one detector
        pass per phrase)."""
        super().__init__(processor, segmenter)
        if passes not in PASSES:
            raise ConfigError(f"concept_passes={passes!r}: use {' or '.join(PASSES)}")
        self.model = model
        self.device = next(model.parameters()).device
        self.passes = passes
        self.image_kwargs = image_size_kwargs(processor.image_processor, image_size)

    @classmethod
    def load(cls, directory: Optional[Union[str, Path]], segmenter, image_size: int = 0,
             passes: str = "joined") -> "GroundingDinoEngine":
        """Load the detector from ``directory`` (default ``weights/grounding-dino-tiny``) onto the
        click model's device; ``image_size``, ``passes``: as the constructor's."""
        path = Path(directory).expanduser() if directory else weights_dir() / DEFAULT_DIRECTORY
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"the Grounding DINO checkpoint directory {path} is missing (no config.json): "
                f"download it with `huggingface-cli download {HUB_ID} --local-dir {path}` or pass "
                f"concept_checkpoint=<directory>; clicks keep working meanwhile")
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        processor, model = load_pretrained(
            path, (GroundingDinoProcessor, GroundingDinoForObjectDetection), ConfigError,
            f"cannot load Grounding DINO from {path}")
        device = getattr(segmenter.model, "device", "cpu")
        model = model.to(device).eval()
        log.info("Grounding DINO loaded from %s on %s", path, device)
        return cls(model, processor, segmenter, image_size, passes)

    def boxes(self, image: np.ndarray, phrase: str, threshold: float
              ) -> Tuple[np.ndarray, np.ndarray]:
        """The detector's boxes for ``phrase`` on ``image`` (HxWx3 uint8 RGB): (N, 4) float32
        (x0, y0, x1, y1) pixels, unclipped, and (N,) float32 scores above ``threshold``, exactly
        as the processor's ``post_process_grounded_object_detection`` returns them."""
        _, boxes, scores = self._detect(image, query_text(phrase), threshold)
        return boxes, scores

    def _detect(self, image: np.ndarray, text: str, threshold: float,
                input_ids: Optional[Tuple[int, ...]] = None):
        """One detector call: processor -> model -> ``post_process_grounded_object_detection``
        for ``text`` on ``image``. Returns the model's outputs and the (N, 4) float32 boxes and
        (N,) float32 scores. ``input_ids``: what the processor must tokenize ``text`` to."""
        import torch

        inputs = self.processor(images=image, text=text, return_tensors="pt",
                                **self.image_kwargs)
        if input_ids is not None and tuple(inputs["input_ids"][0].tolist()) != input_ids:
            raise RuntimeError(f"the processor tokenized {text!r} differently from its "
                               f"tokenizer: the phrases' token spans would be wrong")
        inputs = inputs.to(self.device)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        result = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=threshold, text_threshold=threshold,
            target_sizes=[image.shape[:2]])[0]
        return (outputs, result["boxes"].float().cpu().numpy().reshape(-1, 4),
                result["scores"].float().cpu().numpy())

    @property
    def max_phrase_tokens(self) -> int:
        """The detector takes ``max_text_len`` text tokens (256 for grounding-dino-tiny), and
        its BERT at most its position embeddings."""
        config = self.model.config
        return min(config.max_text_len, config.text_config.max_position_embeddings)

    def phrase_tokens(self, phrase: str) -> int:
        return len(self.processor.tokenizer(query_text(phrase))["input_ids"])

    def image_state(self, image_key: str, load_image: ImageLoaderFn):
        image = load_image()
        embedding = self.segmenter.embedding(image_key, lambda: image)
        return (image_key, image, embedding), image.shape[:2]

    def find(self, state, phrase: str, threshold: float) -> Instances:
        """The detector's boxes for ``phrase`` alone (clipped to the image; empty ones dropped);
        masks come later, for the kept boxes only (:meth:`with_masks`)."""
        _, image, _ = state
        return _instances(image, *self.boxes(image, phrase, threshold))

    def phrase_key(self, phrase: str) -> str:
        """Its query form: ``"Dog."`` and ``"dog"`` are one query."""
        return query_text(phrase)

    # -- joined captions ---------------------------------------------------------------------
    def captions(self, phrases: Sequence[str]) -> List[Caption]:
        """``phrases`` (their distinct query forms, in order) packed greedily into as few
        captions as :attr:`max_phrase_tokens` allows: a phrase goes into the current caption
        while the caption, tokenized, stays within the limit, else it starts the next one. A
        phrase longer than the limit alone is a RequestError (400), as :meth:`check_phrases`."""
        limit = self.max_phrase_tokens
        groups: List[List[str]] = []
        for form in dict.fromkeys(query_text(p) for p in phrases):
            if groups and self._tokens(" ".join(groups[-1] + [form])) <= limit:
                groups[-1].append(form)
            else:
                self.check_phrases([form])
                groups.append([form])
        return [self._caption(group) for group in groups]

    def _tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text)["input_ids"])

    def _caption(self, forms: Sequence[str]) -> Caption:
        text = " ".join(forms)
        encoding = self.processor.tokenizer(text, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]
        spans, start = [], 0
        for form in forms:
            end = start + len(form) - 1  # the phrase's characters, without its closing period
            tokens = [i for i, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end]
            span = (tokens[0], tokens[-1] + 1) if tokens else (0, 0)  # (0, 0): no word
            if tokens != list(range(*span)):
                raise RuntimeError(f"the tokens of {form!r} are not contiguous in {text!r}")
            spans.append(span)
            start += len(form) + 1
        return Caption(text, tuple(forms), tuple(int(i) for i in encoding["input_ids"]),
                       tuple(spans))

    def caption_boxes(self, image: np.ndarray, caption: Caption, threshold: float
                      ) -> List[Tuple[np.ndarray, np.ndarray]]:
        """One detector call for every phrase of ``caption`` on ``image`` (HxWx3 uint8 RGB):
        for each of ``caption.phrases``, in order, its (N, 4) float32 (x0, y0, x1, y1) pixel
        boxes, unclipped, and (N,) float32 scores above ``threshold``.

        Boxes and scores are exactly what the processor's
        ``post_process_grounded_object_detection`` returns for the caption (a box's score: its
        most probable token's probability, over the whole caption); each box goes to the phrase
        whose span (:attr:`Caption.spans`) holds its most probable word token."""
        import torch

        outputs, boxes, scores = self._detect(image, caption.text, threshold, caption.input_ids)
        # the queries the post-processing kept, in its order (a query's score is its highest
        # token probability), and their probability of each token of the caption
        probs = torch.sigmoid(outputs.logits[0])  # (queries, max_text_len), as it computes it
        probs = probs[probs.max(-1).values > threshold].float().cpu()
        if len(probs) != len(scores):
            raise RuntimeError("the detector's post-processing kept other queries than expected")
        best = torch.stack([probs[:, a:b].max(-1).values if b > a
                            else torch.full((len(probs),), -1.0)
                            for a, b in caption.spans], dim=1)  # (kept, phrases)
        owner = best.argmax(1).numpy() if len(probs) else np.zeros((0,), np.int64)
        return [(boxes[owner == i], scores[owner == i]) for i in range(len(caption.phrases))]

    def find_all(self, state, phrases: Sequence[str], threshold: float,
                 scope: WorkScope = UNBOUNDED) -> Iterator[Tuple[str, Instances]]:
        """Joined: one detector call per caption (:meth:`captions`), each phrase's instances
        as :meth:`find` makes them (clipped, empty boxes dropped); phrases with the same query
        form are asked once. ``per_label``: one :meth:`find` per phrase."""
        if self.passes == "per_label":
            yield from super().find_all(state, phrases, threshold, scope)
            return
        _, image, _ = state
        forms: Dict[str, List[str]] = {}
        for phrase in phrases:
            forms.setdefault(query_text(phrase), []).append(phrase)
        for caption in self.captions(list(forms)):
            scope.check(f"the concept pass ({shown(caption.text, 40)})")
            for form, found in zip(caption.phrases, self.caption_boxes(image, caption,
                                                                        threshold)):
                instances = _instances(image, *found)
                for phrase in forms[form]:
                    yield phrase, instances

    def with_masks(self, state, instances: Instances,
                   scope: WorkScope = UNBOUNDED) -> Instances:
        """Each kept box -> a mask, decoded by the click model on the image's embedding."""
        image_key, image, embedding = state
        masks = []
        for box in instances.boxes:
            scope.check("the concept pass's masks")
            masks.append(self.segmenter.decode(image_key, embedding, Prompt(box=box)).mask)
        masks = np.stack(masks) if masks else np.zeros((0,) + image.shape[:2], bool)
        return Instances(masks, instances.boxes, instances.scores)


def _instances(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray) -> Instances:
    """Boxes (N, 4) xyxy pixels clipped to ``image`` (HxWx3), empty ones dropped; no masks."""
    height, width = image.shape[:2]
    boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
    area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return Instances(None, boxes[area], np.asarray(scores, np.float32)[area])


def image_size_kwargs(image_processor: Any, image_size: int) -> Dict[str, Any]:
    """The processor's keyword arguments for a detector input whose shorter side is
    ``image_size`` pixels (0: none, the processor's own size). A processor that resizes to a
    shorter side with a cap on the longer (``grounding-dino-tiny``: 800 / 1333) keeps its ratio
    of the two (``image_size=512``: 512 / 853); one that resizes to a fixed height and width (a
    trained version: a square) is scaled so the shorter of them is ``image_size``."""
    if not image_size:
        return {}
    if image_size < 0:
        raise ConfigError(f"concept_image_size={image_size!r} must not be negative (0: the "
                          f"processor's own size)")
    size = image_processor.size
    shortest, longest = getattr(size, "shortest_edge", None), getattr(size, "longest_edge", None)
    height, width = getattr(size, "height", None), getattr(size, "width", None)
    if shortest:
        resized = {"shortest_edge": int(image_size)}
        if longest:
            resized["longest_edge"] = int(round(longest * image_size / shortest))
        return {"size": resized}
    if height and width:
        scale = image_size / min(height, width)
        return {"size": {"height": int(round(height * scale)), "width": int(round(width * scale))}}
    raise ConfigError(f"concept_image_size: the detector's processor has a size this backend "
                      f"cannot scale ({dict(size) if hasattr(size, 'keys') else size!r}); "
                      f"leave concept_image_size at 0")
