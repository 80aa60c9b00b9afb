"""The video side of /predict, without a model: which boxes a video task's request yields
(percent keyframes -> relative prompts), which regions come back for a track (checked by Label
Studio's own SDK expanding them), the requests and results that travel to a worker, and the
video options."""
from __future__ import annotations

import copy

import pytest
from label_studio_tools.postprocessing.video import extract_key_frames

from sam_backend.errors import ConfigError, RequestError
from sam_backend.labelstudio.label_config import parse_label_config
from sam_backend.labelstudio.video_regions import VideoObject, region_prompts, video_controls
from sam_backend.labelstudio.video_service import VideoAsk, VideoPredictions
from sam_backend.settings import Settings
from sam_backend.video.base import BoxPrompt, Track, clip_frame, pixel_prompts
from sam_backend.video.jobs import TrackRequest, TrackResult, tracking_range

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


def test_only_configs_with_a_video_rectangle_are_video_configs():
    assert VideoPredictions.handles(parse_label_config(CONFIG))
    assert not VideoPredictions.handles(parse_label_config(
        '<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i"/></View>'))


def test_each_keyframe_is_a_relative_box_on_its_0_based_frame():
    prompts, objects = region_prompts([region("z", [kf(1, 1, 1, 0, 5)]),  # no area: left out
                                       region("a", [kf(1, 10, 20, 30, 40),
                                                    kf(7, 50, 50, 60, 10)])])
    assert objects == [VideoObject(0, "a", "car")]
    assert prompts == [BoxPrompt(0, 0, (0.1, 0.2, 0.4, 0.6)),
                       BoxPrompt(0, 6, (0.5, 0.5, 1.1, 0.6))]  # clipped in pixels, later
    assert pixel_prompts(prompts, 200, 100) == [BoxPrompt(0, 0, (20.0, 20.0, 80.0, 60.0)),
                                                BoxPrompt(0, 6, (100.0, 50.0, 200.0, 60.0))]


def test_frames_counted_at_the_config_s_framerate_map_to_the_clip_s_frames():
    """Label Studio shows its frame f at (f - 1) / framerate s: clip frame
    floor((f - 1) * fps / framerate)."""
    assert clip_frame(12, 25.0, 25.0) == 12 and clip_frame(12, 25.0, 0.0) == 12
    assert clip_frame(12, 25.0, 24.0) == 12  # 0.5 s -> 12.5 -> 12
    assert clip_frame(24, 12.0, 24.0) == 12
    relative = [BoxPrompt(0, 24, (0.1, 0.1, 0.2, 0.2)), BoxPrompt(0, 25, (0.2, 0.2, 0.3, 0.3))]
    # two Label Studio frames on one clip frame: the later keyframe wins
    assert pixel_prompts(relative, 100, 100, fps=12.0, framerate=24.0) == \
        [BoxPrompt(0, 12, (20.0, 20.0, 30.0, 30.0))]


def test_a_rotated_keyframe_is_its_corners_bounds():
    (prompt,), _ = region_prompts([region("a", [kf(2, 10, 10, 20, 10, rotation=90)])])
    assert prompt.rotation == 90
    # rotated 90 degrees clockwise around its top-left corner, in pixels (Label Studio rotates
    # the drawn rectangle, not its percentages): on a 200x100 frame the 40x10 px box hangs
    # down-left of (20, 10)
    (pixel,) = pixel_prompts([prompt], 200, 100)
    assert pixel.box == pytest.approx((10.0, 10.0, 20.0, 50.0)) and pixel.rotation == 0


@pytest.mark.parametrize("bad, message", [
    ({"value": {"sequence": []}}, "needs value.sequence"),
    ({"value": {"sequence": [kf(0, 1, 1, 1, 1)]}}, "frame number"),
    ({"value": {"sequence": [kf(1, "a", 1, 1, 1)]}}, "x must be a number"),
])
def test_a_broken_region_is_a_400_naming_it(bad, message):
    with pytest.raises(RequestError, match=f"task 1 region 'x'.*{message}"):
        region_prompts([dict(bad, id="x")], "task 1 region")


def test_the_boxes_come_from_the_latest_annotation_or_draft():
    def ann(i, when, rid, **kw):
        return {"id": i, "updated_at": when, "result": [region(rid, [kf(1, 1, 1, 5, 5)])], **kw}

    videos = VideoPredictions(Settings.load({}, environ={}), None, None, "t", "v")
    config = parse_label_config(CONFIG)
    task = {"id": 9, "data": {"video": "v.mp4"}, "drafts": [],
            "annotations": [ann(2, "2026-12-02", "new"), ann(1, "2026-12-01", "old"),
                            ann(3, "2026-12-03", "cancelled", was_cancelled=True)]}
    ask = videos.ask(task, config)
    assert [o.region_id for o in ask.objects] == ["new"] and ask.framerate == 25.0
    assert ask.url == "v.mp4" and ask.prompts == (BoxPrompt(0, 0, (0.01, 0.01, 0.06, 0.06)),)
    only_draft = dict(task, annotations=[], drafts=[ann(4, "2026-12-02", "draft")])
    assert [o.region_id for o in videos.ask(only_draft, config).objects] == ["draft"]
    context = {"result": [region("sent", [kf(3, 1, 1, 5, 5)])]}
    assert [o.region_id for o in videos.ask(task, config, context).objects] == ["sent"]
    assert videos.ask({"id": 1, "data": {"video": "v.mp4"}, "annotations": []}, config) is None
    many = dict(task, annotations=[{"id": 5, "result": [region(
        "m", [kf(f, 1, 1, 5, 5) for f in range(1, 600)])]}])
    with pytest.raises(RequestError, match="max_points"):
        videos.ask(many, config)


def test_a_track_s_region_expands_in_label_studio_to_exactly_the_tracked_boxes():
    """The answer's keyframes, expanded by Label Studio's SDK as its editor draws them: the
    tracked box on every tracked frame, nothing on a frame where the object was lost, nothing
    past the last tracked frame (no box held to the clip's end)."""
    width, height, frames, fps = 200, 100, 40, 25.0
    boxes = {f: (2.0 * f, 10.0, 2.0 * f + 20, 30.0) for f in range(5, 20)}
    boxes[9] = None  # lost on frames 9 and 10
    boxes[10] = None
    result = TrackResult("partial", {0: Track(0, boxes, {f: 0.5 for f in range(5, 20)})},
                         stop=20, total=35, frames=frames, size=(width, height), fps=fps)
    controls = video_controls(parse_label_config(CONFIG))[0]
    ask = VideoAsk("v.mp4", controls, (VideoObject(0, "r1", "car"),), (), 25.0)
    videos = VideoPredictions(Settings.load({}, environ={}), None, None, "t", "v+track")
    prediction = videos.prediction(result, ask)
    (made,) = prediction["result"]
    # a partial track: another model version, so that Label Studio asks for the task again
    assert prediction["model_version"] == "v+track:partial" and prediction["score"] == 0.5
    result.state = "done"
    assert videos.prediction(result, ask)["model_version"] == "v+track"
    assert made["type"] == "videorectangle" and made["value"]["labels"] == ["car"]
    assert (made["from_name"], made["to_name"]) == ("box", "video")
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
                           "http://ls:8080", 24.0)
    again = TrackRequest.from_json(request.to_json())
    assert again == request and again.key == request.key
    assert TrackRequest.from_json(dict(request.to_json(), max_frames=5)).key != request.key
    assert TrackRequest.from_json(dict(request.to_json(), framerate=25)).key != request.key
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
