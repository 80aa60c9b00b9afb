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
