"""The Grounding DINO fine-tuner on a reduced, random-init Grounding DINO (CPU): it learns the
synthetic shapes project, is reproducible, round-trips through its directory (which the concept
engine serves), refuses a damaged directory and stops cleanly.

Measured here (2 cores shared with other work, load 5-8): the recipe (``REDUCED_RECIPE``: 60
epochs, batch 2, lr 1e-3, 160 px, 28 images) trains in ~190-370 s (~1 s an epoch on an idle
machine) and reaches a held-out bbox mAP50 of 0.15 (1 torch thread) to 0.26 (2 threads), the
untrained model 0.000; through the concept engine the trained model finds 11 of 17 training
objects, the untrained 0. The threshold (0.1) is below both figures: the reduced DETR-family
model trained from random weights for ~840 steps does not reach 0.5. The two ``slow`` tests
share that one training (~6.5 min under load); the others (~90 s) use a two-epoch model."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sam_backend.training.base import MODEL_FILE, ImageSample, TrainOptions, TrainingStopped
from sam_backend.training.dataset import build_dataset
from sam_backend.training.evaluate import evaluate
from sam_backend.training.grounding_dino import (REDUCED_RECIPE, GroundingDinoDetector,
                                                 GroundingDinoTrainer, build_reduced,
                                                 prompt_chunks, prompt_text)
from tests.support.shapes import LABELS, SHAPES_CONFIG, shapes_project

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

N_TRAIN, N_HELD = 28, 8
#: the held-out bbox mAP50 the recipe must reach (measured 0.15-0.26), and what the untrained
#: model stays under (measured 0.000)
TRAINED_MAP50 = 0.1
UNTRAINED_MAP50 = 0.05
#: the share of the training images' objects the concept engine finds with the trained model
ENGINE_FOUND_SHARE = 0.3


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """(train, held_out, classes): 28 + 8 ImageSamples of the shapes project."""
    root = tmp_path_factory.mktemp("shapes")
    tasks = shapes_project(root, N_TRAIN + N_HELD, seed=3)
    training_set = build_dataset(tasks, SHAPES_CONFIG, min_tasks=1)
    items = [ImageSample(s, Path(s.image)) for s in training_set.samples]
    assert len(items) == N_TRAIN + N_HELD and training_set.classes == list(LABELS)
    return items[:N_TRAIN], items[N_TRAIN:], training_set.classes


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """(trainer, directory, logs): the recipe trained once on the 28 training images."""
    train, _, classes = shapes
    trainer = GroundingDinoTrainer(TrainOptions(seed=0, **REDUCED_RECIPE))
    out = tmp_path_factory.mktemp("trained") / "model"
    logs = trainer.train(train, classes, classes, out)
    return trainer, out, logs


@pytest.fixture(scope="module")
def quick_trained(shapes, tmp_path_factory):
    """(trainer, directory, logs): two epochs on 8 images (for the tests that need a saved
    model, not a good one)."""
    train, _, classes = shapes
    trainer = quick(0)
    out = tmp_path_factory.mktemp("quick") / "model"
    logs = trainer.train(train[:8], classes, classes, out)
    return trainer, out, logs


def held_out_map50(detector, held) -> float:
    predictions = {item.sample.task_id: detector.predict(item.load(), threshold=0.0)
                   for item in held}
    return evaluate([item.sample for item in held], predictions, LABELS)["bbox"]["mAP50"]


def quick(seed: int, **options) -> GroundingDinoTrainer:
    recipe = dict(REDUCED_RECIPE, epochs=2)
    recipe.update(options)
    return GroundingDinoTrainer(TrainOptions(seed=seed, **recipe))


# -- prompts -----------------------------------------------------------------------------------

def test_the_prompt_splits_into_the_phrases_as_the_loss_reads_them():
    """The reduced tokenizer has BERT's delimiter ids, so each phrase is one label group."""
    import torch
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

    model, processor = build_reduced(["red", "car", "circle"], seed=0)
    assert prompt_text(["Circle", "red car.", "a?b"]) == "circle. red car. a b."
    ids = processor(text=prompt_text(["circle", "red car"]), return_tensors="pt")["input_ids"]
    maps = build_label_maps(torch.zeros(1, 1, 32), ids)[0]
    assert maps.shape[0] == 2 and maps.sum(dim=1).tolist() == [1, 2]
    # more phrases than the text length holds: several prompts, none over the budget
    chunks = prompt_chunks(["circle"] * 20, processor.tokenizer, 32)
    assert [i for chunk in chunks for i in chunk] == list(range(20)) and len(chunks) == 2
    with pytest.raises(ValueError, match="tokens"):
        prompt_chunks(["red " * 40], processor.tokenizer, 32)
    with pytest.raises(ValueError, match="no word"):
        prompt_text([" . "])


# -- learning ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_learning_is_real(shapes, trained):
    """Held-out bbox mAP50 of the fine-tuned model is far above the same model untrained."""
    _, held, classes = shapes
    trainer, out, logs = trained
    untrained = GroundingDinoDetector(*build_reduced(classes, seed=0), classes, classes)
    before = held_out_map50(untrained, held)
    after = held_out_map50(trainer.load(out), held)
    print(f"held-out bbox mAP50: untrained {before:.3f}, trained {after:.3f}; loss "
          f"{logs[0].loss:.2f} -> {logs[-1].loss:.2f}")
    assert before < UNTRAINED_MAP50
    assert after >= TRAINED_MAP50
    assert logs[-1].loss < logs[0].loss / 3
    assert [log.epoch for log in logs] == list(range(1, REDUCED_RECIPE["epochs"] + 1))
    assert {"loss_ce", "loss_bbox", "loss_giou"} <= set(logs[-1].parts)


def test_the_saved_directory_round_trips(shapes, quick_trained):
    """Loaded twice, the model answers identically; the detector the run ends with (kept as
    ``trainer.detector``) answers as the loaded one; MODEL_FILE says what it is."""
    train, _, classes = shapes
    trainer, out, _ = quick_trained
    image = train[0].load()
    first, second = trainer.load(out), trainer.load(out)
    a, b = first.predict(image, 0.0), second.predict(image, 0.0)
    c = trainer.detector.predict(image, 0.0)
    assert len(a.boxes) > 0
    for p in (b, c):
        np.testing.assert_allclose(p.boxes, a.boxes, atol=1e-4)
        np.testing.assert_allclose(p.scores, a.scores, atol=1e-5)
        np.testing.assert_array_equal(p.labels, a.labels)
    assert a.masks is None and a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    assert first.classes == first.phrases == classes and first.segments is False
    from sam_backend.training.base import read_model_file

    info = read_model_file(out)
    assert info["kind"] == "grounding_dino" and info["classes"] == classes
    assert info["image_size"] == REDUCED_RECIPE["image_size"] and info["epochs"] == 2


@pytest.mark.slow
def test_the_concept_engine_serves_the_directory(shapes, trained, checkpoint_factory, tmp_path):
    """``GroundingDinoEngine.load(out, segmenter)`` unchanged serves the trained directory, one
    phrase per query and every class in one caption (as a concept pass asks), and finds more
    of the training images' objects (a box of the object's phrase among its best three at IoU
    >= 0.5) than the same engine on the untrained model, both ways."""
    from sam_backend.assembly import segmenter_for
    from sam_backend.concepts.grounding_dino import GroundingDinoEngine
    from sam_backend.settings import Settings

    train, _, classes = shapes
    _, out, _ = trained
    untrained_dir = tmp_path / "untrained"
    for part in build_reduced(classes, seed=0):
        part.save_pretrained(str(untrained_dir))
    settings = Settings.load({"model_name": "mobile_sam", "device": "cpu", "runtime": "torch",
                              "sam_checkpoint_file": str(checkpoint_factory("mobile_sam"))},
                             environ={})
    segmenter = segmenter_for(settings)
    found, joined = {}, {}
    for name, directory in (("trained", out), ("untrained", untrained_dir)):
        engine = GroundingDinoEngine.load(directory, segmenter)
        found[name] = joined[name] = 0
        for index, item in enumerate(train[:8]):
            image = item.load()
            # every class in one caption, as a concept pass asks (boxes go to their phrase)
            state, _ = engine.image_state(f"shapes-{index}", lambda: image)  # encoded once
            together = dict(engine.find_all(state, list(classes), 0.05))
            for obj in item.sample.objects:
                boxes, scores = engine.boxes(image, classes[obj.label], 0.05)
                best = boxes[np.argsort(-scores)[:3]]
                found[name] += any(_iou(b, obj.box) >= 0.5 for b in best)
                mine = together[classes[obj.label]]
                best = mine.boxes[np.argsort(-mine.scores)[:3]]
                joined[name] += any(_iou(b, obj.box) >= 0.5 for b in best)
    objects = sum(len(item.sample.objects) for item in train[:8])
    print(f"objects found through the concept engine: {found} of {objects}; with every class "
          f"in one caption: {joined}")
    assert found["trained"] >= max(ENGINE_FOUND_SHARE * objects, found["untrained"] + 3)
    # trained on joined prompts, it finds them as well with every class in one caption (11
    # against 12 alone, measured): the token spans give each box to its own class's phrase
    assert joined["trained"] >= max(ENGINE_FOUND_SHARE * objects, joined["untrained"] + 3)


def _iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# -- reproducibility, faults ------------------------------------------------------------------

def test_same_seed_same_losses_other_seed_other_losses(shapes, tmp_path):
    train, _, classes = shapes
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        logs = quick(seed, batch_size=2).train(train[:4], classes, classes, tmp_path / name)
        runs[name] = [(log.loss, sorted(log.parts.items())) for log in logs]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_a_damaged_directory_is_refused(quick_trained, tmp_path):
    trainer, out, _ = quick_trained
    weights = sorted(out.glob("*.safetensors"))
    assert weights, "the model's weights are saved as safetensors"
    truncated = tmp_path / "truncated"
    shutil.copytree(out, truncated)
    path = truncated / weights[0].name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    missing = tmp_path / "missing"
    shutil.copytree(out, missing)
    (missing / weights[0].name).unlink()
    no_info = tmp_path / "no-info"
    shutil.copytree(out, no_info)
    (no_info / MODEL_FILE).unlink()
    for directory in (truncated, missing, no_info):
        with pytest.raises(ValueError, match=str(directory)):
            trainer.load(directory)


def test_stop_raises_and_writes_nothing(shapes, tmp_path):
    train, _, classes = shapes
    steps = []

    def stop():
        steps.append(1)
        return len(steps) > 2  # after two steps

    out = tmp_path / "out"
    epochs = []
    with pytest.raises(TrainingStopped):
        quick(0).train(train[:12], classes, classes, out, on_epoch=epochs.append, stop=stop)
    assert not out.exists() and epochs == []


def test_a_missing_starting_point_is_a_clear_error(shapes, tmp_path, monkeypatch):
    train, _, classes = shapes
    monkeypatch.setenv("SAM_BACKEND_WEIGHTS_DIR", str(tmp_path / "weights"))
    trainer = GroundingDinoTrainer(TrainOptions(epochs=1, reduced=False))
    with pytest.raises(ValueError, match="huggingface-cli download IDEA-Research"):
        trainer.train(train[:4], classes, classes, tmp_path / "out")
    with pytest.raises(ValueError, match="no config.json"):
        GroundingDinoTrainer(TrainOptions(epochs=1, start=tmp_path)).train(
            train[:4], classes, classes, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fine_tuning_starts_from_a_parent_version(shapes, quick_trained, tmp_path):
    """``options.start`` = a trained directory: training goes on from its weights (its first
    epoch's loss on the same images is far below the random start's)."""
    train, _, classes = shapes
    _, out, logs = quick_trained
    child = quick(0, epochs=1, reduced=False, start=out).train(train[:8], classes, classes,
                                                               tmp_path / "child")
    assert child[0].loss < logs[0].loss / 2
