"""Where runs happen (:class:`TrainingJobs`): a background process per run on one machine, an
RQ job served by ``sam-backend worker --queue train`` for a team (real redis-server). One run
per project at a time; triggers during a run queue exactly one follow-up; a killed run leaves
the served version and says how it ended. The runs are real (the reduced RF-DETR, 1 epoch, on
the small shapes project of tests/support/training_runs.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from sam_backend.training.jobs import TrainingJobs
from sam_backend.training.versions import VersionStore
from tests.support.redis_utils import redis_server  # noqa: F401 - fixture
from tests.support.server_utils import REPO
from tests.support.training_runs import ShapesProject

pytestmark = [pytest.mark.slow, pytest.mark.process,
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]


@pytest.fixture
def shapes(tmp_path):
    project = ShapesProject(tmp_path, n=8)
    yield project
    project.stop()


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_one_run_at_a_time_one_follow_up_and_a_killed_run_keeps_the_served_version(shapes):
    store = VersionStore(shapes.trained)
    jobs = TrainingJobs(shapes.settings(train_every=3), store)
    try:
        first = jobs.request(1, "Start Training")
        assert first["status"] == "started" and first["job"]
        assert jobs.request(1, "Start Training again") == {
            "status": "queued", "project": 1, "job": first["job"]}
        assert jobs.request(1, "and again")["status"] == "already_queued"
        status = jobs.status(1)
        assert status["state"] == "running" and status["follow_up"] is True
        assert jobs.wait(timeout=600)
        versions = store.versions(1)
        assert [v.name for v in versions] == ["p1-v1", "p1-v2"]  # the run and ONE follow-up
        one, two = (v.report for v in versions)
        assert two["started"] >= one["finished"]  # never in parallel
        counters = jobs.counters()
        assert (counters["runs_started"], counters["runs_succeeded"], counters["runs_queued"],
                counters["runs_failed"]) == (2, 2, 1, 0)
        status = jobs.status(1)
        assert status["follow_up"] is False and status["state"] in ("succeeded", "not_promoted")
        assert status["last_report"]["version"] == "p1-v2" and len(status["versions"]) == 2
        served = store.current(1).name

        # train_every=3: two annotations start nothing, the third starts a run...
        assert jobs.annotation_event(1, 2) is None
        third = jobs.annotation_event(1, 1)
        assert third["status"] == "started" and jobs.counters()["annotation_events"] == 3
        # ...which is killed while it trains: the served version stays, the status says why
        run = _wait_for(lambda: (lambda s: s if s.get("state") == "running" and
                                 s.get("stage") in ("images", "training") else None)(
            store.status(1)), 180, "the third run to start")
        os.kill(run["pid"], signal.SIGKILL)
        assert jobs.wait(timeout=60)
        status = jobs.status(1)
        assert status["state"] == "failed" and "signal 9" in status["message"]
        assert status["served"] == served and f"still served: {served}" in status["message"]
        assert [v.name for v in store.versions(1)] == ["p1-v1", "p1-v2"]
        assert jobs.counters()["runs_failed"] == 1
    finally:
        jobs.close()


def test_a_train_worker_runs_the_queued_run_and_its_follow_up(shapes, redis_server, tmp_path):
    store = VersionStore(shapes.trained)
    jobs = TrainingJobs(shapes.settings(embedding_store=redis_server.url), store)
    try:
        first = jobs.request(1, "Start Training")
        assert first["status"] == "started"
        assert jobs.request(1, "again") == {"status": "queued", "project": 1,
                                            "job": first["job"]}
        assert jobs.request(1, "again")["status"] == "already_queued"
        status = jobs.status(1)
        assert (status["state"], status["follow_up"], status["where"]) == ("queued", True, "rq")
        log = tmp_path / "worker.log"
        with open(log, "wb") as out:
            worker = subprocess.run(
                [sys.executable, "-m", "sam_backend.cli", "worker", "--queue", "train",
                 "--burst", "--maintenance-interval", "2", "--with",
                 *shapes.with_args(embedding_store=redis_server.url)],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=600,
                env=dict(os.environ, OMP_NUM_THREADS="2"))
        text = log.read_text(errors="replace")
        assert worker.returncode == 0, text[-3000:]
        assert [v.name for v in store.versions(1)] == ["p1-v1", "p1-v2"], text[-3000:]
        assert "epoch 1/1" in text  # one log line per epoch
        counters = jobs.counters()
        assert (counters["runs_started"], counters["runs_succeeded"], counters["runs_queued"],
                counters["runs_failed"]) == (2, 2, 1, 0)
        status = jobs.status(1)
        assert status["follow_up"] is False and status["state"] in ("succeeded", "not_promoted")
        assert not redis_server.client().exists("sam_backend:train:p1:active")
        # the next request starts a new run (the finished job holds no lock)
        assert jobs.request(1, "later")["status"] == "started"
    finally:
        jobs.close()
