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
