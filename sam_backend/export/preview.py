"""``sam-backend preview``: draw a dataset as images, the check made before training on it.

What can be drawn (:func:`read_dataset`):

- a COCO export: ``export-coco``'s output directory (``annotations/ann.json`` + ``images/``) or
  any COCO annotations file (its images looked up under ``images/`` beside or above it, or beside
  it, or under ``--images DIR``);
- a YOLO export: the layout ``export-yolo`` writes (``data.yaml``, ``images/[train|val/]``,
  ``labels/[train|val/]<stem>.txt``: one normalised polygon per object, or ``cx cy w h`` boxes);
- a Label Studio JSON export file or ``--project ID`` (Label Studio's API): converted exactly as
  the exporters convert it (:func:`sam_backend.export.convert.convert`, one object = one
  annotation), so the preview shows the objects a training run would get.

Each image is written as ``OUT_DIR/<name>.png`` with every object drawn (:func:`draw_objects`):
its mask as a translucent fill (:data:`ALPHA` of the label's colour) with its outline, its box,
and its label in a tag of the label's colour; one colour per label, in category order
(:data:`PALETTE`). ``OUT_DIR/contact_sheet.png`` is a grid of thumbnails (:func:`contact_sheet`):
``columns`` cells across, each ``thumb`` x ``thumb`` pixels, the image fitted and centred.

An image that cannot be read or whose size disagrees with its annotations is skipped and counted;
a missing dataset, or one that is neither layout, is an :class:`~.report.ExportError` (exit 2).
Arrays are OpenCV's: HxWx3 uint8 **BGR**; masks HxW bool; boxes ``[x, y, w, h]`` pixels (COCO).
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from sam_backend.export.report import ExportError, plural

logger = logging.getLogger(__name__)

#: one BGR colour per label, in category order (cycled past the 10th label)
PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (56, 56, 255), (255, 157, 56), (56, 200, 56), (255, 56, 200), (0, 200, 255),
    (200, 255, 0), (147, 56, 255), (255, 255, 56), (56, 128, 128), (128, 56, 0))
#: the mask fill: ALPHA of the label's colour over the image
ALPHA = 0.45
CONTACT_SHEET = "contact_sheet.png"
DEFAULT_LIMIT = 64
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class PreviewObject:
    """One object: its label, COCO ``segmentation`` (an RLE dict, a list of pixel polygons
    ``[x1, y1, x2, y2, ...]``, or None for a box only) and ``bbox`` ``[x, y, w, h]`` pixels."""

    label: str
    bbox: Sequence[float]
    segmentation: Any = None


@dataclass
class PreviewImage:
    name: str  # shown on the contact sheet; the output file is <stem>.png
    read: Callable[[], bytes]  # the image file's bytes; raises OSError / SamBackendError
    objects: List[PreviewObject]
    size: Optional[Tuple[int, int]] = None  # (width, height) the annotations were made on


@dataclass
class Dataset:
    kind: str  # "COCO export", "YOLO export", "Label Studio export", "Label Studio project"
    where: str
    labels: List[str]  # in category order: the colour of labels[i] is PALETTE[i]
    images: List[PreviewImage]
    skipped: List[str] = field(default_factory=list)  # why each skipped image was skipped


@dataclass
class PreviewReport:
    dataset: Dataset
    out_dir: str
    drawn: List[str] = field(default_factory=list)  # PNGs written
    objects: Counter = field(default_factory=Counter)  # label -> objects drawn
    skipped: List[str] = field(default_factory=list)
    contact_sheet: Optional[str] = None

    def summary(self) -> str:
        labels = ", ".join(f"{label} {n}" for label, n in sorted(self.objects.items()))
        text = (f"preview of {self.dataset.kind} {self.dataset.where}: "
                f"{plural(len(self.drawn), 'image')} drawn, "
                f"{plural(sum(self.objects.values()), 'object')} ({labels or 'none'})")
        if self.skipped:
            text += f", {len(self.skipped)} skipped"
        if self.contact_sheet:
            text += f" -> {self.out_dir} (contact sheet {self.contact_sheet})"
        return text


# -- reading a dataset ----------------------------------------------------------------------------

def _load_json(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc})") from None


def _file_reader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def read_coco(ann_file: Path, coco: dict, limit: Optional[int],
              images_dir: Optional[str] = None) -> Dataset:
    """A COCO annotations dict (read from ``ann_file``) as a Dataset."""
    if not all(isinstance(coco.get(k), list) for k in ("images", "annotations")):
        raise ExportError(f"{ann_file} is not a COCO annotations file (no 'images' and "
                          "'annotations' lists)")
    categories = sorted((c for c in coco.get("categories") or [] if isinstance(c, dict)),
                        key=lambda c: c.get("id", 0))
    names = {c.get("id"): str(c.get("name")) for c in categories}
    roots = ([Path(images_dir)] if images_dir else
             [ann_file.parent.parent / "images", ann_file.parent / "images", ann_file.parent,
              ann_file.parent.parent])
    by_image: Dict[Any, List[dict]] = {}
    for ann in coco["annotations"]:
        if isinstance(ann, dict):
            by_image.setdefault(ann.get("image_id"), []).append(ann)
    images = []
    for entry in coco["images"][:limit]:
        file_name = str(entry.get("file_name", ""))
        path = next((root / file_name for root in roots if (root / file_name).is_file()),
                    roots[0] / file_name)
        objects = [PreviewObject(names.get(a.get("category_id"), str(a.get("category_id"))),
                                 a.get("bbox") or [0, 0, 0, 0], a.get("segmentation") or None)
                   for a in by_image.get(entry.get("id"), [])]
        size = (entry["width"], entry["height"]) if "width" in entry and "height" in entry else None
        images.append(PreviewImage(file_name, _file_reader(path), objects, size))
    return Dataset("COCO export", str(ann_file), list(names.values()), images)


def _yolo_names(data_yaml: Path) -> List[str]:
    import yaml

    try:
        data = yaml.safe_load(data_yaml.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot read {data_yaml}: {exc}") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names, key=int)]
    if isinstance(names, list):
        return [str(n) for n in names]
    raise ExportError(f"{data_yaml} has no 'names' (the class names of a YOLO dataset)")


def read_yolo(root: Path, limit: Optional[int]) -> Dataset:
    """A YOLO layout (``data.yaml``, ``images/``, ``labels/``) as a Dataset; a label line is
    ``class x1 y1 x2 y2 ...`` (a polygon) or ``class cx cy w h`` (a box), normalised."""
    from sam_backend.export.source import header_size

    names = _yolo_names(root / "data.yaml")
    images_root = root / "images"
    if not images_root.is_dir():
        raise ExportError(f"{root} has a data.yaml but no images/ directory (not the YOLO layout "
                          "export-yolo writes)")
    files = sorted(p for p in images_root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    dataset = Dataset("YOLO export", str(root), names, [])
    for path in files[:limit]:
        rel = path.relative_to(images_root)
        label_file = root / "labels" / rel.with_suffix(".txt")
        try:
            header = header_size(path.read_bytes())  # the size EXIF orientation applied
        except OSError as exc:
            header = None
            logger.debug("cannot read %s: %s", path, exc)
        if header is None or header[1] < 0:
            dataset.skipped.append(f"{rel}: not an image that can be read")
            logger.warning("%s; skipped", dataset.skipped[-1])
            continue
        _, width, height = header
        objects = []
        lines = label_file.read_text(encoding="utf-8").splitlines() if label_file.is_file() else []
        for number, line in enumerate(lines, start=1):
            values = line.split()
            if not values:
                continue
            try:
                cls, coords = int(values[0]), np.array(values[1:], dtype=np.float64)
            except ValueError:
                coords = np.zeros(1)
                cls = -1
            if cls < 0 or (len(coords) != 4 and (len(coords) < 6 or len(coords) % 2)):
                logger.warning("%s line %d is not a YOLO label (class and a box or polygon); "
                               "left out", label_file, number)
                continue
            label = names[cls] if cls < len(names) else str(cls)
            if len(coords) == 4:
                cx, cy, w, h = coords * [width, height, width, height]
                objects.append(PreviewObject(label, [cx - w / 2, cy - h / 2, w, h]))
                continue
            points = coords.reshape(-1, 2) * [width, height]
            x0, y0 = points.min(axis=0)
            x1, y1 = points.max(axis=0)
            objects.append(PreviewObject(label, [x0, y0, x1 - x0, y1 - y0],
                                         [points.ravel().tolist()]))
        dataset.images.append(PreviewImage(str(rel), _file_reader(path), objects,
                                           (width, height)))
    return dataset


def read_tasks(source, limit: Optional[int], image_loader=None,
               upload_dir: Optional[str] = None) -> Dataset:
    """A Label Studio JSON export file or :class:`~.source.ProjectSource`, converted as the
    exporters convert it; only the first ``limit`` labelled tasks are fetched."""
    from sam_backend.export.convert import convert
    from sam_backend.export.source import (ProjectSource, check_upload_dir, make_image_fetcher,
                                           open_source, used_annotations)

    check_upload_dir(upload_dir)
    fetched: Dict[str, bytes] = {}
    with open_source(source, image_loader) as (tasks, loader):
        labelled = [t for t in tasks if isinstance(t, dict) and used_annotations(t)]
        coco, report = convert(labelled[:limit], None, make_image_fetcher(loader, upload_dir),
                               on_image=fetched.__setitem__, progress=False)
    kind = "Label Studio project" if isinstance(source, ProjectSource) else "Label Studio export"
    where = str(source.project_id) if isinstance(source, ProjectSource) else str(source)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    by_image: Dict[int, List[PreviewObject]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(
            PreviewObject(names[ann["category_id"]], ann["bbox"], ann["segmentation"] or None))
    images = [PreviewImage(i["file_name"], (lambda name=i["file_name"]: fetched[name]),
                           by_image.get(i["id"], []), (i["width"], i["height"]))
              for i in coco["images"]]
    skipped = [str(p) for p in report.problems if p.task_id in report.skipped_tasks]
    return Dataset(kind, where, list(names.values()), images, skipped)


def read_dataset(path: Optional[str] = None, project=None, limit: Optional[int] = DEFAULT_LIMIT,
                 images_dir: Optional[str] = None, image_loader=None,
                 upload_dir: Optional[str] = None) -> Dataset:
    """The dataset at ``path`` (a COCO export directory or annotations file, a YOLO export
    directory, a Label Studio JSON export file), or the ``project``
    (:class:`~.source.ProjectSource`); at most ``limit`` images (None: all)."""
    if project is not None:
        return read_tasks(project, limit, image_loader, upload_dir)
    if not path:
        raise ExportError("nothing to preview: give a dataset (a COCO or YOLO export directory, "
                          "a COCO annotations file, a Label Studio JSON export) or --project ID")
    where = Path(os.path.expanduser(path))
    if not where.exists():
        raise ExportError(f"{path} not found")
    if where.is_dir():
        if (where / "annotations" / "ann.json").is_file():
            ann_file = where / "annotations" / "ann.json"
            return read_coco(ann_file, _load_json(ann_file), limit, images_dir)
        if (where / "data.yaml").is_file():
            return read_yolo(where, limit)
        raise ExportError(f"{path} is neither a COCO export (annotations/ann.json) nor a YOLO "
                          "export (data.yaml, images/, labels/)")
    data = _load_json(where)
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return read_coco(where, data, limit, images_dir)
    if isinstance(data, list) or (isinstance(data, dict) and "data" in data):
        return read_tasks(str(where), limit, image_loader, upload_dir)
    raise ExportError(f"{path} is neither a COCO annotations file ('images', 'annotations') nor "
                      "a Label Studio JSON export (a list of tasks)")


# -- drawing --------------------------------------------------------------------------------------

def colour_of(index: int) -> Tuple[int, int, int]:
    """The BGR colour of the ``index``-th label."""
    return PALETTE[index % len(PALETTE)]


def object_mask(obj: PreviewObject, width: int, height: int) -> Optional[np.ndarray]:
    """The object's HxW bool mask (None for a box only)."""
    import cv2

    seg = obj.segmentation
    if not seg:
        return None
    if isinstance(seg, dict):  # COCO RLE (compressed, or uncompressed counts)
        from pycocotools import mask as mask_utils

        rle = seg if isinstance(seg.get("counts"), (str, bytes)) else \
            mask_utils.frPyObjects(seg, *seg["size"])
        return mask_utils.decode(rle).astype(bool)
    mask = np.zeros((height, width), np.uint8)
    polygons = [np.round(np.asarray(p, np.float64).reshape(-1, 2)).astype(np.int32)
                for p in seg if len(p) >= 6]
    cv2.fillPoly(mask, polygons, 1)
    return mask.astype(bool)


def _line_width(image: np.ndarray) -> int:
    return max(1, int(round(max(image.shape[:2]) / 500)))


def draw_objects(image: np.ndarray, objects: Sequence[PreviewObject], labels: Sequence[str]
                 ) -> np.ndarray:
    """A copy of ``image`` (HxWx3 uint8 BGR) with each object drawn: the mask filled with
    :data:`ALPHA` of its label's colour and outlined, then (on top of every fill) the box and
    the label tag."""
    import cv2

    out = image.copy()
    height, width = out.shape[:2]
    index = {label: i for i, label in enumerate(labels)}
    thickness = _line_width(out)
    for obj in objects:
        mask = object_mask(obj, width, height)
        if mask is None or mask.shape != (height, width):
            continue
        colour = np.array(colour_of(index.get(obj.label, len(labels))), np.float64)
        out[mask] = np.round(out[mask] * (1 - ALPHA) + colour * ALPHA).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour_of(index.get(obj.label, len(labels))), 1)
    scale = max(0.35, min(height, width) / 900)
    for obj in objects:
        colour = colour_of(index.get(obj.label, len(labels)))
        x, y, w, h = (float(v) for v in obj.bbox)
        x0, y0 = int(round(x)), int(round(y))
        x1, y1 = max(x0, int(round(x + w)) - 1), max(y0, int(round(y + h)) - 1)
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, thickness)
        (tw, th), base = cv2.getTextSize(obj.label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top = y0 - th - base - 2 if y0 - th - base - 2 >= 0 else y0  # above the box if room
        cv2.rectangle(out, (x0, top), (x0 + tw + 2, top + th + base + 2), colour, -1)
        ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
        cv2.putText(out, obj.label, (x0 + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, ink,
                    1, cv2.LINE_AA)
    return out


def contact_sheet(images: Sequence[Tuple[str, np.ndarray]], thumb: int = 256,
                  columns: int = 4) -> np.ndarray:
    """A grid of thumbnails: ``min(columns, n)`` cells across, ``ceil(n / columns)`` down, each
    ``thumb`` x ``thumb`` pixels holding one image (fitted, centred, named at the bottom)."""
    import cv2

    if not images:
        raise ValueError("a contact sheet needs at least one image")
    across = max(1, min(columns, len(images)))
    down = math.ceil(len(images) / across)
    sheet = np.full((down * thumb, across * thumb, 3), 40, np.uint8)
    for k, (name, image) in enumerate(images):
        h, w = image.shape[:2]
        scale = min(thumb / w, thumb / h)
        tw, th = max(1, int(w * scale)), max(1, int(h * scale))
        small = cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA)
        top, left = (k // across) * thumb, (k % across) * thumb
        y0, x0 = top + (thumb - th) // 2, left + (thumb - tw) // 2
        sheet[y0:y0 + th, x0:x0 + tw] = small
        cv2.putText(sheet, name[-32:], (left + 3, top + thumb - 5), cv2.FONT_HERSHEY_SIMPLEX,
                    0.35, (255, 255, 255), 1, cv2.LINE_AA)
    return sheet


def _png_name(name: str, used: set) -> str:
    stem = Path(name).stem or "image"
    candidate, n = f"{stem}.png", 1
    while candidate.casefold() in used:
        n += 1
        candidate = f"{stem}_{n}.png"
    used.add(candidate.casefold())
    return candidate


def render(dataset: Dataset, out_dir: str, thumb: int = 256, columns: int = 4) -> PreviewReport:
    """Draw every image of ``dataset`` into ``out_dir`` (one PNG each, plus the contact sheet)."""
    import cv2

    from sam_backend.errors import SamBackendError
    from sam_backend.export.convert import prepare_output, write_file

    out = prepare_output(out_dir, ["."])
    report = PreviewReport(dataset, str(out), skipped=list(dataset.skipped))
    thumbs: List[Tuple[str, np.ndarray]] = []
    used: set = set()
    for item in dataset.images:
        try:
            data = item.read()
        except (OSError, SamBackendError) as exc:
            report.skipped.append(f"{item.name}: cannot be read ({exc})")
            logger.warning("%s; skipped", report.skipped[-1])
            continue
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            report.skipped.append(f"{item.name}: not an image OpenCV can read "
                                  f"({len(data)} bytes)")
            logger.warning("%s; skipped", report.skipped[-1])
            continue
        height, width = image.shape[:2]
        if item.size is not None and tuple(item.size) != (width, height):
            report.skipped.append(f"{item.name}: the image is {width}x{height} but its "
                                  f"annotations were made on {item.size[0]}x{item.size[1]}")
            logger.warning("%s; skipped", report.skipped[-1])
            continue
        drawn = draw_objects(image, item.objects, dataset.labels)
        ok, png = cv2.imencode(".png", drawn)
        name = _png_name(item.name, used | {CONTACT_SHEET})
        write_file(out / name, png.tobytes())
        report.drawn.append(name)
        report.objects.update(o.label for o in item.objects)
        thumbs.append((item.name, drawn))
    if thumbs:
        ok, png = cv2.imencode(".png", contact_sheet(thumbs, thumb, columns))
        write_file(out / CONTACT_SHEET, png.tobytes())
        report.contact_sheet = str(out / CONTACT_SHEET)
    return report


# -- the command ----------------------------------------------------------------------------------

def _run(args) -> int:
    from sam_backend.export.cli import task_source

    source = task_source(args)
    given = [x for x in (args.dataset, source) if x is not None]
    if len(given) > 1:
        raise ExportError("give one dataset: a path, --json_file_path or --project, not several")
    if args.limit is not None and args.limit < 1:
        raise ExportError(f"--limit {args.limit} must be at least 1")
    if args.thumb < 16 or args.columns < 1:
        raise ExportError("--thumb must be at least 16 pixels and --columns at least 1")
    from sam_backend.export.source import ProjectSource

    project = source if isinstance(source, ProjectSource) else None
    path = args.dataset if args.dataset is not None else (None if project else source)
    dataset = read_dataset(path, project, args.limit, args.images, upload_dir=args.upload_dir)
    if not dataset.images and not dataset.skipped:
        raise ExportError(f"{dataset.kind} {dataset.where} has no labelled image to draw")
    report = render(dataset, args.out_dir, args.thumb, args.columns)
    print(report.summary())
    for why in report.skipped:
        print(f"  skipped {why}")
    if not report.drawn:
        logger.error("no image could be drawn (see the skipped images above)")
        return 1
    return 0


def register_cli(subparsers) -> None:
    from sam_backend.export.cli import add_source_arguments

    parser = subparsers.add_parser(
        "preview", help="draw a dataset (COCO or YOLO export, Label Studio export or project): "
                        "masks, boxes and labels, one PNG per image plus a contact sheet",
        description="Draw each image of a dataset with its objects (mask as a translucent fill, "
                    "box, label) into OUT_DIR/<image>.png, and a grid of thumbnails into "
                    f"OUT_DIR/{CONTACT_SHEET}. Exit code 0 when an image was drawn, 1 when none "
                    "could be, 2 when the dataset cannot be read.")
    parser.add_argument("dataset", nargs="?", default=None, metavar="DATASET",
                        help="a COCO export directory (annotations/ann.json, images/) or COCO "
                             "annotations file, a YOLO export directory (data.yaml, images/, "
                             "labels/), or a Label Studio JSON export file")
    add_source_arguments(parser, required=False)
    parser.add_argument("--out_dir", "--out-dir", dest="out_dir", required=True, metavar="DIR",
                        help=f"where the PNGs and {CONTACT_SHEET} are written")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
                        help=f"draw at most N images (default {DEFAULT_LIMIT})")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="a COCO file's images directory (default: images/ beside or above "
                             "the annotations file, or beside it)")
    parser.add_argument("--upload_dir", "--upload-dir", dest="upload_dir", default=None,
                        metavar="DIR", help="Label Studio's media upload directory, as for "
                                            "export-coco")
    parser.add_argument("--thumb", type=int, default=256,
                        help="contact sheet cell size in pixels (default 256)")
    parser.add_argument("--columns", type=int, default=4,
                        help="contact sheet cells across (default 4)")
    parser.set_defaults(func=_run)


__all__ = ["ALPHA", "CONTACT_SHEET", "Dataset", "PALETTE", "PreviewImage", "PreviewObject",
           "PreviewReport", "colour_of", "contact_sheet", "draw_objects", "read_dataset",
           "register_cli", "render"]
