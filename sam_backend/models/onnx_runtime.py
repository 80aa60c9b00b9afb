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

Export cache
Files live in ``<weights_dir or the checkpoint's directory>/onnx/`` (falling back to
``~/.cache/sam_backend/onnx`` when that is not writable), named by the first 16 hex digits of the
checkpoint's SHA-256, so a changed checkpoint never reuses stale graphs. The digest of a file is
remembered in ``onnx/checkpoint-sha256.json`` by (path, size, mtime) so that a 2.5 GB vit_h file
is not re-hashed at every start. Exports are written to a temporary directory and moved in place
with ``os.replace`` (external weight data first, the ``.onnx`` last), under an exclusive file lock
so that concurrent workers export once. Each graph carries ``sam_backend.*`` metadata (format
version, checkpoint digest, pixel mean/std, ...); a file of another format version is re-exported.
A fresh export is checked against the torch modules on a synthetic image before it is used; an
export that fails or disagrees raises :class:`OnnxExportError` (``runtimes.create_model`` then falls
back to torch and logs why). So does a machine without the memory an export needs (about
2 GB + 9x the checkpoint: ~5 GB for vit_b, ~13 GB for vit_l, ~25 GB for vit_h), rather than
being killed mid-export. Exporting takes ~10 s for MobileSAM / Light HQ-SAM, ~1.5-3 min for
vit_b, ~2.5 min for vit_l on 2 cores (once per checkpoint).

Sessions: intra-op threads = the cores this process may use, graph optimisation level "all",
no spin-waiting threads (see :meth:`OnnxSamModel.session_options`).
``InferenceSession.run`` is thread-safe, so one model serves concurrent requests.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from sam_backend.errors import CheckpointError, ConfigError, SamBackendError
from sam_backend.models.base import (Embedding, Prediction, Prompt, SegmentationModel, check_image,
                    resize_longest_side)
from sam_backend.models.registry import Variant, default_checkpoint

log = logging.getLogger(__name__)

# Bump when the graphs' inputs, outputs or semantics change: older files are re-exported.
FORMAT_VERSION = "1"
OPSET = 17
LOW_RES = 256
HASH_SIDECAR = "checkpoint-sha256.json"
_META = "sam_backend."

# Exports performed by this process, per part name ("encoder", "decoder", "encoder-int8"): tests
# and logs use it to prove that a cached export is reused.
export_counts: Dict[str, int] = {}
_export_counts_lock = threading.Lock()


class OnnxExportError(SamBackendError):
    """The checkpoint's graphs cannot be exported, or the export does not match torch.

    ``sam`` is the torch module loaded for the export (if any), so a fallback to the torch
    runtime need not load the checkpoint again."""

    def __init__(self, message: str, sam: Any = None):
        super().__init__(message)
        self.sam = sam


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
    differing pixel had |logit| <= 1.1e-4 (tests/models/test_onnx_runtime.py checks these bounds). About
    15 ms at 3840x2160 on 2 cores, vs. ~60 ms for torch's two interpolations.
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


# -- checkpoint digest ------------------------------------------------------------------------
def _files(directory: Path) -> List[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def file_sha256(path: Union[str, Path], chunk: int = 8 << 20) -> str:
    """SHA-256 of a file; of a hub-format checkpoint directory (SAM 3), over each file's relative
    name and digest."""
    path = Path(path)
    hasher = hashlib.sha256()
    if path.is_dir():
        for file in _files(path):
            hasher.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
        return hasher.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _stamp(path: Path) -> Dict[str, int]:
    """What tells a checkpoint changed without reading it: size and mtime (of a directory: its
    files' total size and newest mtime)."""
    stats = [p.stat() for p in _files(path)] if path.is_dir() else [path.stat()]
    return {"size": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def _write_json_atomic(path: Path, data: Any) -> None:
    _write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def _write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and ``os.replace`` it in place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def checkpoint_sha256(path: Union[str, Path], sidecar: Optional[Path] = None) -> str:
    """SHA-256 of the checkpoint, remembered in the json ``sidecar`` by (path, size, mtime)."""
    path = Path(path)
    key = str(path.resolve())
    stamp = _stamp(path)
    known: Dict[str, Any] = {}
    if sidecar is not None and sidecar.is_file():
        try:
            known = json.loads(sidecar.read_text(encoding="utf-8"))
            entry = known.get(key)
            if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()) \
                    and isinstance(entry.get("sha256"), str):
                return entry["sha256"]
        except (OSError, ValueError, AttributeError):
            known = {}
    started = time.perf_counter()
    digest = file_sha256(path)
    log.info("sha256 of %s computed in %.1f s", path, time.perf_counter() - started)
    if sidecar is not None:
        try:
            known = known if isinstance(known, dict) else {}
            # forget files that are gone, so the sidecar stays small
            known = {k: v for k, v in known.items() if os.path.exists(k)}
            known[key] = dict(stamp, sha256=digest)
            _write_json_atomic(sidecar, known)
        except OSError as exc:
            log.debug("cannot remember the digest of %s in %s: %s", path, sidecar, exc)
    return digest


# -- where the graphs live --------------------------------------------------------------------
def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def onnx_dir_for(checkpoint: Union[str, Path], weights_dir: Union[str, Path, None] = None) -> Path:
    """``<weights_dir or the checkpoint's directory>/onnx``, else ``~/.cache/sam_backend/onnx``
    when that directory cannot be written (e.g. read-only weights mounted into a container)."""
    base = Path(weights_dir) if weights_dir else Path(checkpoint).absolute().parent
    preferred = base / "onnx"
    if _writable_dir(preferred):
        return preferred
    fallback = Path.home() / ".cache" / "sam_backend" / "onnx"
    log.warning("%s is not writable: ONNX exports go to %s", preferred, fallback)
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def graph_path(onnx_dir: Path, digest: str, variant: Variant, part: str) -> Path:
    return onnx_dir / f"{digest[:16]}-{variant.key.replace('/', '-')}-{part}.onnx"


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (fcntl; a no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# -- the torch modules that are exported ------------------------------------------------------
def _encoder_module(sam, hq: bool):
    import torch

    class EncoderGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image_encoder = sam.image_encoder

        def forward(self, image: torch.Tensor):
            out = self.image_encoder(image)
            if hq:
                # MaskDecoderHQ.forward's first line depends on the image only: compute it once
                # per image here instead of at every click.
                features, interm = out
                md = sam.mask_decoder
                hq_features = md.embedding_encoder(features) + \
                    md.compress_vit_feat(interm[0].permute(0, 3, 1, 2))
                return features, hq_features
            return out

    return EncoderGraph().eval()


def _decoder_module(sam, hq: bool):
    import torch

    prompt_encoder, mask_decoder = sam.prompt_encoder, sam.mask_decoder

    class DecoderGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.prompt_encoder = prompt_encoder
            self.mask_decoder = mask_decoder
            with torch.no_grad():
                self.register_buffer("dense_pe", prompt_encoder.get_dense_pe().detach().clone())
            h, w = prompt_encoder.input_image_size
            self.register_buffer("input_wh", torch.tensor([float(w), float(h)]))

        def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            pe = self.prompt_encoder
            coords = (coords + 0.5) / self.input_wh  # PromptEncoder: shift to centre, normalise
            embedding = pe.pe_layer._pe_encoding(coords)
            labels = labels.unsqueeze(-1)
            padding = (labels == -1).to(embedding.dtype)
            embedding = embedding * (1.0 - padding) + pe.not_a_point_embed.weight * padding
            for i in range(pe.num_point_embeddings):  # 0/1: negative/positive, 2/3: box corners
                embedding = embedding + pe.point_embeddings[i].weight * \
                    (labels == i).to(embedding.dtype)
            return embedding

        def embed_mask(self, mask_input: torch.Tensor, has_mask: torch.Tensor) -> torch.Tensor:
            no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            return has_mask * self.prompt_encoder.mask_downscaling(mask_input) + \
                (1.0 - has_mask) * no_mask

        def decode(self, image_embeddings, hq_features, point_coords, point_labels, mask_input,
                   has_mask_input):
            sparse = self.embed_points(point_coords, point_labels)
            dense = self.embed_mask(mask_input, has_mask_input)
            kwargs = dict(image_embeddings=image_embeddings, image_pe=self.dense_pe,
                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
            if hq_features is not None:
                kwargs["hq_features"] = hq_features
            masks, iou = self.mask_decoder.predict_masks(**kwargs)
            return masks, iou

        def forward(self, image_embeddings, point_coords, point_labels, mask_input,
                    has_mask_input):
            return self.decode(image_embeddings, None, point_coords, point_labels, mask_input,
                               has_mask_input)

    class HQDecoderGraph(DecoderGraph):
        def forward(self, image_embeddings, hq_features, point_coords, point_labels, mask_input,
                    has_mask_input):
            return self.decode(image_embeddings, hq_features, point_coords, point_labels,
                               mask_input, has_mask_input)

    if hq:
        return HQDecoderGraph().eval()
    return DecoderGraph().eval()


def _decoder_example(sam, hq: bool):
    import torch

    emb = torch.randn(1, 256, 64, 64)
    # HQ: the fused HQ features at the low-res mask size (transformer_dim // 8 channels)
    hq_features = torch.randn(1, sam.mask_decoder.transformer_dim // 8, LOW_RES, LOW_RES)
    coords = torch.tensor([[[300.0, 400.0], [500.0, 200.0], [0.0, 0.0]]])
    labels = torch.tensor([[1.0, 0.0, -1.0]])
    mask_input = torch.zeros(1, 1, LOW_RES, LOW_RES)
    has_mask = torch.zeros(1)
    args = [emb] + ([hq_features] if hq else []) + [coords, labels, mask_input, has_mask]
    return tuple(args)


def _decoder_names(hq: bool):
    inputs = ["image_embeddings"] + (["hq_features"] if hq else []) + \
        ["point_coords", "point_labels", "mask_input", "has_mask_input"]
    return inputs, ["low_res_masks", "iou_predictions"]


def _torch_export(module, args, path: Path, input_names, output_names, dynamic_axes) -> str:
    """Export with the TorchScript exporter (fast, one file for < 2 GB); fall back to the dynamo
    exporter when it fails. Returns the exporter used."""
    import warnings

    import torch

    errors = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                kwargs: Dict[str, Any] = dict(input_names=input_names, output_names=output_names,
                                              opset_version=OPSET if not dynamo else 18,
                                              dynamo=dynamo)
                if dynamo:
                    if dynamic_axes:  # the forward's argument names are the input names
                        kwargs["dynamic_shapes"] = {
                            name: ({i: torch.export.Dim.AUTO for i in dynamic_axes[name]}
                                   if name in dynamic_axes else None)
                            for name in input_names}
                else:
                    kwargs["dynamic_axes"] = dynamic_axes or None
                    kwargs["do_constant_folding"] = True
                torch.onnx.export(module, args, str(path), **kwargs)
            return "dynamo" if dynamo else "torchscript"
        except Exception as exc:  # noqa: BLE001 - any exporter failure: try the other one
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            if not dynamo:
                log.warning("the TorchScript exporter failed (%s): trying the dynamo exporter",
                            errors[-1])
            for leftover in path.parent.iterdir():
                with contextlib.suppress(OSError):
                    leftover.unlink()
    raise OnnxExportError("; ".join(errors))


def _write_graph(path: Path, export, metadata) -> None:
    """Run ``export(tmp_path)`` (returning the exporter's name) in a private temporary directory
    next to ``path``, add ``metadata(exporter)`` to the graph and move the result in place:
    external weight data first, the .onnx last, each with ``os.replace``."""
    import onnx

    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.stem}."))
    try:
        tmp = tmpdir / path.name
        exporter = export(tmp)
        others = [p for p in tmpdir.iterdir() if p != tmp]
        data_name = path.name + ".data"
        if others and not (len(others) == 1 and others[0].name == data_name):
            # > 2 GB: the TorchScript exporter wrote one file per tensor; gather them into one.
            model = onnx.load(str(tmp), load_external_data=True)
            final_dir = tmpdir / "final"
            final_dir.mkdir()
            onnx.save_model(model, str(final_dir / path.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name,
                            size_threshold=1024)
            del model
            tmp = final_dir / path.name
        model = onnx.load(str(tmp), load_external_data=False)
        for key, value in metadata(exporter).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = _META + key, str(value)
        onnx.save_model(model, str(tmp))
        data = tmp.parent / data_name
        if data.exists():
            os.replace(data, path.parent / data_name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _quantize(source: Path, path: Path) -> str:
    """Dynamic int8 quantisation of the MatMul/Gemm weights (per output channel)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(path), op_types_to_quantize=["MatMul", "Gemm"],
                     per_channel=True, weight_type=QuantType.QInt8)
    return "quantize_dynamic(MatMul,Gemm,QInt8,per_channel)"


def _count_export(part: str) -> None:
    with _export_counts_lock:
        export_counts[part] = export_counts.get(part, 0) + 1


# -- the model --------------------------------------------------------------------------------
def available_memory() -> Optional[int]:
    """Bytes of memory available to new allocations (Linux MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def export_memory_needed(checkpoint_bytes: int) -> int:
    """Peak memory of exporting and checking a checkpoint of this size (measured peak RSS:
    vit_b 0.36 GB -> ~4.4 GB, vit_l 1.2 GB -> 11.7 GB; the tracer, the serialised graph and
    the torch and onnxruntime reference runs each hold a copy of the weights)."""
    return int(2e9 + 9 * checkpoint_bytes)


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class OnnxSamModel(SegmentationModel):
    """A variant's checkpoint, run by onnxruntime (see the module docstring).

    ``weights_dir``: where the ``onnx/`` cache directory goes (default: the checkpoint's
    directory). ``int8_encoder``: use a dynamically int8-quantised encoder (MatMul/Gemm weights);
    it is checked against the float32 graphs when it is made and not used (with a warning) when
    its masks differ (mask IoU < 0.99). ``threads``: onnxruntime intra-op threads (default: the
    cores this process may use). ``validate``: check fresh exports against torch.
    """

    runtime = "onnx"

    def __init__(self, variant: Variant, checkpoint: Union[str, Path, None] = None,
                 device: Optional[str] = "cpu", weights_dir: Union[str, Path, None] = None,
                 int8_encoder: bool = False, threads: Optional[int] = None,
                 validate: bool = True):
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
                      for part in ("encoder", "decoder", "encoder-int8")}
        try:
            sessions = self._open()
        finally:
            self._sam = None
            gc.collect()
        self._use(sessions["encoder"], sessions["decoder"])
        self.encoder_part = "encoder"
        if int8_encoder:
            int8 = self._open_int8()
            if int8 is not None:
                self._use(int8, self.decoder)
                self.encoder_part = "encoder-int8"
        log.info("onnx runtime for %s: %s + %s (%s, %d threads%s)", variant.key,
                 self.paths[self.encoder_part].name, self.paths["decoder"].name,
                 self.providers[0] if isinstance(self.providers[0], str) else
                 self.providers[0][0], self.threads,
                 f", exported now: {', '.join(self.exported)}" if self.exported else "")

    def _use(self, encoder, decoder) -> None:
        """Run with these sessions; the preprocessing constants come from the encoder's
        metadata (so a cached export needs no torch model)."""
        meta = encoder.get_modelmeta().custom_metadata_map
        self.pixel_mean = np.asarray(json.loads(meta[_META + "pixel_mean"]), np.float32)
        self.pixel_std = np.asarray(json.loads(meta[_META + "pixel_std"]), np.float32)
        self.img_size = int(meta[_META + "img_size"])
        self.mask_threshold = float(meta[_META + "mask_threshold"])
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
        # session's cores. Measured on 2 busy cores: a click took a median 65 ms without
        # spinning and 106 ms with it.
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
        if meta.get(_META + "format") != FORMAT_VERSION or \
                meta.get(_META + "checkpoint_sha256") != self.sha256:
            log.info("%s is of another format or checkpoint: exporting it again", path)
            return None
        return session

    def _open(self) -> Dict[str, Any]:
        parts = ("encoder", "decoder")
        sessions = {part: self._usable(part) for part in parts}
        if all(s is not None for s in sessions.values()):
            return sessions
        with _exclusive(self.onnx_dir / ".export.lock"):
            for part in parts:  # another process may have exported it while we waited
                if sessions[part] is None:
                    sessions[part] = self._usable(part)
            missing = [p for p in parts if sessions[p] is None]
            if missing:
                sessions.update(self._export(missing))
        return sessions

    def torch_model(self):
        """The checkpoint as a torch module (loaded strictly, once, only to export)."""
        if self._sam is None:
            from sam_backend.models.loading import load_model

            self._sam = load_model(self.variant, self.checkpoint, "cpu")
        return self._sam

    def _metadata(self, sam, part: str, exporter: str) -> Dict[str, str]:
        return {
            "format": FORMAT_VERSION,
            "part": part,
            "variant": self.variant.key,
            "family": self.variant.family,
            "checkpoint_sha256": self.sha256,
            "pixel_mean": json.dumps([float(v) for v in sam.pixel_mean.flatten()]),
            "pixel_std": json.dumps([float(v) for v in sam.pixel_std.flatten()]),
            "img_size": str(int(sam.image_encoder.img_size)),
            "mask_threshold": str(float(sam.mask_threshold)),
            "exporter": exporter,
        }

    def _export(self, parts: Sequence[str]) -> Dict[str, Any]:
        """Export ``parts`` (encoder/decoder), check them against torch, return their sessions."""
        import torch

        needed = export_memory_needed(self.checkpoint.stat().st_size)
        available = available_memory()
        if available is not None and available < needed:
            raise OnnxExportError(
                f"exporting {self.variant.key} to ONNX needs about {needed / 1e9:.0f} GB of "
                f"free memory, {available / 1e9:.1f} GB are available")
        sam = self.torch_model()
        started = time.perf_counter()
        try:
            for part in parts:
                t0 = time.perf_counter()
                if part == "encoder":
                    module = _encoder_module(sam, self._hq)
                    size = sam.image_encoder.img_size
                    x = torch.zeros(1, 3, size, size)
                    outputs = ["image_embeddings"] + (["hq_features"] if self._hq else [])
                    export = (lambda p: _torch_export(module, (x,), p, ["image"], outputs, {}))
                else:
                    module = _decoder_module(sam, self._hq)
                    inputs, outputs = _decoder_names(self._hq)
                    axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
                    example = _decoder_example(sam, self._hq)
                    export = (lambda p: _torch_export(module, example, p, inputs, outputs, axes))
                _write_graph(self.paths[part], export,
                             lambda exporter, part=part: self._metadata(sam, part, exporter))
                log.info("exported the %s of %s to %s in %.1f s", part, self.variant.key,
                         self.paths[part], time.perf_counter() - t0)
                self.exported.append(part)
                _count_export(part)
            sessions = {part: self._session(self.paths[part]) for part in ("encoder", "decoder")}
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
            self._remove(parts)
            raise
        except Exception as exc:  # noqa: BLE001 - reported as an export failure
            self._remove(parts)
            raise OnnxExportError(f"{type(exc).__name__}: {exc}", sam) from exc
        log.info("ONNX export of %s done in %.1f s (checked against torch: %s)", self.variant.key,
                 time.perf_counter() - started, self._validate)
        return sessions

    def _open_int8(self):
        """The int8 encoder's session, quantising and checking it first if needed; None (and a
        warning) when it does not keep the masks."""
        rejected = self.paths["encoder-int8"].with_suffix(".rejected")
        with _exclusive(self.onnx_dir / ".export.lock"):
            session = self._usable("encoder-int8")
            if session is not None:
                return session
            if rejected.is_file():
                log.warning("the int8 encoder of %s was rejected (%s): using float32",
                            self.variant.key, rejected.read_text(encoding="utf-8").strip())
                return None
            fp32 = self.paths["encoder"]
            meta = self.encoder.get_modelmeta().custom_metadata_map
            metadata = {k[len(_META):]: v for k, v in meta.items() if k.startswith(_META)}
            metadata["part"] = "encoder-int8"
            _write_graph(self.paths["encoder-int8"], lambda p: _quantize(fp32, p),
                         lambda exporter: dict(metadata, exporter=exporter))
            self.exported.append("encoder-int8")
            _count_export("encoder-int8")
            session = self._session(self.paths["encoder-int8"])
            fp32_session = self.encoder
            self.encoder = session
            try:
                problem = self._disagreement(lambda image: self.embed(image, fp32_session),
                                             self.decode, feature_tolerance=None)
            finally:
                self.encoder = fp32_session
            if problem:
                self._remove(["encoder-int8"])
                _write_text_atomic(rejected, problem + "\n")
                log.warning("the int8 encoder of %s changes the masks (%s): using float32",
                            self.variant.key, problem)
                return None
            return session

    def _remove(self, parts: Sequence[str]) -> None:
        for part in parts:
            for path in (self.paths[part], self.paths[part].with_name(
                    self.paths[part].name + ".data")):
                with contextlib.suppress(OSError):
                    path.unlink()

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
            ref_features = _as_float32(theirs.features)
            err = float(np.abs(ours.features - ref_features).max())
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

    def embed(self, image: np.ndarray, session=None) -> Embedding:
        check_image(image)
        x, input_size = self.preprocess(image)
        outputs = (session or self.encoder).run(None, {"image": x})
        features = outputs[0]
        extra = [outputs[1]] if self._hq else None
        return Embedding(features, extra, tuple(image.shape[:2]), input_size)

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
            "image_embeddings": _as_float32(embedding.features),
            "point_coords": np.concatenate(coords).astype(np.float32)[None],
            "point_labels": np.concatenate(labels).astype(np.float32)[None],
            "mask_input": mask_input,
            "has_mask_input": has_mask,
        }
        if self._hq:
            feed["hq_features"] = _as_float32(embedding.extra[0])
        return feed

    def decode_low_res(self, embedding: Embedding, prompt: Prompt) -> Tuple[np.ndarray, float]:
        """The chosen mask's low-res logits (256x256 float32) and its predicted IoU, picked as
        ``MaskDecoder.forward`` / ``MaskDecoderHQ.forward`` (hq_token_only=False) pick them."""
        masks, iou = self.decoder.run(None, self.decoder_inputs(embedding, prompt))
        masks, iou = masks[0], iou[0]
        best = 1 + int(np.argmax(iou[1:4])) if prompt.multimask else 0
        chosen = masks[best]
        if self._hq:
            chosen = chosen + masks[-1]  # masks_sam + masks_hq
        return np.ascontiguousarray(chosen, dtype=np.float32), float(iou[best])

    def decode(self, embedding: Embedding, prompt: Prompt) -> Prediction:
        chosen, score = self.decode_low_res(embedding, prompt)
        mask = upscale_mask(chosen, embedding.input_size, embedding.original_size,
                            self.mask_threshold, self.img_size)
        return Prediction(mask, score, chosen[None])


def _as_float32(array: Any) -> np.ndarray:
    if not isinstance(array, np.ndarray) and hasattr(array, "detach"):  # a torch tensor
        array = array.detach().float().cpu().numpy()
    return np.ascontiguousarray(array, dtype=np.float32)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)
