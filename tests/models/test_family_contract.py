"""The contract every model family passes, one parametrised run per row of the family table.

Each family's smallest variant, with seeded random weights saved to a checkpoint and loaded
through the normal loading code (SAM 3: the reduced configuration of the same classes): encode an
image into an embedding with the named parts the row declares; decode a point, a refining click
and a box into an HxW bool mask of the image's size with a finite score, through the one decode
contract (candidates in the low-res frame, then upscaled); the embedding survives the store's wire
format; the runtime chooser's answer; and the row's random-init recipe writes a checkpoint that
the row's state-dict recogniser (and no other row's) recognises as that variant.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tests.support.random_weights import reduced_sam3_config, synthetic_image
from sam_backend.embeddings.store import decode_embedding, encode_embedding
from sam_backend.errors import ConfigError
from sam_backend.models import families
from sam_backend.models.base import Candidates, Embedding, Prompt
from sam_backend.models.families import FAMILIES, choose_runtime
from sam_backend.models.registry import DEFAULT_CONFIG, VARIANTS, get_variant
from sam_backend.models.runtimes import create_model

H, W = 96, 128  # small, and not square: sizes must be kept per axis
KEY = "sam_backend:emb:v2:contract:img"


@pytest.fixture(scope="module", params=list(FAMILIES))
def loaded(request):
    """(family name, model, embedding of the test image): each family's smallest variant loaded
    and the image encoded once (module-scoped params: pytest runs every test of one family
    before loading the next)."""
    name = request.param
    variant = FAMILIES[name].smallest
    if name == "sam3":  # the reduced random SAM 3 (official layout), not 3.4 GB
        checkpoint = request.getfixturevalue("official_dir")
    else:
        checkpoint = request.getfixturevalue("checkpoint_factory")(variant.model_name,
                                                                   variant.sam_config)
    model = create_model(variant, checkpoint, "cpu", "torch")
    yield name, model, model.embed(synthetic_image(H, W, seed=3))
    del model


def check_candidates(candidates: Candidates, k: int) -> None:
    assert isinstance(candidates, Candidates)
    assert isinstance(candidates.logits, np.ndarray) and candidates.logits.dtype == np.float32
    assert candidates.logits.ndim == 3 and candidates.logits.shape[0] == k
    assert candidates.logits.shape[1] == candidates.logits.shape[2]  # the low-res square
    assert candidates.scores.shape == (k,) and np.isfinite(candidates.scores).all()


def check_prediction(prediction, low_res: int) -> None:
    assert prediction.mask.shape == (H, W) and prediction.mask.dtype == np.bool_
    assert np.isfinite(prediction.score)
    assert prediction.low_res_logits.shape == (1, low_res, low_res)
    assert prediction.low_res_logits.dtype == np.float32


def test_encode_gives_the_named_parts_the_row_declares(loaded):
    name, model, embedding = loaded
    family = FAMILIES[name]
    assert model.runtime == "torch" and model.variant == family.smallest
    assert isinstance(embedding, Embedding)
    assert set(embedding.parts()) == set(family.embedding_parts[model.runtime])
    assert embedding.original_size == (H, W)
    assert len(embedding.input_size) == 2 and all(int(v) > 0 for v in embedding.input_size)
    shape = tuple(embedding.image_embedding.shape)
    assert shape[:2] == (1, 256) and shape[2] == shape[3]
    assert embedding.nbytes == sum(a.element_size() * a.nelement() for a in embedding.arrays())


def test_a_point_a_refining_click_and_a_box_decode_to_masks_of_the_image_size(loaded):
    name, model, embedding = loaded
    point = Prompt(np.array([[40.0, 30.0]], np.float32), np.array([1]))
    box = Prompt(np.zeros((0, 2), np.float32), np.zeros(0, np.int64),
                 np.array([10.0, 12.0, 90.0, 70.0], np.float32))
    hq = "interm_embeddings" in embedding.parts() or "hq_features" in embedding.parts()

    candidates = model.decode_low_res(embedding, point)
    check_candidates(candidates, 1 if hq else 3)  # ambiguous: 3 candidates (HQ-SAM picks 1)
    low_res = candidates.logits.shape[-1]
    first = model.decode(embedding, point)
    check_prediction(first, low_res)
    assert first.score == pytest.approx(float(candidates.scores[candidates.best()]))

    refine = Prompt(np.array([[40.0, 30.0], [100.0, 80.0]], np.float32), np.array([1, 0]),
                    mask_input=first.low_res_logits)
    check_candidates(model.decode_low_res(embedding, refine), 1)
    check_prediction(model.decode(embedding, refine), low_res)

    check_candidates(model.decode_low_res(embedding, box), 1)
    check_prediction(model.decode(embedding, box), low_res)


def test_the_embedding_survives_the_store_format_and_float16(loaded):
    name, model, embedding = loaded
    point = Prompt(np.array([[64.0, 48.0]], np.float32), np.array([1]))
    back = decode_embedding(encode_embedding(embedding, KEY), KEY)
    assert set(back.parts()) == set(embedding.parts())
    assert np.array_equal(model.decode(back, point).mask, model.decode(embedding, point).mask)
    half = decode_embedding(encode_embedding(embedding.to_float16(), KEY), KEY)
    assert half.nbytes * 2 == embedding.nbytes
    check_prediction(model.decode(half.to_float32(), point),
                     model.decode_low_res(embedding, point).logits.shape[-1])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_runtime_chooser(name):
    family = FAMILIES[name]
    for variant in family.variants:
        auto = choose_runtime(variant, "cpu", "auto")
        assert auto in family.runtimes
        assert auto == ("onnx" if variant.sam_config in family.onnx_by_default else "torch")
        assert choose_runtime(variant, "cpu", "torch") == "torch"
        assert choose_runtime(variant, "cpu", "onnx") == \
            ("onnx" if "onnx" in family.runtimes else "torch")
    assert set(family.onnx_by_default) <= set(family.configs)
    assert set(family.embedding_parts) == set(family.runtimes)
    with pytest.raises(ConfigError, match="use auto, torch or onnx"):
        choose_runtime(family.smallest, "cpu", "tensorrt")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_random_init_recipe_writes_what_the_recogniser_recognises(name, tmp_path):
    family = FAMILIES[name]
    variant = family.smallest
    architecture = {"config": reduced_sam3_config()} if name == "sam3" else {}
    path = family.random_init(variant, tmp_path / variant.checkpoint_name, seed=7, **architecture)
    assert Path(path).exists()
    state = family.read_state(path)
    assert family.recognise(state) == variant.key
    assert families.recognise(state) == variant.key  # and no other row claims it
    for other in FAMILIES.values():
        if other is not family:
            assert other.recognise(state) is None, other.name


def test_the_table_is_what_the_registry_and_the_options_read():
    from sam_backend.settings import Settings
    from dataclasses import fields

    assert set(DEFAULT_CONFIG) == set(FAMILIES)
    assert [v.key for f in FAMILIES.values() for v in f.variants] == \
        [v.key for v in VARIANTS.values()]
    help_text = {f.name: f.metadata["help"] for f in fields(Settings)}
    for family in FAMILIES.values():
        assert get_variant(family.name) == family.variant(family.default_config)
        assert family.smallest in family.variants
        assert all(v.family == family.name for v in family.variants)
        assert family.name in help_text["model_name"]
        assert f"{family.name}: {family.default_config}" in help_text["sam_config"]
        assert family.default_config in help_text["sam_config"]


# Modules that may ask which family they run: the table, and each family's own runtime modules.
FAMILY_MODULES = {"families.py", "torch_runtime.py", "onnx_runtime.py", "onnx_export.py",
                  "sam2_runtime.py", "sam3_runtime.py"}


def test_no_family_branches_outside_the_table_and_the_runtime_modules():
    package = Path(__file__).resolve().parents[2] / "sam_backend"
    names = "|".join(map(re.escape, FAMILIES))
    branch = re.compile(rf"""(family|model_name)\)?\s*(==|!=|in)\s*\(?["']({names})["']""")
    found = []
    for folder in ("models", "embeddings"):
        for path in sorted((package / folder).glob("*.py")):
            if path.name in FAMILY_MODULES:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if branch.search(line):
                    found.append(f"{path.name}:{number}: {line.strip()}")
    for line in (package / "settings.py").read_text().splitlines():
        assert not branch.search(line), line
    assert not found, found
