"""Video tasks through /predict (Flask's test client on build_app, a random-weight SAM 2.1
hiera_tiny, a real clip of moving shapes under the document root): the first frames answer at
once, the rest is tracked in the background and answers the next ask; the regions are the
tracker's own boxes; every object at once; bad videos and tasks without boxes.

Slow: SAM 2.1 encodes every frame at 1024 x 1024 (seconds per frame on a shared CPU)."""
from __future__ import annotations

import gc

import pytest

from sam_backend.server.app import build_app, close_app
from sam_backend.settings import Settings
from sam_backend.video.base import BoxPrompt
from sam_backend.video.clip import open_clip
from tests.support.videos import MP4_MPEG4, write_shapes_clip

pytestmark = pytest.mark.slow

W, H, FRAMES = 96, 64, 6
CONFIG = """<View>
  <Labels name="videoLabels" toName="video"><Label value="square"/><Label value="disc"/></Labels>
  <Video name="video" value="$video" framerate="12"/>
  <VideoRectangle name="box" toName="video"/>
</View>"""
ENV = ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY",
       "LABEL_STUDIO_ACCESS_TOKEN", "IMAGE_HOSTS", "LOCAL_FILES_DOCUMENT_ROOT")


@pytest.fixture(scope="module")
def docroot(tmp_path_factory):
    """clips/shapes.mp4 (the shapes' boxes per frame) and clips/broken.mp4."""
    root = tmp_path_factory.mktemp("video-docroot")
    (root / "clips").mkdir()
    boxes = write_shapes_clip(root / "clips" / "shapes.mp4", frames=FRAMES, width=W, height=H,
                              codec=MP4_MPEG4)
    (root / "clips" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 400)
    return root, boxes


@pytest.fixture(scope="module")
def settings(sam2_file, docroot, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        for name in ENV:
            env.delenv(name, raising=False)
        env.setenv("SAM_BACKEND_IMAGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield Settings.load(dict(
            model_name="sam2", sam_config="hiera_tiny", sam_checkpoint_file=str(sam2_file),
            device="cpu", runtime="torch", local_files_document_root=str(docroot[0]),
            video_answer_frames="2", video_answer_timeout="300"), environ={})


@pytest.fixture(scope="module")
def app(settings):
    app = build_app(settings)
    app.testing = True
    yield app
    close_app(app)
    gc.unfreeze()


def pct(box):
    x0, y0, x1, y1 = box
    return {"x": 100.0 * x0 / W, "y": 100.0 * y0 / H, "width": 100.0 * (x1 - x0) / W,
            "height": 100.0 * (y1 - y0) / H}


def ls_region(rid, label, keyframes):
    """A videorectangle as Label Studio stores it: ``keyframes`` = [(frame 1-based, box px)]."""
    return {"id": rid, "type": "videorectangle", "from_name": "box", "to_name": "video",
            "origin": "manual",
            "value": {"framesCount": FRAMES, "duration": FRAMES / 12.0, "labels": [label],
                      "sequence": [{"frame": f, "enabled": True, "rotation": 0, "time": f / 12.0,
                                    **pct(b)} for f, b in keyframes]}}


def video_task(task_id, regions, video="/data/local-files/?d=clips/shapes.mp4"):
    return {"id": task_id, "data": {"video": video}, "drafts": [], "predictions": [],
            "annotations": [{"id": 100 + task_id, "result": regions,
                             "updated_at": "2026-12-02T10:00:00Z"}], "project": 1}


def predict(client, task):
    response = client.post("/predict", json={"tasks": [task], "label_config": CONFIG,
                                             "project": "1.1700000000", "params": {}})
    return response


def boxes_of(region):
    """{frame 0-based: (x0, y0, x1, y1) px} of an answered region's keyframes."""
    out = {}
    for k in region["value"]["sequence"]:
        x0, y0 = k["x"] * W / 100, k["y"] * H / 100
        out[k["frame"] - 1] = (x0, y0, x0 + k["width"] * W / 100, y0 + k["height"] * H / 100)
    return out


def test_first_frames_at_once_then_the_whole_track_from_the_background(app, settings, docroot):
    _, truth = docroot
    client = app.test_client()
    square = ls_region("sq", "square", [(2, truth[1]["square"])])
    disc = ls_region("dc", "disc", [(2, truth[1]["disc"])])
    task = video_task(1, [square, disc])
    first = predict(client, task)
    assert first.status_code == 200, first.get_data(as_text=True)
    result = first.get_json()["results"][0]
    setup_version = client.post("/setup", json={"project": "1.1700000000", "schema": CONFIG}
                                ).get_json()["model_version"]
    assert result["model_version"] in (setup_version, setup_version + ":partial")
    regions = {r["value"]["labels"][0]: r for r in result["result"]}
    assert set(regions) == {"square", "disc"}
    for region in regions.values():
        assert region["type"] == "videorectangle" and region["to_name"] == "video"
        assert region["from_name"] == "box" and region["value"]["framesCount"] == FRAMES
    # the answer bound: frames 1..2 (0-based) from the first box, unless the pass was done first
    first_frames = {label: sorted(boxes_of(r)) for label, r in regions.items()}
    assert all(frames[0] == 1 for frames in first_frames.values())

    app.extensions["sam_backend"]["tracking"].wait(600)
    again = predict(client, task).get_json()["results"][0]
    assert again["model_version"] == setup_version  # done: Label Studio asks no more
    done = {r["value"]["labels"][0]: boxes_of(r) for r in again["result"]}
    assert sorted(done["square"]) == list(range(1, FRAMES))  # to the clip's end

    # the tracker's own boxes for the same prompts, both objects at once (the app's tracker: its
    # cached frame features, no second encode)
    tracker = app.extensions["sam_backend"]["tracking"].tracker
    with open_clip(str(docroot[0] / "clips" / "shapes.mp4")) as clip:
        session = tracker.session(clip)
        own = session.track([BoxPrompt(0, 1, tuple(map(float, truth[1]["square"]))),
                             BoxPrompt(1, 1, tuple(map(float, truth[1]["disc"])))])
    for object_id, label in ((0, "square"), (1, "disc")):
        expected = {f: b for f, b in own[object_id].boxes.items() if b is not None}
        assert sorted(done[label]) == sorted(expected)
        for frame, box in expected.items():
            assert done[label][frame] == pytest.approx(box, abs=1e-3)


def test_a_task_without_boxes_gets_no_prediction(app):
    response = predict(app.test_client(), video_task(2, []))
    assert response.status_code == 200
    assert response.get_json()["results"] == [[]]


def test_a_corrupt_video_is_a_400_naming_it_and_the_server_goes_on(app, docroot):
    _, truth = docroot
    client = app.test_client()
    task = video_task(3, [ls_region("a", "square", [(1, truth[0]["square"])])],
                      video="/data/local-files/?d=clips/broken.mp4")
    response = predict(client, task)
    assert response.status_code == 400
    message = response.get_json()["errors"][0]
    assert "broken.mp4" in message and "corrupt" in message
    assert client.get("/health").status_code == 200


def test_a_box_past_the_clip_is_a_400(app, docroot):
    _, truth = docroot
    task = video_task(4, [ls_region("a", "square", [(FRAMES + 5, truth[0]["square"])])])
    response = predict(app.test_client(), task)
    assert response.status_code == 400
    assert f"past the clip's {FRAMES} frames" in response.get_json()["errors"][0]
