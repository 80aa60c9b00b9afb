"""Video regions against what Label Studio 1.23.2 really sent and stored (fixtures captured from a
real instance and its browser editor: docs/video-protocol.md): the config, regions -> box prompts
(object per region, keyframes -> prompts, percent -> pixels, 1-based -> 0-based), tracks ->
videorectangle regions as the editor draws them (enabled: false where the object is gone)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sam_backend.errors import RequestError
from sam_backend.labelstudio.label_config import parse_label_config
from sam_backend.labelstudio.video_regions import (VideoObject, clip_index, keyframe_box,
                                                   ls_frame, ls_frames_count,
                                                   prompts_from_regions, task_box_regions,
                                                   track_regions, track_sequence, video_controls,
                                                   video_url)
from sam_backend.video.base import BoxPrompt, ClipInfo, Track

from tests.support.videos import shapes_frame

FIXTURES = Path(__file__).parent / "fixtures"
# the clip of the capture: tests.support.videos.write_shapes_clip(frames=48, fps=12, 320x240)
INFO = ClipInfo(frames=48, fps=12.0, width=320, height=240)


def _load(name):
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture
def retrieve():
    return _load("ls_1.23.2_predict_retrieve_predictions.json")


@pytest.fixture
def controls(retrieve):
    [found] = video_controls(parse_label_config(retrieve["label_config"]))
    return found


def test_the_config_of_the_capture(controls, retrieve):
    assert (controls.to_name, controls.box, controls.labels_control) == ("video", "box",
                                                                        "videoLabels")
    assert controls.labels == ("square", "disc")
    task = retrieve["tasks"][0]
    assert controls.framerate(task) == 12.0
    assert video_url(task, controls).startswith("/data/upload/1/")


def test_framerate_as_the_editor_reads_it():
    config = parse_label_config(
        '<View><Video name="v" value="$video" framerate="$fps"/>'
        '<VideoRectangle name="b" toName="v"/></View>')
    [c] = video_controls(config)
    assert c.framerate({"data": {"fps": "29.97"}}) == 29.97
    assert c.framerate({"data": {}}) == 24.0  # Label Studio's default
    assert c.framerate({"data": {"fps": 0.04}}) == 25.0  # below 1: the inverse, as the editor
    assert c.labels == () and c.labels_control is None
    assert video_controls(parse_label_config(
        '<View><Video name="v" value="$video"/></View>')) == []  # no VideoRectangle: no tracking


def test_task_open_sends_no_context(retrieve):
    opened = _load("ls_1.23.2_predict_task_open.json")
    assert opened["params"]["context"] is None and retrieve["params"]["context"] is None
    assert opened["tasks"][0]["annotations"] == []


def test_stored_regions_become_prompts(controls, retrieve):
    task = retrieve["tasks"][0]
    regions = task_box_regions(task, controls)
    stored = _load("ls_1.23.2_stored_annotation.json")[0]["result"]
    assert regions == stored  # what /predict carries is what Label Studio stored
    prompts, objects = prompts_from_regions(regions, INFO, controls.framerate(task))
    assert objects == [VideoObject(0, "i_cWIz5Qz-", "square"), VideoObject(1, "SjVEiUvIpB", "disc")]
    assert [(p.object_id, p.frame) for p in prompts] == [(0, 0), (0, 19), (1, 4), (1, 29)]
    # the annotator drew the square on frame 1 and moved it onto the square on frame 20: the
    # prompts are where the synthetic clip has it, frames 0 and 19 (0-based)
    for prompt in prompts[:2]:
        truth = shapes_frame(prompt.frame)[1]["square"]
        assert prompt.box == pytest.approx(truth, abs=1.0)
    # the disc's keyframe on frame 30 is disabled (hidden after it) but is still its box there
    assert prompts[3].box == prompts[2].box


def test_a_draft_restored_region_with_an_empty_box_is_left_out(controls):
    annotation = _load("ls_1.23.2_stored_annotation_draft_restored.json")[0]
    regions = task_box_regions({"annotations": [annotation]}, controls)
    assert len(regions) == 3
    prompts, objects = prompts_from_regions(regions, INFO, 12.0)
    assert [o.region_id for o in objects] == ["Zv7TPt8lby", "WkqV_6VtEf"]  # height 0: left out
    assert [o.object_id for o in objects] == [0, 1]
    assert {p.object_id for p in prompts} == {0, 1}


def test_the_newest_annotation_with_boxes_is_used(controls, retrieve):
    task = json.loads(json.dumps(retrieve["tasks"][0]))
    newest = json.loads(json.dumps(task["annotations"][0]))
    newest.update(id=99, updated_at="2999-01-01T00:00:00Z", result=newest["result"][:1])
    cancelled = dict(newest, id=100, was_cancelled=True, result=newest["result"] * 2)
    task["annotations"] += [newest, cancelled]
    assert len(task_box_regions(task, controls)) == 1
    assert task_box_regions({"annotations": [], "drafts": [newest]}, controls) == newest["result"]
    assert task_box_regions({"annotations": [], "drafts": []}, controls) == []


def test_frame_numbers():
    assert [clip_index(f, 12.0, 12.0) for f in (1, 2, 48)] == [0, 1, 47]
    assert [ls_frame(i, 12.0, 12.0) for i in (0, 1, 47)] == [1, 2, 48]
    # the config's framerate differs from the clip's: frames map through time, as shown
    assert [clip_index(f, 30.0, 25.0) for f in (1, 2, 6, 26)] == [0, 1, 6, 30]
    assert ls_frames_count(ClipInfo(300, 30.0, 1, 1), 25.0) == 250
    for i in range(60):
        assert clip_index(ls_frame(i, 25.0, 30.0), 25.0, 30.0) == i


def test_rotated_and_out_of_frame_boxes():
    assert keyframe_box({"x": 10, "y": 10, "width": 20, "height": 10, "rotation": 0}, 200, 100) \
        == (20.0, 10.0, 60.0, 20.0)
    rotated = keyframe_box({"x": 10, "y": 10, "width": 20, "height": 10, "rotation": 90}, 200, 100)
    assert rotated == pytest.approx((10.0, 10.0, 20.0, 50.0))  # about the top-left corner
    assert keyframe_box({"x": 90, "y": 90, "width": 50, "height": 50}, 100, 100) == (90, 90, 100,
                                                                                    100)
    assert keyframe_box({"x": 10, "y": 10, "width": 0.1, "height": 5}, 100, 100) is None


@pytest.mark.parametrize("keyframe, words", [
    ({"frame": 49, "x": 1, "y": 1, "width": 5, "height": 5}, "past the clip's end"),
    ({"frame": 0, "x": 1, "y": 1, "width": 5, "height": 5}, "not a frame number"),
    ({"frame": 2.5, "x": 1, "y": 1, "width": 5, "height": 5}, "not a frame number"),
    ({"frame": 3, "x": "a", "y": 1, "width": 5, "height": 5}, "x must be a number"),
    ({"frame": 3, "x": float("nan"), "y": 1, "width": 5, "height": 5}, "x must be a finite"),
])
def test_bad_keyframes_are_a_400(keyframe, words):
    region = {"id": "r1", "type": "videorectangle", "value": {"sequence": [keyframe]}}
    with pytest.raises(RequestError, match=words):
        prompts_from_regions([region], INFO, 12.0)
    with pytest.raises(RequestError, match="needs value.sequence"):
        prompts_from_regions([{"id": "r2", "value": {}}], INFO, 12.0)


def _truth_track(object_id, label, frames, gone=()):
    track = Track(object_id)
    for i in frames:
        track.boxes[i] = None if i in gone else tuple(float(v) for v in shapes_frame(i)[1][label])
        track.scores[i] = 0.5 + 0.01 * (i % 3)
    return track


def test_tracks_become_regions_as_the_editor_draws_them(controls, retrieve):
    """The two objects of the captured annotation, tracked through clip frame 40 with the disc
    gone on 30..35: the same answer a real Label Studio stored and its editor drew (checked in
    the editor's store: the disc shown on frames 1-30 and 37-41, hidden on 31-36; both hidden
    after 41, where tracking stopped; tests/e2e/test_video_with_label_studio.py)."""
    task = retrieve["tasks"][0]
    prompts, objects = prompts_from_regions(task_box_regions(task, controls), INFO, 12.0)
    tracks = {0: _truth_track(0, "square", range(41)),
              1: _truth_track(1, "disc", range(41), gone=range(30, 36))}
    square, disc = track_regions(tracks, objects, controls, INFO, 12.0)
    for region in (square, disc):
        assert (region["type"], region["from_name"], region["to_name"]) == ("videorectangle",
                                                                            "box", "video")
        assert region["value"]["framesCount"] == 48 and region["value"]["duration"] == 4.0
        assert isinstance(region["id"], str) and 0.5 <= region["score"] <= 0.52
    assert square["value"]["labels"] == ["square"] and disc["value"]["labels"] == ["disc"]
    frames = [k["frame"] for k in square["value"]["sequence"]]
    assert frames == list(range(1, 42))
    assert [k["frame"] for k in square["value"]["sequence"] if not k["enabled"]] == [41]
    disc_frames = {k["frame"]: k["enabled"] for k in disc["value"]["sequence"]}
    assert sorted(disc_frames) == list(range(1, 31)) + list(range(37, 42))
    assert [f for f, on in disc_frames.items() if not on] == [30, 41]
    # percent of the frame, top-left corner; back to pixels it is the track's box
    k20 = square["value"]["sequence"][19]
    assert (k20["frame"], k20["rotation"], k20["time"]) == (20, 0, 20 / 12.0)
    back = keyframe_box(k20, 320, 240)
    assert back == pytest.approx(tracks[0].boxes[19])
    # round trip: the predicted regions read as prompts give the tracked boxes back
    again, _ = prompts_from_regions([square], INFO, 12.0)
    assert [p.frame for p in again] == list(range(41))
    for p in again:
        assert p.box == pytest.approx(tracks[0].boxes[p.frame])


def test_a_track_to_the_end_stays_shown_and_empty_tracks_go():
    info = ClipInfo(5, 5.0, 100, 100)
    track = Track(0, boxes={i: (10.0, 10.0, 20.0, 20.0) for i in range(5)})
    sequence = track_sequence(track, info, 5.0)
    assert [k["enabled"] for k in sequence] == [True] * 5
    gone = Track(1, boxes={i: None for i in range(5)})
    [c] = video_controls(parse_label_config(
        '<View><Video name="v" value="$video" framerate="5"/>'
        '<VideoRectangle name="b" toName="v"/></View>'))
    regions = track_regions({0: track, 1: gone}, [VideoObject(0, "a", None),
                                                  VideoObject(1, "b", "x")], c, info, 5.0)
    assert len(regions) == 1 and "labels" not in regions[0]["value"] and "score" not in regions[0]
