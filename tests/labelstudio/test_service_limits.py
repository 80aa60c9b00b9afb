"""The click path's bounds, in process with a real random-weight MobileSAM (issue 21, defects 5
and 7): a /predict's work stops when its client has gone or its time is up; what it builds (each
task's mask, the results kept for the answer) is counted in ``image_memory_mb`` and a request
that does not fit is answered early; waiting on an image host holds a download slot, never one
of the few decode/encode slots. tests/server/test_memory_budget.py checks the memory bound on a
real ``sam-backend serve`` under an RSS watchdog."""
from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import pytest

from sam_backend.common.deadline import ClientGone, WorkScope
from sam_backend.common.limits import MIB
from sam_backend.errors import BusyError, ImageError
from sam_backend.assembly import prediction_service
from sam_backend.labelstudio.service import MASK_BYTES_PER_PIXEL, result_bytes
from sam_backend.settings import Settings
from tests.support.random_weights import synthetic_image
from tests.support.hardening import RawServer, read_request

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat" smart="true"/></KeyPointLabels>
  <BrushLabels name="brush" toName="image"><Label value="cat"/></BrushLabels>
</View>"""
SIDE = 2000  # the large image: 4 Mpx, a task's working memory 96 MB, its result ~5 MB
HANG = 12.0  # seconds a hanging host keeps its connections (longer than IMAGE_TIMEOUT)
IMAGE_TIMEOUT = 8.0


def click(x=50.0, y=50.0):
    return {"result": [{"value": {"x": x, "y": y, "keypointlabels": ["cat"]}, "is_positive": True,
                        "id": "k", "from_name": "kp", "to_name": "image",
                        "type": "keypointlabels"}]}


def tasks(image, n):
    return [{"id": i, "data": {"image": image}} for i in range(n)]


@pytest.fixture(scope="module")
def docroot(tmp_path_factory):
    root = tmp_path_factory.mktemp("docroot")
    cv2.imwrite(str(root / "big.png"),
                cv2.cvtColor(synthetic_image(SIDE, SIDE, seed=1), cv2.COLOR_RGB2BGR))
    for i in range(8):  # new images for the load-slot test, one per click
        cv2.imwrite(str(root / f"new{i}.png"),
                    cv2.cvtColor(synthetic_image(240, 320, seed=10 + i), cv2.COLOR_RGB2BGR))
    return root


@pytest.fixture(scope="module")
def make_service(checkpoint_factory, docroot, tmp_path_factory):
    """``make_service(**options) -> PredictionService``; the model (and the embedding cache) is
    the process-wide one, shared by every service of this module."""
    checkpoint = checkpoint_factory("mobile_sam")
    cache_dir = tmp_path_factory.mktemp("imgcache")

    def make(**options):
        values = dict(model_name="mobile_sam", sam_checkpoint_file=str(checkpoint), device="cpu",
                      local_files_document_root=str(docroot), image_cache_dir=str(cache_dir),
                      image_timeout=str(IMAGE_TIMEOUT))
        values.update({k: str(v) for k, v in options.items()})
        return prediction_service(Settings.load(values, environ={}))

    return make


@pytest.fixture(scope="module")
def service(make_service):
    """A service whose model has embedded big.png already (the clicks below only decode)."""
    made = make_service()
    made.predict(tasks("big.png", 1), CONFIG, click())
    return made


# -- defect 5: work stops when nobody waits for it -----------------------------------------------
def test_a_request_stops_between_tasks_once_its_client_has_gone(service):
    gone_at = time.monotonic() + 0.5
    asked = []

    def cancelled():
        asked.append(time.monotonic())
        return asked[-1] > gone_at

    started = time.monotonic()
    with pytest.raises(ClientGone, match="disconnected"):
        service.predict(tasks("big.png", 64), CONFIG, click(), scope=WorkScope(
            cancelled=cancelled, what="predict_timeout"))
    stopped = time.monotonic()
    # it asked between tasks and stopped at the first answer "gone": about one task after 0.5 s
    # (64 tasks take ~4 s here and more on a loaded machine)
    assert len(asked) >= 2 and stopped - gone_at < 1.5, (len(asked), stopped - started)
    assert service.memory.used == 0  # everything it reserved is given back


def test_a_request_stops_at_its_deadline_with_a_503(service):
    started = time.monotonic()
    with pytest.raises(BusyError, match="predict_timeout"):
        service.predict(tasks("big.png", 64), CONFIG, click(),
                        scope=WorkScope(0.4, what="predict_timeout"))
    assert time.monotonic() - started < 0.4 + 1.5
    assert service.memory.used == 0


def test_precompute_of_many_tasks_stops_when_the_client_has_gone(service):
    with pytest.raises(ClientGone):
        service.predict(tasks("new7.png", 64), CONFIG, {"result": []},
                        scope=WorkScope(cancelled=lambda: True))


# -- defect 5: what a request builds is counted --------------------------------------------------
def test_results_stay_counted_until_the_caller_releases_them(service):
    held = service.memory.hold(1.0)
    results = service.predict(tasks("big.png", 6), CONFIG, click(30, 40), held=held)
    assert len(results) == 6 and all(r["result"] for r in results)
    rle = len(results[0]["result"][0]["value"]["rle"])
    # the results (their lists and JSON: ~16 bytes per RLE value) are held, not the masks
    assert held.held == sum(result_bytes(r["result"]) for r in results) >= 6 * 16 * rle
    assert held.held < 6 * SIDE * SIDE * MASK_BYTES_PER_PIXEL / 4
    assert service.memory.used == held.held
    # while they were made, one task's working memory came on top
    assert service.memory.peak >= SIDE * SIDE * MASK_BYTES_PER_PIXEL
    held.release()
    assert service.memory.used == 0


def test_a_request_whose_results_exceed_the_budget_is_refused_early(make_service, service):
    # 160 MiB: one task's working memory (92 MiB) fits; 64 results (~5 MiB each) do not
    small = make_service(image_memory_mb=160, memory_wait=1)
    started = time.monotonic()
    with pytest.raises(ImageError, match="fewer tasks") as refused:
        small.predict(tasks("big.png", 64), CONFIG, click(60, 60))
    elapsed = time.monotonic() - started
    assert "image_memory_mb" in str(refused.value)
    assert small.memory.peak <= 160 * MIB and small.memory.used == 0
    assert elapsed < 20  # refused once the results filled the budget, not after all 64 tasks


def test_a_request_gets_a_503_within_memory_wait_when_others_hold_the_budget(make_service,
                                                                          service):
    small = make_service(image_memory_mb=160, memory_wait=1)
    other = small.memory.hold(1.0)
    other.grow(100 * MIB, "another request's results")
    try:
        started = time.monotonic()
        with pytest.raises(BusyError, match="image_memory_mb"):
            small.predict(tasks("big.png", 8), CONFIG, click(70, 30))
        assert time.monotonic() - started < 1 + 1.5  # memory_wait, not image_timeout per task
    finally:
        other.release()
    assert small.memory.used == 0


# -- defect 7: waiting on a host holds a download slot, not a load slot --------------------------
class HangingHosts:
    """A loopback host that accepts every connection, reads the request and answers nothing for
    ``HANG`` seconds; ``connections`` counts the requests that reached it."""

    def __init__(self):
        self.connections = 0
        self._lock = threading.Lock()

        def hang(conn: socket.socket):
            read_request(conn)
            with self._lock:
                self.connections += 1
            time.sleep(HANG)

        self.server = RawServer(hang)
        self.url = self.server.url

    def wait_for(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.connections < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.connections >= n, f"{self.connections} of {n} downloads reached the host"

    def close(self):
        self.server.close()


def test_hanging_image_hosts_do_not_block_clicks_on_new_images(make_service):
    loads = 4
    svc = make_service(max_concurrent_loads=loads, max_concurrent_downloads=6)
    hosts = HangingHosts()
    pool = ThreadPoolExecutor(8)
    try:
        # as many hanging downloads as there are load slots, and two more
        hanging = [pool.submit(svc.predict, tasks(f"{hosts.url}/img{i}.png", 1), CONFIG, click())
                   for i in range(loads + 2)]
        hosts.wait_for(loads + 2)
        # past max_concurrent_downloads: a 503 at once, not a thread held for image_timeout
        started = time.monotonic()
        with pytest.raises(BusyError, match="max_concurrent_downloads=6"):
            svc.predict(tasks(f"{hosts.url}/one-more.png", 1), CONFIG, click())
        assert time.monotonic() - started < 1.0
        for i in range(2):  # a new image each time: each needs a load slot
            results = svc.predict(tasks(f"new{i}.png", 1), CONFIG, click())
            assert results[0]["result"], results
        # ... answered while every hanging download was still waiting on its host
        assert svc.images.downloads.held == loads + 2 and svc.loads.held == 0
        # the downloads themselves end at image_timeout with a 400 naming it
        for future in hanging:
            with pytest.raises(ImageError, match=f"{IMAGE_TIMEOUT:g} s"):
                future.result(timeout=IMAGE_TIMEOUT + 10)
    finally:
        pool.shutdown(wait=True)
        hosts.close()
    assert svc.memory.used == 0 and svc.images.downloads.held == 0 and svc.loads.held == 0


def test_clicks_waiting_for_the_same_hanging_image_hold_download_slots(make_service):
    svc = make_service(max_concurrent_loads=2, max_concurrent_downloads=3)
    hosts = HangingHosts()
    pool = ThreadPoolExecutor(4)
    try:
        first = pool.submit(svc.predict, tasks(f"{hosts.url}/same.png", 1), CONFIG, click())
        hosts.wait_for(1)
        waiting = [pool.submit(svc.predict, tasks(f"{hosts.url}/same.png", 1), CONFIG, click())
                   for _ in range(2)]
        deadline = time.monotonic() + 5
        while svc.images.downloads.held < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert svc.images.downloads.held == 3 and svc.loads.held == 0
        with pytest.raises(BusyError, match="max_concurrent_downloads"):
            svc.predict(tasks(f"{hosts.url}/same.png", 1), CONFIG, click())
        assert svc.predict(tasks("new5.png", 1), CONFIG, click())[0]["result"]
        for future in [first] + waiting:
            with pytest.raises(ImageError):
                future.result(timeout=IMAGE_TIMEOUT + 10)
    finally:
        pool.shutdown(wait=True)
        hosts.close()


def test_a_new_image_is_not_read_when_no_load_slot_is_free(make_service):
    svc = make_service(max_concurrent_loads=1)
    with svc.loads.admit():  # e.g. a long encode
        with pytest.raises(BusyError, match="max_concurrent_loads=1"):
            svc.predict(tasks("new6.png", 1), CONFIG, click())
        assert svc.memory.peak == 0  # refused before its bytes were read
    assert svc.predict(tasks("new6.png", 1), CONFIG, click())[0]["result"]
