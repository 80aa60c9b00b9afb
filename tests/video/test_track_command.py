"""`sam-backend track --project ID` against a loopback stand-in of Label Studio's API (the same
stand-in as `annotate` and `precompute` are tested with): every video task with boxes is tracked
by a random-weight SAM 2.1 hiera_tiny and posted as a prediction; a task without boxes is counted,
a broken video is reported without stopping the run, and a second run resumes (skips what is
predicted). Slow: SAM 2.1 encodes every frame at 1024 x 1024."""
from __future__ import annotations

import pytest

from sam_backend import cli
from tests.support.team_utils import API_TOKEN, FakeLabelStudioAPI
from tests.support.videos import MP4_MPEG4, write_shapes_clip

pytestmark = pytest.mark.slow

W, H, FRAMES = 96, 64, 5
CONFIG = """<View>
  <Labels name="videoLabels" toName="video"><Label value="square"/><Label value="disc"/></Labels>
  <Video name="video" value="$video" framerate="12"/>
  <VideoRectangle name="box" toName="video"/>
</View>"""


def region(label, frame, box):
    x0, y0, x1, y1 = box
    return {"id": f"r-{label}", "type": "videorectangle", "from_name": "box", "to_name": "video",
            "value": {"framesCount": FRAMES, "duration": FRAMES / 24, "labels": [label],
                      "sequence": [{"frame": frame, "enabled": True, "rotation": 0,
                                    "x": 100 * x0 / W, "y": 100 * y0 / H,
                                    "width": 100 * (x1 - x0) / W, "height": 100 * (y1 - y0) / H,
                                    "time": frame / 24}]}}


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "docroot"
    (root / "clips").mkdir(parents=True)
    truth = write_shapes_clip(root / "clips" / "a.mp4", frames=FRAMES, width=W, height=H,
                              codec=MP4_MPEG4)
    (root / "clips" / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x02" * 300)
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(root))
    monkeypatch.setenv("SAM_BACKEND_IMAGE_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_HOST",
                 "LABEL_STUDIO_ACCESS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    url = "/data/local-files/?d=clips/{}"
    tasks = [
        {"id": 1, "data": {"video": url.format("a.mp4")}, "predictions": [], "drafts": [],
         "annotations": [{"id": 11, "result": [region("square", 1, truth[0]["square"]),
                                               region("disc", 1, truth[0]["disc"])]}]},
        {"id": 2, "data": {"video": url.format("a.mp4")}, "predictions": [], "drafts": [],
         "annotations": []},
        {"id": 3, "data": {"video": url.format("bad.mp4")}, "predictions": [], "drafts": [],
         "annotations": [{"id": 33, "result": [region("square", 1, truth[0]["square"])]}]},
    ]
    api = FakeLabelStudioAPI(CONFIG, tasks)
    yield api
    api.stop()


def test_track_posts_each_video_s_tracks_and_resumes(project, sam2_file, capsys, monkeypatch):
    args = ["track", "--project", "1", "--url", project.url, "--no-progress",
            "--with", "model_name=sam2", "sam_config=hiera_tiny",
            f"sam_checkpoint_file={sam2_file}", "device=cpu"]
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", API_TOKEN)
    assert cli.main(args) == 1  # task 3's video is broken
    out = capsys.readouterr().out
    assert "1 video(s) tracked, 2 track(s)" in out and "1 without boxes" in out
    assert "task 3:" in out and "bad.mp4" in out
    (prediction,) = project.predictions
    assert prediction["task"] == 1  # under the server's model version, finished
    assert prediction["model_version"].startswith("sam_backend-")
    assert not prediction["model_version"].endswith(":partial")
    labels = sorted(r["value"]["labels"][0] for r in prediction["result"])
    assert labels == ["disc", "square"]
    for r in prediction["result"]:
        frames = [k["frame"] for k in r["value"]["sequence"]]
        assert frames[0] == 1 and frames[-1] <= FRAMES
    # a second run skips task 1 (already predicted) and retries only task 3
    assert cli.main(args) == 1
    assert "0 video(s) tracked" in capsys.readouterr().out
    assert len(project.predictions) == 1
