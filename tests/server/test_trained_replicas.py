"""A team's replicas serve a newly promoted trained version without a restart: two
``sam-backend serve`` processes on one Redis store and one shared ``trained_dir``; a version
promoted on that volume answers both replicas' task-open /predict from their next look at the
pointer (each looks at most once a second), under its model_version, in the same processes.

Real components: redis-server, two server processes (random-weight MobileSAM), a reduced
random-init RF-DETR saved by its trainer, the VersionStore publishing and promoting. Runtime
here: ~50 s (two replicas start)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import requests

from sam_backend.training.base import ImageSample, TrainOptions, trainer_for
from sam_backend.training.dataset import build_dataset
from sam_backend.training.versions import VersionStore
from tests.support.redis_utils import RedisServer
from tests.support.shapes import SHAPES_CONFIG, shapes_project
from tests.support.team_utils import model_options, process_env, start_replica

PROJECT = 31


def open_task(replica, task):
    response = requests.post(replica.url + "/predict", timeout=300, json={
        "tasks": [task], "project": f"{PROJECT}.1700000000", "label_config": SHAPES_CONFIG,
        "params": {"context": None}})
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


@pytest.mark.process
def test_two_replicas_switch_to_a_newly_promoted_version(checkpoint_factory, tmp_path):
    docroot = tmp_path / "docs"
    tasks = shapes_project(docroot, 2, seed=4)
    dataset = build_dataset(tasks, SHAPES_CONFIG, min_tasks=1)
    model = tmp_path / "model"
    trainer_for("rf_detr", TrainOptions(epochs=0, reduced=True, seed=2)).train(
        [ImageSample(s, Path(s.image)) for s in dataset.samples], dataset.classes,
        list(dataset.classes), model)
    store = VersionStore(tmp_path / "trained")

    def promote_copy():
        work = store.work_dir(PROJECT)
        shutil.copytree(model, work / "model")
        return store.promote(PROJECT, store.publish(PROJECT, work, "rf_detr", {}), "test")

    v1 = promote_copy()
    task = {"id": 1, "data": {"image": "/data/local-files/?d=" + Path(
        tasks[0]["data"]["image"]).name}}
    redis_server = RedisServer(tmp_path).start()
    replicas = []
    try:
        options = model_options(checkpoint_factory("mobile_sam"), redis_server.url,
                                f"trained_dir={tmp_path / 'trained'}", "trained_threshold=0",
                                "concept_timeout=300")
        for i in range(2):
            replicas.append(start_replica(options, process_env(docroot),
                                          tmp_path / f"replica{i}.log"))
        pids = [replica.process.pid for replica in replicas]
        for replica in replicas:
            answer = open_task(replica, task)
            assert answer["model_version"].endswith(f"+rf_detr@{v1.name}") and answer["result"]
        v2 = promote_copy()
        for replica, pid in zip(replicas, pids):
            deadline = time.monotonic() + 60  # a look per second; a load of a few seconds
            while True:
                answer = open_task(replica, task)
                if answer["model_version"].endswith(v2.name) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert answer["model_version"].endswith(f"+rf_detr@{v2.name}") and answer["result"]
            assert replica.running and replica.process.pid == pid  # the same process
            metrics = requests.get(replica.url + "/metrics", timeout=10).json()
            assert metrics["trained_served"] == {str(PROJECT): v2.name}
            assert metrics["trained_loads"] == 2 and metrics["trained_load_failures"] == 0
    finally:
        for replica in replicas:
            replica.stop()
        redis_server.stop()
