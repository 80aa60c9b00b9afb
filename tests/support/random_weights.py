"""Test and benchmark fixtures: seeded random-weight checkpoints kept between runs (SAM variants,
reduced SAM 3, Grounding DINO), small word-level tokenizers, and synthetic images."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Tuple, Union

import numpy as np

from sam_backend.models.random_init import make_random_checkpoint, seeded_random_model
from sam_backend.models.registry import get_variant

# Test and benchmark checkpoints are deterministic (seeded), so they are kept between runs; the
# tag changes when the way they are made changes.
CACHE_DIR = Path(os.environ.get("SAM_BACKEND_TEST_WEIGHTS",
                                Path.home() / ".cache" / "sam_backend" / "test-weights-v1"))
CACHE_SEED = 1234


def cached_random_checkpoint(model_name: str, sam_config: Union[str, None] = None) -> Path:
    """The seeded random-weight checkpoint of a variant, made once into ``CACHE_DIR``."""
    variant = get_variant(model_name, sam_config)
    path = CACHE_DIR / f"seed{CACHE_SEED}" / variant.checkpoint_name
    if not path.is_file():
        make_random_checkpoint(variant, path, seed=CACHE_SEED)
    return path


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """HxWx3 uint8 RGB: a smooth gradient with a few coloured discs."""
    import cv2

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)),
                      np.full_like(xx, 96)], axis=-1).astype(np.uint8)
    for _ in range(4):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        radius = int(rng.integers(max(2, min(height, width) // 12), max(3, min(height, width) // 4)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(image, centre, radius, colour, -1)
    return image


def write_synthetic_images(root: Path, sizes: Dict[str, Tuple[int, int]]
                           ) -> Dict[str, np.ndarray]:
    """``root/<name>.png`` for each ``name: (height, width)`` of ``sizes`` (seeds 5, 6, ... in
    order); returns the HxWx3 uint8 RGB arrays by name."""
    import cv2

    images = {}
    for seed, (name, (h, w)) in enumerate(sizes.items()):
        image = synthetic_image(h, w, seed=seed + 5)
        cv2.imwrite(str(root / f"{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        images[name] = image
    return images


def cached_random_sam3(reduced: bool = True) -> Path:
    """The seeded random-weight SAM 3 checkpoint directory (official layout), made once into
    ``CACHE_DIR``; ``reduced``: the small configuration of the same classes (fast tests)."""
    from sam_backend.models.random_init import make_random_sam3_dir

    path = CACHE_DIR / f"seed{CACHE_SEED}" / ("sam3-reduced" if reduced else "sam3")
    if not (path / "config.json").is_file():
        make_random_sam3_dir(path, seed=CACHE_SEED,
                             config=reduced_sam3_config() if reduced else None)
    return path


# -- concept engines: Grounding DINO with a word-level tokenizer, SAM 3's tokenizer --------------
_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "a", "an", "the", "of",
          "red", "blue", "green", "big", "small", "car", "cat", "dog", "person", "tree", "house",
          "disc", "square", "bird", "bike", "boat", "road", "sky", "window"]


def make_random_grounding_dino(directory: Union[str, Path], size: str = "tiny",
                               seed: int = 0, bert_layout: bool = False) -> Path:
    """Write a Grounding DINO directory with seeded random weights and a small word-level BERT
    tokenizer (no download): ``size="tiny"`` is a reduced configuration of the same classes (for
    the fast tests), ``size="full"`` the architecture of ``grounding-dino-tiny`` (Swin-T + a
    BERT-base text encoder). Masks from it are meaningless; the computation is the real one.

    ``bert_layout``: the tokenizer's vocabulary puts ``[CLS]``, ``[SEP]``, ``.`` and ``?`` at
    BERT's ids (101, 102, 1012, 1029), the ids the model splits a caption into phrases at (each
    phrase attends to itself only, its positions restart), as with the real tokenizer; without
    it no token is a delimiter to the model."""
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig,
                              GroundingDinoForObjectDetection, GroundingDinoImageProcessor,
                              GroundingDinoProcessor, SwinConfig)

    from sam_backend.training.grounding_dino import reduced_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    words = _WORDS
    if bert_layout:
        from sam_backend.training.grounding_dino import reduced_vocabulary

        words = reduced_vocabulary(w for w in _WORDS if not w.startswith("["))
    vocab.write_text("\n".join(words) + "\n")
    # `vocab=`: transformers 5 ignores `vocab_file=` here and maps every word to [UNK]
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    processor = GroundingDinoProcessor(GroundingDinoImageProcessor(), tokenizer)
    if size == "tiny":
        config = reduced_config(len(words))  # the trainer's reduced recipe
    elif size == "full":
        config = GroundingDinoConfig(
            backbone_config=SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                                       window_size=7, out_features=["stage2", "stage3", "stage4"]),
            text_config=BertConfig())
    else:
        raise ValueError(f"size must be tiny or full, got {size!r}")
    model = seeded_random_model(lambda: GroundingDinoForObjectDetection(config).eval(), seed)
    model.save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    return directory


def write_test_tokenizer(directory: Path) -> Path:
    """Save a small word-level tokenizer with SAM 3's processor into a checkpoint directory
    (random-weight directories for tests and benchmarks have none; no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, Sam3ImageProcessor, Sam3Processor

    words = ["<|startoftext|>", "<|endoftext|>", "[UNK]", ".", "a", "the", "red", "blue", "big",
             "small", "car", "cat", "dog", "person", "tree", "house", "disc", "square"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|startoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="[UNK]", model_max_length=32)
    Sam3Processor(Sam3ImageProcessor(), fast).save_pretrained(str(directory))
    return Path(directory)


def reduced_sam3_config() -> dict:
    """A reduced SAM 3 (the same classes; a 2-layer, 32-wide ViT and a 1-layer text encoder, DETR
    encoder and decoder) for fast tests: input size, patch size, FPN and the click model's prompt
    encoder and mask decoder are the published ones, so every tensor a click touches has its real
    shape."""
    backbone = dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=2, global_attn_indexes=[1])
    return dict(
        detector_config=dict(
            vision_config=dict(backbone_config=backbone),
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, projection_dim=32),
            detr_encoder_config=dict(num_layers=1), detr_decoder_config=dict(num_layers=1)),
        tracker_config=dict(vision_config=dict(backbone_config=backbone)))
