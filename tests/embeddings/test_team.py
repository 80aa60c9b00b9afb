"""A team deployment on loopback: a real redis-server, two backend replicas (`sam-backend serve`),
one RQ worker (`sam-backend worker`), `sam-backend precompute --project` against a Label Studio API
stand-in. Random-weight MobileSAM (torch runtime, float32 embeddings: masks compared exactly)."""
from __future__ import annotations

import json
import subprocess
import time

import cv2
import numpy as np
import pytest
import requests

from tests.support.redis_utils import RedisServer
from sam_backend.models.base import Prompt
from tests.support.random_weights import synthetic_image
from sam_backend.models.registry import get_variant
from sam_backend.models.torch_runtime import TorchSamModel
from tests.support.server_utils import REPO, run_together
from tests.support.team_utils import (API_TOKEN, CLI, FakeLabelStudioAPI, WorkerProcess, model_options,
                        process_env, start_replica)
from tests.support.payloads import FULL_CONFIG, H, W, decode_brush, keypoint, payload

pytestmark = pytest.mark.process  # Redis, replicas and workers as processes

PROJECT_IMAGES = ["p1.png", "p2.png", "p3.png"]
OTHER_IMAGES = ["n1.png", "n2.png", "n3.png", "n4.png", "n5.png"]


def url_of(name):
    return f"/data/local-files/?d=pics/{name}"


@pytest.fixture(scope="module")
def docroot(tmp_path_factory):
    root = tmp_path_factory.mktemp("team-docroot")
    (root / "pics").mkdir()
    images = {}
    for seed, name in enumerate(PROJECT_IMAGES + OTHER_IMAGES):
        image = synthetic_image(H, W, seed=seed + 20)
        cv2.imwrite(str(root / "pics" / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        images[name] = image
    return root, images


@pytest.fixture(scope="module")
def team(checkpoint_factory, docroot, tmp_path_factory):
    """Redis + two replicas + one worker; stopped (all of it) at the end of the module."""
    logs = tmp_path_factory.mktemp("team-logs")
    root, _ = docroot
    redis_server = RedisServer(logs).start()
    checkpoint = checkpoint_factory("mobile_sam")
    options = model_options(checkpoint, redis_server.url)
    env = process_env(root)
    started = []
    try:
        worker = WorkerProcess(options, env, logs / "worker.log", redis_server.client())
        started.append(worker.start())
        replicas = []
        for i in range(2):
            replicas.append(start_replica(options, env, logs / f"replica{i}.log"))
            started.append(replicas[-1])
        yield {"redis": redis_server, "replicas": replicas, "worker": worker, "options": options,
               "env": env, "logs": logs}
    finally:
        for process in started:
            process.stop()
        redis_server.stop()


@pytest.fixture(scope="module")
def reference(checkpoint_factory, docroot):
    model = TorchSamModel(get_variant("mobile_sam"), str(checkpoint_factory("mobile_sam")), "cpu")
    embeddings = {}

    def mask(name, x, y):
        if name not in embeddings:
            embeddings[name] = model.embed(docroot[1][name])
        prompt = Prompt(np.array([[x / 100 * W, y / 100 * H]], np.float32), np.array([1]))
        return model.decode(embeddings[name], prompt).mask

    return mask


def metrics(replica):
    return requests.get(replica.url + "/metrics", timeout=10).json()


def click(replica, name, x=40.0, y=50.0, task_id=1):
    response = requests.post(replica.url + "/predict", timeout=300, json=payload(
        [keypoint(x, y)], data={"image": url_of(name)}, task_id=task_id))
    assert response.status_code == 200, response.text
    brush = [r for r in response.json()["results"][0]["result"] if r["type"] == "brushlabels"]
    return decode_brush(brush[0])


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def stored_entries(team):
    return sum(1 for k in team["redis"].client().scan_iter("sam_backend:emb:*", count=1000)
               if not k.endswith(b":lock"))


def test_precompute_then_first_clicks_on_either_replica_run_no_encoder(team, reference):
    # tasks 1..4 reference the three project images (task 4 repeats task 1's image)
    tasks = [{"id": i + 1, "data": {"image": url_of(name)}}
             for i, name in enumerate(PROJECT_IMAGES + PROJECT_IMAGES[:1])]
    api = FakeLabelStudioAPI(FULL_CONFIG, tasks)
    try:
        env = dict(team["env"], LABEL_STUDIO_URL=api.url, LABEL_STUDIO_API_KEY=API_TOKEN)
        import os

        done = subprocess.run(CLI + ["precompute", "--project", "1", "--no-progress", "--with",
                                     *team["options"]], env=dict(os.environ, **env), cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    finally:
        api.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["tasks"] == 4 and summary["images"] == 3 and summary["duplicates"] == 1
    assert summary["enqueued"] + summary["stored"] + summary["queued"] == 3
    wait_for(lambda: stored_entries(team) >= 3, 600, "the worker to encode the project")
    # newest tasks first: task 4 (p1), task 3 (p3), task 2 (p2); task 1 repeats p1
    encoded = team["worker"].encoded()
    assert [k.split("pics/")[1].split("?")[0] for k in encoded[:3]] == ["p1.png", "p3.png", "p2.png"]

    a, b = team["replicas"]
    before = [metrics(r) for r in (a, b)]
    for i, name in enumerate(PROJECT_IMAGES):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        for replica in (first, second):
            mask = click(replica, name, 30.0 + 10 * i, 45.0)
            assert np.array_equal(mask, reference(name, 30.0 + 10 * i, 45.0))
    after = [metrics(r) for r in (a, b)]
    for b0, b1 in zip(before, after):
        assert b1["encodes"] == b0["encodes"]  # no encoder ran on either replica
        assert b1["store_hits"] - b0["store_hits"] == 3  # each image came from the store


def test_eight_concurrent_first_clicks_over_both_replicas_encode_once(team, reference):
    a, b = team["replicas"]
    before = [metrics(r)["encodes"] for r in (a, b)]
    worker_before = len(team["worker"].encoded())
    masks, errors = run_together(
        lambda i: click((a, b)[i % 2], OTHER_IMAGES[0], 55.0, 40.0), 8, timeout=300, barrier_timeout=30)
    assert not errors, errors
    after = [metrics(r) for r in (a, b)]
    assert sum(m["encodes"] for m in after) - sum(before) == 1
    assert len(team["worker"].encoded()) == worker_before  # clicks are not queued work
    want = reference(OTHER_IMAGES[0], 55.0, 40.0)
    assert all(np.array_equal(m, want) for m in masks)


def test_an_opened_task_is_encoded_by_the_worker_not_the_replica(team, reference):
    a, b = team["replicas"]
    before = [metrics(r) for r in (a, b)]
    opened = requests.post(a.url + "/predict", timeout=30, json={
        "tasks": [{"id": 9, "data": {"image": url_of(OTHER_IMAGES[1])}}],
        "label_config": FULL_CONFIG, "project": "1.1", "params": {"context": None}})
    assert opened.status_code == 200 and opened.json()["results"] == []
    wait_for(lambda: any(OTHER_IMAGES[1] in k for k in team["worker"].encoded()), 300,
             "the worker to encode the opened task's image")
    mask = click(b, OTHER_IMAGES[1], 20.0, 60.0)
    assert np.array_equal(mask, reference(OTHER_IMAGES[1], 20.0, 60.0))
    after = [metrics(r) for r in (a, b)]
    assert after[0]["queue_enqueued"] - before[0]["queue_enqueued"] == 1
    assert [m["encodes"] for m in after] == [m["encodes"] for m in before]
    assert after[1]["store_hits"] - before[1]["store_hits"] == 1
    assert after[0]["queue_length"] == 0


def test_garbage_under_a_store_key_is_recomputed_and_logged(team, docroot, reference):
    from sam_backend.images.config import ImageAccessSettings
    from sam_backend.images.loader import ImageLoader
    from sam_backend.assembly import identity_for
    from sam_backend.settings import Settings
    from sam_backend.embeddings.store import EmbeddingStore, decode_embedding

    settings = Settings.load(dict(o.split("=", 1) for o in team["options"]), environ={})
    store = EmbeddingStore(team["redis"].url, identity_for(settings))
    images = ImageLoader(ImageAccessSettings(local_files_document_root=str(docroot[0]),
                                             cache_max_bytes=0))
    key = store.key_for(images.source_key(url_of(OTHER_IMAGES[4])))
    team["redis"].client().set(key, b"\x80\x04\x95 not an embedding")
    a = team["replicas"][0]
    before = metrics(a)
    assert np.array_equal(click(a, OTHER_IMAGES[4], 45.0, 55.0),
                          reference(OTHER_IMAGES[4], 45.0, 55.0))
    after = metrics(a)
    assert after["store_corrupt"] - before["store_corrupt"] == 1
    assert after["encodes"] - before["encodes"] == 1
    assert "is unusable" in (team["logs"] / "replica0.log").read_text()
    decode_embedding(team["redis"].client().get(key), key)  # replaced by a good entry


def test_redis_killed_mid_run_then_restarted(team, reference):
    """Last in the module: it takes the team's Redis away and brings it back empty."""
    a, b = team["replicas"]
    health = requests.get(a.url + "/health", timeout=5).json()
    assert health["embedding_store"]["state"] == "up"
    team["redis"].kill()
    # clicks keep working: from memory, and with the local encoder for a new image
    for _ in range(3):
        for replica in (a, b):
            assert np.array_equal(click(replica, PROJECT_IMAGES[0], 30.0, 45.0),
                                  reference(PROJECT_IMAGES[0], 30.0, 45.0))
    before = metrics(a)
    assert np.array_equal(click(a, OTHER_IMAGES[2], 35.0, 35.0),
                          reference(OTHER_IMAGES[2], 35.0, 35.0))
    assert metrics(a)["encodes"] - before["encodes"] == 1
    assert metrics(a)["queue_length"] is None
    health = requests.get(a.url + "/health", timeout=5).json()
    assert health["status"] == "UP" and health["embedding_store"]["state"] == "down"
    log_a = (team["logs"] / "replica0.log").read_text()
    assert log_a.count("unreachable (") == 1  # logged once, not per request
    # training cannot be queued without Redis: a clear 503, and status and metrics still answer
    hook = requests.post(a.url + "/webhook", json={"action": "START_TRAINING",
                                                   "project": {"id": 1}}, timeout=30)
    assert hook.status_code == 503 and "Redis" in hook.json()["errors"][0], hook.text
    assert "unreachable" in requests.get(a.url + "/train/status?project=1",
                                         timeout=30).json()["message"]
    assert metrics(a)["training_runs_started"] is None

    team["redis"].start()
    wait_for(lambda: requests.get(a.url + "/health", timeout=5).json()["embedding_store"]["state"]
             == "up" and requests.get(b.url + "/health", timeout=5).json()["embedding_store"]
             ["state"] == "up", 30, "both replicas to see Redis again")
    assert "reachable again" in (team["logs"] / "replica0.log").read_text()
    before = [metrics(r) for r in (a, b)]
    click(a, OTHER_IMAGES[3], 50.0, 50.0)
    assert np.array_equal(click(b, OTHER_IMAGES[3], 50.0, 50.0),
                          reference(OTHER_IMAGES[3], 50.0, 50.0))
    after = [metrics(r) for r in (a, b)]
    assert after[0]["encodes"] - before[0]["encodes"] == 1
    assert after[0]["store_writes"] - before[0]["store_writes"] == 1
    assert after[1]["encodes"] == before[1]["encodes"]
    assert after[1]["store_hits"] - before[1]["store_hits"] == 1  # store hits resumed


@pytest.mark.slow
def test_a_worker_killed_mid_job_loses_only_that_job_which_is_retried(checkpoint_factory,
                                                                       tmp_path):
    """RQ keeps a started job in its StartedJobRegistry until its heartbeat lapses
    (precompute_job_timeout + 60 s); a living worker's maintenance then re-queues it (Retry)."""
    from rq import Queue
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from sam_backend.assembly import identity_for
    from sam_backend.embeddings.precompute import RETRIES, EncodeQueue
    from sam_backend.settings import Settings
    from sam_backend.embeddings.store import EmbeddingStore

    root = tmp_path / "docroot"
    (root / "pics").mkdir(parents=True)
    cv2.imwrite(str(root / "pics" / "big.png"), synthetic_image(1080, 1920, seed=9))
    server = RedisServer(tmp_path).start()
    checkpoint = checkpoint_factory("mobile_sam")
    # a job may run 30 s (plenty for one MobileSAM encode, even on a busy machine); the killed
    # worker's job is abandoned 30 + 60 s after it started
    options = model_options(checkpoint, server.url, "precompute_job_timeout=30")
    env = process_env(root)
    settings = Settings.load(dict(o.split("=", 1) for o in options), environ={})
    store = EmbeddingStore(server.url, identity_for(settings))
    queue = EncodeQueue(store, settings.precompute_job_timeout)
    first = WorkerProcess(options, env, tmp_path / "w1.log", server.client(), name="first")
    second = WorkerProcess(options, env, tmp_path / "w2.log", server.client(), name="second",
                           maintenance_interval=1)
    try:
        first.start()
        image_key = f"file://{root}/pics/big.png#test"
        assert queue.submit(image_key, str(root / "pics" / "big.png")) == "enqueued"
        rq_queue = Queue(queue.queue.name, connection=server.client(), serializer=JSONSerializer)
        job_id = queue.job_id(image_key)
        wait_for(lambda: job_id in rq_queue.started_job_registry.get_job_ids(), 120,
                 "the first worker to start the job")
        first.kill()  # mid-job: a 1080p image takes more than a second to load and encode
        assert not store.contains(image_key)
        second.start()
        wait_for(lambda: store.contains(image_key), 300, "the job to be retried")
        job = Job.fetch(job_id, connection=server.client(), serializer=JSONSerializer)
        assert job.retries_left == RETRIES - 1
        assert any(image_key in k for k in second.encoded())
        assert "encoded" not in first.log()
    finally:
        first.stop()
        second.stop()
        server.stop()
