"""The onnxruntime runtime: the loaded checkpoint's encoder and decoder, exported to ONNX once.

What runs where
- **Encoder graph** ``<sha16>-<variant>-encoder.onnx``: input ``image`` 1x3x1024x1024 float32, the
  image already resized (``ResizeLongestSide.apply_image``, as the torch runtime does), normalised
  with the model's pixel mean/std and zero-padded, all in numpy; outputs ``image_embeddings``
  (1x256x64x64) and, for HQ-SAM, ``hq_features`` (1x32x256x256): the first line of
  ``MaskDecoderHQ.forward`` (``embedding_encoder(features) + compress_vit_feat(interm[0])``)
  depends on the image only, so it runs once per image here instead of at every click (a third
  of the HQ decoder's time), and the cached embedding holds it instead of the ViT's intermediate
  features (8 MiB float32 per image, vs. 2.5 MiB for vit_tiny's interm[0] and 12 MiB for
  vit_b's).
- **Decoder graph** ``<sha16>-<variant>-decoder.onnx``: prompt encoder + mask decoder. Inputs
  ``image_embeddings``, (HQ: ``hq_features``), ``point_coords`` 1xNx2 (already in the 1024
  frame) and ``point_labels`` 1xN with SAM's ONNX convention (1 positive, 0 negative, -1 padding
  point, 2/3 box corners; N is a dynamic axis), ``mask_input`` 1x1x256x256 and
  ``has_mask_input`` (1). Outputs **every** mask token's low-res logits ``low_res_masks``
  1xKx256x256 (K = 4; HQ-SAM 5: the 4 SAM tokens + the HQ token) and ``iou_predictions`` 1x4.
  There is no in-graph selection, upscaling or cropping: ``SamOnnxModel``'s in-graph crop is
  frozen to the export image's aspect ratio. Choosing the mask in numpy from all tokens is
  exactly what ``MaskDecoder.forward`` (``masks[:, 1:]`` + argmax for a single point, else
  ``masks[:, 0:1]``) and ``MaskDecoderHQ.forward`` (best of tokens 1-3 or token 0, plus the HQ
  token) do with the same ``predict_masks`` output, so one graph serves both the 3-mask and the
  1-mask policy and picks the same mask as the torch runtime.
- The points are embedded the way ``PromptEncoder`` does it (``+0.5``, divide by the input size,
  random-Fourier encoding, label embeddings; the padding point only without a box), written with
  masks instead of in-place indexing so that it traces; the dense positional encoding is a
  constant computed by the same call the torch runtime makes.
- **Upscaling** (:func:`upscale_logits`) is outside the graph, with OpenCV, on the chosen mask
  only: exactly ``Sam.postprocess_masks``' two bilinear (``align_corners=False``) resizes, the first
  one computed only on the part of the 1024 upscale the crop keeps.

Exports (once per checkpoint, into ``<checkpoint dir>/onnx/``, keyed by its SHA-256) are made by
:mod:`.onnx_export`. A fresh export is checked here against the torch modules on a synthetic image
before it is used; an export that fails or disagrees raises :class:`OnnxExportError`
(``runtimes.create_model`` then falls back to torch and logs why).

Sessions: intra-op threads = the cores this process may use, graph optimisation level "all",
no spin-waiting threads (see :meth:`OnnxSamModel.session_options`).
``InferenceSession.run`` is thread-safe, so one model serves concurrent requests.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from sam_backend.common.files import file_lock
from sam_backend.errors import CheckpointError, ConfigError
from sam_backend.models.base import (Candidates, Embedding, Prompt, SegmentationModel, check_image,
                                     resize_longest_side)
from sam_backend.models import onnx_export
from sam_backend.models.onnx_export import (HASH_SIDECAR, LOW_RES, META, PARTS,
                                            OnnxExportError, check_export_memory,
                                            checkpoint_sha256, export_graphs, graph_path,
                                            onnx_dir_for, remove_graphs)

__all__ = ["OnnxExportError", "OnnxSamModel", "default_threads", "mask_iou", "upscale_logits",
           "upscale_mask"]
from sam_backend.models.registry import Variant, default_checkpoint

log = logging.getLogger(__name__)

# -- upscaling --------------------------------------------------------------------------------
def upscale_logits(low_res: np.ndarray, input_size: Tuple[int, int],
                   original_size: Tuple[int, int], img_size: int = 1024) -> np.ndarray:
    """``Sam.postprocess_masks`` for one mask, in OpenCV: low-res logits (256x256, or 1x256x256)
    -> float32 logits at ``original_size`` (H, W).

    Torch upsamples to img_size x img_size (bilinear, align_corners=False), crops the top-left
    ``input_size`` and resizes that to ``original_size``. ``cv2.INTER_LINEAR`` on float32 uses the
    same half-pixel-centre sampling and edge clamping. Only the low-res rows/columns that the crop
    reads are upscaled (one more than ``ceil(size / factor)`` so that no output sample touches the
    sub-block's clamped edge): the result equals the full upscale's crop, bit for bit.

    The logits differ from torch's by rounding only (OpenCV computes sample positions in double,
    torch in float32): max |difference| 1.5e-4 on logits with structure, 3.4e-4 on white noise of
    std 3. Pixels whose logit is that close to 0 may flip: at 3840x2160, 2-4 of 8.3 M pixels on
    structured logits (mask IoU >= 0.999999), <= 39 on white noise (IoU >= 0.99999); every
    differing pixel had |logit| <= 1.1e-4 (tests/models/test_onnx_runtime.py checks these bounds).
    Its cost against torch's two interpolations is in benchmarks/README.md.
    """
    logits = np.asarray(low_res, dtype=np.float32)
    if logits.ndim == 3:
        logits = logits[0]
    lh, lw = logits.shape
    h, w = int(input_size[0]), int(input_size[1])
    big_h, big_w = int(original_size[0]), int(original_size[1])
    fy, fx = img_size // lh, img_size // lw
    if fy * lh != img_size or fx * lw != img_size:
        raise ValueError(f"low-res logits of {lh}x{lw} do not divide {img_size}")
    kh = min(lh, -(-h // fy) + 1)
    kw = min(lw, -(-w // fx) + 1)
    block = np.ascontiguousarray(logits[:kh, :kw])
    stage1 = cv2.resize(block, (kw * fx, kh * fy), interpolation=cv2.INTER_LINEAR)[:h, :w]
    if (h, w) == (big_h, big_w):
        return np.ascontiguousarray(stage1)
    return cv2.resize(stage1, (big_w, big_h), interpolation=cv2.INTER_LINEAR)


def upscale_mask(low_res: np.ndarray, input_size: Tuple[int, int],
                 original_size: Tuple[int, int], threshold: float = 0.0,
                 img_size: int = 1024) -> np.ndarray:
    """The HxW bool mask of :func:`upscale_logits` ``> threshold`` (SAM's mask_threshold is 0)."""
    return upscale_logits(low_res, input_size, original_size, img_size) > threshold


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class OnnxSamModel(SegmentationModel):
    """A variant's checkpoint, run by onnxruntime (see the module docstring).

    ``weights_dir``: where the ``onnx/`` cache directory goes (default: the checkpoint's
    directory). ``threads``: onnxruntime intra-op threads (default: the cores this process may
    use). ``validate``: check fresh exports against torch.
    """

    runtime = "onnx"

    def __init__(self, variant: Variant, checkpoint: Union[str, Path, None] = None,
                 device: Optional[str] = "cpu", weights_dir: Union[str, Path, None] = None,
                 threads: Optional[int] = None, validate: bool = True):
        from sam_backend.models.loading import resolve_device

        self.variant = variant
        self._hq = variant.family == "sam_hq"
        dev = resolve_device(device)
        self.providers = self._providers(dev)
        self.device = str(dev)
        self.checkpoint = Path(checkpoint) if checkpoint else default_checkpoint(variant)
        if not self.checkpoint.is_file():
            raise CheckpointError(f"checkpoint {self.checkpoint} not found for {variant.key}")
        self.onnx_dir = onnx_dir_for(self.checkpoint, weights_dir)
        self.sha256 = checkpoint_sha256(self.checkpoint, self.onnx_dir / HASH_SIDECAR)
        self.threads = threads or default_threads()
        self.exported: List[str] = []  # parts this construction had to export
        self._validate = validate
        self._sam = None  # the torch module, loaded only when something must be exported
        self.paths = {part: graph_path(self.onnx_dir, self.sha256, variant, part)
                      for part in PARTS}
        try:
            sessions = self._open()
        finally:
            self._sam = None
            gc.collect()
        self._use(sessions["encoder"], sessions["decoder"])
        log.info("onnx runtime for %s: %s + %s (%s, %d threads%s)", variant.key,
                 self.paths["encoder"].name, self.paths["decoder"].name,
                 self.providers[0] if isinstance(self.providers[0], str) else
                 self.providers[0][0], self.threads,
                 f", exported now: {', '.join(self.exported)}" if self.exported else "")

    def _use(self, encoder, decoder) -> None:
        """Run with these sessions; the preprocessing constants come from the encoder's
        metadata (so a cached export needs no torch model)."""
        meta = encoder.get_modelmeta().custom_metadata_map
        self.pixel_mean = np.asarray(json.loads(meta[META + "pixel_mean"]), np.float32)
        self.pixel_std = np.asarray(json.loads(meta[META + "pixel_std"]), np.float32)
        self.img_size = int(meta[META + "img_size"])
        self.mask_threshold = float(meta[META + "mask_threshold"])
        self.transform = resize_longest_side(self.img_size)
        self.encoder, self.decoder = encoder, decoder

    # -- sessions and exports ------------------------------------------------------------------
    @staticmethod
    def _providers(dev) -> List[Any]:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if dev.type == "cpu":
            return ["CPUExecutionProvider"]
        if dev.type == "cuda" and "CUDAExecutionProvider" in available:
            return [("CUDAExecutionProvider", {"device_id": dev.index or 0}),
                    "CPUExecutionProvider"]
        raise ConfigError(f"runtime=onnx on device={dev} needs an onnxruntime build with that "
                          f"device (available: {', '.join(available)}): use device=cpu or "
                          f"runtime=torch")

    def session_options(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Encoder and decoder sessions run at the same time (a click while an image is being
        # encoded) on few cores: threads that spin while waiting for work steal the other
        # session's cores (measured: benchmarks/README.md, "Model layer").
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return options

    def _session(self, path: Path):
        import onnxruntime as ort

        return ort.InferenceSession(str(path), self.session_options(), providers=self.providers)

    def _usable(self, part: str):
        """The session of the cached graph if it is of this format and checkpoint, else None."""
        path = self.paths[part]
        if not path.is_file():
            return None
        try:
            session = self._session(path)
        except Exception as exc:  # noqa: BLE001 - a damaged file is exported again
            log.warning("cannot open %s (%s): exporting it again", path, exc)
            return None
        meta = session.get_modelmeta().custom_metadata_map
        if meta.get(META + "format") != onnx_export.FORMAT_VERSION or \
                meta.get(META + "checkpoint_sha256") != self.sha256:
            log.info("%s is of another format or checkpoint: exporting it again", path)
            return None
        return session

    def _open(self) -> Dict[str, Any]:
        sessions = {part: self._usable(part) for part in PARTS}
        if all(s is not None for s in sessions.values()):
            return sessions
        with file_lock(self.onnx_dir / ".export.lock"):
            for part in PARTS:  # another process may have exported it while we waited
                if sessions[part] is None:
                    sessions[part] = self._usable(part)
            missing = [p for p in PARTS if sessions[p] is None]
            if missing:
                sessions.update(self._export(missing))
        return sessions

    def torch_model(self):
        """The checkpoint as a torch module (loaded strictly, once, only to export)."""
        if self._sam is None:
            from sam_backend.models.loading import load_model

            self._sam = load_model(self.variant, self.checkpoint, "cpu")
        return self._sam

    def _export(self, parts: Sequence[str]) -> Dict[str, Any]:
        """Export ``parts`` (encoder/decoder), check them against torch, return their sessions."""
        check_export_memory(self.variant, self.checkpoint)
        started = time.perf_counter()
        sam = self.torch_model()
        try:
            export_graphs(sam, self.variant, self.sha256, self.paths, parts)
            self.exported.extend(parts)
            sessions = {part: self._session(self.paths[part]) for part in PARTS}
            if self._validate:
                from sam_backend.models.torch_runtime import TorchSamModel

                self._use(sessions["encoder"], sessions["decoder"])
                reference = TorchSamModel(self.variant, device="cpu", sam=sam)
                problem = self._disagreement(reference.embed, reference.decode,
                                             feature_tolerance=1e-3)
                if problem:
                    raise OnnxExportError(f"the exported graphs differ from torch: {problem}")
        except OnnxExportError as exc:
            exc.sam = sam
            remove_graphs(self.paths[part] for part in parts)
            raise
        except Exception as exc:  # noqa: BLE001 - reported as an export failure
            remove_graphs(self.paths[part] for part in parts)
            raise OnnxExportError(f"{type(exc).__name__}: {exc}", sam) from exc
        log.info("ONNX export of %s done in %.1f s (checked against torch: %s)", self.variant.key,
                 time.perf_counter() - started, self._validate)
        return sessions

    def _disagreement(self, reference_embed, reference_decode,
                      feature_tolerance: Optional[float]) -> Optional[str]:
        """Compare this model with a reference (its embed and decode) on a synthetic 480x640
        image: encoder features (relative max difference <= ``feature_tolerance``, if given) and
        the masks of four prompts (IoU >= 0.99, scores within 1e-2). A description of the first
        difference, or None."""
        h, w = 480, 640
        yy, xx = np.mgrid[0:h, 0:w]
        image = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1),
                          ((xx // 48 + yy // 48) % 2) * 200], -1).astype(np.uint8)
        ours, theirs = self.embed(image), reference_embed(image)
        if feature_tolerance is not None:
            ref_features = _as_float32(theirs.image_embedding)
            err = float(np.abs(ours.image_embedding - ref_features).max())
            scale = float(np.abs(ref_features).max()) or 1.0
            if not err <= feature_tolerance * scale:
                return f"encoder features differ by up to {err:.3g} (max |feature| {scale:.3g})"
        prompts = {
            "one point": Prompt(np.array([[w * 0.4, h * 0.5]]), np.array([1])),
            "two points": Prompt(np.array([[w * 0.4, h * 0.5], [w * 0.7, h * 0.2]]),
                                 np.array([1, 0])),
            "box": Prompt(box=np.array([w * 0.1, h * 0.2, w * 0.6, h * 0.9])),
        }
        previous = reference_decode(theirs, prompts["two points"])
        prompts["mask input"] = Prompt(prompts["two points"].points,
                                       prompts["two points"].labels, None,
                                       previous.low_res_logits)
        for name, prompt in prompts.items():
            got, want = self.decode(ours, prompt), reference_decode(theirs, prompt)
            iou = mask_iou(got.mask, want.mask)
            if not (iou >= 0.99 and abs(got.score - want.score) <= 1e-2):
                return (f"{name}: mask IoU {iou:.4f}, predicted IoU {got.score:.4f} vs "
                        f"{want.score:.4f}")
        return None

    # -- image ---------------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> Tuple[np.ndarray, Tuple[int, int]]:
        """The encoder's input: resized as the torch runtime does, normalised, zero-padded."""
        resized = self.transform.apply_image(image)
        h, w = resized.shape[:2]
        x = np.zeros((1, 3, self.img_size, self.img_size), np.float32)
        normalised = (resized.astype(np.float32) - self.pixel_mean) / self.pixel_std
        x[0, :, :h, :w] = normalised.transpose(2, 0, 1)
        return x, (h, w)

    def embed(self, image: np.ndarray) -> Embedding:
        check_image(image)
        x, input_size = self.preprocess(image)
        outputs = self.encoder.run(None, {"image": x})
        return Embedding(outputs[0], tuple(image.shape[:2]), input_size,
                         hq_features=outputs[1] if self._hq else None)

    # -- prompt --------------------------------------------------------------------------------
    def decoder_inputs(self, embedding: Embedding, prompt: Prompt) -> Dict[str, np.ndarray]:
        coords: List[np.ndarray] = []
        labels: List[np.ndarray] = []
        if len(prompt.points):
            coords.append(self.transform.apply_coords(
                np.asarray(prompt.points, np.float32), embedding.original_size))
            labels.append(np.asarray(prompt.labels, np.float32))
        if prompt.box is not None:
            box = self.transform.apply_boxes(np.asarray(prompt.box, np.float32)[None],
                                             embedding.original_size)
            coords.append(box.reshape(2, 2))
            labels.append(np.array([2, 3], np.float32))
        else:  # PromptEncoder pads the points with a "not a point" when there is no box
            coords.append(np.zeros((1, 2), np.float32))
            labels.append(np.array([-1], np.float32))
        if prompt.mask_input is not None:
            mask_input = _as_float32(prompt.mask_input).reshape(1, 1, LOW_RES, LOW_RES)
            has_mask = np.ones(1, np.float32)
        else:
            mask_input = np.zeros((1, 1, LOW_RES, LOW_RES), np.float32)
            has_mask = np.zeros(1, np.float32)
        feed = {
            "image_embeddings": _as_float32(embedding.image_embedding),
            "point_coords": np.concatenate(coords).astype(np.float32)[None],
            "point_labels": np.concatenate(labels).astype(np.float32)[None],
            "mask_input": mask_input,
            "has_mask_input": has_mask,
        }
        if self._hq:
            feed["hq_features"] = _as_float32(embedding.hq_features)
        return feed

    def decode_low_res(self, embedding: Embedding, prompt: Prompt) -> Candidates:
        """The candidates ``MaskDecoder.forward`` / ``MaskDecoderHQ.forward`` (hq_token_only=False)
        keep from every token's logits: tokens 1-3 for an ambiguous prompt, else token 0; HQ-SAM:
        the best of those plus the HQ token's logits, one candidate either way."""
        masks, iou = self.decoder.run(None, self.decoder_inputs(embedding, prompt))
        masks, iou = masks[0], iou[0]
        kept = slice(1, 4) if prompt.multimask else slice(0, 1)
        logits, scores = masks[kept], iou[kept]
        if self._hq:
            best = int(np.argmax(scores))
            logits = logits[best:best + 1] + masks[-1]  # masks_sam + masks_hq
            scores = scores[best:best + 1]
        return Candidates(np.ascontiguousarray(logits, dtype=np.float32),
                          np.ascontiguousarray(scores, dtype=np.float32))

    def upscale_mask(self, logits: np.ndarray, embedding: Embedding) -> np.ndarray:
        """:func:`upscale_mask` (``Sam.postprocess_masks`` in OpenCV) at the model's threshold."""
        return upscale_mask(logits, embedding.input_size, embedding.original_size,
                            self.mask_threshold, self.img_size)


def _as_float32(array: Any) -> np.ndarray:
    if not isinstance(array, np.ndarray) and hasattr(array, "detach"):  # a torch tensor
        array = array.detach().float().cpu().numpy()
    return np.ascontiguousarray(array, dtype=np.float32)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)
