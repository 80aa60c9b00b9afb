"""The onnx runtime vs. the torch runtime on the same checkpoint, the export cache, the upscaler.

The torch runtime is the reference (tests/models/test_model_fidelity.py proves it pixel-identical to the
packages' SamPredictor). Graphs are exported once into ``<checkpoint dir>/onnx`` (the test weights
cache) and reused by later runs, exactly as in production.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading

import numpy as np
import pytest
import torch

from sam_backend.models import onnx_export
from sam_backend.models.base import Embedding, Prompt
from sam_backend.models.onnx_export import OnnxExportError, checkpoint_sha256, graph_path
from sam_backend.models.onnx_runtime import OnnxSamModel, mask_iou, upscale_logits, upscale_mask
from sam_backend.models.registry import get_variant
from sam_backend.models.families import choose_runtime
from sam_backend.models.runtimes import create_model
from sam_backend.models.torch_runtime import TorchSamModel

pytestmark = pytest.mark.usefixtures("release_memory")

# (H, W): 4:3 landscape, wide 12:5, tall 5:12, and an odd size
IMAGE_SIZES = [(480, 640), (300, 720), (720, 300), (333, 517)]

_MODELS = {}


def models(model_name, sam_config, checkpoint_factory):
    """(onnx, torch) runtimes of one random-weight checkpoint, built once per test session."""
    key = (model_name, sam_config)
    if key not in _MODELS:
        path = checkpoint_factory(model_name, sam_config)
        variant = get_variant(model_name, sam_config)
        _MODELS[key] = (OnnxSamModel(variant, path, "cpu"),
                        TorchSamModel(variant, str(path), "cpu"))
    return _MODELS[key]


def prompts_for(h, w):
    return {
        "single point": Prompt(np.array([[w * 0.4, h * 0.5]]), np.array([1])),
        "another single point": Prompt(np.array([[w * 0.75, h * 0.25]]), np.array([1])),
        "points with a negative": Prompt(np.array([[w * 0.4, h * 0.5], [w * 0.6, h * 0.3],
                                                   [w * 0.2, h * 0.8]]), np.array([1, 1, 0])),
        "box": Prompt(box=np.array([w * 0.1, h * 0.2, w * 0.7, h * 0.9])),
        "box and a point": Prompt(np.array([[w * 0.5, h * 0.5]]), np.array([0]),
                                  box=np.array([w * 0.2, h * 0.1, w * 0.9, h * 0.8])),
    }


def compare(got, want, what):
    h, w = want.mask.shape
    assert got.mask.shape == (h, w) and got.mask.dtype == np.bool_, what
    iou = mask_iou(got.mask, want.mask)
    assert iou >= 0.99, f"{what}: mask IoU {iou:.5f}"
    assert got.score == pytest.approx(want.score, abs=1e-3), what
    assert got.low_res_logits.shape == (1, 256, 256) and got.low_res_logits.dtype == np.float32
    # the same mask token was chosen: the logits agree to rounding, not just the thresholded mask
    scale = 1.0 + float(np.abs(want.low_res_logits).max())
    assert np.abs(got.low_res_logits - want.low_res_logits).max() <= 1e-3 * scale, what
    return iou


def check_fidelity(model_name, sam_config, checkpoint_factory, image_factory):
    ours, reference = models(model_name, sam_config, checkpoint_factory)
    ious = []
    for h, w in IMAGE_SIZES:
        image = image_factory(h, w, seed=h + w)
        embedding = ours.embed(image)
        ref_embedding = reference.embed(image)
        assert embedding.original_size == ref_embedding.original_size == (h, w)
        assert tuple(embedding.input_size) == tuple(ref_embedding.input_size)
        features = ref_embedding.image_embedding.numpy()
        assert np.abs(embedding.image_embedding - features).max() <= 1e-3 * np.abs(features).max()
        for name, prompt in prompts_for(h, w).items():
            what = f"{model_name}/{sam_config} {h}x{w} {name}"
            want = reference.decode(ref_embedding, prompt)
            got = ours.decode(embedding, prompt)
            ious.append(compare(got, want, what))
            if "point" in name and "box" not in name:
                assert 0 < want.mask.sum() < h * w, f"{what}: an uninformative mask proves little"
        # a repeated click: the previous low-res logits fed back as mask input
        prompt = prompts_for(h, w)["points with a negative"]
        previous = reference.decode(ref_embedding, prompt)
        again = Prompt(prompt.points, prompt.labels, None, previous.low_res_logits)
        ious.append(compare(ours.decode(embedding, again), reference.decode(ref_embedding, again),
                            f"{model_name}/{sam_config} {h}x{w} repeated click"))
    return min(ious)


@pytest.mark.parametrize("model_name,sam_config", [("mobile_sam", "vit_t"),
                                                   ("sam_hq", "vit_tiny")])
def test_onnx_matches_torch(model_name, sam_config, checkpoint_factory, image_factory):
    check_fidelity(model_name, sam_config, checkpoint_factory, image_factory)


class FakeDecoderSession:
    """Stands in for the decoder graph: returns given (masks, iou) whatever the prompt."""

    def __init__(self, masks, iou):
        self.outputs = [masks, iou]

    def run(self, names, feed):
        return self.outputs


@pytest.mark.parametrize("model_name,sam_config", [("mobile_sam", "vit_t"),
                                                   ("sam_hq", "vit_tiny")])
def test_mask_choice_is_the_torch_decoders(model_name, sam_config, checkpoint_factory,
                                           image_factory, monkeypatch):
    """Given the same ``predict_masks`` output (every token's logits and IoU predictions), the
    onnx runtime keeps exactly the mask and score that MaskDecoder.forward /
    MaskDecoderHQ.forward (hq_token_only=False) keep, for the 3-mask and the 1-mask policy.
    (With random weights the real decoders nearly always prefer the same token, so the choice
    is exercised here on IoU predictions that put the best token everywhere.)"""
    ours, reference = models(model_name, sam_config, checkpoint_factory)
    hq = model_name == "sam_hq"
    h, w = 120, 160
    ref_embedding = reference.embed(image_factory(h, w, seed=1))
    stub = Embedding(np.zeros((1, 256, 64, 64), np.float32), (h, w), ref_embedding.input_size,
                     hq_features=np.zeros((1, 32, 256, 256), np.float32) if hq else None)
    single = Prompt(np.array([[50.0, 60.0]]), np.array([1]))
    several = Prompt(np.array([[50.0, 60.0], [100.0, 30.0]]), np.array([1, 0]))
    rng = np.random.default_rng(0)
    tokens = 5 if hq else 4
    chosen = set()
    for trial in range(12):
        masks = rng.normal(0, 4, (1, tokens, 256, 256)).astype(np.float32)
        iou = rng.uniform(0, 1, (1, 4)).astype(np.float32)
        if trial == 0:
            iou[0, 1:] = 0.5  # a tie: the first of the tied tokens wins in both
        monkeypatch.setattr(ours, "decoder", FakeDecoderSession(masks, iou))
        monkeypatch.setattr(reference.sam.mask_decoder, "predict_masks",
                            lambda **kwargs: (torch.from_numpy(masks), torch.from_numpy(iou)))
        for prompt in (single, several):
            # one decode contract: the same candidates (K logits and scores) from both runtimes
            got = ours.decode_low_res(stub, prompt)
            want = reference.decode_low_res(ref_embedding, prompt)
            assert got.logits.shape == want.logits.shape and got.logits.dtype == np.float32
            assert np.array_equal(got.logits, want.logits)
            assert np.array_equal(got.scores, want.scores)
            assert got.best() == want.best()
            if prompt is single:
                chosen.add(int(np.argmax(iou[0, 1:])))
    assert chosen == {0, 1, 2}


def test_embeddings_of_other_dtypes_decode(checkpoint_factory, image_factory):
    """A cache may hand back the features as float16 numpy or torch tensors."""
    ours, _ = models("mobile_sam", "vit_t", checkpoint_factory)
    image = image_factory(300, 400, seed=3)
    embedding = ours.embed(image)
    prompt = Prompt(np.array([[150.0, 120.0]]), np.array([1]))
    want = ours.decode(embedding, prompt)
    as_torch = embedding.map_arrays(torch.from_numpy)
    assert np.array_equal(ours.decode(as_torch, prompt).mask, want.mask)
    as_half = embedding.to_float16()
    assert mask_iou(ours.decode(as_half, prompt).mask, want.mask) >= 0.99


def test_sessions_serve_concurrent_threads(checkpoint_factory, image_factory):
    ours, _ = models("mobile_sam", "vit_t", checkpoint_factory)
    image = image_factory(240, 320, seed=5)
    embedding = ours.embed(image)
    prompts = [Prompt(np.array([[30.0 + 20 * i, 40.0 + 15 * i]]), np.array([1]))
               for i in range(8)]
    expected = [ours.decode(embedding, p).mask for p in prompts]
    results = {}

    def work(i):
        results[i] = ours.decode(embedding, prompts[i]).mask

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(results[i], expected[i]) for i in range(len(prompts)))


# -- the export cache ----------------------------------------------------------------------------
def test_export_is_cached_next_to_the_weights_and_reused(checkpoint_factory, tmp_path,
                                                         monkeypatch, caplog):
    weights = tmp_path / "weights"
    weights.mkdir()
    checkpoint = weights / "mobile_sam.pt"
    shutil.copy(checkpoint_factory("mobile_sam", "vit_t"), checkpoint)
    variant = get_variant("mobile_sam", "vit_t")

    def exports():  # the record each export writes
        return sorted(r.getMessage().split()[2] for r in caplog.records
                      if r.name == onnx_export.__name__ and r.getMessage().startswith("exported the"))

    caplog.set_level(logging.INFO, logger=onnx_export.__name__)
    first = OnnxSamModel(variant, checkpoint, "cpu", validate=False)
    assert sorted(first.exported) == ["decoder", "encoder"] == exports()
    digest = checkpoint_sha256(checkpoint)
    onnx_dir = weights / "onnx"
    assert first.onnx_dir == onnx_dir
    files = {part: onnx_dir / f"{digest[:16]}-mobile_sam-vit_t-{part}.onnx"
             for part in ("encoder", "decoder")}
    assert all(p.is_file() for p in files.values())
    assert files["encoder"] == graph_path(onnx_dir, digest, variant, "encoder")
    assert not [p for p in onnx_dir.iterdir() if p.name.endswith(".tmp") or p.is_dir()]
    mtimes = {part: p.stat().st_mtime_ns for part, p in files.items()}
    caplog.clear()

    # a second start: no export, not even a torch model
    def no_torch(self):
        raise AssertionError("a cached export must not load the torch model")

    monkeypatch.setattr(OnnxSamModel, "torch_model", no_torch)
    monkeypatch.setattr(onnx_export, "sha256_of",
                        lambda path: pytest.fail("the digest must come from the sidecar"))
    second = OnnxSamModel(variant, checkpoint, "cpu")
    assert second.exported == [] and exports() == []
    assert {part: p.stat().st_mtime_ns for part, p in files.items()} == mtimes
    image = np.zeros((64, 96, 3), np.uint8)
    prompt = Prompt(np.array([[40.0, 30.0]]), np.array([1]))
    a, b = first.embed(image), second.embed(image)
    assert np.array_equal(first.decode(a, prompt).mask, second.decode(b, prompt).mask)



def test_explicit_weights_dir_and_stale_format(checkpoint_factory, tmp_path, monkeypatch):
    """``weights_dir`` places the cache; a graph of another format version is re-exported."""
    path = checkpoint_factory("mobile_sam", "vit_t")
    variant = get_variant("mobile_sam", "vit_t")
    cached, _ = models("mobile_sam", "vit_t", checkpoint_factory)
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    # reuse the session's encoder export, so that only the decoder is exported here
    shutil.copy(cached.paths["encoder"], onnx_dir / cached.paths["encoder"].name)
    model = OnnxSamModel(variant, path, "cpu", weights_dir=tmp_path, validate=False)
    assert model.onnx_dir == onnx_dir and model.exported == ["decoder"]
    monkeypatch.setattr(onnx_export, "FORMAT_VERSION", "0-older")
    again = OnnxSamModel(variant, path, "cpu", weights_dir=tmp_path, validate=False)
    assert sorted(again.exported) == ["decoder", "encoder"]


def test_checkpoint_digest_is_remembered_by_size_and_mtime(tmp_path, monkeypatch):
    checkpoint = tmp_path / "x.pth"
    checkpoint.write_bytes(b"abc" * 1000)
    sidecar = tmp_path / "sums.json"
    digest = checkpoint_sha256(checkpoint, sidecar)
    import hashlib

    assert digest == hashlib.sha256(b"abc" * 1000).hexdigest()
    calls = []
    real = onnx_export.sha256_of
    monkeypatch.setattr(onnx_export, "sha256_of", lambda p: calls.append(p) or real(p))
    assert checkpoint_sha256(checkpoint, sidecar) == digest and calls == []
    checkpoint.write_bytes(b"abd" * 1000)  # same size, new content and mtime
    os.utime(checkpoint, ns=(1, 10 ** 18))
    assert checkpoint_sha256(checkpoint, sidecar) == hashlib.sha256(b"abd" * 1000).hexdigest()
    assert len(calls) == 1


def test_a_wrong_export_is_rejected_and_torch_takes_over(checkpoint_factory, tmp_path,
                                                         monkeypatch, caplog):
    """The fresh-export check catches a graph that disagrees with torch; create_model then
    falls back to the torch runtime and says why."""
    cached, _ = models("mobile_sam", "vit_t", checkpoint_factory)
    weights = tmp_path / "w"
    (weights / "onnx").mkdir(parents=True)
    checkpoint = weights / "mobile_sam.pt"
    shutil.copy(checkpoint_factory("mobile_sam", "vit_t"), checkpoint)
    shutil.copy(cached.paths["encoder"], weights / "onnx" / cached.paths["encoder"].name)
    real = onnx_export._decoder_module

    def broken(sam, hq):  # an exporter bug: negative and positive labels swapped
        module = real(sam, hq)
        embed_points = module.embed_points
        module.embed_points = lambda coords, labels: embed_points(
            coords, torch.where(labels == 0, torch.ones_like(labels),
                                torch.where(labels == 1, torch.zeros_like(labels), labels)))
        return module

    monkeypatch.setattr(onnx_export, "_decoder_module", broken)
    variant = get_variant("mobile_sam", "vit_t")
    with pytest.raises(OnnxExportError, match="differ from torch"):
        OnnxSamModel(variant, checkpoint, "cpu")
    assert not list((weights / "onnx").glob("*decoder*"))  # nothing wrong is left cached
    with caplog.at_level(logging.WARNING, logger="sam_backend.models"):
        model = create_model(variant, checkpoint, "cpu", runtime="onnx")
    assert isinstance(model, TorchSamModel)
    assert "running it with torch" in caplog.text and "differ from torch" in caplog.text


def test_no_export_without_the_memory_for_it(checkpoint_factory, tmp_path, monkeypatch,
                                             caplog):
    """Exporting needs several copies of the weights in memory (vit_h: ~25 GB); without that
    much available the torch runtime runs instead of the process being killed mid-export."""
    checkpoint = tmp_path / "mobile_sam.pt"
    shutil.copy(checkpoint_factory("mobile_sam", "vit_t"), checkpoint)
    monkeypatch.setattr(onnx_export, "available_memory", lambda: 500 * 2 ** 20)
    variant = get_variant("mobile_sam", "vit_t")
    with caplog.at_level(logging.WARNING, logger="sam_backend.models"):
        model = create_model(variant, checkpoint, "cpu", runtime="onnx")
    assert isinstance(model, TorchSamModel)
    assert "free memory" in caplog.text
    assert onnx_export.export_memory_needed(2_564_550_879) > 24e9  # vit_h


def test_runtime_selection(checkpoint_factory):
    assert choose_runtime(get_variant("mobile_sam", "vit_t"), "cpu") == "onnx"
    assert choose_runtime(get_variant("sam_hq", "vit_tiny"), "cpu") == "onnx"
    assert choose_runtime(get_variant("sam", "vit_h"), "cpu") == "torch"
    path = checkpoint_factory("mobile_sam", "vit_t")
    variant = get_variant("mobile_sam", "vit_t")
    model = create_model(variant, path, "cpu", runtime="auto")
    assert isinstance(model, OnnxSamModel) and model.runtime == "onnx"
    assert model.describe() == "mobile_sam/vit_t (onnx, cpu)"
    assert isinstance(create_model(variant, path, "cpu", runtime="torch"), TorchSamModel)


# -- upscaling -----------------------------------------------------------------------------------
def torch_postprocess(low_res, input_size, original_size):
    from torch.nn import functional as F

    masks = torch.from_numpy(low_res)[None, None]
    masks = F.interpolate(masks, (1024, 1024), mode="bilinear", align_corners=False)
    masks = masks[..., :input_size[0], :input_size[1]]
    masks = F.interpolate(masks, original_size, mode="bilinear", align_corners=False)
    return masks[0, 0].numpy()


def random_logits(seed):
    """Low-res logits with structure at several scales (like real ones) plus noise."""
    import cv2

    rng = np.random.default_rng(seed)
    coarse = cv2.resize(rng.normal(0, 8, (16, 16)).astype(np.float32), (256, 256),
                        interpolation=cv2.INTER_CUBIC)
    return (coarse + rng.normal(0, 1, (256, 256))).astype(np.float32)


@pytest.mark.parametrize("height,width", [(2160, 3840), (1080, 1920), (480, 640), (720, 300),
                                          (333, 517), (1024, 1024), (100, 3000), (7, 5)])
def test_upscale_matches_torch_postprocess(height, width):
    """OpenCV's bilinear resizes vs. Sam.postprocess_masks: same logits up to float rounding
    (OpenCV places samples in double precision, torch in float32), so only pixels whose logit
    is within ~1e-3 of the threshold may differ."""
    from segment_anything.utils.transforms import ResizeLongestSide

    input_size = ResizeLongestSide.get_preprocess_shape(height, width, 1024)
    for seed in range(3):
        low_res = random_logits(seed)
        want = torch_postprocess(low_res, input_size, (height, width))
        got = upscale_logits(low_res, input_size, (height, width))
        assert got.shape == (height, width) and got.dtype == np.float32
        assert np.abs(got - want).max() <= 1e-3
        mask = upscale_mask(low_res[None], input_size, (height, width))
        differ = mask != (want > 0)
        assert differ.sum() <= max(2, 1e-5 * height * width)
        # every differing pixel is one whose logit is (almost) exactly at the threshold
        assert np.all(np.abs(want[differ]) <= 1e-3)
        assert mask_iou(mask, want > 0) >= 0.9999


def test_upscale_computes_only_the_cropped_part_exactly():
    """Upscaling only the low-res rows/columns the crop reads gives the full upscale's crop."""
    import cv2

    low_res = random_logits(9)
    for h, w in [(576, 1024), (1024, 427), (1024, 68), (660, 1024), (1, 1024), (1024, 1024)]:
        full = cv2.resize(low_res, (1024, 1024), interpolation=cv2.INTER_LINEAR)[:h, :w]
        assert np.array_equal(upscale_logits(low_res, (h, w), (h, w)), full)


# -- writing graphs ------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["inline", "one data file", "a file per tensor"])
def test_graphs_are_written_atomically_with_their_weights(tmp_path, layout):
    """Graphs over 2 GB (vit_h's encoder) keep their weights outside the .onnx: the TorchScript
    exporter writes a file per tensor, the dynamo exporter one ``<name>.data``. Either way the
    cache ends up with ``<name>.onnx`` + at most ``<name>.onnx.data``, moved in place last."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(64, 32)).astype(np.float32)
    bias = rng.normal(size=(32,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]),
         helper.make_node("Add", ["xw", "b"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    final = tmp_path / "abc-mobile_sam-vit_t-encoder.onnx"

    def export(path):
        if layout == "inline":
            onnx.save_model(model, str(path))
        else:
            one = layout == "one data file"
            onnx.save_model(model, str(path), save_as_external_data=True,
                            all_tensors_to_one_file=one,
                            location=path.name + ".data" if one else None, size_threshold=0)
        return "test"

    onnx_export.write_graph(final, export, lambda exporter: {"format": "x", "by": exporter})
    names = sorted(p.name for p in tmp_path.iterdir())
    expected = [final.name] + ([] if layout == "inline" else [final.name + ".data"])
    assert names == sorted(expected)
    session = ort.InferenceSession(str(final), providers=["CPUExecutionProvider"])
    x = rng.normal(size=(1, 64)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weight + bias, rtol=1e-5)
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["sam_backend.format"] == "x" and meta["sam_backend.by"] == "test"


# Last in the file: the vit_b models and sessions use up to ~17 GB while they run.
@pytest.mark.slow
@pytest.mark.parametrize("model_name,sam_config", [("sam", "vit_b"), ("sam_hq", "vit_b")])
def test_onnx_matches_torch_vit_b(model_name, sam_config, checkpoint_factory, image_factory):
    check_fidelity(model_name, sam_config, checkpoint_factory, image_factory)
