"""Both trainers refuse bad arguments before building a model (``Trainer.check_inputs``)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from sam_backend.training.base import TRAINERS, TrainOptions, trainer_for
from tests.support.rf_detr_recipe import shapes_split


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_split(tmp_path_factory.mktemp("shapes"))


@pytest.mark.parametrize("kind", sorted(TRAINERS))
def test_bad_arguments_are_refused_naming_what_is_wrong(kind, shapes, tmp_path):
    _, train, _ = shapes
    trainer = trainer_for(kind, TrainOptions(epochs=1, reduced=True))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="0 classes and 0 phrases"):
        trainer.train(train, [], [], out)
    with pytest.raises(ValueError, match="2 classes and 1 phrases"):
        trainer.train(train, ["circle", "square"], ["circle"], out)
    with pytest.raises(ValueError, match="no training sample"):
        trainer.train([], ["circle", "square"], ["circle", "square"], out)
    item = train[0]
    wrong = replace(item, sample=replace(item.sample, objects=[
        replace(item.sample.objects[0], label=5)]))
    with pytest.raises(ValueError, match="label index 5"):
        trainer.train([wrong], ["circle", "square"], ["circle", "square"], out)
    out.mkdir()
    (out / "left.txt").write_text("x")
    with pytest.raises(ValueError, match="is not empty"):
        trainer.train(train, ["circle", "square"], ["circle", "square"], Path(out))
