"""SAM 2 / 2.1 (``model_name=sam2``): the official ``sam2`` package's modules, called the way
``sam2.sam2_image_predictor.SAM2ImagePredictor`` calls them.

Masks are pixel-identical to ``SAM2ImagePredictor`` on the same weights
(tests/models/test_sam2.py); what differs is where the per-image state lives: the predictor keeps
``_features`` and ``_orig_hw`` on itself, this model returns them in an
:class:`~sam_backend.models.base.Embedding`, so one loaded model serves any number of images, threads
and cached embeddings, and a click never re-runs the image encoder.

The embedding of an image (1024x1024 model input, whatever the aspect ratio):

- ``image_embedding``: ``image_embed``, ``1x256x64x64`` (with SAM 2's ``no_mem_embed`` added, as
  the predictor does for single images);
- ``high_res_features``: ``high_res_feats``, ``[1x32x256x256, 1x64x128x128]``, which the mask decoder's
  upscaling path uses.

16 MiB per image in float32, 8 MiB in float16 (MobileSAM/SAM: 4 / 2 MiB).

Prompts follow the predictor exactly: point coordinates are divided by the image's width/height
and multiplied by 1024 (SAM 2 squashes the image to a square, it does not pad); a box becomes
two points labelled 2 and 3 put *before* the clicks; the previous prediction's low-res logits
(clamped to [-32, 32], as the predictor returns them) are the mask input; masks are the
bilinear upscaling of the low-res logits to the image size, thresholded at 0.

Runtimes: ``torch`` (all of the above in torch) and ``onnx`` (the default on CPU): the image
encoder stays torch, the prompt encoder + mask decoder run in onnxruntime (two graphs: multimask
and single-mask, the latter with SAM 2's stability fallback inside). Masks are the same as torch's
(checked at creation on seeded random embeddings, and over HTTP in tests/models/test_sam2.py); the decoder
is what every click pays, and it runs faster in onnxruntime (figures in the README's SAM 2
section). The graphs are exported once into ``<checkpoint dir>/onnx/``, keyed by the checkpoint's
SHA-256. The Hiera
encoder's export is not attempted (:data:`ONNX_ENCODER_REASON`): a first click costs a torch encoder
run with either runtime. When the decoder cannot be exported or disagrees with torch, torch runs and
the reason is logged.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Mapping, Optional, Union

import numpy as np
import torch

from sam_backend.models.loading import load_model, resolve_device
from sam_backend.models.base import (Candidates, Embedding, Prompt, SegmentationModel,
                                     candidates_of, check_image)
from sam_backend.models.registry import Variant

log = logging.getLogger(__name__)

ONNX_ENCODER_REASON = ("the Hiera image encoder runs with torch: its ONNX export has not been "
                       "checked against torch")

# Backbone feature map sizes of a 1024x1024 input, finest first (SAM2ImagePredictor's
# ``_bb_feat_sizes``).
_FEAT_SIZES = [(256, 256), (128, 128), (64, 64)]


def build_sam2(yaml: str) -> torch.nn.Module:
    """The family table's builder: the package's architecture for ``yaml``, uninitialised."""
    from sam2.build_sam import build_sam2 as package_build

    # As SAM2ImagePredictor users build it (apply_postprocessing=True: the decoder falls
    # back to its best multimask output when a single mask is unstable).
    return package_build(yaml, None, device="cpu")


_HIERA_CONFIGS = {(96, 12): "hiera_tiny", (96, 16): "hiera_small", (112, 24): "hiera_base_plus",
                  (144, 48): "hiera_large"}


def recognise_sam2(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """``sam2/hiera_*`` (``_v2.0`` for SAM 2.0's layout) from the Hiera trunk's width and depth."""
    patch = state.get("image_encoder.trunk.patch_embed.proj.weight")
    if patch is None or patch.dim() != 4:
        return None
    blocks = {k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")}
    config = _HIERA_CONFIGS.get((int(patch.shape[0]), len(blocks)))
    if config is None:
        return None
    return f"sam2/{config}" + ("" if "no_obj_embed_spatial" in state else "_v2.0")


def create_sam2_model(variant: Variant, checkpoint: Union[str, Path, None], device: str,
                      runtime: str) -> "Sam2Model":
    """The family table's ``create``: ``runtime`` as families.choose_runtime chose it; onnx (the
    decoder in onnxruntime) needs a CPU device here, and falls back to torch with the reason
    logged."""
    checkpoint = str(checkpoint) if checkpoint else None
    model = Sam2Model(variant, checkpoint, device)
    if runtime != "onnx":
        return model
    if resolve_device(device).type != "cpu":
        log.warning("runtime=onnx for %s needs device=cpu here: running it with torch",
                    variant.key)
        return model
    try:
        return Sam2OnnxModel(variant, checkpoint, device, model=model.model)
    except Exception as exc:  # an export or onnxruntime failure, or a graph that disagrees
        log.warning("cannot run the %s decoder with onnxruntime (%s: %s): running it with torch",
                    variant.key, type(exc).__name__, exc)
        return model


class Sam2Model(SegmentationModel):
    runtime = "torch"
    logit_bound = 32.0  # the predictor returns the logits clamped to [-32, 32]

    def __init__(self, variant: Variant, checkpoint: Optional[str] = None,
                 device: Optional[str] = "cpu", model: Optional[torch.nn.Module] = None):
        from sam2.utils.transforms import SAM2Transforms

        self.variant = variant
        dev = resolve_device(device)
        self.device = str(dev)
        self.model = model if model is not None else load_model(variant, checkpoint, dev)
        self._dev = dev
        self.resolution = int(self.model.image_size)
        # The predictor's own transforms (resize to a square, ImageNet normalisation, coordinate
        # scaling, mask upscaling), with its defaults: threshold 0, no hole/sprinkle filling.
        self.transforms = SAM2Transforms(resolution=self.resolution, mask_threshold=0.0,
                                         max_hole_area=0.0, max_sprinkle_area=0.0)
        self.mask_threshold = 0.0
        with torch.inference_mode():
            self._dense_pe = self.model.sam_prompt_encoder.get_dense_pe()

    # -- image ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> Embedding:
        """Encode an HxWx3 uint8 RGB image; see the module docstring for the shapes."""
        check_image(image)
        x = self.transforms(image)[None].to(self._dev)
        backbone_out = self.model.forward_image(x)
        _, vision_feats, _, _ = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        feats = [feat.permute(1, 2, 0).reshape(1, -1, *size)
                 for feat, size in zip(vision_feats[::-1], _FEAT_SIZES[::-1])][::-1]
        return Embedding(feats[-1], tuple(image.shape[:2]), (self.resolution, self.resolution),
                         high_res_features=list(feats[:-1]))

    # -- prompt --------------------------------------------------------------------------------
    def _prompt_tensors(self, embedding: Embedding, prompt: Prompt):
        """(coords 1xNx2 float, labels 1xN int) in the 1024x1024 input frame, the box first."""
        coords: List[torch.Tensor] = []
        labels: List[torch.Tensor] = []
        orig_hw = embedding.original_size
        if prompt.box is not None:
            box = torch.as_tensor(np.asarray(prompt.box, np.float32), dtype=torch.float,
                                  device=self._dev)
            coords.append(self.transforms.transform_boxes(box, normalize=True, orig_hw=orig_hw))
            labels.append(torch.tensor([[2, 3]], dtype=torch.int, device=self._dev))
        if len(prompt.points):
            points = torch.as_tensor(np.asarray(prompt.points, np.float32), dtype=torch.float,
                                     device=self._dev)
            coords.append(self.transforms.transform_coords(points, normalize=True,
                                                           orig_hw=orig_hw)[None])
            labels.append(torch.as_tensor(np.asarray(prompt.labels), dtype=torch.int,
                                          device=self._dev)[None])
        return torch.cat(coords, dim=1), torch.cat(labels, dim=1)

    @torch.inference_mode()
    def decode_low_res(self, embedding: Embedding, prompt: Prompt) -> Candidates:
        """Kx256x256 candidates (unclamped) in the squashed 1024x1024 input's low-res frame; K
        is 3 for an ambiguous single-point prompt, else 1."""
        masks = None
        if prompt.mask_input is not None:
            masks = torch.as_tensor(prompt.mask_input, dtype=torch.float, device=self._dev)
            if masks.dim() == 3:
                masks = masks[None]
        sparse, dense = self.model.sam_prompt_encoder(
            points=self._prompt_tensors(embedding, prompt), boxes=None, masks=masks)
        high_res = [f.to(device=self._dev, dtype=torch.float32)
                    for f in embedding.high_res_features]
        low_res, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=embedding.image_embedding.to(device=self._dev, dtype=torch.float32),
            image_pe=self._dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=prompt.multimask,
            repeat_image=False,
            high_res_features=high_res,
        )
        return candidates_of(low_res[0], iou[0])

    @torch.inference_mode()
    def upscale_mask(self, logits: np.ndarray, embedding: Embedding) -> np.ndarray:
        """The predictor's bilinear upscaling of the (unclamped) logits to the image size,
        thresholded at 0."""
        chosen = torch.from_numpy(logits).to(self._dev)
        upscaled = self.transforms.postprocess_masks(chosen[None], embedding.original_size)
        return (upscaled[0, 0] > self.mask_threshold).cpu().numpy()


class _DecoderGraph(torch.nn.Module):
    """Prompt encoder + mask decoder as the predictor calls them (points padded, boxes already
    turned into points 2/3), ``multimask`` fixed at export. ``has_mask`` (0 or 1) selects the
    mask input's embedding or the no-mask embedding, exactly (x*1 + y*0 == x)."""

    def __init__(self, model: torch.nn.Module, multimask: bool):
        super().__init__()
        self.model, self.multimask = model, multimask

    def forward(self, image_embed, high_res_0, high_res_1, coords, labels, mask_input, has_mask):
        pe = self.model.sam_prompt_encoder
        sparse = pe._embed_points(coords, labels, pad=True)
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            1, -1, *pe.image_embedding_size)
        dense = has_mask * pe._embed_masks(mask_input) + (1 - has_mask) * no_mask
        low_res, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=image_embed, image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=self.multimask, repeat_image=False,
            high_res_features=[high_res_0, high_res_1])
        return low_res, iou


_INPUTS = ["image_embed", "high_res_0", "high_res_1", "coords", "labels", "mask_input", "has_mask"]


class Sam2OnnxModel(Sam2Model):
    """The torch image encoder, the prompt encoder + mask decoder in onnxruntime."""

    runtime = "onnx"
    PARTS = ("decoder-multi", "decoder-single")

    def __init__(self, variant: Variant, checkpoint: Optional[str] = None,
                 device: Optional[str] = "cpu", model: Optional[torch.nn.Module] = None):
        from sam_backend.common.files import file_lock
        from sam_backend.models.onnx_export import (HASH_SIDECAR, checkpoint_sha256, graph_path,
                                                    onnx_dir_for)
        from sam_backend.models.onnx_runtime import default_threads
        from sam_backend.models.registry import default_checkpoint

        super().__init__(variant, checkpoint, device, model=model)
        path = Path(checkpoint) if checkpoint else default_checkpoint(variant)
        onnx_dir = onnx_dir_for(path)
        digest = checkpoint_sha256(path, onnx_dir / HASH_SIDECAR)
        self.threads = default_threads()
        self.providers = ["CPUExecutionProvider"]
        self.sessions = {}
        for part in self.PARTS:
            graph = graph_path(onnx_dir, digest, variant, part)
            with file_lock(graph.with_name(graph.name + ".lock")):
                if not graph.is_file():
                    self._export(part, graph)
            self.sessions[part] = self._session(graph)
        worst = self.check()
        log.info("%s: decoder in onnxruntime (min mask IoU vs torch %.5f); %s", variant.key,
                 worst, ONNX_ENCODER_REASON)

    def _session(self, path: Path):
        import onnxruntime as ort

        from sam_backend.models.onnx_runtime import OnnxSamModel

        # the SAM 1 runtime's session options (self.threads intra-op threads, no spinning)
        options = OnnxSamModel.session_options(self)
        return ort.InferenceSession(str(path), options, providers=self.providers)

    def _export(self, part: str, path: Path) -> None:
        import time
        import warnings

        started = time.perf_counter()
        graph = _DecoderGraph(self.model, multimask=part == "decoder-multi").eval()
        example = (torch.zeros(1, 256, 64, 64), torch.zeros(1, 32, 256, 256),
                   torch.zeros(1, 64, 128, 128), torch.zeros(1, 2, 2),
                   torch.ones(1, 2, dtype=torch.int32), torch.zeros(1, 1, 256, 256),
                   torch.tensor(0.0))
        from sam_backend.common.files import atomic_path

        with warnings.catch_warnings(), torch.no_grad(), atomic_path(path) as tmp:
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, example, str(tmp), input_names=_INPUTS,
                              output_names=["low_res", "iou"], opset_version=17, dynamo=False,
                              dynamic_axes={"coords": {1: "points"}, "labels": {1: "points"}})
        log.info("exported the %s of %s to %s in %.1f s", part, self.variant.key, path,
                 time.perf_counter() - started)

    def decode_low_res(self, embedding: Embedding, prompt: Prompt) -> Candidates:
        from sam_backend.models.onnx_runtime import _as_float32

        coords, labels = self._prompt_tensors(embedding, prompt)
        has_mask = prompt.mask_input is not None
        mask = (_as_float32(prompt.mask_input).reshape(1, 1, 256, 256) if has_mask
                else np.zeros((1, 1, 256, 256), np.float32))
        high_res = embedding.high_res_features
        feed = dict(zip(_INPUTS, [_as_float32(embedding.image_embedding), _as_float32(high_res[0]),
                                  _as_float32(high_res[1]), _as_float32(coords),
                                  labels.cpu().numpy().astype(np.int32), mask,
                                  np.array(float(has_mask), np.float32)]))
        part = "decoder-multi" if prompt.multimask else "decoder-single"
        low_res, iou = self.sessions[part].run(None, feed)
        return Candidates(low_res[0], iou[0])

    def check(self, seed: int = 0) -> float:
        """The smallest mask IoU between this decoder and torch's on a seeded random embedding
        (one point, two points with the previous logits, a box, a box and a point; masks at a
        16:9 image's size). Raises RuntimeError below 0.99."""
        from sam_backend.models.onnx_runtime import mask_iou

        generator = torch.Generator().manual_seed(seed)
        embedding = Embedding(
            torch.randn(1, 256, 64, 64, generator=generator), (720, 1280), (1024, 1024),
            high_res_features=[torch.randn(1, 32, 256, 256, generator=generator),
                               torch.randn(1, 64, 128, 128, generator=generator)])
        first = Prompt(np.array([[400.0, 300.0]]), np.array([1]))
        box = np.array([100.0, 80.0, 900.0, 600.0])
        prompts = [first, None, Prompt(np.zeros((0, 2)), np.zeros(0), box),
                   Prompt(np.array([[500.0, 350.0]]), np.array([0]), box)]
        worst = 1.0
        previous = None
        for prompt in prompts:
            if prompt is None:  # refinement: the first prediction's logits fed back
                prompt = Prompt(np.array([[400.0, 300.0], [700.0, 500.0]]), np.array([1, 0]),
                                mask_input=previous.low_res_logits)
            ours = self.decode(embedding, prompt)
            reference = Sam2Model.decode(self._torch_view(), embedding, prompt)
            previous = previous or reference
            worst = min(worst, mask_iou(ours.mask, reference.mask))
            if worst < 0.99 or abs(ours.score - reference.score) > 1e-3:
                raise RuntimeError(f"the onnx decoder disagrees with torch (mask IoU {worst:.4f}, "
                                   f"scores {ours.score:.5f} vs {reference.score:.5f})")
        return worst

    def _torch_view(self) -> Sam2Model:
        view = Sam2Model.__new__(Sam2Model)
        view.__dict__.update(self.__dict__)
        return view
