"""The shared embedding store with the model families whose embeddings carry more than the image
embedding (read from the family table: HQ-SAM's intermediate features, SAM 2.1's two
high-resolution feature maps, SAM 3's two FPN levels), and SAM 3 with ``keep_vision_state`` (the
ViT backbone output the concept engine reads). Real random-weight models loaded through the normal
loading code, a real redis-server on loopback."""
from __future__ import annotations

import numpy as np
import pytest

from tests.support.redis_utils import redis_server  # noqa: F401  (fixture)
from sam_backend.models.base import Prompt
from tests.support.random_weights import synthetic_image
from sam_backend.models.families import FAMILIES
from sam_backend.models.runtimes import create_model
from sam_backend.embeddings.store import EmbeddingStore
from tests.embeddings.test_store import same

# every row whose torch embedding has more than one part, + SAM 3 as concept_model=sam3 runs it
CASES = [name for name, family in FAMILIES.items()
         if len(family.embedding_parts["torch"]) > 1] + ["sam3+vision_state"]


@pytest.fixture(scope="module")
def models(request):
    """family name -> its smallest variant's torch model (SAM 3: the reduced one), loaded once."""
    loaded = {}

    def get(name):
        if name not in loaded:
            variant = FAMILIES[name].smallest
            if name == "sam3":
                checkpoint = request.getfixturevalue("official_dir")
            else:
                checkpoint = request.getfixturevalue("checkpoint_factory")(variant.model_name,
                                                                           variant.sam_config)
            loaded[name] = create_model(variant, checkpoint, "cpu", "torch")
        return loaded[name]

    yield get
    loaded.clear()


@pytest.fixture(params=CASES)
def family(request, models):
    """(model, the parts its embedding has); SAM 3 with ``keep_vision_state`` as the
    service sets it for ``concept_model=sam3``."""
    name, _, vision = request.param.partition("+")
    model = models(name)
    parts = set(FAMILIES[name].embedding_parts["torch"])
    if vision:
        model.keep_vision_state = True
        parts.add("vision_state")
    yield model, parts
    if vision:
        model.keep_vision_state = False


@pytest.mark.process
def test_a_family_embedding_round_trips_through_redis(family, redis_server):  # noqa: F811
    model, parts = family
    image = synthetic_image(240, 320, seed=5)  # not square: sizes are kept per axis
    embedding = model.embed(image)
    assert set(embedding.parts()) == parts
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
    from sam_backend.assembly import identity_for, segmenter_for
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


@pytest.mark.parametrize("name,runtime", [("sam2", "auto"), ("sam3", "onnx")])
def test_the_store_identity_without_a_model_names_the_runtime_the_model_runs(name, runtime,
                                                                             request):
    """``sam-backend precompute`` computes the store's model identity without loading the model;
    it must name the runtime the loaded model runs (the family table's one choice), else the
    command queues images under another identity than its workers and replicas read. SAM 2 with
    runtime=auto on CPU runs its decoder in onnxruntime; SAM 3 asked for onnx runs torch."""
    from sam_backend.assembly import identity_for
    from sam_backend.settings import Settings

    variant = FAMILIES[name].smallest
    checkpoint = request.getfixturevalue("official_dir" if name == "sam3" else "sam2_file")
    settings = Settings.load(dict(model_name=name, sam_config=variant.sam_config,
                                  sam_checkpoint_file=str(checkpoint), device="cpu",
                                  runtime=runtime, offline=True), environ={})
    model = create_model(variant, checkpoint, "cpu", runtime)
    assert model.runtime == {"sam2": "onnx", "sam3": "torch"}[name]
    assert identity_for(settings) == identity_for(settings, model)
    assert f":{model.runtime}:" in identity_for(settings)
