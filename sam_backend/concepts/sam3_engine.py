"""Concept engine ``sam3``: SAM 3's concept model gives a mask, a box and a score for every
instance of a phrase, on the image state the click model already cached.

SAM 3's checkpoint holds one ViT backbone that two heads share: the click model
(``Sam3TrackerModel``, :mod:`sam_backend.models.sam3_runtime`) and the concept model
(``Sam3Model``: its own FPN neck, a CLIP text encoder, a DETR encoder/decoder and a mask decoder).
With ``concept_model=sam3`` the click model keeps the backbone's output in each cached embedding
(``vision_state``, (1, 5184, 1024) float for a 1008 px input; its memory per image is in the README's
SAM 3 section); a concept pass runs only the concept model's neck and heads on it — the expensive
backbone runs once per image for both clicks and concepts. The concept model's weights are read
from the same checkpoint directory (``detector_model.*`` of the official layout; its backbone
tensors are not loaded twice: the click model's backbone module is shared), and its tokenizer from
the directory's tokenizer files.

The steps are transformers' own pipeline (``Sam3Processor`` -> ``Sam3Model`` ->
``post_process_instance_segmentation``) with ``vision_embeds`` computed from the cached backbone
output instead of ``pixel_values``. Box exemplars (:meth:`Sam3ConceptEngine.find_exemplars`) go
the same way, as the processor's ``input_boxes`` / ``input_boxes_labels`` (pixels, xyxy; 1
positive, 0 negative) with the label's phrase, or the processor's "visual" prompt without one.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from sam_backend.concepts.base import ConceptEngine, ImageLoaderFn, Instances, load_pretrained
from sam_backend.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

DETECTOR_PREFIX = "detector_model."
BACKBONE_PREFIX = "vision_encoder.backbone."


def concept_model_state(directory: Path) -> Dict[str, "object"]:
    """The concept model's tensors (``Sam3Model`` names) except the shared backbone."""
    from safetensors import safe_open

    from sam_backend.models.sam3_runtime import safetensors_files

    state = {}
    for path in safetensors_files(directory):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if key.startswith(DETECTOR_PREFIX):
                    name = key[len(DETECTOR_PREFIX):]
                    if not name.startswith(BACKBONE_PREFIX):
                        state[name] = handle.get_tensor(key)
    return state


class Sam3ConceptEngine(ConceptEngine):
    name = "sam3"
    supports_exemplars = True

    def __init__(self, detector, processor, segmenter):
        super().__init__(processor, segmenter)
        self.detector = detector
        self.click_model = segmenter.model

    @classmethod
    def load(cls, settings, segmenter) -> "Sam3ConceptEngine":
        click_model = segmenter.model
        if getattr(click_model.variant, "model_name", None) != "sam3":
            raise ConfigError("concept_model=sam3 needs model_name=sam3 (the concept model runs "
                              "on SAM 3's image encoder, shared with clicks); with another click "
                              "model use concept_model=grounding_dino")
        from transformers import Sam3Model, Sam3Processor, Sam3VideoConfig

        from sam_backend.models.sam3_runtime import read_config

        directory = Path(settings.concept_checkpoint or click_model.checkpoint)
        config = read_config(directory)
        if config.get("model_type") != "sam3_video":
            raise CheckpointError(
                f"{directory} holds SAM 3's click model only (model_type "
                f"{config.get('model_type')!r}): the concept model is in the full facebook/sam3 "
                f"checkpoint (`sam-backend weights download sam3`)")
        (processor,) = load_pretrained(
            directory, (Sam3Processor,), CheckpointError,
            f"{directory} has no usable SAM 3 processor/tokenizer files (tokenizer.json, "
            f"processor_config.json)")
        detector = Sam3Model(Sam3VideoConfig.from_dict(config).detector_config)
        state = concept_model_state(directory)
        missing, unexpected = detector.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(BACKBONE_PREFIX)]
        if missing or unexpected:
            raise CheckpointError(f"SAM 3 concept model in {directory}: missing "
                                  f"{missing[:5]}, unexpected {unexpected[:5]}")
        # one backbone for both heads: the click model's module (same tensors in the file)
        detector.vision_encoder.backbone = click_model.model.vision_encoder.backbone
        detector = detector.to(click_model.model.device).eval()
        click_model.keep_vision_state = True
        log.info("SAM 3 concept model loaded from %s (backbone shared with clicks)", directory)
        return cls(detector, processor, segmenter)

    def vision_embeds(self, image_key: str, load_image: ImageLoaderFn):
        """``Sam3VisionEncoderOutput`` of the image from the cached backbone output (the image is
        encoded only when no embedding with the backbone output is cached)."""
        import torch
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        embedding = self.segmenter.embedding(image_key, load_image)
        if embedding.vision_state is None:
            # cached by a click before the concept model was loaded: encode again, keeping it
            image = load_image()
            with self.segmenter.gate.slot(True):
                embedding = self.click_model.embed(image)
            self.segmenter.cache.put(self.segmenter.embedding_key(image_key),
                                     embedding.to_float16() if self.segmenter.store_float16
                                     else embedding)
        device = self.detector.device
        hidden = torch.as_tensor(embedding.vision_state).to(device=device, dtype=torch.float32)
        patch = self.detector.config.vision_config.backbone_config.patch_size
        height, width = (s // patch for s in embedding.input_size)
        spatial = hidden.view(hidden.shape[0], height, width, -1).permute(0, 3, 1, 2)
        with torch.inference_mode():
            fpn, positions = self.detector.vision_encoder.neck(spatial)
        return (Sam3VisionEncoderOutput(last_hidden_state=hidden, fpn_hidden_states=fpn,
                                        fpn_position_encoding=positions),
                embedding.original_size)

    @property
    def max_phrase_tokens(self) -> int:
        """SAM 3's CLIP text encoder has 32 positions (its config's max_position_embeddings)."""
        return self.detector.config.text_config.max_position_embeddings

    def phrase_tokens(self, phrase: str) -> int:
        return len(self.processor.tokenizer(" ".join(phrase.split()))["input_ids"])

    def image_state(self, image_key: str, load_image: ImageLoaderFn):
        vision, size = self.vision_embeds(image_key, load_image)
        return (vision, size), size

    def find(self, state, phrase: str, threshold: float) -> Instances:
        """Masks, boxes and scores of the phrase's instances, from transformers' own
        post-processing, on the cached image state."""
        import torch

        vision, (height, width) = state
        text = self.processor(text=" ".join(phrase.split()), return_tensors="pt")
        with torch.inference_mode():
            outputs = self.detector(vision_embeds=vision,
                                    input_ids=text["input_ids"].to(self.detector.device),
                                    attention_mask=text["attention_mask"].to(self.detector.device))
        return self._instances(outputs, threshold, height, width)

    def find_exemplars(self, state, phrase: Optional[str], boxes: np.ndarray, labels: np.ndarray,
                       threshold: float) -> Instances:
        """Instances like the positive boxes and unlike the negative ones (``boxes``: (N, 4)
        float (x0, y0, x1, y1) pixels of the image frame; ``labels``: (N,) 1 / 0), with
        ``phrase`` as text when given (else the processor's "visual" prompt), on the cached
        image state."""
        import torch

        vision, (height, width) = state
        inputs = self.processor(
            text=" ".join(phrase.split()) if phrase else None,
            input_boxes=[np.asarray(boxes, np.float32).reshape(-1, 4).tolist()],
            input_boxes_labels=[np.asarray(labels, np.int64).reshape(-1).tolist()],
            original_sizes=[[height, width]], return_tensors="pt")
        device = self.detector.device
        with torch.inference_mode():
            outputs = self.detector(vision_embeds=vision,
                                    input_ids=inputs["input_ids"].to(device),
                                    attention_mask=inputs["attention_mask"].to(device),
                                    input_boxes=inputs["input_boxes"].to(device),
                                    input_boxes_labels=inputs["input_boxes_labels"].to(device))
        return self._instances(outputs, threshold, height, width)

    def _instances(self, outputs, threshold: float, height: int, width: int) -> Instances:
        """The detector's ``outputs`` through transformers' own post-processing: masks (N, H, W)
        bool, boxes (N, 4) xyxy pixels and scores above ``threshold``."""
        result = self.processor.post_process_instance_segmentation(
            outputs, threshold=threshold, mask_threshold=0.5, target_sizes=[(height, width)])[0]
        return Instances(result["masks"].cpu().numpy().astype(bool).reshape(-1, height, width),
                         result["boxes"].float().cpu().numpy().reshape(-1, 4).astype(np.float32),
                         result["scores"].float().cpu().numpy().astype(np.float32))
