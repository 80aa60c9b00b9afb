"""Exporting a SAM / HQ-SAM checkpoint's encoder and decoder to ONNX, once per checkpoint.

The graphs (inputs, outputs, what runs where) are described in :mod:`.onnx_runtime`, which runs
them. This module makes them and keeps them:

- Files live in ``<weights_dir or the checkpoint's directory>/onnx/`` (falling back to
  ``~/.cache/sam_backend/onnx`` when that is not writable), named by the first 16 hex digits of the
  checkpoint's SHA-256 (:func:`graph_path`), so a changed checkpoint never reuses stale graphs.
  The digest of a checkpoint is remembered in ``onnx/checkpoint-sha256.json`` by (path, size,
  mtime) so that a large file is not re-hashed at every start (:func:`checkpoint_sha256`).
- An export is written to a temporary directory and moved in place with ``os.replace`` (external
  weight data first, the ``.onnx`` last: :func:`write_graph`); callers hold an inter-process lock
  so that concurrent workers export once. Each export logs ``exported the <part> of <variant>
  to <path>``.
- Each graph carries ``sam_backend.*`` metadata (format version, checkpoint digest, pixel
  mean/std, ...); a file of another format version is re-exported.
- A machine without the memory an export needs (:func:`export_memory_needed`) gets an
  :class:`OnnxExportError` rather than being killed mid-export. Export times are in
  benchmarks/README.md.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from sam_backend.common.files import atomic_write, sha256_of, stamp_of
from sam_backend.errors import SamBackendError
from sam_backend.models.registry import Variant

log = logging.getLogger(__name__)

# Bump when the graphs' inputs, outputs or semantics change: older files are re-exported.
FORMAT_VERSION = "1"
OPSET = 17
LOW_RES = 256
HASH_SIDECAR = "checkpoint-sha256.json"
META = "sam_backend."
PARTS = ("encoder", "decoder")


class OnnxExportError(SamBackendError):
    """The checkpoint's graphs cannot be exported, or the export does not match torch.

    ``sam`` is the torch module loaded for the export (if any), so a fallback to the torch
    runtime need not load the checkpoint again."""

    def __init__(self, message: str, sam: Any = None):
        super().__init__(message)
        self.sam = sam



# -- checkpoint digest ------------------------------------------------------------------------
def checkpoint_sha256(path: Union[str, Path], sidecar: Optional[Path] = None) -> str:
    """SHA-256 of the checkpoint, remembered in the json ``sidecar`` by (path, size, mtime)."""
    path = Path(path)
    key = str(path.resolve())
    stamp = stamp_of(path)
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
    digest = sha256_of(path)
    log.info("sha256 of %s computed in %.1f s", path, time.perf_counter() - started)
    if sidecar is not None:
        try:
            known = known if isinstance(known, dict) else {}
            # forget files that are gone, so the sidecar stays small
            known = {k: v for k, v in known.items() if os.path.exists(k)}
            known[key] = dict(stamp, sha256=digest)
            atomic_write(sidecar, json.dumps(known, indent=1, sort_keys=True))
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


def write_graph(path: Path, export, metadata) -> None:
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
            entry.key, entry.value = META + key, str(value)
        onnx.save_model(model, str(tmp))
        data = tmp.parent / data_name
        if data.exists():
            os.replace(data, path.parent / data_name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)



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
    """Peak memory, bytes, of exporting and checking a checkpoint of ``checkpoint_bytes``: the
    tracer, the serialised graph and the torch and onnxruntime reference runs each hold a copy
    of the weights (the peaks this bound was fitted to are in benchmarks/README.md)."""
    return int(2e9 + 9 * checkpoint_bytes)


def graph_metadata(sam, variant: Variant, sha256: str, part: str, exporter: str) -> Dict[str, str]:
    """The ``sam_backend.*`` metadata of a graph (without the prefix)."""
    return {
        "format": FORMAT_VERSION,
        "part": part,
        "variant": variant.key,
        "family": variant.family,
        "checkpoint_sha256": sha256,
        "pixel_mean": json.dumps([float(v) for v in sam.pixel_mean.flatten()]),
        "pixel_std": json.dumps([float(v) for v in sam.pixel_std.flatten()]),
        "img_size": str(int(sam.image_encoder.img_size)),
        "mask_threshold": str(float(sam.mask_threshold)),
        "exporter": exporter,
    }


def check_export_memory(variant: Variant, checkpoint: Path) -> None:
    """OnnxExportError when this machine lacks the memory to export ``checkpoint`` (checked
    before anything is loaded)."""
    needed = export_memory_needed(checkpoint.stat().st_size)
    available = available_memory()
    if available is not None and available < needed:
        raise OnnxExportError(
            f"exporting {variant.key} to ONNX needs about {needed / 1e9:.0f} GB of "
            f"free memory, {available / 1e9:.1f} GB are available")


def export_graphs(sam, variant: Variant, sha256: str, paths: Mapping[str, Path],
                  parts: Sequence[str]) -> None:
    """Export ``parts`` (``encoder``, ``decoder``) of the loaded torch ``sam`` to ``paths[part]``
    (the caller holds the export lock, and checked :func:`check_export_memory`). Raises
    OnnxExportError when no exporter succeeds; what was written is then removed."""
    import torch

    hq = variant.family == "sam_hq"
    try:
        for part in parts:
            started = time.perf_counter()
            if part == "encoder":
                module = _encoder_module(sam, hq)
                size = sam.image_encoder.img_size
                x = torch.zeros(1, 3, size, size)
                outputs = ["image_embeddings"] + (["hq_features"] if hq else [])
                export = (lambda p: _torch_export(module, (x,), p, ["image"], outputs, {}))
            else:
                module = _decoder_module(sam, hq)
                inputs, outputs = _decoder_names(hq)
                axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
                example = _decoder_example(sam, hq)
                export = (lambda p: _torch_export(module, example, p, inputs, outputs, axes))
            write_graph(paths[part], export, lambda exporter, part=part: graph_metadata(
                sam, variant, sha256, part, exporter))
            log.info("exported the %s of %s to %s in %.1f s", part, variant.key, paths[part],
                     time.perf_counter() - started)
    except BaseException:
        remove_graphs(paths[part] for part in parts)
        raise


def remove_graphs(paths) -> None:
    """Delete these graph files and their external weight data (``<name>.data``), if present."""
    for path in paths:
        for file in (path, path.with_name(path.name + ".data")):
            with contextlib.suppress(OSError):
                file.unlink()

