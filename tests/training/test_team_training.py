"""Training for a team: a replica asks, a ``sam-backend worker --queue train`` trains, every
replica serves the new version without a restart, and a worker killed mid-run leaves the served
version alone while RQ keeps the job to retry.

Everything runs as the project's own processes on loopback: Debian's redis-server, two replicas
(``sam-backend serve`` with ``embedding_store=redis://…`` and one ``trained_dir``, the shared
volume), the train workers; the project's tasks come from a loopback stand-in of Label Studio's
API (tests/support/team_utils.py), its images are local files (``LOCAL_FILES_DOCUMENT_ROOT``).
The real-Label-Studio loop is tests/e2e/test_training_with_label_studio.py.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, List

import pytest
import requests

from tests.support.redis_utils import RedisServer
from tests.support.shapes import LABELS, SHAPES_CONFIG, shapes_project
from tests.support.team_utils import (API_TOKEN, FakeLabelStudioAPI, WorkerProcess,
                                      model_options, process_env, start_replica)

pytestmark = [pytest.mark.process, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

PROJECT = 7
W, H = 160, 120


def wait_for(check: Callable[[], object], timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def train_worker(options: List[str], env, log_path: Path, redis_client, name: str,
                 **kw) -> WorkerProcess:
    """``sam-backend worker --queue train --with <options>``."""
    worker = WorkerProcess(options, env, log_path, redis_client, name=name, **kw)
    at = worker.cmd.index("--with")
    worker.cmd[at:at] = ["--queue", "train"]
    return worker


def auto_annotation(replica, task: dict) -> dict:
    """What a replica answers when a task is opened (a /predict without a prompt): the first
    result, or {} when there is none."""
    body = {"tasks": [{**task, "annotations": [], "predictions": [], "drafts": [],
                       "project": PROJECT}],
            "project": f"{PROJECT}.1700000000", "label_config": SHAPES_CONFIG,
            "params": {"login": None, "password": None, "context": None}}
    answer = requests.post(replica.url + "/predict", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    results = answer.json().get("results") or [{}]
    return results[0] or {}


def served_by(replica, task: dict, version: str) -> bool:
    """True once the replica's auto-annotation comes from ``version`` (e.g. rf_detr@p7-v1)."""
    return str(auto_annotation(replica, task).get("model_version", "")).endswith("+" + version)


def train_status(replica) -> dict:
    answer = requests.get(replica.url + "/train/status", params={"project": PROJECT}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def start_training(replica) -> dict:
    """Label Studio 1.23.2's *Start Training*, posted to this replica."""
    answer = requests.post(replica.url + "/webhook", timeout=30,
                           json={"action": "START_TRAINING", "project": {"id": PROJECT}})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body.get("job"), body  # Label Studio keeps a train-job record only with "job"
    return body


def test_a_train_worker_trains_replicas_switch_and_a_killed_run_keeps_the_served_version(
        checkpoint_factory, tmp_path):
    root = tmp_path / "docroot"
    tasks = shapes_project(root / "shapes", 16, seed=3, width=W, height=H,
                           url_for=lambda p: f"/data/local-files/?d=shapes/{p.name}")
    api = FakeLabelStudioAPI(SHAPES_CONFIG, tasks, project=PROJECT)
    redis_server = RedisServer(tmp_path).start()
    trained = tmp_path / "trained"  # the shared volume
    # one quick epoch per run: this is about who trains and who serves, not about learning;
    # promote=always so that every run becomes the served version
    options = model_options(checkpoint_factory("mobile_sam"), redis_server.url,
                            "trainer=rf_detr", f"trained_dir={trained}", "train_random_init=true",
                            "train_epochs=1", "train_batch_size=4", "promote=always",
                            "concept_model=none")
    env = process_env(root, {"LABEL_STUDIO_URL": api.url, "LABEL_STUDIO_API_KEY": API_TOKEN})
    processes = []
    try:
        worker = train_worker(options, env, tmp_path / "worker.log", redis_server.client(),
                              "trainer-1")
        processes.append(worker.start())
        replicas = [start_replica(options, env, tmp_path / f"replica{i}.log") for i in (0, 1)]
        processes += replicas
        task = tasks[0]
        assert not any("+rf_detr" in str(auto_annotation(r, task)) for r in replicas)

        # replica 0 is asked; the worker trains; both replicas serve v1
        start_training(replicas[0])
        wait_for(lambda: train_status(replicas[1])["served"] == f"p{PROJECT}-v1", 240,
                 "the worker's run to be promoted")
        for replica in replicas:
            wait_for(lambda: served_by(replica, task, f"rf_detr@p{PROJECT}-v1"), 30,
                     f"{replica.url} to serve v1")
        regions = auto_annotation(replicas[1], task)["result"]
        assert all(r["value"][r["type"]][0] in LABELS for r in regions)
        # asked on the other replica: v2, and both switch without a restart
        start_training(replicas[1])
        wait_for(lambda: train_status(replicas[0])["served"] == f"p{PROJECT}-v2", 240,
                 "the second run to be promoted")
        for replica in replicas:
            wait_for(lambda: served_by(replica, task, f"rf_detr@p{PROJECT}-v2"), 30,
                     f"{replica.url} to serve v2")
            assert replica.running  # the same processes all along

        # a long run, killed mid-run with its worker: v2 stays served; RQ re-queues the job once
        # its heartbeat lapses and the next worker runs it (a quick run again): v3
        worker.kill()
        long_run = [o for o in options if not o.startswith("train_epochs=")] + ["train_epochs=500"]
        doomed = train_worker(long_run, env, tmp_path / "doomed.log", redis_server.client(),
                              "trainer-2")
        processes.append(doomed.start())
        job = start_training(replicas[0])["job"]
        wait_for(lambda: train_status(replicas[1])["progress"].get("epoch", 0) >= 1, 240,
                 "the long run to be training")
        doomed.kill()
        assert (trained / f"project-{PROJECT}" / "current").read_text().strip() == "v2"
        for replica in replicas:
            assert served_by(replica, task, f"rf_detr@p{PROJECT}-v2")
        assert [v["name"] for v in train_status(replicas[0])["versions"]] == \
            [f"p{PROJECT}-v1", f"p{PROJECT}-v2"]  # nothing half-written is listed
        from rq import Queue
        from rq.job import Job
        from rq.serializers import JSONSerializer

        from sam_backend.training.jobs import RETRIES, TRAIN_QUEUE

        queue = Queue(TRAIN_QUEUE, connection=redis_server.client(), serializer=JSONSerializer)
        assert queue.started_job_registry.get_job_ids() == [job]  # held for a retry
        rescuer = train_worker(options, env, tmp_path / "rescuer.log", redis_server.client(),
                               "trainer-3", maintenance_interval=2)
        processes.append(rescuer.start())
        wait_for(lambda: train_status(replicas[1])["served"] == f"p{PROJECT}-v3", 240,
                 "the killed run's job to be retried and promoted")
        for replica in replicas:
            wait_for(lambda: served_by(replica, task, f"rf_detr@p{PROJECT}-v3"), 30,
                     f"{replica.url} to serve v3")
        retried = Job.fetch(job, connection=redis_server.client(), serializer=JSONSerializer)
        assert retried.retries_left == RETRIES - 1
        assert [v["name"] for v in train_status(replicas[0])["versions"]] == \
            [f"p{PROJECT}-v{n}" for n in (1, 2, 3)]
    finally:
        for process in processes:
            process.stop()
        redis_server.stop()
        api.stop()
