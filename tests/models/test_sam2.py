"""SAM 2.1 (``model_name=sam2``): the backend, started the way users start it, answers exactly the
masks of the official ``SAM2ImagePredictor`` on the same (seeded random) weights; the weights
command knows, downloads and verifies the SAM 2 files; the registry recognises them by name."""
from __future__ import annotations

import numpy as np
import pytest
import requests

from sam_backend.models.checkpoints import infer_variant
from sam_backend.models.download import download
from sam_backend.cli import main
from sam_backend.errors import CheckpointError
from sam_backend.models.loading import load_model
from sam_backend.models.base import Prompt
from sam_backend.models.registry import VARIANTS, get_variant
from sam_backend.models.runtimes import create_model
from tests.support.server_utils import BackendProcess, free_port
from tests.support.payloads import decode_brush, payload
from tests.support.payloads import keypoint as server_keypoint
from tests.support.payloads import rectangle as server_rectangle
from tests.models.test_weights import leftovers, mirror, sha256_of, weights_dir  # noqa: F401 (fixture)

TINY = get_variant("sam2", "hiera_tiny")
SIZES = {"wide": (360, 540), "tall": (480, 300)}  # two aspect ratios (H, W)


@pytest.fixture(scope="module")
def docroot(tmp_path_factory):
    from tests.support.random_weights import write_synthetic_images

    root = tmp_path_factory.mktemp("docroot")
    return root, write_synthetic_images(root, SIZES)


@pytest.fixture(scope="module", params=["torch", "auto"])
def backend(request, sam2_file, docroot, tmp_path_factory):
    """The backend with runtime=torch, and with the default runtime (onnxruntime decoder)."""
    port = free_port()
    env = {"LOCAL_FILES_DOCUMENT_ROOT": str(docroot[0]),
           "SAM_BACKEND_IMAGE_CACHE_DIR": str(tmp_path_factory.mktemp("imgcache"))}
    process = BackendProcess(
        ["label-studio-ml", "start", "sam", "--with", "model_name=sam2", "sam_config=hiera_tiny",
         f"sam_checkpoint_file={sam2_file}", "device=cpu", "embedding_dtype=float32",
         f"runtime={request.param}", "-p", str(port), "--host", "127.0.0.1"],
        port, env, tmp_path_factory.mktemp("logs") / "backend.log")
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def predictor(sam2_file):
    """The library's own predictor, built and loaded by the library's own code."""
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", str(sam2_file), device="cpu")
    return SAM2ImagePredictor(model)


def reference(predictor, points, labels, box=None, mask_input=None):
    """SAM2ImagePredictor.predict with this backend's multimask policy (one point and no box:
    3 candidates, the highest predicted IoU wins): (mask HxW bool, score, logits 1x256x256)."""
    multimask = len(points) == 1 and box is None
    masks, scores, logits = predictor.predict(
        point_coords=np.array(points, np.float32) if points else None,
        point_labels=np.array(labels) if points else None,
        box=None if box is None else np.array(box, np.float32),
        mask_input=mask_input, multimask_output=multimask)
    best = int(np.argmax(scores))
    return masks[best] > 0, float(scores[best]), logits[best:best + 1]


def sized(region, name):
    """test_server's region dict for the image ``name`` (its own size)."""
    h, w = SIZES[name]
    return dict(region, original_width=w, original_height=h)


def keypoint(name, x, y, positive=True):
    return sized(server_keypoint(x, y, positive=positive), name)


def rectangle(name, x, y, w, h):
    return sized(server_rectangle(x, y, w, h), name)


def ask(backend, name, regions):
    body = payload(regions, data={"image": f"/data/local-files/?d={name}.png"})
    response = requests.post(backend.url + "/predict", json=body, timeout=120)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    brush = [r for r in result["result"] if r["type"] == "brushlabels"]
    assert len(brush) == 1
    return decode_brush(brush[0]), result["score"]


@pytest.mark.process
def test_health_names_the_sam2_variant_and_runtime(backend):
    body = requests.get(backend.url + "/health", timeout=5).json()
    assert body["model"] == "sam2/hiera_tiny"
    log = backend.log_path.read_text()
    if "runtime=auto" in backend.cmd:
        assert body["runtime"] == "onnx"  # the decoder; the encoder stays torch (logged)
        assert "decoder in onnxruntime (min mask IoU vs torch" in log
        assert "image encoder runs with torch" in log
    else:
        assert body["runtime"] == "torch"


def same(backend, mask, want):
    """torch: pixel for pixel; onnx decoder: mask IoU >= 0.99 (it matched exactly here)."""
    if "runtime=torch" in backend.cmd:
        return np.array_equal(mask, want)
    return (mask & want).sum() / (mask | want).sum() >= 0.99


@pytest.mark.process
@pytest.mark.parametrize("name", list(SIZES))
def test_masks_equal_sam2_image_predictor(backend, predictor, docroot, name):
    h, w = SIZES[name]
    predictor.set_image(docroot[1][name])

    # one positive click
    mask, score = ask(backend, name, [keypoint(name, 40.0, 50.0)])
    want, want_score, logits = reference(predictor, [[0.4 * w, 0.5 * h]], [1])
    assert same(backend, mask, want) and 0 < want.sum() < h * w
    assert score == pytest.approx(want_score, abs=1e-4)

    # then an Alt-click (negative): the previous prediction's low-res logits are fed back
    mask, score = ask(backend, name, [keypoint(name, 40.0, 50.0),
                                      keypoint(name, 70.0, 30.0, positive=False)])
    points, labels = [[0.4 * w, 0.5 * h], [0.7 * w, 0.3 * h]], [1, 0]
    want, want_score, _ = reference(predictor, points, labels, mask_input=logits)
    assert same(backend, mask, want)
    assert score == pytest.approx(want_score, abs=1e-4)
    fresh, _, _ = reference(predictor, points, labels)  # the test can tell feedback apart
    assert not np.array_equal(fresh, want)

    # a box
    mask, score = ask(backend, name, [rectangle(name, 10.0, 20.0, 50.0, 60.0)])
    want, want_score, _ = reference(predictor, [], [], box=[0.1 * w, 0.2 * h, 0.6 * w, 0.8 * h])
    assert same(backend, mask, want)
    assert score == pytest.approx(want_score, abs=1e-4)


def test_float16_cached_embedding_keeps_the_masks(sam2_file, docroot):
    """The cache stores float16 by default: masks stay within IoU 0.999 of float32 here."""
    model = create_model(TINY, sam2_file, "cpu", "auto")
    embedding = model.embed(docroot[1]["tall"])
    assert embedding.nbytes == 16 * 2 ** 20  # image_embed + two high-res maps, float32
    half = embedding.to_float16()
    assert half.nbytes == 8 * 2 ** 20
    h, w = SIZES["tall"]
    for prompt in (Prompt(np.array([[0.4 * w, 0.5 * h]]), np.array([1])),
                   Prompt(np.zeros((0, 2)), np.zeros(0), np.array([0.1 * w, 0.2 * h, 0.6 * w,
                                                                   0.8 * h]))):
        full = model.decode(embedding, prompt).mask
        approx = model.decode(half.to_float32(), prompt).mask
        assert (full & approx).sum() / (full | approx).sum() >= 0.999


def test_registry_names_and_file_recognition():
    keys = {v.key for v in VARIANTS.values() if v.model_name == "sam2"}
    assert keys == {f"sam2/{c}{s}" for c in ("hiera_tiny", "hiera_small", "hiera_base_plus",
                                             "hiera_large") for s in ("", "_v2.0")}
    assert get_variant("sam2").key == "sam2/hiera_tiny"
    assert TINY.url == "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt"
    old = infer_variant(checkpoint="/w/sam2_hiera_large.pt")
    assert old.key == "sam2/hiera_large_v2.0"
    assert old.url.endswith("/072824/sam2_hiera_large.pt")
    assert infer_variant(checkpoint="sam2.1_hiera_small.pt").key == "sam2/hiera_small"
    # SAM 2.0's file under its 2.1 config name: that file's layout is used
    assert infer_variant("sam2", "hiera_tiny", "sam2_hiera_tiny.pt").key == \
        "sam2/hiera_tiny_v2.0"


def test_wrong_sam2_file_is_refused_naming_the_right_config(sam2_file):
    with pytest.raises(CheckpointError, match="sam_config=hiera_tiny[^_]"):
        load_model(get_variant("sam2", "hiera_tiny_v2.0"), sam2_file)
    with pytest.raises(CheckpointError, match="sam_config=hiera_tiny[^_]"):
        load_model(get_variant("sam2", "hiera_small"), sam2_file)


def test_weights_download_verifies_and_lists_sam2(mirror, sam2_file, tmp_path, capsys):  # noqa: F811
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("sam2/hiera_tiny *"))
    assert "sam2.1_hiera_tiny.pt" in line and TINY.url in line
    assert "sam2_hiera_tiny.pt" in out

    mirror.files["sam2.1_hiera_tiny.pt"] = sam2_file
    mirror.sidecars["sam2.1_hiera_tiny.pt"] = sha256_of(sam2_file)
    assert main(["weights", "download", "sam2"]) == 0
    path = weights_dir(tmp_path) / "sam2.1_hiera_tiny.pt"
    assert sha256_of(path) == sha256_of(sam2_file)
    load_model(TINY, path)

    # a file of another config is refused by the strict load, and nothing is left behind
    mirror.files["sam2.1_hiera_small.pt"] = sam2_file
    with pytest.raises(CheckpointError, match="check 3"):
        download(get_variant("sam2", "hiera_small"))
    assert leftovers(tmp_path) == ["sam2.1_hiera_tiny.pt"]


@pytest.mark.slow
def test_every_sam2_config_builds_and_is_recognised_from_its_weights(release_memory):
    """Each registry entry builds its architecture from the package's config, and the loader
    recognises a state dict of that layout (the hint its mismatch errors give)."""
    from sam_backend.models.loading import guess_variant

    for variant in [v for v in VARIANTS.values() if v.model_name == "sam2"]:
        model = variant.builder()
        assert model.image_size == 1024
        assert guess_variant(model.state_dict()) == variant.key
        del model


@pytest.mark.slow
def test_onnx_decoder_matches_torch_on_four_aspect_ratios(sam2_file, release_memory):
    """runtime=auto (onnxruntime decoder) against runtime=torch: every prompt kind, 4 shapes."""
    from sam_backend.models.onnx_runtime import mask_iou
    from tests.support.random_weights import synthetic_image

    onnx = create_model(TINY, sam2_file, "cpu", "auto")
    torch_model = create_model(TINY, sam2_file, "cpu", "torch")
    assert (onnx.runtime, torch_model.runtime) == ("onnx", "torch")
    for h, w in [(1080, 1920), (1920, 1080), (512, 512), (300, 1000)]:
        embedding = torch_model.embed(synthetic_image(h, w, seed=h + w))
        box = np.array([0.1 * w, 0.2 * h, 0.6 * w, 0.8 * h])
        first = Prompt(np.array([[0.4 * w, 0.5 * h]]), np.array([1]))
        previous = torch_model.decode(embedding, first).low_res_logits
        for prompt in (first, Prompt(np.array([[0.4 * w, 0.5 * h], [0.7 * w, 0.3 * h]]),
                                     np.array([1, 0]), mask_input=previous),
                       Prompt(np.zeros((0, 2)), np.zeros(0), box),
                       Prompt(np.array([[0.3 * w, 0.4 * h]]), np.array([0]), box)):
            want, got = torch_model.decode(embedding, prompt), onnx.decode(embedding, prompt)
            assert mask_iou(got.mask, want.mask) >= 0.99, (h, w)
            assert got.score == pytest.approx(want.score, abs=1e-4)
