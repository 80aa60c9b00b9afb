"""The export commands: ``sam-backend export-coco`` (:mod:`.coco`) and ``sam-backend
export-yolo`` (:mod:`.yolo`), with the options they share::

    sam-backend export-coco --json_file_path project.json --out_dir dataset [--classes cat,dog]
                            [--upload_dir ~/.local/share/label-studio/media/upload] [--no_images]
                            [--keep-all-regions] [--val-fraction 0.2 --seed 0]
                            [--mmdet-config mask-rcnn_r50_fpn|rtmdet-ins_s]
    sam-backend export-yolo --json_file_path project.json --out_dir yolo [same options]
                            [--boxes-as-polygons]
    sam-backend export-coco --project 3 [--url http://localhost:8080] --out_dir dataset
    sam-backend export-video-coco --json_file_path project.json --out_dir dataset [--no_images]
    sam-backend export-mot --json_file_path project.json --out_dir mot

The video commands (:mod:`.video`) read ``videorectangle`` tracks with the same sources and
options.

``--project ID`` reads the project from Label Studio's API instead of an export file (address and
token as ``sam-backend annotate`` takes them); the objects are the same as from its JSON export.

Both print what to paste into a training config (the categories / class indices) on stdout.
Exit code: 0 when anything was exported (even with problems, which are listed), 1 when no image
could be exported, 2 when the export (or the project) cannot be read or the options are wrong. A
new output format is a module of this folder plus one :func:`_add_command` call here.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Callable, Optional

from sam_backend.export.report import ExportReport
from sam_backend.export.source import ProjectSource, TaskSource

logger = logging.getLogger(__name__)


def _add_command(subparsers, name: str, summary: str, description: str, outputs: str,
                 classes_help: str, run: Callable[[argparse.Namespace], int],
                 own_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """One export command: the options every export takes (the export file, the output
    directory, the classes, Label Studio's upload directory, ``--keep-all-regions``, the
    train/val split) around the command's ``own_options``."""
    parser = subparsers.add_parser(name, help=summary, description=description)
    add_source_arguments(parser, required=True)
    parser.add_argument("--out_dir", "--out-dir", dest="out_dir", required=True, metavar="DIR",
                        help=f"output directory ({outputs})")
    parser.add_argument("--classes", default=None, metavar="a,b,c",
                        help=f"{classes_help}; labels not listed are skipped. "
                             "Default: every label in the export, sorted by name")
    parser.add_argument("--upload_dir", "--upload-dir", dest="upload_dir", default=None,
                        metavar="DIR",
                        help="Label Studio's media upload directory: /data/upload/<project>/<file> "
                             "is read from DIR/<project>/<file> when present, before downloading")
    own_options(parser)
    parser.add_argument("--keep-all-regions", "--keep_all_regions", dest="keep_all_regions",
                        action="store_true",
                        help="one annotation per region (brush, polygon, rectangle) instead of "
                             "one per object: the regions of one object are not merged")
    parser.add_argument("--val-fraction", "--val_fraction", dest="val_fraction", type=float,
                        default=0.0, metavar="F",
                        help="put this fraction of the images (0 <= F < 1) in a validation split, "
                             "chosen at random by image (default 0: no split)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the train/val split (default 0)")
    parser.set_defaults(func=run)


def add_source_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """Where the tasks come from: ``--json_file_path EXPORT.json`` or ``--project ID`` (Label
    Studio's API, its address and token as ``sam-backend annotate`` takes them: ``--url`` /
    ``--token`` over ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY``)."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--json_file_path", "--json-file-path", dest="json_file_path",
                       default=None, metavar="EXPORT.json",
                       help="the project exported from Label Studio in the 'JSON' format")
    group.add_argument("--project", type=int, default=None, metavar="ID",
                       help="read the project's tasks and annotations from Label Studio's API "
                            "instead of an export file")
    parser.add_argument("--url", dest="label_studio_url", default=None,
                        help="with --project: Label Studio's address (default: LABEL_STUDIO_URL)")
    parser.add_argument("--token", dest="label_studio_api_key", default=None,
                        help="with --project: a legacy or personal access token (default: "
                             "LABEL_STUDIO_API_KEY; prefer the variable: a flag shows in the "
                             "process list)")


def task_source(args: argparse.Namespace) -> Optional[TaskSource]:
    """The export file, or the :class:`~.source.ProjectSource` ``--project`` names (None when
    neither was given)."""
    if args.project is not None:
        return ProjectSource(args.project, args.label_studio_url, args.label_studio_api_key)
    return args.json_file_path


def _export(export: Callable[..., Any], args: argparse.Namespace, **own: Any) -> Any:
    """``export(...)`` (export_coco or export_yolo) with the shared options of ``args``."""
    return export(task_source(args), args.out_dir, classes=args.classes,
                  upload_dir=args.upload_dir, keep_all_regions=args.keep_all_regions,
                  val_fraction=args.val_fraction, seed=args.seed, **own)


def _exit_code(report: ExportReport) -> int:
    if report.tasks and report.images == 0:
        logger.error("no image was exported (see the problems above)")
        return 1
    return 0


def _coco_options(parser: argparse.ArgumentParser) -> None:
    from sam_backend.export.mmdet_config import TEMPLATES

    parser.add_argument("--no_images", "--no-images", dest="copy_images", action="store_false",
                        help="write only annotations/ann.json, do not fetch or copy the images")
    parser.add_argument("--mmdet-config", "--mmdet_config", "--out_config", dest="mmdet_config",
                        choices=list(TEMPLATES), default=None,
                        help="also write OUT_DIR/<NAME>.py, an MMDetection 3.x training config "
                             "for this dataset (data_root, ann_file, classes, num_classes, "
                             "LoadAnnotations for RLE masks)")


def _run_coco(args: argparse.Namespace) -> int:
    from sam_backend.export.coco import MMDET_RLE_HINT, export_coco, format_categories

    report = _export(export_coco, args, copy_images=args.copy_images,
                     mmdet_config=args.mmdet_config)
    # the command's output: what to paste into a training config
    print(format_categories(report.categories))
    if report.config_file:
        print(f"# MMDetection config: {report.config_file}")
    elif report.annotations.get("mask"):
        print(MMDET_RLE_HINT)
    return _exit_code(report)


def _yolo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--boxes-as-polygons", "--boxes_as_polygons", dest="boxes_as_polygons",
                        action="store_true",
                        help="write box-only objects (a rectangle without mask or polygon) as "
                             "their 4 corners; by default they are left out (and counted)")


def _run_yolo(args: argparse.Namespace) -> int:
    from sam_backend.export.yolo import export_yolo

    report = _export(export_yolo, args, boxes_as_polygons=args.boxes_as_polygons)
    print("# YOLO class indices (data.yaml names):")
    print("\n".join(f"{c['id'] - 1}: {c['name']}" for c in report.coco.categories))
    print(f"# Ultralytics: yolo segment train data={report.data_yaml}")
    return _exit_code(report.coco)


def _video_command(subparsers, name: str, summary: str, description: str, outputs: str,
                   run: Callable[[argparse.Namespace], int], images: bool) -> None:
    """A video export command: the source, the output directory, the classes, Label Studio's
    upload directory and ``--keep-all-regions`` (:mod:`.video`)."""
    parser = subparsers.add_parser(name, help=summary, description=description)
    add_source_arguments(parser, required=True)
    parser.add_argument("--out_dir", "--out-dir", dest="out_dir", required=True, metavar="DIR",
                        help=f"output directory ({outputs})")
    parser.add_argument("--classes", default=None, metavar="a,b,c",
                        help="the categories in order (ids 1..N); labels not listed are skipped. "
                             "Default: every label in the export, sorted by name")
    parser.add_argument("--upload_dir", "--upload-dir", dest="upload_dir", default=None,
                        metavar="DIR",
                        help="Label Studio's media upload directory: /data/upload/<project>/<file> "
                             "is read from DIR/<project>/<file> when present, before downloading")
    if images:
        parser.add_argument("--no_images", "--no-images", dest="copy_images",
                            action="store_false",
                            help="write only annotations/ann.json, not the frames as JPEGs")
    parser.add_argument("--keep-all-regions", "--keep_all_regions", dest="keep_all_regions",
                        action="store_true",
                        help="one track per videorectangle region: a region whose keyframes lie "
                             "on another track of its label is not merged into it")
    parser.set_defaults(func=run)


def _video_exit_code(report) -> int:
    if report.tasks and report.videos == 0:
        logger.error("no video was exported (see the problems above)")
        return 1
    return 0


def _run_video_coco(args: argparse.Namespace) -> int:
    from sam_backend.export.coco import format_categories
    from sam_backend.export.video import write_video_coco

    report = write_video_coco(task_source(args), args.out_dir, classes=args.classes,
                              upload_dir=args.upload_dir, copy_images=args.copy_images,
                              keep_all_regions=args.keep_all_regions)
    print(format_categories(report.categories))
    return _video_exit_code(report)


def _run_mot(args: argparse.Namespace) -> int:
    from sam_backend.export.video import write_mot

    report = write_mot(task_source(args), args.out_dir, classes=args.classes,
                       upload_dir=args.upload_dir, keep_all_regions=args.keep_all_regions)
    print(f"# MOT files (frame,id,x,y,w,h,conf,-1,-1,-1): {len(report.files) - 1}; the label "
          f"of every id: {report.files[-1]}")
    return _video_exit_code(report)


def register_cli(subparsers) -> None:
    _add_command(
        subparsers, "export-coco",
        summary="convert a Label Studio JSON export into a COCO dataset (RLE masks)",
        description="Convert a Label Studio JSON export into a COCO instance-segmentation "
                    "dataset: OUT_DIR/annotations/ann.json and the images in OUT_DIR/images. "
                    "Brushes become compressed RLE masks, polygons COCO polygons, rectangles "
                    "boxes. Problems are reported by task id and the export goes on.",
        outputs="annotations/ann.json, images/", classes_help="the categories in order (ids 1..N)",
        run=_run_coco, own_options=_coco_options)
    _add_command(
        subparsers, "export-yolo",
        summary="convert a Label Studio JSON export into an Ultralytics YOLO segmentation dataset",
        description="Convert a Label Studio JSON export into an Ultralytics YOLO segmentation "
                    "dataset: OUT_DIR/data.yaml, OUT_DIR/images, OUT_DIR/labels (one normalised "
                    "polygon per object). Same one-object rule as export-coco.",
        outputs="data.yaml, images/, labels/", classes_help="the classes in order (indices 0..N-1)",
        run=_run_yolo, own_options=_yolo_options)
    _video_command(
        subparsers, "export-video-coco",
        summary="convert a Label Studio video export (videorectangle tracks) into COCO, frames "
                "as images",
        description="Convert the videorectangle tracks of a Label Studio JSON export into a COCO "
                    "detection dataset with a track id per object: OUT_DIR/annotations/ann.json "
                    "(videos, one image per frame with an object, one annotation per object and "
                    "frame, track_id / instance_id) and the frames in OUT_DIR/images/<video>/. "
                    "Boxes between keyframes are interpolated as Label Studio draws them.",
        outputs="annotations/ann.json, images/<video>/<frame>.jpg", run=_run_video_coco,
        images=True)
    _video_command(
        subparsers, "export-mot",
        summary="convert a Label Studio video export (videorectangle tracks) into MOT text files",
        description="Convert the videorectangle tracks of a Label Studio JSON export into "
                    "MOT-style text: OUT_DIR/<video>.txt with one line per object and frame, "
                    "frame,id,x,y,w,h,conf,-1,-1,-1 (1-based frames, pixels), and "
                    "OUT_DIR/tracks.json with each id's label.",
        outputs="<video>.txt, tracks.json", run=_run_mot, images=False)


__all__ = ["add_source_arguments", "register_cli", "task_source"]
