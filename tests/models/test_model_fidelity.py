"""Our model layer vs. the packages' own SamPredictor: pixel-identical masks on the same weights.

Each variant is built with seeded random weights, saved as a checkpoint file and loaded through the
project's loading path by model_name/sam_config/sam_checkpoint_file. The reference predictor is
built by the package's own builder (MobileSAM: from the published recipe) from the same file.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_backend.models.base import Prompt
from sam_backend.models.registry import get_variant
from sam_backend.models.torch_runtime import TorchSamModel

pytestmark = pytest.mark.usefixtures("release_memory")

IMAGE_SIZES = [(480, 640), (300, 720)]  # (H, W): landscape 4:3, and a wide 12:5


def reference_predictor(model_name, sam_config, path):
    if model_name == "sam":
        from segment_anything import SamPredictor, sam_model_registry

        return SamPredictor(sam_model_registry[sam_config](checkpoint=str(path)))
    if model_name == "sam_hq":
        from segment_anything_hq import SamPredictor, sam_model_registry

        model = sam_model_registry[sam_config](checkpoint=None)
        model.load_state_dict(torch.load(path, map_location="cpu"), strict=True)
        # TinyViT caches its attention biases when eval() is called, and the package's builder
        # calls eval() before loading: refresh the cache so the reference uses the file's biases.
        model.eval()
        return SamPredictor(model)
    # MobileSAM is not on PyPI: its published recipe, built here independently of our registry.
    from segment_anything import SamPredictor
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    from segment_anything_hq.modeling.tiny_vit_sam import TinyViT

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = TinyViT(img_size=1024, in_chans=3, num_classes=1000,
                               embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                               num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.,
                               drop_rate=0., drop_path_rate=0.0, use_checkpoint=False,
                               mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8)
            self.img_size = 1024

        def forward(self, x):
            return self.vit(x)[0]

    sam = Sam(Encoder(), PromptEncoder(256, (64, 64), (1024, 1024), 16),
              MaskDecoder(num_multimask_outputs=3,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048,
                                                        num_heads=8),
                          transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
              pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    state = torch.load(path, map_location="cpu")
    state = {(k.replace("image_encoder.", "image_encoder.vit.", 1)
              if k.startswith("image_encoder.") else k): v for k, v in state.items()}
    sam.load_state_dict(state, strict=True)
    sam.eval()
    return SamPredictor(sam)


def prompts_for(h, w):
    return {
        "single point": Prompt(np.array([[w * 0.4, h * 0.5]]), np.array([1])),
        "points with a negative": Prompt(np.array([[w * 0.4, h * 0.5], [w * 0.6, h * 0.3],
                                                   [w * 0.2, h * 0.8]]), np.array([1, 1, 0])),
        "box": Prompt(box=np.array([w * 0.1, h * 0.2, w * 0.7, h * 0.9])),
    }


def check_variant(model_name, sam_config, checkpoint_factory, image_factory):
    path = checkpoint_factory(model_name, sam_config)
    ours = TorchSamModel(get_variant(model_name, sam_config), str(path), "cpu")
    reference = reference_predictor(model_name, sam_config, path)
    for h, w in IMAGE_SIZES:
        image = image_factory(h, w, seed=h)
        embedding = ours.embed(image)
        reference.set_image(image)
        for name, prompt in prompts_for(h, w).items():
            got = ours.decode(embedding, prompt)
            masks, scores, logits = reference.predict(
                point_coords=prompt.points if len(prompt.points) else None,
                point_labels=prompt.labels if len(prompt.points) else None,
                box=prompt.box, multimask_output=prompt.multimask)
            best = int(np.argmax(scores))
            assert got.mask.shape == (h, w), name
            assert got.mask.dtype == np.bool_
            assert np.array_equal(got.mask, masks[best]), f"{model_name}/{sam_config} {h}x{w} {name}"
            assert got.score == pytest.approx(float(scores[best]), abs=1e-6)
            np.testing.assert_array_equal(got.low_res_logits, logits[best:best + 1])
            # the masks must be informative, or identity proves little
            assert 0 < got.mask.sum() < h * w or name == "box"
        # the low-res logits fed back as mask input, as in a repeated click
        prompt = prompts_for(h, w)["points with a negative"]
        previous = ours.decode(embedding, prompt)
        again = ours.decode(embedding, Prompt(prompt.points, prompt.labels, None,
                                              previous.low_res_logits))
        masks, scores, _ = reference.predict(prompt.points, prompt.labels, None,
                                             previous.low_res_logits, multimask_output=False)
        assert np.array_equal(again.mask, masks[0])


@pytest.mark.parametrize("model_name,sam_config", [("mobile_sam", "vit_t"),
                                                   ("sam_hq", "vit_tiny")])
def test_fidelity_small_variants(model_name, sam_config, checkpoint_factory, image_factory):
    check_variant(model_name, sam_config, checkpoint_factory, image_factory)


@pytest.mark.slow
@pytest.mark.parametrize("model_name,sam_config", [("sam", "vit_b"), ("sam_hq", "vit_b")])
def test_fidelity_vit_b(model_name, sam_config, checkpoint_factory, image_factory):
    check_variant(model_name, sam_config, checkpoint_factory, image_factory)


def test_tinyvit_attention_biases_come_from_the_checkpoint(checkpoint_factory):
    """segment_anything_hq's builder calls eval() before loading weights, which freezes TinyViT's
    cached attention biases at their initial values; our loader must use the checkpoint's."""
    from sam_backend.models.loading import load_model, read_state_dict

    path = checkpoint_factory("sam_hq", "vit_tiny")
    model = load_model(get_variant("sam_hq", "vit_tiny"), path)
    state = read_state_dict(path)
    checked = 0
    for name, module in model.image_encoder.named_modules():
        if hasattr(module, "ab") and hasattr(module, "attention_bias_idxs"):
            loaded = state[f"image_encoder.{name}.attention_biases"]
            assert torch.equal(module.ab, loaded[:, module.attention_bias_idxs])
            assert loaded.abs().sum() > 0  # the biases are not the initial zeros
            checked += 1
    assert checked > 0
