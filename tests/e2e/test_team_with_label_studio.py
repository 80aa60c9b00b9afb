"""A team against a real Label Studio 1.23.2: `sam-backend precompute --project` lists the
project through Label Studio's API, a `sam-backend worker` downloads the uploads from Label Studio
and fills the shared Redis store, and a replica then answers Label Studio's clicks without
running its encoder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.support.redis_utils import RedisServer
from tests.support.server_utils import REPO, free_port
from tests.support.team_utils import CLI, WorkerProcess, model_options

H, W = 200, 300


def picture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((H, W, 3), rng.integers(0, 255, 3), np.uint8)
    image[40:160, 60 + 20 * seed:200 + 20 * seed] = rng.integers(0, 255, 3)
    return image


def test_precompute_a_project_then_clicks_through_label_studio_run_no_encoder(
        label_studio, backend_process, checkpoint_factory, tmp_path):
    api = label_studio.api
    config = (REPO / "xml_templates" / "point_to_brush.xml").read_text()
    project = api.create_project("e2e team", config)
    tasks = []
    for seed in range(3):
        path = tmp_path / f"img{seed}.png"
        Image.fromarray(picture(seed)).save(path)
        tasks += api.import_image(project["id"], path)
    redis_server = RedisServer(tmp_path).start()
    options = model_options(checkpoint_factory("mobile_sam"), redis_server.url)
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "SAM_BACKEND_IMAGE_CACHE_BYTES": "0", "PYTHONUNBUFFERED": "1"}
    worker = WorkerProcess(options, env, tmp_path / "worker.log", redis_server.client())
    try:
        worker.start()
        done = subprocess.run(CLI + ["precompute", "--project", str(project["id"]),
                                     "--no-progress", "--with", *options],
                              env=dict(os.environ, **env), cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary["tasks"] == 3 and summary["images"] == 3 and summary["enqueued"] == 3
        deadline = time.monotonic() + 600
        while len(worker.encoded()) < 3:
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.5)

        port = free_port()
        replica = backend_process(CLI + ["serve", "--host", "127.0.0.1", "--port", str(port),
                                         "--with", *options], port,
                                  env=dict(os.environ, **env, PATH=str(Path(sys.executable).parent)
                                           + os.pathsep + os.environ["PATH"]),
                                  cwd=REPO, name="replica", timeout=300)
        ml = api.add_ml_backend(project["id"], replica.url, is_interactive=True)
        from sam_backend.labelstudio.label_config import parse_label_config

        control = next(c for c in parse_label_config(config).controls
                       if c.type == "keypointlabels")
        label = control.labels[0]
        for task in tasks:
            region = {"original_width": W, "original_height": H, "image_rotation": 0,
                      "value": {"x": 50.0, "y": 50.0, "width": 0.6, "keypointlabels": [label]},
                      "is_positive": True, "id": "k1", "from_name": control.name,
                      "to_name": control.to_name, "type": "keypointlabels", "origin": "manual"}
            answer = api.interactive_annotating(ml["id"], task["id"], {"result": [region]})
            assert "errors" not in answer, answer
            assert any(r["type"] == "brushlabels" for r in answer["data"]["result"])
        metrics = requests.get(replica.url + "/metrics", timeout=10).json()
        assert metrics["encodes"] == 0 and metrics["store_hits"] == 3
    finally:
        worker.stop()
        redis_server.stop()
