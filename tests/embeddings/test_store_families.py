"""The shared embedding store with the model families whose embeddings carry more than one array:
SAM 2.1 (two high-resolution feature maps) and SAM 3 (two FPN levels, and with
``keep_vision_state`` the ViT backbone output the concept engine reads). Real random-weight models
loaded through the normal loading code, a real redis-server on loopback."""
from __future__ import annotations

import numpy as np
import pytest

from redis_utils import redis_server  # noqa: F401  (fixture)
from sam_backend.models.base import Prompt
from random_weights import synthetic_image
from sam_backend.models.registry import get_variant
from sam_backend.models.runtimes import create_model
from sam_backend.embeddings.store import EmbeddingStore
from test_store import same

# (name, variant args, keep_vision_state, the embedding's named parts)
FAMILIES = {"sam2": (("sam2", "hiera_tiny"), None, {"image_embedding", "high_res_features"}),
            "sam3": (("sam3",), False, {"image_embedding", "high_res_features"}),
            "sam3+vision_state": (("sam3",), True, {"image_embedding", "high_res_features",
                                                    "vision_state"})}


@pytest.fixture(scope="module")
def sam2_model(sam2_file):  # noqa: F811
    return create_model(get_variant("sam2", "hiera_tiny"), str(sam2_file), "cpu", "torch")


@pytest.fixture(scope="module")
def sam3_model(official_dir):  # noqa: F811
    return create_model(get_variant("sam3"), official_dir, "cpu", "torch")


@pytest.fixture(params=list(FAMILIES))
def family(request):
    """(model, the parts its embedding has); SAM 3 with ``keep_vision_state`` as the
    service sets it for ``concept_model=sam3``."""
    args, keep, parts = FAMILIES[request.param]
    model = request.getfixturevalue(f"{args[0]}_model")
    if keep is not None:
        model.keep_vision_state = keep
    yield model, parts
    if keep is not None:
        model.keep_vision_state = False


def test_a_family_embedding_round_trips_through_redis(family, redis_server):  # noqa: F811
    model, parts = family
    image = synthetic_image(240, 320, seed=5)  # not square: sizes are kept per axis
    embedding = model.embed(image)
    assert set(embedding.parts()) == parts and len(embedding.high_res_features) == 2
    store = EmbeddingStore(redis_server.url, f"{model.variant.key}:torch:float16:test")
    prompt = Prompt(np.array([[100.0, 80.0], [250.0, 190.0]], np.float32), np.array([1, 0]))
    click = Prompt(np.array([[160.0, 120.0]], np.float32), np.array([1]))
    # float16 (the backend's default embedding_dtype) and float32 (bit-exact) entries
    for stored in (embedding.to_float16(), embedding):
        name = f"img-{stored.image_embedding.dtype}"
        assert store.save(name, stored)
        back = store.load(name)
        same(stored, back)  # kinds, dtypes, shapes, values, original and input size
        assert back.original_size == (240, 320)
        for p in (click, prompt):
            want = model.decode(stored.to_float32(), p)
            got = model.decode(back.to_float32(), p)
            assert got.mask.any() or want.mask.any()
            assert np.array_equal(got.mask, want.mask) and got.score == want.score
    # the float32 entry decodes to the very mask of the embedding as the encoder made it
    assert np.array_equal(model.decode(back, click).mask, model.decode(embedding, click).mask)


def test_concept_model_sam3_keeps_the_backbone_output_in_every_encoding_process(official_dir):  # noqa: F811
    """Web replicas and precompute workers both build their model through ``segmenter_for``: with
    ``concept_model=sam3`` it keeps SAM 3's backbone output, and the store's model identity says
    so, so a worker's entries serve concept passes and never mix with click-only entries."""
    from sam_backend.embeddings.precompute import identity_for
    from sam_backend.labelstudio.service import segmenter_for
    from sam_backend.settings import Settings

    options = dict(model_name="sam3", sam_checkpoint_file=str(official_dir), device="cpu",
                   runtime="torch", offline=True)
    with_concepts = Settings.load(dict(options, concept_model="sam3"), environ={})
    clicks_only = Settings.load(options, environ={})
    model = segmenter_for(with_concepts).model
    assert model.keep_vision_state is True
    assert model.embed(synthetic_image(64, 96, seed=1)).vision_state is not None
    assert identity_for(with_concepts, model).endswith(":vision")
    assert identity_for(clicks_only) == identity_for(with_concepts, model)[:-len(":vision")]
