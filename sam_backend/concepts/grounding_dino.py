"""Concept engine ``grounding_dino``: an open-vocabulary detector gives boxes, the click model
turns each box into a mask.

Grounding DINO (``transformers``' ``GroundingDinoForObjectDetection`` and its processor) finds the
boxes of a phrase; the backend's configured click model (MobileSAM by default) decodes each box
into a mask on the image's cached embedding — the same embedding clicks use, so a click after a
concept pass encodes nothing. It works with every click model: the detector is Swin-T + BERT-base
for ``grounding-dino-tiny``, and each mask costs one click decode (sizes and timings: the README's
"Engines" table).

The checkpoint is a directory in ``transformers``' format (``config.json``, weights, the
processor's ``preprocessor_config.json`` and tokenizer files), e.g. the hub's
``IDEA-Research/grounding-dino-tiny`` downloaded with
``huggingface-cli download IDEA-Research/grounding-dino-tiny --local-dir weights/grounding-dino-tiny``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from sam_backend.common.deadline import UNBOUNDED, WorkScope
from sam_backend.concepts.base import ConceptEngine, ImageLoaderFn, Instances, load_pretrained
from sam_backend.errors import ConfigError
from sam_backend.models.base import Prompt
from sam_backend.models.registry import weights_dir

log = logging.getLogger(__name__)

DEFAULT_DIRECTORY = "grounding-dino-tiny"
HUB_ID = "IDEA-Research/grounding-dino-tiny"


def query_text(phrase: str) -> str:
    """Grounding DINO's query form: lower case, ending with a period (``"red car."``)."""
    return " ".join(phrase.lower().split()).rstrip(".") + "."


class GroundingDinoEngine(ConceptEngine):
    name = "grounding_dino"

    def __init__(self, model, processor, segmenter):
        super().__init__(processor, segmenter)
        self.model = model
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, directory: Optional[Union[str, Path]], segmenter) -> "GroundingDinoEngine":
        """Load the detector from ``directory`` (default ``weights/grounding-dino-tiny``) onto the
        click model's device."""
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
        return cls(model, processor, segmenter)

    def boxes(self, image: np.ndarray, phrase: str, threshold: float
              ) -> Tuple[np.ndarray, np.ndarray]:
        """The detector's boxes for ``phrase`` on ``image`` (HxWx3 uint8 RGB): (N, 4) float32
        (x0, y0, x1, y1) pixels, unclipped, and (N,) float32 scores above ``threshold``, exactly
        as the processor's ``post_process_grounded_object_detection`` returns them."""
        import torch

        inputs = self.processor(images=image, text=query_text(phrase), return_tensors="pt")
        inputs = inputs.to(self.device)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        result = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=threshold, text_threshold=threshold,
            target_sizes=[image.shape[:2]])[0]
        return (result["boxes"].float().cpu().numpy().reshape(-1, 4),
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
        """The detector's boxes (clipped to the image; empty ones dropped); masks come later,
        for the kept boxes only (:meth:`with_masks`)."""
        _, image, _ = state
        height, width = image.shape[:2]
        boxes, scores = self.boxes(image, phrase, threshold)
        boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
        area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return Instances(None, boxes[area], scores[area].astype(np.float32))

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
