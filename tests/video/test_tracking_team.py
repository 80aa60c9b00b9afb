"""Tracking for a team (``video_background=worker``): a real redis-server, one
`sam-backend worker --queue video` process with a random-weight SAM 2.1 hiera_tiny, and the app
(Flask's test client on build_app) queueing video tasks there; then no worker (a clear 503 naming
the command), then no Redis (the app tracks in its own process)."""
from __future__ import annotations

import gc

import pytest

from sam_backend.server.app import build_app, close_app
from sam_backend.settings import Settings
from tests.support.redis_utils import RedisServer
from tests.support.team_utils import WorkerProcess, process_env
from tests.support.videos import MP4_MPEG4, write_shapes_clip

# redis-server and a worker as processes; SAM 2.1 encodes every frame at 1024 x 1024
pytestmark = [pytest.mark.process, pytest.mark.slow]

W, H, FRAMES = 96, 64, 4
CONFIG = """<View>
  <Labels name="videoLabels" toName="video"><Label value="square"/></Labels>
  <Video name="video" value="$video" framerate="12"/>
  <VideoRectangle name="box" toName="video"/>
</View>"""


def task(task_id, frame, box, video="clips/a.mp4"):
    x0, y0, x1, y1 = box
    region = {"id": "sq", "type": "videorectangle", "from_name": "box", "to_name": "video",
              "value": {"framesCount": FRAMES, "labels": ["square"],
                        "sequence": [{"frame": frame, "enabled": True, "rotation": 0,
                                      "x": 100 * x0 / W, "y": 100 * y0 / H,
                                      "width": 100 * (x1 - x0) / W,
                                      "height": 100 * (y1 - y0) / H}]}}
    return {"id": task_id, "data": {"video": f"/data/local-files/?d={video}"},
            "annotations": [{"id": task_id, "result": [region]}]}


def ask(client, one):
    return client.post("/predict", json={"tasks": [one], "label_config": CONFIG, "params": {}})


@pytest.fixture(scope="module")
def setup(sam2_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("team-video")
    (root / "clips").mkdir()
    truth = write_shapes_clip(root / "clips" / "a.mp4", frames=FRAMES, width=W, height=H,
                              codec=MP4_MPEG4)
    logs = tmp_path_factory.mktemp("team-video-logs")
    redis_server = RedisServer(logs).start()
    options = ["model_name=sam2", "sam_config=hiera_tiny", f"sam_checkpoint_file={sam2_file}",
               "device=cpu", "runtime=torch", f"embedding_store={redis_server.url}",
               "video_background=worker"]
    worker = WorkerProcess(options, process_env(root), logs / "worker.log", redis_server.client())
    worker.cmd[worker.cmd.index("worker") + 1:worker.cmd.index("worker") + 1] = ["--queue",
                                                                                  "video"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SAM_BACKEND_IMAGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LOCAL_FILES_DOCUMENT_ROOT"):
            env.delenv(name, raising=False)
        settings = Settings.load(dict(
            model_name="sam2", sam_config="hiera_tiny", sam_checkpoint_file=str(sam2_file),
            device="cpu", runtime="torch", embedding_store=redis_server.url,
            video_background="worker", local_files_document_root=str(root),
            video_answer_frames="0", video_answer_timeout="240"), environ={})
        app = build_app(settings)
        app.testing = True
        try:
            yield app.test_client(), app, worker, redis_server, truth
        finally:
            close_app(app)
            gc.unfreeze()
            worker.kill()
            redis_server.kill()


def test_a_worker_tracks_and_every_replica_answers_from_redis(setup):
    client, app, worker, redis_server, truth = setup
    worker.start()
    response = ask(client, task(1, 1, truth[0]["square"]))
    assert response.status_code == 200, response.get_data(as_text=True)
    (region,) = response.get_json()["results"][0]["result"]
    assert [k["frame"] for k in region["value"]["sequence"]][0] == 1
    assert "tracked 1 object(s)" in worker.log()
    stored = [k for k in redis_server.client().keys("sam_backend:video:result:*")]
    assert len(stored) == 1


def test_no_worker_is_a_clear_503_and_the_server_goes_on(setup):
    client, app, worker, redis_server, truth = setup
    worker.kill()
    redis_server.client().delete(*redis_server.client().keys("rq:worker*") or ["none"])
    response = ask(client, task(2, 2, truth[1]["square"]))
    assert response.status_code == 503
    assert "sam-backend worker --queue video" in response.get_json()["errors"][0]
    assert client.get("/health").status_code == 200


def test_without_redis_the_app_tracks_in_its_own_process(setup):
    client, app, worker, redis_server, truth = setup
    redis_server.kill()
    response = ask(client, task(3, 3, truth[2]["square"]))
    assert response.status_code == 200, response.get_data(as_text=True)
    (region,) = response.get_json()["results"][0]["result"]
    assert region["value"]["sequence"][0]["frame"] == 3
