"""The team's video queue and results on a real redis-server (no model: what is queued and
stored, and what an ask says when nobody serves the queue or Redis is gone)."""
from __future__ import annotations

import pytest

from sam_backend.embeddings.store import EmbeddingStore, StoreUnavailable
from sam_backend.errors import BusyError
from sam_backend.video.base import BoxPrompt, Track
from sam_backend.video.jobs import (FAILED_TTL, TrackRequest, TrackResult, VideoQueue,
                                    queue_name)
from tests.support.redis_utils import RedisServer

pytestmark = pytest.mark.process  # a redis-server


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()


def request(frame=0):
    return TrackRequest("/data/upload/1/v.mp4", 1, "src:v", (BoxPrompt(0, frame, (.1, .1, .3, .3)),),
                        "track:sam2:abc", 0, 8)


def test_a_request_is_one_job_and_its_results_are_shared(redis_server):
    store = EmbeddingStore(redis_server.url, "m")
    queue = VideoQueue(store, "track:sam2:abc")
    assert queue.queue.name == queue_name("track:sam2:abc")
    assert queue.submit(request()) == "enqueued"
    assert queue.submit(request()) == "queued"  # asked again: the same job
    assert queue.submit(request(1)) == "enqueued"
    assert queue.queue.count == 2
    job = queue.queue.jobs[0]
    assert TrackRequest.from_json(job.kwargs["request"]) == request()
    result = TrackResult("done", {0: Track(0, {0: (1.0, 2.0, 3.0, 4.0)})}, 5, 5, 5, (64, 48))
    queue.results.put(request().key, result)
    other = VideoQueue(EmbeddingStore(redis_server.url, "m"), "track:sam2:abc")  # a replica
    assert other.results.get(request().key).tracks[0].boxes == {0: (1.0, 2.0, 3.0, 4.0)}
    failed = TrackResult("failed", {}, error="corrupt")
    queue.results.put("k2", failed)
    assert 0 < redis_server.client().ttl(queue.results.redis_key("k2")) <= FAILED_TTL


def test_nobody_serving_the_queue_is_a_busy_error_naming_the_command(redis_server):
    queue = VideoQueue(EmbeddingStore(redis_server.url, "m"), "track:sam2:abc")
    with pytest.raises(BusyError, match="sam-backend worker --queue video"):
        queue.check_workers()


def test_redis_gone_is_store_unavailable(redis_server):
    queue = VideoQueue(EmbeddingStore(redis_server.url, "m"), "track:sam2:abc")
    redis_server.kill()
    with pytest.raises(StoreUnavailable):
        queue.submit(request())
    with pytest.raises(StoreUnavailable):
        queue.results.get(request().key)
    queue.check_workers()  # Redis down: nothing to say about workers (the ask falls back)
