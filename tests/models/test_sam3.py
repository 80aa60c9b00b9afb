"""SAM 3 (model_name=sam3) over HTTP: `label-studio-ml start sam --with model_name=sam3 device=cpu`
with a local checkpoint directory answers clicks, Alt-clicks and boxes with the masks of
transformers' own interactive pipeline (Sam3TrackerProcessor -> Sam3TrackerModel ->
post_process_masks) on the same random weights; checkpoint layouts; the weights command through a
loopback model hub, including a refused (gated) download.

The fast suite uses a reduced configuration of the same classes (a 2-layer, 32-wide ViT; the
published input size, FPN, prompt encoder and mask decoder); the full size runs in the slow lane
(tests/models/test_sam3_full.py).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
import requests
import torch

from tests.support.fake_hub import FakeHub
from tests.support.random_weights import synthetic_image, write_synthetic_images
from sam_backend.models.registry import get_variant
from tests.support.server_utils import REPO, BackendProcess, free_port
from tests.support.payloads import FULL_CONFIG, decode_brush, keypoint, payload, rectangle

# two aspect ratios: landscape and portrait (the processor squashes both to 1008x1008)
SIZES = {"landscape": (360, 540), "portrait": (500, 300)}


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights_root(official_dir, tmp_path_factory):
    """A weights directory whose ``sam3/`` is the click model alone, as the library saves it
    (Sam3TrackerModel.save_pretrained): the library's own from_pretrained reads it."""
    from sam_backend.models.sam3_runtime import load_click_model

    root = tmp_path_factory.mktemp("weights")
    load_click_model(get_variant("sam3"), official_dir).save_pretrained(str(root / "sam3"))
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("docroot")
    return root, write_synthetic_images(root, SIZES)


@pytest.fixture(scope="module")
def backend(weights_root, images, tmp_path_factory):
    """Started the way a user starts it: model_name=sam3 device=cpu; the checkpoint is the
    default weights/sam3 directory (offline: nothing may be downloaded)."""
    port = free_port()
    env = {"LOCAL_FILES_DOCUMENT_ROOT": str(images[0]), "SAM_BACKEND_WEIGHTS_DIR": str(weights_root),
           "SAM_BACKEND_OFFLINE": "1", "EMBEDDING_DTYPE": "float32",
           "SAM_BACKEND_IMAGE_CACHE_DIR": str(tmp_path_factory.mktemp("imgcache"))}
    process = BackendProcess(
        ["label-studio-ml", "start", "sam", "--with", "model_name=sam3", "device=cpu",
         "-p", str(port), "--host", "127.0.0.1"],
        port, env, tmp_path_factory.mktemp("logs") / "backend.log")
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def library(weights_root):
    """transformers' own pipeline on the same directory, loaded by the library itself."""
    from transformers import Sam3ImageProcessor, Sam3TrackerModel, Sam3TrackerProcessor

    model, info = Sam3TrackerModel.from_pretrained(str(weights_root / "sam3"),
                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # the directory has no processor config: the library's defaults (1008 px, mean = std = 0.5)
    return model.eval(), Sam3TrackerProcessor(Sam3ImageProcessor())


class LibraryClicks:
    """The library's interactive recipe on one image: encode once (get_image_embeddings), then
    per prompt the processor's coordinates, the model with ``image_embeddings`` (and the previous
    low-res logits as ``input_masks``), the best of the masks by predicted IoU, and
    ``post_process_masks``."""

    def __init__(self, library, image):
        self.model, self.processor = library
        inputs = self.processor(images=image, return_tensors="pt")
        self.original_sizes = inputs["original_sizes"]
        with torch.no_grad():
            self.embeddings = self.model.get_image_embeddings(inputs["pixel_values"])

    def predict(self, points=(), labels=(), box=None, previous=None):
        kwargs = {}
        if len(points):
            kwargs.update(input_points=[[list(map(list, points))]], input_labels=[[list(labels)]])
        if box is not None:
            kwargs["input_boxes"] = [[list(box)]]
        inputs = self.processor(original_sizes=self.original_sizes, return_tensors="pt", **kwargs)
        inputs.pop("original_sizes")
        with torch.no_grad():
            out = self.model(image_embeddings=self.embeddings, input_masks=previous,
                             multimask_output=len(points) == 1 and box is None, **inputs)
        best = int(out.iou_scores[0, 0].argmax())
        logits = out.pred_masks[:, 0, best:best + 1]  # 1x1x288x288, fed back on the next click
        mask = self.processor.post_process_masks(out.pred_masks[:, :, best:best + 1],
                                                 self.original_sizes)[0][0, 0].numpy()
        return mask, float(out.iou_scores[0, 0, best]), logits


def click(x, y, size, positive=True):
    h, w = size
    return dict(keypoint(x, y, positive=positive), original_width=w, original_height=h)


def box(x, y, bw, bh, size):
    h, w = size
    return dict(rectangle(x, y, bw, bh), original_width=w, original_height=h)


def ask(backend, regions, name):
    body = payload(regions, FULL_CONFIG, data={"image": f"/data/local-files/?d={name}.png"},
                   task_id=zlib.crc32(name.encode()) % 100000)
    response = requests.post(backend.url + "/predict", json=body, timeout=300)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    brush = [r for r in result["result"] if r["type"] == "brushlabels"]
    assert len(brush) == 1
    return decode_brush(brush[0]), result["score"]


def pixels(percent_points, size):
    h, w = size
    return [(x * (w / 100.0), y * (h / 100.0)) for x, y in percent_points]


# -- over HTTP -----------------------------------------------------------------------------------
@pytest.mark.process
def test_health_names_sam3(backend):
    body = requests.get(backend.url + "/health", timeout=5).json()
    assert body["status"] == "UP"
    assert body["model"] == "sam3/default"
    assert body["runtime"] == "torch" and body["device"] == "cpu"


@pytest.mark.process
@pytest.mark.parametrize("name", list(SIZES))
def test_clicks_and_a_box_match_the_library_pipeline(name, backend, library, images):
    size = SIZES[name]
    reference = LibraryClicks(library, images[1][name])

    # one point: the best of three candidates
    first = [(30.0, 40.0)]
    got, score = ask(backend, [click(*first[0], size)], name)
    want, want_score, logits = reference.predict(pixels(first, size), [1])
    assert got.shape == size
    assert np.array_equal(got, want)
    assert score == pytest.approx(want_score, abs=1e-5)

    # then an Alt-click (negative): the previous low-res logits go back in as input_masks
    second = first + [(65.0, 55.0)]
    got2, score2 = ask(backend, [click(*first[0], size), click(*second[1], size, positive=False)],
                       name)
    want2, want_score2, _ = reference.predict(pixels(second, size), [1, 0], previous=logits)
    assert np.array_equal(got2, want2)
    assert score2 == pytest.approx(want_score2, abs=1e-5)
    # the test tells the two apart: without the fed-back logits the mask differs
    fresh, _, _ = reference.predict(pixels(second, size), [1, 0])
    assert not np.array_equal(fresh, want2)

    # a box (Smart Rectangle)
    got3, score3 = ask(backend, [box(10.0, 20.0, 50.0, 60.0, size)], name)
    h, w = size
    want3, want_score3, _ = reference.predict(
        box=(10.0 * (w / 100.0), 20.0 * (h / 100.0), 60.0 * (w / 100.0), 80.0 * (h / 100.0)))
    assert np.array_equal(got3, want3)
    assert score3 == pytest.approx(want_score3, abs=1e-5)


@pytest.mark.process
def test_the_image_is_encoded_once_for_all_clicks(backend):
    metrics = requests.get(backend.url + "/metrics", timeout=5).json()
    # two images, six answered prompts: two encodes, the rest are cache hits
    assert metrics["embedding_cache_misses"] == len(SIZES)
    assert metrics["embedding_cache_hits"] >= 2 * len(SIZES)
    # float32 here (EMBEDDING_DTYPE): 21.2 MB per image whatever its size
    assert metrics["embedding_cache_bytes"] == len(SIZES) * 4 * (256 * 72 * 72 + 32 * 288 * 288
                                                                 + 64 * 144 * 144)


# -- checkpoint layouts --------------------------------------------------------------------------
def test_the_official_layout_loads_as_the_library_wires_it(official_dir):
    """facebook/sam3 is a Sam3VideoModel: one ViT backbone (under detector_model.) shared by the
    concept model and the click model, each with its own FPN neck. Our strict loading of the
    click model equals how Sam3VideoModel itself wires its tracker, and the concept model
    (Sam3Model, read by the library) has the very same backbone tensors."""
    from transformers import Sam3Model, Sam3VideoModel

    from sam_backend.models.sam3_runtime import load_click_model

    ours = load_click_model(get_variant("sam3"), official_dir).state_dict()
    video = Sam3VideoModel.from_pretrained(str(official_dir)).eval()
    wired = {**{f"vision_encoder.backbone.{k}": v
                for k, v in video.detector_model.vision_encoder.backbone.state_dict().items()},
             **{f"vision_encoder.neck.{k}": v for k, v in video.tracker_neck.state_dict().items()},
             **video.tracker_model.state_dict()}
    assert all(torch.equal(ours[k], wired[k]) for k in ours)
    assert len(ours) > 100
    concept, info = Sam3Model.from_pretrained(str(official_dir), output_loading_info=True)
    assert not info["missing_keys"]
    for k, v in concept.vision_encoder.backbone.state_dict().items():
        assert torch.equal(v, ours[f"vision_encoder.backbone.{k}"]), k
    # ... while the necks differ (the click model has its own)
    assert not torch.equal(concept.vision_encoder.neck.fpn_layers[0].proj1.weight,
                           ours["vision_encoder.neck.fpn_layers.0.proj1.weight"])


def test_a_bad_checkpoint_directory_is_refused_with_what_to_do(official_dir, tmp_path):
    from sam_backend.errors import CheckpointError
    from sam_backend.models.sam3_runtime import load_click_model

    variant = get_variant("sam3")
    with pytest.raises(CheckpointError, match="not a directory.*hub-format"):
        load_click_model(variant, official_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_click_model(variant, tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(official_dir, broken)
    size = (broken / "model.safetensors").stat().st_size
    with open(broken / "model.safetensors", "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        load_click_model(variant, broken)


# -- the weights command through a loopback hub --------------------------------------------------
@pytest.fixture
def hub(official_dir):
    server = FakeHub()
    server.add_repo("facebook/sam3", official_dir, gated=True, token="hf_granted")
    server.start()
    yield server
    server.stop()


def weights_cli(args, hub, tmp_path, token=None):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "SAM_BACKEND_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"),
               SAM_BACKEND_WEIGHTS_DIR=str(tmp_path / "weights"),
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "sam_backend.cli", "weights", *args], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)


@pytest.mark.process
def test_weights_download_sam3_through_a_hub_mirror(hub, official_dir, tmp_path):
    done = weights_cli(["download", "sam3"], hub, tmp_path, token="hf_granted")
    assert done.returncode == 0, done.stderr
    dest = tmp_path / "weights" / "sam3"
    assert f"sam3/default: {dest}" in done.stdout
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]
    assert (dest / "model.safetensors").read_bytes() == \
        (official_dir / "model.safetensors").read_bytes()
    assert "100%" in done.stderr  # huggingface_hub's progress
    assert any(r.startswith("GET /facebook/sam3/resolve/") for r in hub.requests)
    # nothing else in the weights dir, nothing in the user's hub cache
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["sam3"]
    assert not (tmp_path / "hf-home" / "hub").exists()
    listing = weights_cli(["list"], hub, tmp_path)
    line = next(x for x in listing.stdout.splitlines() if x.startswith("sam3/default"))
    assert "yes," in line and "https://huggingface.co/facebook/sam3" in line


@pytest.mark.process
@pytest.mark.parametrize("token", [None, "hf_not_approved"])
def test_a_refused_gated_download_says_what_to_do_and_leaves_nothing(token, hub, tmp_path):
    done = weights_cli(["download", "sam3"], hub, tmp_path, token=token)
    assert done.returncode == 2
    message = done.stderr
    assert "access to facebook/sam3 was refused" in message
    assert "request access on https://huggingface.co/facebook/sam3" in message
    assert "export HF_TOKEN=" in message
    assert ("HF_TOKEN is not set" if token is None else "that token was refused") in message
    assert "hf_not_approved" not in message  # tokens never appear in messages
    assert "Traceback" not in message
    weights = tmp_path / "weights"
    assert not weights.exists() or not any(weights.iterdir())
    assert not (tmp_path / "hf-home" / "hub").exists()


def test_one_cached_image_state_serves_the_concept_model_too(official_dir):
    """With keep_vision_state the embedding also holds the shared backbone's output; the concept
    model's vision features (Sam3Model.get_vision_features, the library's own call) are its FPN
    neck applied to that output: no second encoder run for concept prompts on a clicked image."""
    from transformers import Sam3Model

    from sam_backend.models.base import Prompt
    from sam_backend.models.sam3_runtime import Sam3ClickModel

    image = synthetic_image(200, 320, seed=9)
    clicks = Sam3ClickModel(get_variant("sam3"), official_dir, "cpu", keep_vision_state=True)
    embedding = clicks.embed(image)
    backbone = embedding.vision_state  # 1x5184xC: the ViT's last hidden state
    assert backbone.shape[:2] == (1, 72 * 72)
    # clicks still decode from the same embedding
    assert clicks.decode(embedding, Prompt(np.array([[50.0, 60.0]]), np.array([1]))).mask.shape \
        == (200, 320)

    concept = Sam3Model.from_pretrained(str(official_dir)).eval()
    with torch.no_grad():
        want = concept.get_vision_features(pixel_values=clicks.pixel_values(image))
        spatial = backbone.view(1, 72, 72, -1).permute(0, 3, 1, 2)
        got, _ = concept.vision_encoder.neck(spatial)
    assert torch.equal(backbone, want.last_hidden_state)
    for level_got, level_want in zip(got, want.fpn_hidden_states):
        assert torch.equal(level_got, level_want)
