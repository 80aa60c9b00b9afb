"""Video with a real Label Studio 1.23.2 (API level; what its browser editor sends and draws was
measured with Chromium and is written up in docs/video-protocol.md):

* the project template ``xml_templates/video.xml`` is a valid config, a WebM (VP8) clip uploads as
  a video task;
* an annotation in the captured format is stored as sent;
* *Retrieve predictions* posts the task with its annotations and no context to the backend's
  /predict; the boxes read from it become the prompts on the clip's real frames, and an answer
  made of tracks by :func:`track_regions` is stored by Label Studio as the task's prediction,
  keyframes and all.

The backend here is a recording stand-in (tests/support/capture_backend.py) answering what the
test writes: this checks the protocol, not a tracker (those have their own tests)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from sam_backend.labelstudio.label_config import parse_label_config
from sam_backend.labelstudio.video_regions import (prompts_from_regions, task_box_regions,
                                                   track_regions, video_controls)
from sam_backend.video.base import Track
from sam_backend.video.clip import open_clip
from tests.support.capture_backend import serve
from tests.support.ls_harness import free_port
from tests.support.server_utils import REPO
from tests.support.videos import write_shapes_clip

FIXTURES = REPO / "tests" / "video" / "fixtures"
FPS, FRAMES, W, H = 12.0, 48, 320, 240


@pytest.fixture
def recorder(tmp_path):
    port = free_port()
    log, answer = tmp_path / "requests.jsonl", tmp_path / "answer.json"
    server = serve(port, log, answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{port}", "log": log, "answer": answer}
    server.shutdown()
    server.server_close()


def _requests(log: Path, path: str):
    if not log.exists():
        return []
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["path"] == path]


def test_video_task_boxes_and_a_tracked_prediction(label_studio, recorder, tmp_path):
    api = label_studio.api
    config = (REPO / "xml_templates" / "video.xml").read_text().replace(
        'framerate="25.0"', f'framerate="{FPS}"')
    config = config.replace('"Person"', '"square"').replace('"Car"', '"disc"')
    project = api.create_project("e2e video", config)
    clip_path = tmp_path / "shapes.webm"
    truth = write_shapes_clip(clip_path, frames=FRAMES, fps=FPS, width=W, height=H)
    [task] = api.import_image(project["id"], clip_path, content_type="video/webm")
    assert task["data"]["video"].startswith(f"/data/upload/{project['id']}/")

    # the annotation the editor stored in the capture, on this task: stored as sent
    captured = json.loads((FIXTURES / "ls_1.23.2_stored_annotation.json").read_text())[0]["result"]
    api.create_annotation(task["id"], captured)
    [stored] = api.list_annotations(task["id"])
    assert stored["result"] == captured

    # Retrieve predictions: the backend gets the whole task, its annotation, no context
    ml = api.add_ml_backend(project["id"], recorder["url"], is_interactive=True)
    assert ml["state"] == "CO"
    [c] = video_controls(parse_label_config(config))
    with open_clip(str(clip_path)) as clip:
        info = clip.info
    assert (info.frames, info.fps, info.width, info.height) == (FRAMES, FPS, W, H)
    prompts, objects = prompts_from_regions(task_box_regions({"annotations": [stored]}, c), info,
                                            c.framerate(task))
    tracks = {}
    for obj in objects:  # the truth of the synthetic clip stands in for a tracker's answer
        track = Track(obj.object_id)
        for i in range(min(p.frame for p in prompts if p.object_id == obj.object_id), 40):
            gone = obj.label == "disc" and 30 <= i < 36
            track.boxes[i] = None if gone else tuple(map(float, truth[i][obj.label]))
            track.scores[i] = 0.75
        tracks[obj.object_id] = track
    regions = track_regions(tracks, objects, c, info, c.framerate(task))
    recorder["answer"].write_text(json.dumps(
        {"results": [{"result": regions, "score": 0.75, "model_version": "capture-1"}]}))
    answer = api.post(f"/api/dm/actions?id=retrieve_tasks_predictions&project={project['id']}",
                      {"ordering": [], "selectedItems": {"all": False, "included": [task["id"]]},
                       "filters": {"conjunction": "and", "items": []},
                       "project": str(project["id"])})
    assert "Retrieved 1 predictions" in json.dumps(answer)
    [sent] = _requests(recorder["log"], "/predict")
    assert sent["body"]["params"]["context"] is None
    [sent_task] = sent["body"]["tasks"]
    assert sent_task["id"] == task["id"] and sent_task["data"] == task["data"]
    assert task_box_regions(sent_task, c) == captured  # the boxes arrive as stored
    assert "original_width" not in json.dumps(sent_task)  # the frame size comes from the clip

    [prediction] = api.get(f"/api/predictions?task={task['id']}")
    assert prediction["model_version"] == "capture-1" and prediction["score"] == 0.75
    assert [r["value"] for r in prediction["result"]] == [r["value"] for r in regions]
    assert [(r["type"], r["from_name"], r["to_name"]) for r in prediction["result"]] == \
        [("videorectangle", "box", "video")] * 2
    disc = prediction["result"][1]["value"]
    assert disc["labels"] == ["disc"]
    assert [k["frame"] for k in disc["sequence"] if not k["enabled"]] == [30, 40]


# ------------------------------------------------------------------------------------------------
# video_deliver: the whole track replaces the partial prediction, written by the backend itself

DELIVER_FRAMES, DW, DH = 5, 96, 64  # 2 frames answered, 3 more in the background


def test_the_whole_track_replaces_the_partial_prediction_in_label_studio(
        label_studio, sam2_file, tmp_path, monkeypatch):
    """The backend (build_app, SAM 2.1 hiera_tiny on seeded random weights, cpu) answers a video
    task's /predict with its first frames (``<version>:partial``), which Label Studio stores as
    it stores any answer; when the background pass is done the backend itself deletes that
    prediction and writes the whole track under ``<version>`` (Label Studio asks no more for
    such a task, so nobody has to run Retrieve Predictions). Another model's prediction stays.
    What is written is what the backend answers for the task once done."""
    from sam_backend.server.app import build_app, close_app
    from sam_backend.settings import Settings
    from tests.support.videos import MP4_MPEG4

    root = tmp_path / "docroot"
    (root / "clips").mkdir(parents=True)
    truth = write_shapes_clip(root / "clips" / "shapes.mp4", frames=DELIVER_FRAMES, width=DW,
                              height=DH, codec=MP4_MPEG4)
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_HOST",
                 "LABEL_STUDIO_ACCESS_TOKEN", "IMAGE_HOSTS", "LOCAL_FILES_DOCUMENT_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SAM_BACKEND_IMAGE_CACHE_DIR", str(tmp_path / "cache"))
    settings = Settings.load(dict(
        model_name="sam2", sam_config="hiera_tiny", sam_checkpoint_file=str(sam2_file),
        device="cpu", runtime="torch", local_files_document_root=str(root),
        video_answer_frames="2", video_answer_timeout="300"),
        environ={"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token})

    api = label_studio.api
    config = (REPO / "xml_templates" / "video.xml").read_text().replace(
        'framerate="25.0"', f'framerate="{FPS}"')
    config = config.replace('"Person"', '"square"').replace('"Car"', '"disc"')
    pid = api.create_project("e2e video delivery", config)["id"]
    api.import_tasks(pid, [{"data": {"video": "/data/local-files/?d=clips/shapes.mp4"}}])
    [task] = api.list_tasks(pid)
    tid = task["id"]
    x0, y0, x1, y1 = truth[0]["square"]
    api.create_annotation(tid, [{
        "id": "sq", "type": "videorectangle", "from_name": "box", "to_name": "video",
        "origin": "manual",
        "value": {"framesCount": DELIVER_FRAMES, "duration": DELIVER_FRAMES / FPS,
                  "labels": ["square"],
                  "sequence": [{"frame": 1, "enabled": True, "rotation": 0, "time": 0.0,
                                "x": 100 * x0 / DW, "y": 100 * y0 / DH,
                                "width": 100 * (x1 - x0) / DW,
                                "height": 100 * (y1 - y0) / DH}]}}])
    api.post("/api/predictions", {"task": tid, "model_version": "someone-else", "score": 0.5,
                                  "result": []})

    app = build_app(settings)
    app.testing = True
    client = app.test_client()
    try:
        version = client.post("/setup", json={"project": f"{pid}.1", "schema": config}
                              ).get_json()["model_version"]
        sent = api.get_task(tid)  # the task as Label Studio posts it (annotations included)
        body = {"tasks": [sent], "label_config": config, "project": f"{pid}.1",
                "params": {"context": None}}
        first = client.post("/predict", json=body)
        assert first.status_code == 200, first.get_data(as_text=True)
        [partial] = first.get_json()["results"]
        assert partial["model_version"] == f"{version}:partial"
        assert [k["frame"] for k in partial["result"][0]["value"]["sequence"]] == [1, 2]
        api.post("/api/predictions", {"task": tid, **partial})  # what Label Studio does with it

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            held = api.get(f"/api/predictions?task={tid}")
            if sorted(p["model_version"] for p in held) == sorted(["someone-else", version]):
                break
            time.sleep(1)
        assert sorted(p["model_version"] for p in held) == sorted(["someone-else", version]), held
        [written] = [p for p in held if p["model_version"] == version]
        [track] = written["result"]
        frames = [k["frame"] for k in track["value"]["sequence"]]
        assert frames == list(range(1, DELIVER_FRAMES + 1))  # the whole clip, not the first 2
        # what was written is what the backend answers for the task now that it is done
        done = client.post("/predict", json=body).get_json()["results"][0]
        assert done["model_version"] == version
        assert [r["value"] for r in done["result"]] == [track["value"]]
        deliveries = app.extensions["sam_backend"]["deliveries"]
        assert deliveries.delivered == 1 and deliveries.watching == 0
        # the track is there once: asked again (done), nothing more is written
        time.sleep(deliveries.poll_s + deliveries.settle_s)
        assert len(api.get(f"/api/predictions?task={tid}")) == 2
    finally:
        close_app(app)
