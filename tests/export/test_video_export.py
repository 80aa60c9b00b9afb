"""Video exports (`export-video-coco`, `export-mot`): Label Studio's videorectangle tracks ->
a box per frame by Label Studio's own interpolation rule, one object one track, COCO with track
ids and MOT text, from real clips written here (moving shapes) and read by the backend's video
reader.

The payloads have the shape of Label Studio 1.23's videorectangle results (``value.sequence``
of keyframes with ``frame`` 1-based, percent ``x/y/width/height``, ``rotation``, ``enabled``,
``time``; ``framesCount``, ``duration``, ``labels``; ``from_name`` the VideoRectangle,
``to_name`` the Video; no ``original_width``): :data:`LS_DOC_RESULT` is the result of Label
Studio's own editor test fixture (``simpleVideoResult``)."""
from __future__ import annotations

import copy
import json
import random

import cv2
import numpy as np
import pytest
from label_studio_tools.postprocessing.video import extract_key_frames

from sam_backend import cli
from sam_backend.export.geometry import RegionError
from sam_backend.export.video import (Track, group_tracks, mot_tracks, track_frames, video_coco)

# Label Studio's editor test fixture for a video task (simpleVideoResult): a box on frame 1,
# disabled on frame 3 (shown on frames 1..3, then gone)
LS_DOC_RESULT = {
    "value": {"framesCount": 131, "duration": 5.425, "sequence": [
        {"frame": 1, "enabled": True, "rotation": 0, "x": 20.54721030042918,
         "y": 15.665236051502147, "width": 58.90557939914163, "height": 68.6695278969957,
         "time": 0.041666666666666664},
        {"x": 20.54721030042918, "y": 15.665236051502147, "width": 58.90557939914163,
         "height": 68.6695278969957, "rotation": 0, "enabled": False, "frame": 3,
         "time": 0.125}],
        "labels": ["Label 1"]},
    "id": "RRxnu061g3", "from_name": "box", "to_name": "video", "type": "videorectangle",
    "origin": "manual"}


def kf(frame, x, y, w, h, enabled=True, rotation=0.0, fps=25.0):
    return {"frame": frame, "enabled": enabled, "rotation": rotation, "x": x, "y": y,
            "width": w, "height": h, "time": (frame - 1) / fps}


def track(rid, label, sequence, frames_count, to_name="video"):
    return {"id": rid, "type": "videorectangle", "from_name": "box", "to_name": to_name,
            "origin": "manual",
            "value": {"framesCount": frames_count, "duration": frames_count / 25.0,
                      "sequence": sequence, "labels": [label]}}


def ls_reference(result):
    """{frame: (x, y, width, height, rotation)} as Label Studio's SDK expands the keyframes."""
    expanded = extract_key_frames([copy.deepcopy(result)])[0]["value"]["sequence"]
    out = {}
    for item in expanded:
        out.setdefault(item["frame"], tuple(item[p] for p in
                                            ("x", "y", "width", "height", "rotation")))
    return out


def ours(result):
    return {b.frame: (b.x, b.y, b.width, b.height, b.rotation)
            for b in track_frames(result["value"])}


def same_frames(a, b):
    """Same frames, and on each the same box (to float rounding)."""
    assert sorted(a) == sorted(b)
    for frame in a:
        assert a[frame] == pytest.approx(b[frame], abs=1e-9), frame
    return True


# -- Label Studio's interpolation rule ---------------------------------------------------------

def test_the_documented_result_is_shown_on_frames_1_to_3():
    frames = track_frames(LS_DOC_RESULT["value"])
    assert [b.frame for b in frames] == [1, 2, 3]
    assert [b.keyframe for b in frames] == [True, False, True]
    assert same_frames(ours(LS_DOC_RESULT), ls_reference(LS_DOC_RESULT))


def test_interpolation_is_linear_between_keyframes_and_held_after_the_last():
    result = track("a", "car", [kf(2, 10, 20, 30, 40), kf(6, 30, 20, 10, 40, rotation=20)], 9)
    boxes = {b.frame: b for b in track_frames(result["value"])}
    assert sorted(boxes) == [2, 3, 4, 5, 6, 7, 8, 9]  # nothing before the first keyframe
    assert (boxes[4].x, boxes[4].width, boxes[4].rotation) == (20, 20, 10)  # halfway
    assert (boxes[9].x, boxes[9].width, boxes[9].rotation) == (30, 10, 20)  # held to the end
    assert [f for f, b in boxes.items() if b.keyframe] == [2, 6]


def test_a_disabled_keyframe_ends_the_track_until_the_next_keyframe():
    result = track("a", "car", [kf(1, 10, 10, 10, 10), kf(4, 40, 10, 10, 10, enabled=False),
                                kf(8, 50, 50, 10, 10), kf(10, 60, 50, 10, 10, enabled=False)], 20)
    frames = [b.frame for b in track_frames(result["value"])]
    assert frames == [1, 2, 3, 4, 8, 9, 10]
    assert same_frames(ours(result), ls_reference(result))


@pytest.mark.parametrize("seed", range(20))
def test_random_tracks_expand_as_label_studio_s_sdk_expands_them(seed):
    rng = random.Random(seed)
    count = rng.randint(5, 60)
    frames = sorted(rng.sample(range(1, count + 1), rng.randint(1, min(6, count))))
    sequence = [kf(f, rng.uniform(0, 80), rng.uniform(0, 80), rng.uniform(1, 20),
                   rng.uniform(1, 20), enabled=rng.random() < 0.7,
                   rotation=rng.choice([0, 0, 15.0])) for f in frames]
    rng.shuffle(sequence)  # Label Studio keeps them sorted; an edited export may not
    result = track("r", "x", sequence, count)
    assert same_frames(ours(result), ls_reference(result))


@pytest.mark.parametrize("sequence, message", [
    ([], "no keyframes"),
    ([{"frame": 0, "x": 1, "y": 1, "width": 1, "height": 1, "enabled": True}], "frame number"),
    ([{"frame": 2, "x": "1", "y": 1, "width": 1, "height": 1, "enabled": True}], "x is not"),
    (["nope"], "not an object"),
])
def test_a_broken_sequence_is_named(sequence, message):
    with pytest.raises(RegionError, match=message):
        track_frames({"sequence": sequence, "framesCount": 10})


# -- one object, one track ---------------------------------------------------------------------

def _track(label, boxes, keys, ref):
    return Track(label, {f: {"bbox": list(b)} for f, b in boxes.items()}, tuple(keys), ref)


def test_a_prompt_box_on_its_track_joins_it_and_the_track_keeps_its_boxes():
    # the annotator's box on frame 3 (held to the end by Label Studio) and the backend's track
    # that starts from it and moves away
    prompt = _track("car", {f: (10, 10, 20, 20) for f in range(3, 11)}, [3], "prompt")
    moving = _track("car", {f: (10 + 5 * (f - 3), 10, 20, 20) for f in range(3, 11)},
                    range(3, 11), "track")
    for order in ([prompt, moving], [moving, prompt]):
        objects = group_tracks([copy.deepcopy(t) for t in order])
        assert len(objects) == 1
        assert objects[0].ref == "track"
        assert objects[0].joined == ["prompt"]
        assert objects[0].frames[10]["bbox"] == [45, 10, 20, 20]


def test_two_objects_stay_two_even_when_they_cross():
    a = _track("car", {f: (5 * f, 10, 20, 20) for f in range(1, 11)}, range(1, 11), "a")
    b = _track("car", {f: (50 - 5 * f, 10, 20, 20) for f in range(1, 11)}, range(1, 11), "b")
    assert [o.ref for o in group_tracks([a, b])] == ["a", "b"]


def test_tracks_of_two_labels_are_never_merged():
    a = _track("car", {1: (0, 0, 10, 10)}, [1], "a")
    b = _track("bus", {1: (0, 0, 10, 10)}, [1], "b")
    assert [o.ref for o in group_tracks([a, b])] == ["a", "b"]


# -- the commands, on real clips ---------------------------------------------------------------

W, H, N = 64, 48, 12  # the clips: 12 frames of 64x48 at 25 fps


def write_clip(path, frames=N, step=4):
    """A white 10x10 square moving ``step`` px right per frame on black (MPEG-4 part 2)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (W, H))
    assert writer.isOpened()
    for i in range(frames):
        frame = np.zeros((H, W, 3), np.uint8)
        frame[10:20, step * i:step * i + 10] = 255
        writer.write(frame)
    writer.release()
    return path


def pct(x, y, w, h):
    """Pixel box -> Label Studio percent (x, y, width, height)."""
    return 100.0 * x / W, 100.0 * y / H, 100.0 * w / W, 100.0 * h / H


@pytest.fixture
def project(tmp_path):
    """(export file, upload dir): task 1 a car tracked by keyframes 1 (x=0) and 9 (x=32), gone
    after the disabled keyframe 11, plus the annotator's prompt box on frame 1 (held by Label
    Studio: the same object); a bus on frames 2..3 only; task 2 a corrupt video; task 3 not
    labelled."""
    upload = tmp_path / "upload"
    (upload / "1").mkdir(parents=True)
    write_clip(upload / "1" / "a1b2-street.mp4")
    (upload / "1" / "c3d4-broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 500)
    car = track("car1", "car", [kf(1, *pct(0, 10, 10, 10)), kf(9, *pct(32, 10, 10, 10)),
                                kf(11, *pct(40, 10, 10, 10), enabled=False)], N)
    prompt = track("prompt", "car", [kf(1, *pct(0, 10, 10, 10))], N)
    bus = track("bus1", "bus", [kf(2, *pct(20, 30, 20, 10)),
                                kf(3, *pct(20, 30, 20, 10), enabled=False)], N)
    tasks = [
        {"id": 1, "data": {"video": "/data/upload/1/a1b2-street.mp4"},
         "annotations": [{"id": 10, "result": [prompt, car, bus]}]},
        {"id": 2, "data": {"video": "/data/upload/1/c3d4-broken.mp4"},
         "annotations": [{"id": 20, "result": [track("x", "car", [kf(1, 1, 1, 5, 5)], N)]}]},
        {"id": 3, "data": {"video": "/data/upload/1/a1b2-street.mp4"}, "annotations": []},
    ]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    return export, upload


def test_export_video_coco_writes_frames_tracks_and_interpolated_boxes(project, tmp_path, capsys):
    export, upload = project
    out = tmp_path / "coco"
    assert cli.main(["export-video-coco", "--json_file_path", str(export), "--out_dir", str(out),
                     "--upload_dir", str(upload)]) == 0
    assert "1: bus" in capsys.readouterr().out  # categories sorted by name
    coco = json.loads((out / "annotations" / "ann.json").read_text())
    assert coco["videos"] == [{"id": 1, "name": "a1b2-street", "width": W, "height": H,
                               "frames": N, "fps": 25.0, "ls_task_id": 1}]
    assert [c["name"] for c in coco["categories"]] == ["bus", "car"]
    # the car on frames 1..11, the bus on 2..3: one image per frame with an object
    assert [i["ls_frame"] for i in coco["images"]] == list(range(1, 12))
    image = {i["ls_frame"]: i for i in coco["images"]}
    assert image[5]["file_name"] == "a1b2-street/000004.jpg" and image[5]["frame_id"] == 4
    cars = [a for a in coco["annotations"] if a["category_id"] == 2]
    buses = [a for a in coco["annotations"] if a["category_id"] == 1]
    assert len({a["track_id"] for a in cars}) == 1  # the prompt box joined its track
    assert {a["track_id"] for a in cars} != {a["track_id"] for a in buses}
    assert all(a["instance_id"] == a["track_id"] for a in coco["annotations"])
    by_frame = {coco["images"][a["image_id"] - 1]["ls_frame"]: a for a in cars}
    assert sorted(by_frame) == list(range(1, 12))
    assert by_frame[5]["bbox"] == pytest.approx([16, 10, 10, 10])  # halfway from 0 to 32
    assert by_frame[5]["keyframe"] is False and by_frame[9]["keyframe"] is True
    assert by_frame[5]["area"] == pytest.approx(100)
    assert len(buses) == 2
    # the frames as JPEGs: frame 4 (0-based) shows the square at x = 16
    jpeg = cv2.imread(str(out / "images" / "a1b2-street" / "000004.jpg"))
    assert jpeg.shape == (H, W, 3)
    assert jpeg[12:18, 18:24].mean() > 200 and jpeg[12:18, 40:50].mean() < 50
    assert len(list((out / "images" / "a1b2-street").iterdir())) == 11


def test_a_corrupt_video_is_reported_and_the_rest_exported(project, tmp_path, caplog):
    export, upload = project
    caplog.set_level("WARNING")
    assert cli.main(["export-video-coco", "--json_file_path", str(export), "--out_dir",
                     str(tmp_path / "c"), "--upload_dir", str(upload), "--no_images"]) == 0
    assert "task 2: video cannot be read" in caplog.text
    assert "c3d4-broken.mp4" in caplog.text
    assert not (tmp_path / "c" / "images").exists()
    only_broken = json.loads(export.read_text())[1:2]
    export.write_text(json.dumps(only_broken))
    assert cli.main(["export-mot", "--json_file_path", str(export), "--out_dir",
                     str(tmp_path / "m"), "--upload_dir", str(upload)]) == 1


def test_export_mot_writes_one_line_per_object_and_frame(project, tmp_path):
    export, upload = project
    out = tmp_path / "mot"
    assert cli.main(["export-mot", "--json_file_path", str(export), "--out_dir", str(out),
                     "--upload_dir", str(upload)]) == 0
    lines = (out / "a1b2-street.txt").read_text().splitlines()
    assert lines[:3] == ["1,1,0.00,10.00,10.00,10.00,1,-1,-1,-1",
                         "2,1,4.00,10.00,10.00,10.00,1,-1,-1,-1",
                         "2,2,20.00,30.00,20.00,10.00,1,-1,-1,-1"]
    assert lines[-1] == "11,1,40.00,10.00,10.00,10.00,1,-1,-1,-1"
    assert len(lines) == 11 + 2
    index = json.loads((out / "tracks.json").read_text())
    assert index["a1b2-street.txt"]["tracks"] == {"1": "car", "2": "bus"}
    assert index["a1b2-street.txt"]["task"] == 1


def test_keep_all_regions_exports_the_prompt_box_as_a_track_of_its_own(project, tmp_path):
    export, upload = project
    clips, report = mot_tracks(json.loads(export.read_text())[:1],
                               _opener(upload), keep_all_regions=True)
    assert clips["a1b2-street"]["tracks"] == {1: "car", 2: "car", 3: "bus"}
    assert report.merged_regions == 0


def test_frames_past_the_clip_are_dropped_and_reported(tmp_path):
    write_clip(tmp_path / "short.mp4", frames=5)
    task = {"id": 7, "data": {"video": "/data/upload/1/short.mp4"},
            "annotations": [{"id": 1, "result": [
                track("r", "car", [kf(3, 10, 10, 10, 10), kf(9, 20, 10, 10, 10)], 12)]}]}
    upload = tmp_path / "up"
    (upload / "1").mkdir(parents=True)
    (tmp_path / "short.mp4").rename(upload / "1" / "short.mp4")
    coco, report = video_coco([task], _opener(upload))
    assert [i["ls_frame"] for i in coco["images"]] == [3, 4, 5]
    assert "7 frames past the clip's 5 frames (from frame 6) dropped" in report.summary()


def _opener(upload):
    from sam_backend.export.video import open_task_clip
    from sam_backend.video.clip import VideoLimits

    return open_task_clip(None, str(upload), VideoLimits())


def test_a_project_read_from_the_api_exports_the_same_tracks_as_its_export_file(
        project, tmp_path, monkeypatch):
    """``--project ID``: the tasks through Label Studio's API (a loopback stand-in), the videos
    through the backend's sources (here local files under the document root)."""
    from tests.support.team_utils import API_TOKEN, FakeLabelStudioAPI

    export, upload = project
    tasks = json.loads(export.read_text())
    for t in tasks:  # the same clips, as local files
        t["data"]["video"] = t["data"]["video"].replace("/data/upload/", "/data/local-files/?d=")
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(upload))
    monkeypatch.setenv("SAM_BACKEND_IMAGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", API_TOKEN)
    api = FakeLabelStudioAPI(CONFIG_VIDEO, tasks)
    try:
        assert cli.main(["export-mot", "--project", "1", "--url", api.url, "--out_dir",
                         str(tmp_path / "api")]) == 0
    finally:
        api.stop()
    assert cli.main(["export-mot", "--json_file_path", str(export), "--out_dir",
                     str(tmp_path / "file"), "--upload_dir", str(upload)]) == 0
    assert (tmp_path / "api" / "a1b2-street.txt").read_text() == \
        (tmp_path / "file" / "a1b2-street.txt").read_text()


CONFIG_VIDEO = """<View>
  <Labels name="videoLabels" toName="video"><Label value="car"/><Label value="bus"/></Labels>
  <Video name="video" value="$video"/>
  <VideoRectangle name="box" toName="video"/>
</View>"""
