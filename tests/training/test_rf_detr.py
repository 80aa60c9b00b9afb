"""The RF-DETR trainer: a reduced RF-DETR (random seeded weights, 0.61M parameters) really learns
the synthetic shapes project; runs are reproducible by seed; a saved model loads back to the same
predictions and a corrupt one is refused; stop() writes nothing; the pretrained start downloads
through a (loopback) hub.

Runtimes on this 2-core CPU shared with other work: the learning test (slow, one thread) ~1 min
(30 epochs of 40 images at 128 px, 1.6 s per epoch, 25 images/s; held-out segm mAP50 measured
0.52 trained (0.61 with two threads: other rounding) against 0.00 untrained); the rest ~30 s
together. Every test here runs on one torch thread (see ``one_thread``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sam_backend.errors import CheckpointError
from sam_backend.training.base import (MODEL_FILE, TrainingStopped, TrainOptions, read_model_file,
                                       trainer_for)
from sam_backend.training.evaluate import evaluate
from sam_backend.training.rf_detr import (RfDetrDetector, RfDetrTrainer, _processor, build_model,
                                          reduced_config)
from tests.support.fake_hub import FakeHub
from tests.support.rf_detr_recipe import RF_DETR_SHAPES, RF_DETR_SHAPES_MAP50, shapes_split

CLASSES = ["circle", "square"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_split(tmp_path_factory.mktemp("shapes"))


def tiny(**changes) -> TrainOptions:
    """A few steps at 96 px: enough to exercise the loop, not to learn."""
    values = dict(epochs=2, batch_size=2, learning_rate=1e-3, image_size=96, seed=0,
                  reduced=True)
    values.update(changes)
    return TrainOptions(**values)


def untrained(options: TrainOptions) -> RfDetrDetector:
    model, size, _ = build_model(CLASSES, options)
    return RfDetrDetector(model.eval(), _processor(size), CLASSES, CLASSES, size, {})


def segm_map50(detector, held, classes) -> float:
    predictions = {h.sample.task_id: detector.predict(h.load(), threshold=0.0) for h in held}
    return evaluate([h.sample for h in held], predictions, classes)["segm"]["mAP50"]


def same(a, b) -> None:
    assert len(a.scores) == len(b.scores)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.boxes, b.boxes)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared CPU two threads spinning against other work ran this
    test at 25 s per epoch instead of 1.5 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_training_learns_the_shapes(shapes, tmp_path, one_thread):
    dataset, train, held = shapes
    assert dataset.classes == CLASSES
    before = segm_map50(untrained(RF_DETR_SHAPES), held, dataset.classes)
    logs = trainer_for("rf_detr", RF_DETR_SHAPES).train(train, dataset.classes, dataset.classes,
                                                        tmp_path / "model")
    assert [log.epoch for log in logs] == list(range(1, RF_DETR_SHAPES.epochs + 1))
    assert logs[-1].loss < 0.6 * logs[0].loss
    assert set(logs[-1].parts) >= {"loss_ce", "loss_bbox", "loss_giou", "loss_mask_ce",
                                   "loss_mask_dice"}
    detector = RfDetrTrainer(RF_DETR_SHAPES).load(tmp_path / "model")
    after = segm_map50(detector, held, dataset.classes)
    print(f"held-out segm mAP50: untrained {before:.3f}, trained {after:.3f}; "
          f"{np.mean([log.seconds for log in logs]):.2f} s/epoch, "
          f"{np.mean([log.images_per_second for log in logs]):.1f} images/s")
    assert before < 0.05
    assert after >= RF_DETR_SHAPES_MAP50
    # the prediction contract: best first, masks at the image's size, boxes = the masks' bounds
    image = held[0].load()
    prediction = detector.predict(image, threshold=0.3)
    assert len(prediction.scores) >= 1
    assert np.all(np.diff(prediction.scores) <= 0) and prediction.scores.min() > 0.3
    assert prediction.masks.shape == (len(prediction.scores), *image.shape[:2])
    assert prediction.masks.dtype == bool and prediction.boxes.dtype == np.float32
    assert prediction.labels.dtype == np.int64 and set(prediction.labels) <= {0, 1}


def test_same_seed_same_losses_other_seed_other_losses(shapes, tmp_path):
    _, train, _ = shapes
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        logs = RfDetrTrainer(tiny(seed=seed)).train(train[:2], CLASSES, CLASSES, tmp_path / name)
        runs[name] = [(log.loss, log.parts) for log in logs]
    assert runs["a"] == runs["b"]
    assert runs["a"][0][0] != runs["c"][0][0]


def test_saved_model_loads_to_the_same_predictions(shapes, tmp_path):
    _, train, held = shapes
    options = tiny(epochs=0)
    in_memory = untrained(options)  # the same seeded weights the run starts (and, 0 epochs, ends) with
    RfDetrTrainer(options).train(train[:2], CLASSES, ["a circle", "a square"], tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == sorted(["config.json", "model.safetensors", "preprocessor_config.json",
                            MODEL_FILE])
    facts = read_model_file(tmp_path / "m")
    assert facts["kind"] == "rf_detr" and facts["classes"] == CLASSES
    assert facts["phrases"] == ["a circle", "a square"]
    assert facts["image_size"] == 96 and facts["reduced"] is True and facts["seed"] == 0
    loaded = trainer_for("rf_detr", options).load(tmp_path / "m")
    assert loaded.segments and loaded.phrases == ["a circle", "a square"]
    image = held[0].load()
    first = in_memory.predict(image, threshold=0.0)
    assert len(first.scores) > 0  # threshold 0: every query with a non-empty mask
    same(first, loaded.predict(image, threshold=0.0))


def test_no_detection_is_an_empty_prediction(shapes):
    _, _, held = shapes
    image = held[0].load()
    found = untrained(tiny()).predict(image, threshold=1.0)  # no score is above 1
    assert found.boxes.shape == (0, 4) and found.scores.shape == (0,)
    assert found.labels.shape == (0,) and found.masks.shape == (0,) + image.shape[:2]


def test_a_corrupt_or_incomplete_model_is_refused_with_its_directory(shapes, tmp_path):
    _, train, _ = shapes
    RfDetrTrainer(tiny(epochs=0)).train(train[:2], CLASSES, CLASSES, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=str(tmp_path / "m")):
        RfDetrDetector.load(tmp_path / "m")
    weights.unlink()
    with pytest.raises(ValueError, match=r"has no weights"):
        RfDetrDetector.load(tmp_path / "m")
    (tmp_path / "m" / MODEL_FILE).unlink()
    with pytest.raises(ValueError, match=MODEL_FILE):
        RfDetrDetector.load(tmp_path / "m")


def test_stop_raises_and_writes_nothing(shapes, tmp_path):
    _, train, _ = shapes
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 2  # after two steps

    out = tmp_path / "out"
    with pytest.raises(TrainingStopped):
        RfDetrTrainer(tiny(epochs=3)).train(train[:4], CLASSES, CLASSES, out, stop=stop)
    assert not out.exists() or not any(out.iterdir())


def test_a_parent_keeps_its_head_other_classes_get_a_new_one(shapes, tmp_path):
    _, train, _ = shapes
    RfDetrTrainer(tiny(epochs=0, seed=3)).train(train[:2], CLASSES, CLASSES, tmp_path / "p")
    parent = RfDetrDetector.load(tmp_path / "p").model
    kept, _, facts = build_model(CLASSES, tiny(start=tmp_path / "p", seed=5))
    assert facts["head"] == "kept"
    torch.testing.assert_close(kept.model.class_embed.weight, parent.model.class_embed.weight)
    other = ["square", "circle"]  # same count, other order: other classes
    fresh, _, facts = build_model(other, tiny(start=tmp_path / "p", seed=5))
    assert facts["head"] == "new" and fresh.config.id2label[0] == "square"
    assert not torch.equal(fresh.model.class_embed.weight, parent.model.class_embed.weight)
    # everything else comes from the parent
    torch.testing.assert_close(fresh.model.bbox_embed.layers[0].weight,
                               parent.model.bbox_embed.layers[0].weight)
    three, _, _ = build_model(["a", "b", "c"], tiny(start=tmp_path / "p"))
    assert three.model.class_embed.out_features == 3
    assert all(h.out_features == 3 for h in three.model.model.enc_out_class_embed)


def test_the_pretrained_start_downloads_once_through_the_hub(shapes, tmp_path, monkeypatch):
    """No start, not reduced: the default pretrained repository comes through HF_ENDPOINT into
    the weights directory (a hub-format copy with 91 COCO classes), gets a new 2-class head."""
    from transformers import RfDetrForInstanceSegmentation

    _, train, _ = shapes
    repo = tmp_path / "repo"
    torch.manual_seed(0)
    coco = RfDetrForInstanceSegmentation(reduced_config([f"c{i}" for i in range(91)], 96))
    coco.save_pretrained(str(repo))
    _processor(96).save_pretrained(str(repo))
    hub = FakeHub()
    hub.add_repo("Roboflow/rf-detr-seg-small", repo)
    hub.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("SAM_BACKEND_WEIGHTS_DIR", str(tmp_path / "weights"))
        options = TrainOptions(epochs=1, batch_size=2, image_size=0, reduced=False)
        RfDetrTrainer(options).train(train[:2], CLASSES, CLASSES, tmp_path / "m")
        dest = tmp_path / "weights" / "rf-detr-seg-small"
        assert (dest / "model.safetensors").read_bytes() == \
            (repo / "model.safetensors").read_bytes()
        assert [p.name for p in (tmp_path / "weights").iterdir()] == ["rf-detr-seg-small"]
        facts = read_model_file(tmp_path / "m")
        assert facts["pretrained"] == "Roboflow/rf-detr-seg-small" and facts["head"] == "new"
        assert facts["image_size"] == 96  # the start's own size
        assert RfDetrDetector.load(tmp_path / "m").model.config.num_labels == 2
        fetched = len(hub.requests)
        RfDetrTrainer(options).train(train[:2], CLASSES, CLASSES, tmp_path / "m2")
        assert len(hub.requests) == fetched  # downloaded once
        # a repository the hub does not have: a clear error, nothing left behind
        with pytest.raises(CheckpointError, match=r"Roboflow/nothing .*Nothing was"):
            RfDetrTrainer(TrainOptions(start=Path("Roboflow/nothing"))).train(
                train[:2], CLASSES, CLASSES, tmp_path / "m3")
        assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["rf-detr-seg-small"]
    finally:
        hub.stop()


def test_images_without_objects_are_negatives(shapes, tmp_path):
    """A batch whose images hold no object at all still trains (the library's loss sum is then
    empty: the trainer adds the parts that exist)."""
    from dataclasses import replace

    from sam_backend.training.base import ImageSample

    _, train, _ = shapes
    negatives = [ImageSample(replace(item.sample, objects=[]), item.path) for item in train[:2]]
    logs = RfDetrTrainer(tiny(epochs=1, batch_size=1)).train(negatives + train[2:3], CLASSES,
                                                             CLASSES, tmp_path / "m")
    assert logs[0].images == 3 and np.isfinite(logs[0].loss)
    assert (tmp_path / "m" / MODEL_FILE).is_file()


def test_a_diverging_run_says_so_and_writes_nothing(shapes, tmp_path):
    """A learning rate far too high makes the weights non-finite within a few steps; the run
    names that (not the matcher's complaint about NaN boxes) and writes nothing."""
    _, train, _ = shapes
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match="diverged.*lower train_learning_rate"):
        RfDetrTrainer(tiny(epochs=5, learning_rate=1e3)).train(train[:4], CLASSES, CLASSES, out)
    assert not out.exists() or not any(out.iterdir())
