"""Video annotations -> COCO (frames as images, one track id per object) and MOT-style text:
``sam-backend export-video-coco`` and ``sam-backend export-mot`` (the commands are in :mod:`.cli`).

**What Label Studio stores.** A ``videorectangle`` region is one object through the clip: its
``value.sequence`` holds the keyframes the annotator (or a backend) placed, each ``{frame
(1-based), x, y, width, height (percent of the frame), rotation, enabled, time}``, plus
``value.framesCount`` (the frames Label Studio counts in the clip) and ``value.labels``. Between
keyframes Label Studio draws the box itself (:func:`track_frames`, the rule of its editor's
``getShape`` / ``isInLifespan`` and of its SDK's ``extract_key_frames``):

* a frame is **visible** when the last keyframe at or before it is ``enabled``, or is that frame
  itself (a disabled keyframe is the last frame the object is shown on; a missing ``enabled`` is
  false, as in the editor);
* its box is the keyframe's on a keyframe, else **linear** between the keyframes before and after
  it (x, y, width, height and rotation each), else (after the last keyframe) the last keyframe's,
  up to ``framesCount``.

**The frames.** Label Studio's frame ``n`` is the clip's decoded frame ``n - 1`` (the numbering of
:mod:`sam_backend.video.base`). The clip is opened (OpenCV, through the backend's own video
reader and sources: :func:`open_task_clip`) for its size and its real frame count; frames past
the clip's end are reported and dropped.

**One object, one track** (:func:`group_tracks`), per annotation and label: a track whose every
keyframe lies on another track's box (visible there, IoU >= :data:`TRACK_IOU`) is the same object
(e.g. the annotator's prompt box and the track the backend answered from it). The object keeps
the explaining track's boxes (the joined one adds no frames: its keyframes are already on it);
ties go to the earlier region. ``keep_all_regions`` exports every region as its own track.

**COCO** (:func:`write_video_coco`): ``videos`` (one per clip: ``name``, ``width``, ``height``,
``frames``, ``fps``), ``images`` (one per frame on which some object is visible: ``file_name`` =
``<clip name>/<frame index, 0-based, 6 digits>.jpg``, ``video_id``, ``frame_id`` 0-based,
``ls_frame`` 1-based), ``annotations`` (one per object and frame: ``bbox`` pixels, ``area``, the box
as a 4-point ``segmentation``, ``track_id`` = ``instance_id`` unique in the export, ``keyframe``:
whether an annotator's keyframe is there, false for an interpolated box) and ``categories`` (the
labels sorted, or ``--classes``). The frames themselves are written as JPEGs under ``images/``
unless ``--no_images``.

**MOT** (:func:`write_mot`): one ``<clip name>.txt`` per clip, a line per object and frame,
``frame,id,x,y,w,h,conf,-1,-1,-1`` (frame 1-based, id 1.. per clip, pixels, conf 1 for an
annotation), sorted by frame then id; ``tracks.json`` names each clip's task, video and the label
of every id.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from sam_backend.errors import ImageError
from sam_backend.export.convert import parse_classes, prepare_output, write_file
from sam_backend.export.geometry import RegionError, convert_region, region_labels
from sam_backend.export.report import ExportError, Problem, TaskProblems, id_list, plural
from sam_backend.export.source import (TaskSource, _upload_dir_path, check_upload_dir,
                                       open_source, task_image_url, unique_name,
                                       used_annotations)

logger = logging.getLogger(__name__)

#: the region types that are tracks
VIDEO_TYPES = ("videorectangle",)
#: a track joins another when each of its keyframes overlaps the other's box with this IoU
TRACK_IOU = 0.5
#: what a percent box of a frame is: (x, y, width, height, rotation) as Label Studio stores it
PROPS = ("x", "y", "width", "height", "rotation")

Box = Tuple[float, float, float, float]  # (x, y, w, h) pixels


# -- one region: keyframes -> a box per frame --------------------------------------------------

@dataclass(frozen=True)
class FrameBox:
    """A track on one frame: ``frame`` 1-based (Label Studio's), the box in percent of the frame
    as Label Studio draws it there, and whether a keyframe is on that frame."""

    frame: int
    x: float
    y: float
    width: float
    height: float
    rotation: float
    keyframe: bool


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegionError(f"{what} is not a finite number: {value!r}")
    return float(value)


def keyframes(value: dict) -> List[dict]:
    """The keyframes of a ``videorectangle`` value, checked and sorted by frame (a frame given
    twice keeps its first keyframe, as Label Studio's editor does); raises RegionError."""
    sequence = value.get("sequence")
    if not isinstance(sequence, list) or not sequence:
        raise RegionError("videorectangle has no keyframes (value.sequence is empty)")
    out: Dict[int, dict] = {}
    for i, item in enumerate(sequence):
        if not isinstance(item, dict):
            raise RegionError(f"keyframe {i} is not an object: {item!r}")
        frame = item.get("frame")
        if isinstance(frame, bool) or not isinstance(frame, (int, float)) or frame != int(frame) \
                or frame < 1:
            raise RegionError(f"keyframe {i} has no frame number >= 1: {frame!r}")
        kf = {p: _number(item.get(p, 0 if p == "rotation" else None), f"keyframe {i} {p}")
              for p in PROPS}
        kf["frame"] = int(frame)
        kf["enabled"] = bool(item.get("enabled"))
        out.setdefault(int(frame), kf)
    return [out[f] for f in sorted(out)]


def track_frames(value: dict, frames_count: Optional[int] = None) -> List[FrameBox]:
    """Every frame a ``videorectangle`` value shows its object on, with its box there, by Label
    Studio's rule (module docstring). ``frames_count``: the last frame a box is held to after the
    last keyframe (default ``value.framesCount``; without either, the last keyframe is the
    end). Raises RegionError for a value that is no track."""
    kfs = keyframes(value)
    if frames_count is None:
        count = value.get("framesCount")
        frames_count = int(count) if isinstance(count, (int, float)) and \
            not isinstance(count, bool) and math.isfinite(count) and count > 0 else 0
    out: List[FrameBox] = []
    for i, kf in enumerate(kfs):
        nxt = kfs[i + 1] if i + 1 < len(kfs) else None
        out.append(FrameBox(kf["frame"], *(kf[p] for p in PROPS), keyframe=True))
        if not kf["enabled"]:
            continue  # shown on its own frame only
        end = nxt["frame"] if nxt is not None else max(frames_count + 1, kf["frame"] + 1)
        for frame in range(kf["frame"] + 1, end):
            if nxt is None:
                props = [kf[p] for p in PROPS]
            else:
                r = (frame - kf["frame"]) / (nxt["frame"] - kf["frame"])
                props = [kf[p] + (nxt[p] - kf[p]) * r for p in PROPS]
            out.append(FrameBox(frame, *props, keyframe=False))
    return out


def frame_fields(box: FrameBox, width: int, height: int) -> dict:
    """COCO ``segmentation`` (the box's corners), ``area`` and ``bbox`` (pixels) of a frame's box
    on a ``width x height`` clip, as an image rectangle of the same values exports
    (:func:`~.geometry.convert_region`: rotated around its top-left corner, clipped to the
    frame); raises RegionError for a box outside the frame or of no size."""
    value = {"x": box.x, "y": box.y, "width": box.width, "height": box.height,
             "rotation": box.rotation}
    return convert_region({"type": "rectanglelabels", "value": value}, width, height)[1]


# -- one object, one track ---------------------------------------------------------------------

@dataclass
class Track:
    """One region's track on a clip: its label, ``{frame (1-based): COCO fields}`` and the
    frames its keyframes are on. ``ref``: the region id, carried through."""

    label: str
    frames: Dict[int, dict]
    keyframes: Tuple[int, ...]
    ref: Any = None
    joined: List[Any] = field(default_factory=list)  # refs of the regions merged into it


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x, y, w, h] boxes."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def explains(track: Track, other: Track) -> bool:
    """Whether every keyframe of ``other`` lies on ``track``: visible there, IoU >= TRACK_IOU."""
    for frame in other.keyframes:
        mine = track.frames.get(frame)
        if mine is None or frame not in other.frames or \
                _iou(mine["bbox"], other.frames[frame]["bbox"]) < TRACK_IOU:
            return False
    return bool(other.keyframes)


def group_tracks(tracks: Sequence[Track]) -> List[Track]:
    """The objects of one annotation's tracks (module docstring): tracks of one label that
    explain each other become one, keeping the explaining track's boxes; in the order of each
    object's first region."""
    objects: List[Track] = []
    for track in tracks:
        for index, obj in enumerate(objects):
            if obj.label != track.label:
                continue
            if explains(obj, track):
                obj.joined.append(track.ref)
                break
            if explains(track, obj):  # the new track explains the object: its boxes win
                track.joined.extend([obj.ref] + obj.joined)
                objects[index] = track
                break
        else:
            objects.append(track)
    return objects


# -- the clips ---------------------------------------------------------------------------------

#: (url, task id) -> an open Clip (sam_backend.video.base.Clip); raises ImageError
ClipOpener = Callable[[str, Optional[int]], Any]


def open_task_clip(image_loader, upload_dir: Optional[str] = None, limits=None) -> ClipOpener:
    """A :data:`ClipOpener` through the backend's video reader
    (:mod:`sam_backend.video.clip`): ``upload_dir`` first for Label Studio uploads (read in
    place), else the loader's sources (uploads, local files, cloud and http(s) URLs). ``limits``:
    a :class:`~sam_backend.video.clip.VideoLimits` (default: the video limits of the backend's
    options, from the environment)."""
    from sam_backend.video.clip import VideoLimits, fetch_clip, open_clip

    if limits is None:
        from sam_backend.settings import Settings

        limits = VideoLimits.from_settings(Settings.load())

    def open_(url: str, task_id: Optional[int]):
        local = _upload_dir_path(url, upload_dir) if upload_dir else None
        if local is not None:
            return open_clip(local, limits=limits, name=f"video {local}")
        return fetch_clip(image_loader, url, task_id, limits=limits)

    return open_


# -- the export --------------------------------------------------------------------------------

@dataclass
class VideoReport:
    """What a video export did: counts, categories and every problem by task id."""

    tasks: int = 0
    videos: int = 0
    frames: int = 0  # frames with at least one object (COCO images)
    boxes: int = 0  # one per object and frame (COCO annotations, MOT lines)
    keyframe_boxes: int = 0  # of those, on an annotator's keyframe
    regions: int = 0
    objects: int = 0
    merged_regions: int = 0  # regions joined into another track
    categories: List[dict] = field(default_factory=list)
    problems: List[Problem] = field(default_factory=list)
    skipped_tasks: List[Any] = field(default_factory=list)
    unlabelled_tasks: List[Any] = field(default_factory=list)
    skipped_labels: Dict[str, List[Any]] = field(default_factory=dict)
    ignored_results: Counter = field(default_factory=Counter)
    keep_all_regions: bool = False
    files: List[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{plural(self.tasks, 'task')}: {plural(self.videos, 'video')}, "
                 f"{plural(self.objects, 'track')} ({len(self.categories)} "
                 f"{'category' if len(self.categories) == 1 else 'categories'}), "
                 f"{plural(self.boxes, 'box')} on {plural(self.frames, 'frame')} "
                 f"({self.keyframe_boxes} on keyframes, {self.boxes - self.keyframe_boxes} "
                 f"interpolated)"]
        if self.keep_all_regions:
            lines.append("--keep-all-regions: every region exported as its own track")
        elif self.regions:
            lines.append(f"one object, one track: {plural(self.regions, 'region')} -> "
                         f"{plural(self.objects, 'track')} ({self.merged_regions} joined)")
        if self.unlabelled_tasks:
            lines.append(f"{plural(len(self.unlabelled_tasks), 'task')} without a submitted "
                         f"annotation left out: {id_list(self.unlabelled_tasks)}")
        lines += [f"label {label!r} is not in --classes: {plural(len(ids), 'region')} skipped "
                  f"(tasks {id_list(sorted(set(ids), key=str))})"
                  for label, ids in self.skipped_labels.items()]
        if self.ignored_results:
            lines.append("ignored results (not tracks): " + ", ".join(
                f"{n} {t}" for t, n in sorted(self.ignored_results.items())))
        if self.problems:
            lines.append(f"{plural(len(self.problems), 'problem')} "
                         f"({plural(len(self.skipped_tasks), 'task')} skipped):")
            lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)


@dataclass
class VideoObjects:
    """One clip's export: its task, URL, name, size, frame rate, frame count and tracks."""

    task_id: Any
    url: str
    name: str
    width: int
    height: int
    fps: float
    frames: int
    tracks: List[Track]
    clip: Any = None  # the open clip (frames are read from it), closed by the caller


def _tasks_tracks(tasks: Sequence[dict], classes: Optional[List[str]], open_clip: ClipOpener,
                  report: VideoReport, keep_all_regions: bool) -> Iterator[VideoObjects]:
    """Each exported clip's tracks (the clip open while the caller uses it)."""
    class_set = set(classes) if classes is not None else None
    used_names: set = set()
    for position, task in enumerate(tasks):
        task_id = task.get("id") if isinstance(task, dict) else None

        problems = TaskProblems(report, task_id, position)
        problem, skip = problems.problem, problems.skip

        if not isinstance(task, dict):
            skip(f"is not a task object ({type(task).__name__})")
            continue
        used = used_annotations(task)
        if not used:
            report.unlabelled_tasks.append(task_id if task_id is not None else f"#{position}")
            continue
        results = [(a.get("id"), r) for a in used for r in (a.get("result") or [])
                   if isinstance(r, dict)]
        regions = []  # (annotation id, region)
        for ann_id, region in results:
            rtype = region.get("type")
            if rtype in VIDEO_TYPES:
                regions.append((ann_id, region))
            elif isinstance(rtype, str):
                report.ignored_results[rtype] += 1
        try:
            url = task_image_url(task, (r for _, r in regions))
        except RegionError as exc:
            skip(str(exc).replace("image", "video"))
            continue
        try:
            clip = open_clip(url, task_id if isinstance(task_id, int) else None)
        except ImageError as exc:
            skip(f"video cannot be read: {exc}")
            continue
        info = clip.info
        try:
            tracks_by_ann: Dict[Any, List[Track]] = {}
            for ann_id, region in regions:
                region_id = region.get("id")
                value = region.get("value") or {}
                try:
                    labels = region_labels(region, "videorectangle")
                    boxes = track_frames(value)
                except RegionError as exc:
                    problem(f"{exc}; region skipped", ann_id, region_id)
                    continue
                count = value.get("framesCount")
                if isinstance(count, int) and count > info.frames:
                    logger.info("task %s: Label Studio counts %d frames, the clip has %d", task_id,
                                count, info.frames)
                past = [b.frame for b in boxes if b.frame > info.frames]
                if past:
                    problem(f"{plural(len(past), 'frame')} past the clip's {info.frames} frames "
                            f"(from frame {past[0]}) dropped", ann_id, region_id)
                frames: Dict[int, dict] = {}
                keys = []
                for box in boxes:
                    if box.frame > info.frames:
                        continue
                    try:
                        frames[box.frame] = frame_fields(box, info.width, info.height)
                    except RegionError:
                        continue  # outside the frame there: not visible
                    if box.keyframe:
                        keys.append(box.frame)
                if not frames:
                    problem("the track has no box inside the clip; region skipped", ann_id,
                            region_id)
                    continue
                for label in labels:
                    if class_set is not None and label not in class_set:
                        report.skipped_labels.setdefault(label, []).append(task_id)
                        continue
                    tracks_by_ann.setdefault(ann_id, []).append(
                        Track(label, frames, tuple(keys), region_id))
            tracks: List[Track] = []
            for ann_tracks in tracks_by_ann.values():
                report.regions += len(ann_tracks)
                found = list(ann_tracks) if keep_all_regions else group_tracks(ann_tracks)
                report.merged_regions += sum(len(t.joined) for t in found)
                tracks.extend(found)
            report.objects += len(tracks)
            stem = os.path.splitext(unique_name(url, task_id, position, "", used_names))[0]
            report.videos += 1
            yield VideoObjects(task_id, url, stem, info.width, info.height, info.fps, info.frames,
                               tracks, clip)
        finally:
            clip.close()


def _categories(seen: Sequence[str], classes: Optional[List[str]]) -> List[dict]:
    names = classes if classes is not None else sorted(set(seen))
    return [{"id": i, "name": n} for i, n in enumerate(names, start=1)]


@contextlib.contextmanager
def _source_tasks(source: TaskSource, image_loader, upload_dir: Optional[str],
                  open_clip: Optional[ClipOpener]):
    check_upload_dir(upload_dir)
    with open_source(source, image_loader, images=open_clip is None) as (tasks, loader):
        yield tasks, open_clip or open_task_clip(loader, upload_dir)


def _check_tasks(tasks: Any) -> None:
    if not isinstance(tasks, list):
        raise ExportError("the export must be a list of tasks (Label Studio 'JSON' export format)")
    if tasks and not any(isinstance(t, dict) and "annotations" in t for t in tasks):
        raise ExportError("the export's tasks have no 'annotations': export the project from "
                          "Label Studio in the 'JSON' format")


def video_coco(tasks: Sequence[dict], open_clip: ClipOpener,
               classes: Optional[Sequence[str]] = None, keep_all_regions: bool = False,
               on_frame: Optional[Callable[[str, Any], None]] = None
               ) -> Tuple[dict, VideoReport]:
    """The COCO dict of the tasks' tracks (module docstring) and the report. ``open_clip``
    opens each task's clip; ``on_frame(file_name, frame HxWx3 uint8 RGB)`` is called for every
    exported image's frame, in order (None: the frames are not decoded)."""
    _check_tasks(tasks)
    class_list = parse_classes(",".join(classes)) if isinstance(classes, (list, tuple)) else \
        (parse_classes(classes) if classes else None)
    report = VideoReport(tasks=len(tasks), keep_all_regions=keep_all_regions)
    videos, images, pending = [], [], []  # pending: (image id, track id, label, fields, key)
    track_id = 0
    for clip in _tasks_tracks(tasks, class_list, open_clip, report, keep_all_regions):
        video_id = len(videos) + 1
        entry = {"id": video_id, "name": clip.name, "width": clip.width, "height": clip.height,
                 "frames": clip.frames, "fps": clip.fps}
        if clip.task_id is not None:
            entry["ls_task_id"] = clip.task_id
        videos.append(entry)
        frame_images: Dict[int, int] = {}
        for frame in sorted({f for t in clip.tracks for f in t.frames}):
            image_id = len(images) + 1
            frame_images[frame] = image_id
            images.append({"id": image_id, "file_name": f"{clip.name}/{frame - 1:06d}.jpg",
                           "width": clip.width, "height": clip.height, "video_id": video_id,
                           "frame_id": frame - 1, "ls_frame": frame,
                           **({"ls_task_id": clip.task_id} if clip.task_id is not None else {})})
        for track in clip.tracks:
            track_id += 1
            keys = set(track.keyframes)
            for frame in sorted(track.frames):
                pending.append((frame_images[frame], track_id, video_id, track.label,
                                track.frames[frame], frame in keys))
        if on_frame is not None and frame_images:
            wanted = sorted(frame_images)
            for index, pixels in clip.clip.frames(wanted[0] - 1, wanted[-1]):
                if index + 1 in frame_images:
                    on_frame(images[frame_images[index + 1] - 1]["file_name"], pixels)
    report.categories = _categories([p[3] for p in pending], class_list)
    cat_id = {c["name"]: c["id"] for c in report.categories}
    annotations = []
    for image_id, tid, video_id, label, fields, key in pending:
        annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                            "category_id": cat_id[label], "iscrowd": 0, **fields,
                            "track_id": tid, "instance_id": tid, "video_id": video_id,
                            "keyframe": key})
    report.frames = len(images)
    report.boxes = len(annotations)
    report.keyframe_boxes = sum(1 for a in annotations if a["keyframe"])
    coco = {"info": {"description": "Label Studio video export converted by sam-backend "
                                    "export-video-coco"},
            "licenses": [], "videos": videos, "images": images, "annotations": annotations,
            "categories": report.categories}
    return coco, report


def mot_tracks(tasks: Sequence[dict], open_clip: ClipOpener,
               classes: Optional[Sequence[str]] = None, keep_all_regions: bool = False
               ) -> Tuple[Dict[str, dict], VideoReport]:
    """``{clip name: {"task", "video", "lines": [MOT lines], "tracks": {id: label}}}`` and the
    report (module docstring)."""
    _check_tasks(tasks)
    class_list = parse_classes(",".join(classes)) if isinstance(classes, (list, tuple)) else \
        (parse_classes(classes) if classes else None)
    report = VideoReport(tasks=len(tasks), keep_all_regions=keep_all_regions)
    out: Dict[str, dict] = {}
    labels: List[str] = []
    for clip in _tasks_tracks(tasks, class_list, open_clip, report, keep_all_regions):
        rows = []
        names = {}
        for number, track in enumerate(clip.tracks, start=1):
            names[number] = track.label
            labels.append(track.label)
            keys = set(track.keyframes)
            for frame, fields in track.frames.items():
                x, y, w, h = fields["bbox"]
                rows.append((frame, number, x, y, w, h))
                report.keyframe_boxes += frame in keys
        rows.sort()
        report.boxes += len(rows)
        report.frames += len({r[0] for r in rows})
        out[clip.name] = {
            "task": clip.task_id, "video": clip.url, "width": clip.width,
            "height": clip.height, "frames": clip.frames, "fps": clip.fps, "tracks": names,
            "lines": [f"{f},{i},{x:.2f},{y:.2f},{w:.2f},{h:.2f},1,-1,-1,-1"
                      for f, i, x, y, w, h in rows]}
    report.categories = _categories(labels, class_list)
    return out, report


# -- the commands' writers ---------------------------------------------------------------------

ANN_FILE = os.path.join("annotations", "ann.json")


def _log(report: VideoReport) -> None:
    (logger.warning if report.problems else logger.info)("%s", report.summary())


def write_video_coco(source: TaskSource, out_dir: str, classes: Optional[Sequence[str]] = None,
                     upload_dir: Optional[str] = None, copy_images: bool = True,
                     keep_all_regions: bool = False, image_loader=None,
                     open_clip: Optional[ClipOpener] = None) -> VideoReport:
    """``out_dir/annotations/ann.json`` (and, with ``copy_images``, each image's frame as
    ``out_dir/images/<file_name>``, JPEG quality 95) from the tasks of ``source`` (an export
    file or a :class:`~.source.ProjectSource`)."""
    import cv2

    out = prepare_output(out_dir, ["annotations"] + (["images"] if copy_images else []))

    def save(name: str, pixels) -> None:
        path = out / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR),
                                [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise ExportError(f"cannot encode the frame {name} as JPEG")
        write_file(path, data.tobytes())

    with _source_tasks(source, image_loader, upload_dir, open_clip) as (tasks, opener):
        logger.info("exporting the tracks of %d tasks of %s", len(tasks), source)
        coco, report = video_coco(tasks, opener, classes, keep_all_regions,
                                  save if copy_images else None)
    write_file(out / ANN_FILE, json.dumps(coco, ensure_ascii=False))
    report.files = [str(out / ANN_FILE)]
    _log(report)
    return report


def write_mot(source: TaskSource, out_dir: str, classes: Optional[Sequence[str]] = None,
              upload_dir: Optional[str] = None, keep_all_regions: bool = False,
              image_loader=None, open_clip: Optional[ClipOpener] = None) -> VideoReport:
    """``out_dir/<clip name>.txt`` per clip and ``out_dir/tracks.json`` (module docstring)."""
    out = prepare_output(out_dir, ["."])
    with _source_tasks(source, image_loader, upload_dir, open_clip) as (tasks, opener):
        logger.info("exporting the tracks of %d tasks of %s", len(tasks), source)
        clips, report = mot_tracks(tasks, opener, classes, keep_all_regions)
    index = {}
    for name, clip in clips.items():
        path = out / f"{name}.txt"
        write_file(path, "".join(line + "\n" for line in clip.pop("lines")))
        report.files.append(str(path))
        index[f"{name}.txt"] = {**clip, "tracks": {str(k): v for k, v in clip["tracks"].items()}}
    write_file(out / "tracks.json", json.dumps(index, ensure_ascii=False, indent=1))
    report.files.append(str(out / "tracks.json"))
    _log(report)
    return report


__all__ = ["FrameBox", "TRACK_IOU", "Track", "VideoReport", "frame_fields", "group_tracks",
           "keyframes", "mot_tracks", "open_task_clip", "track_frames", "video_coco",
           "write_mot", "write_video_coco"]
