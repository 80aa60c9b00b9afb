"""The video side of /predict, without a model: which boxes a video task's request yields
(percent keyframes -> relative prompts), which regions come back for a track (checked by Label
Studio's own SDK expanding them), the requests and results that travel to a worker, and the
video options."""
from __future__ import annotations

import copy

import pytest
from label_studio_tools.postprocessing.video import extract_key_frames

from sam_backend.errors import ConfigError, RequestError
from sam_backend.labelstudio.video_service import (VideoObject, region_prompts, task_regions,
                                                   track_region, video_controls)
from sam_backend.settings import Settings
from sam_backend.video.base import BoxPrompt, Track
from sam_backend.video.jobs import (TrackRequest, TrackResult, pixel_prompts, tracking_range)

CONFIG = """<View>
  <Labels name="videoLabels" toName="video"><Label value="car"/><Label value="bus"/></Labels>
  <Video name="video" value="$video" framerate="25"/>
  <VideoRectangle name="box" toName="video"/>
</View>"""


def region(rid, sequence, label="car", frames=50):
    return {"id": rid, "type": "videorectangle", "from_name": "box", "to_name": "video",
            "origin": "manual", "value": {"framesCount": frames, "duration": frames / 25,
                                          "sequence": sequence, "labels": [label]}}


def kf(frame, x, y, w, h, enabled=True, rotation=0):
    return {"frame": frame, "enabled": enabled, "rotation": rotation, "x": x, "y": y,
            "width": w, "height": h, "time": frame / 25}


def test_the_config_s_video_controls():
    controls = video_controls(CONFIG)
    assert controls.tracks
    assert controls.videos == {"video": ("video", 25.0)}
    assert controls.rectangle_for("video") == "box"
    assert controls.labels["videoLabels"] == ("video", ("car", "bus"))
    image_only = video_controls('<View><Image name="i" value="$image"/>'
                                '<RectangleLabels name="r" toName="i"/></View>')
    assert not image_only.tracks


def test_each_keyframe_is_a_relative_box_on_its_0_based_frame():
    prompts = region_prompts(region("a", [kf(1, 10, 20, 30, 40), kf(7, 50, 50, 60, 10)]), 3, "r")
    assert prompts == [BoxPrompt(3, 0, (0.1, 0.2, 0.4, 0.6)),
                       BoxPrompt(3, 6, (0.5, 0.5, 1.0, 0.6))]  # clipped to the frame
    assert pixel_prompts(prompts[:1], 200, 100) == [BoxPrompt(3, 0, (20.0, 20.0, 80.0, 60.0))]


def test_a_rotated_keyframe_is_its_corners_bounds():
    (prompt,) = region_prompts(region("a", [kf(2, 10, 10, 20, 10, rotation=90)]), 0, "r")
    # rotated 90 degrees clockwise around its top-left corner: it hangs down-left of it
    assert prompt.box == pytest.approx((0.0, 0.1, 0.1, 0.3))


@pytest.mark.parametrize("bad, message", [
    ({"value": {"sequence": []}}, "needs value.sequence"),
    ({"value": {"sequence": [kf(0, 1, 1, 1, 1)]}}, "frame number >= 1"),
    ({"value": {"sequence": [kf(1, "a", 1, 1, 1)]}}, "x must be a number"),
    ({"value": {"sequence": [kf(1, 120, 1, 5, 5)]}}, "no area inside the frame"),
])
def test_a_broken_region_is_a_400_naming_it(bad, message):
    with pytest.raises(RequestError, match=message):
        region_prompts(bad, 0, "task 1 region x")


def test_the_boxes_come_from_the_context_else_the_latest_annotation_or_draft():
    old = {"id": 1, "updated_at": "2026-12-01T10:00:00Z", "result": [region("old", [kf(1, 1, 1, 5, 5)])]}
    new = {"id": 2, "updated_at": "2026-12-02T10:00:00Z", "result": [region("new", [kf(1, 1, 1, 5, 5)])]}
    cancelled = {"id": 3, "updated_at": "2026-12-03T10:00:00Z", "was_cancelled": True,
                 "result": [region("cancelled", [kf(1, 1, 1, 5, 5)])]}
    draft = {"id": 4, "updated_at": "2026-12-02T12:00:00Z", "result": [region("draft", [kf(1, 1, 1, 5, 5)])]}
    task = {"id": 9, "data": {"video": "v.mp4"}, "annotations": [new, old, cancelled], "drafts": []}
    assert [r["id"] for r in task_regions(task, None)] == ["new"]
    assert [r["id"] for r in task_regions(dict(task, drafts=[draft]), None)] == ["draft"]
    context = {"result": [region("clicked", [kf(3, 1, 1, 5, 5)])]}
    assert [r["id"] for r in task_regions(task, context)] == ["clicked"]
    assert task_regions({"id": 1, "data": {}, "annotations": []}, None) == []


def test_a_track_s_region_expands_in_label_studio_to_exactly_the_tracked_boxes():
    """Label Studio's SDK expands the answer's keyframes as its editor draws them: the tracked
    box on every tracked frame, nothing on a frame where the object was lost, nothing past the
    last tracked frame (no box held to the clip's end)."""
    width, height, frames, fps = 200, 100, 40, 25.0
    boxes = {f: (2.0 * f, 10.0, 2.0 * f + 20, 30.0) for f in range(5, 20)}
    boxes[9] = None  # lost on frame 9
    boxes[10] = None
    track = Track(0, boxes, {f: 0.5 for f in range(5, 20)})
    obj = VideoObject(0, "r1", "box", "video", "car", ())
    made = track_region(track, obj, frames, fps, width, height, stop=20, score=0.5)
    assert made["type"] == "videorectangle" and made["value"]["labels"] == ["car"]
    assert made["value"]["framesCount"] == frames
    expanded = extract_key_frames([copy.deepcopy(made)])[0]["value"]["sequence"]
    shown = {}
    for item in expanded:
        shown.setdefault(item["frame"], item)
    expected = {f + 1: b for f, b in boxes.items() if b is not None}
    assert sorted(shown) == sorted(expected)
    for frame, (x0, y0, x1, y1) in expected.items():
        item = shown[frame]
        assert (item["x"] * width / 100, item["y"] * height / 100,
                (item["x"] + item["width"]) * width / 100,
                (item["y"] + item["height"]) * height / 100) == pytest.approx((x0, y0, x1, y1))


def test_requests_and_results_travel_as_json():
    request = TrackRequest("/data/upload/1/v.mp4", 7, "src:abc",
                           (BoxPrompt(0, 3, (0.1, 0.2, 0.3, 0.4)),), "track:sam2:x", 100, 16,
                           "http://ls:8080")
    again = TrackRequest.from_json(request.to_json())
    assert again == request and again.key == request.key
    assert TrackRequest.from_json(dict(request.to_json(), max_frames=5)).key != request.key
    result = TrackResult("partial", {0: Track(0, {3: (1.0, 2.0, 3.0, 4.0), 4: None}, {3: 0.9})},
                         stop=19, total=97, frames=200, size=(640, 360), fps=25.0)
    back = TrackResult.from_json(result.to_json())
    assert back.tracks[0].boxes == {3: (1.0, 2.0, 3.0, 4.0), 4: None}
    assert (back.state, back.stop, back.total, back.frames, back.size, back.fps) == \
        ("partial", 19, 97, 200, (640, 360), 25.0)


def test_the_tracked_range_starts_at_the_first_box_and_covers_the_last():
    prompts = [BoxPrompt(0, 10, (0, 0, 1, 1)), BoxPrompt(1, 40, (0, 0, 1, 1))]
    assert tracking_range(prompts, 100) == (10, 100)
    assert tracking_range(prompts, 100, max_frames=20) == (10, 41)
    assert tracking_range(prompts, 100, max_frames=50) == (10, 60)
    assert tracking_range(prompts, 45, max_frames=50) == (10, 45)


@pytest.mark.parametrize("options, message", [
    ({"video_background": "cloud"}, "use thread or worker"),
    ({"video_background": "worker"}, "needs embedding_store"),
    ({"max_track_frames": -1}, "must not be negative"),
    ({"video_answer_timeout": 0}, "must be positive"),
])
def test_bad_video_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        Settings.load(options, environ={})
