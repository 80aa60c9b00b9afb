"""Checkpoint loading: the registry's defaults and the clear errors."""
from __future__ import annotations

import torch
from pathlib import Path

import pytest

from sam_backend.errors import CheckpointError, ConfigError
from sam_backend.models.loading import load_model, resolve_device
from sam_backend.models.registry import VARIANTS, default_checkpoint, get_variant, variant_for_file


def test_registry_defaults_and_names():
    assert get_variant("sam").sam_config == "vit_b"
    assert get_variant("sam_hq").sam_config == "vit_b"
    assert get_variant("mobile_sam").sam_config == "vit_t"
    assert get_variant("sam", "vit_h").checkpoint_name == "sam_vit_h_4b8939.pth"
    assert get_variant("sam_hq", "vit_tiny").checkpoint_name == "sam_hq_vit_tiny.pth"
    assert variant_for_file("/x/mobile_sam.pt").key == "mobile_sam/vit_t"
    assert {"sam", "sam_hq", "mobile_sam", "sam3"} <= {v.model_name for v in VARIANTS.values()}
    assert len([v for v in VARIANTS.values() if v.model_name in ("sam", "sam_hq", "mobile_sam")]) == 8
    assert all(v.url.startswith("https://") and v.url.endswith(v.checkpoint_name)
               for v in VARIANTS.values())
    assert default_checkpoint(get_variant("sam")).name == "sam_vit_b_01ec64.pth"


def test_weights_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SAM_BACKEND_WEIGHTS_DIR", str(tmp_path))
    assert default_checkpoint(get_variant("mobile_sam")) == tmp_path / "mobile_sam.pt"


def test_weights_dir_rule_for_a_checkout_and_an_installed_package(monkeypatch, tmp_path):
    """A checkout: its own ``weights/`` (never a folder inside the package). Installed
    (site-packages): ``weights/`` of the current directory when it exists, else the user's
    cache directory."""
    from sam_backend.models import registry

    monkeypatch.delenv("SAM_BACKEND_WEIGHTS_DIR", raising=False)
    checkout = Path(registry.__file__).resolve().parents[2]
    assert registry.weights_dir() == checkout / "weights"

    site = tmp_path / "site-packages"  # no setup.py beside the package: installed
    (site / "sam_backend").mkdir(parents=True)
    monkeypatch.setattr(registry, "_CHECKOUT", site)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert registry.weights_dir() == tmp_path / "cache" / "sam_backend" / "weights"
    (work / "weights").mkdir()
    assert registry.weights_dir() == work / "weights"


@pytest.mark.parametrize("model_name,config,match", [
    ("sam9", None, "unknown model_name 'sam9': choose one of mobile_sam, sam, sam2, sam3, sam_hq"),
    ("sam", "vit_t", "unknown sam_config 'vit_t' for model_name=sam: choose one of vit_b, vit_h, vit_l"),
])
def test_unknown_variant_is_a_clear_error(model_name, config, match):
    with pytest.raises(ConfigError, match=match):
        get_variant(model_name, config)


def test_missing_checkpoint_says_how_to_get_it(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_model(get_variant("sam", "vit_h"), tmp_path / "nothing.pth")
    message = str(err.value)
    assert "nothing.pth not found" in message
    assert "sam-backend weights download sam/vit_h" in message
    assert "sam_checkpoint_file=" in message


def test_mismatched_checkpoint_names_file_expectation_and_fix(checkpoint_factory):
    # a MobileSAM file given as HQ-SAM vit_tiny: same encoder, different decoder
    path = checkpoint_factory("mobile_sam")
    with pytest.raises(CheckpointError) as err:
        load_model(get_variant("sam_hq", "vit_tiny"), path)
    message = str(err.value)
    assert str(path) in message
    assert "does not fit sam_hq/vit_tiny" in message
    assert "25 missing keys: mask_decoder.compress_vit_feat.0.bias" in message
    assert "model_name=mobile_sam sam_config=vit_t" in message


def test_vit_b_file_with_vit_h_config_is_refused(checkpoint_factory):
    path = checkpoint_factory("sam", "vit_b")
    with pytest.raises(CheckpointError) as err:
        load_model(get_variant("sam", "vit_h"), path)
    message = str(err.value)
    assert "shape mismatches" in message and "missing keys: image_encoder.blocks.12" in message
    assert "model_name=sam sam_config=vit_b" in message


def test_shape_mismatch_only(checkpoint_factory, tmp_path):
    state = torch.load(checkpoint_factory("mobile_sam"), map_location="cpu")
    state["mask_decoder.iou_token.weight"] = torch.zeros(2, 256)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"1 shape mismatches: mask_decoder.iou_token.weight: "
                                              r"file \(2, 256\), model \(1, 256\)"):
        load_model(get_variant("mobile_sam"), path)


def test_truncated_checkpoint_is_a_clear_error(checkpoint_factory, tmp_path):
    data = checkpoint_factory("mobile_sam").read_bytes()
    path = tmp_path / "mobile_sam.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read.*truncated or not a PyTorch checkpoint"):
        load_model(get_variant("mobile_sam"), path)


def test_devices():
    assert str(resolve_device("cpu")) == "cpu"
    assert str(resolve_device("auto")) == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is available"):
            resolve_device("cuda:1")
