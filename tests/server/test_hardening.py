"""The backend under abuse: each class of hostile or careless input, replayed against a real
``sam-backend serve`` process on loopback while eight clients keep clicking, under a memory
watchdog.

Every test asserts: a 4xx (or a 503 "retry" where the backend is at a concurrency limit) with a
clear message, within a bound; the process alive; its RSS back near the test's baseline
(``guard``); the eight clients' clicks answered 200 throughout. Limits are set low through the
environment (image timeout 3 s, request timeout 4 s, image memory 768 MiB) so the file stays
short; the mechanisms are the same at the defaults.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

import cv2
import numpy as np
import pytest
import requests

from tests.support.hardening import (RawServer, RssWatch, assert_closed, process_tree_rss,
                                     read_answer, read_request, trickle_until_answered)
from tests.support.server_utils import BackendProcess, free_port

pytestmark = pytest.mark.process  # a real backend process

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat" smart="true"/></KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true"><Label value="cat"/></RectangleLabels>
  <BrushLabels name="brush" toName="image"><Label value="cat"/></BrushLabels>
</View>"""
W, H = 320, 240
IMAGE_TIMEOUT = 3.0
REQUEST_TIMEOUT = 4.0
IMAGE_MEMORY_MB = 768
RSS_SLACK = 300 * 2 ** 20  # "back near the baseline"
# /health's bound. Label Studio's check waits 1 s; on a shared 2-core test machine a request can
# take longer for lack of CPU alone, so the bound is set below the stalls the tests create
# (REQUEST_TIMEOUT, IMAGE_TIMEOUT): a /health queued behind them would exceed it.
HEALTH_BOUND = 2.5
MB = 2 ** 20


# -- helpers ------------------------------------------------------------------------------------
def keypoint(x=50.0, y=50.0, **extra):
    region = {"original_width": W, "original_height": H, "image_rotation": 0,
              "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["cat"]},
              "is_positive": True, "id": "k", "from_name": "kp", "to_name": "image",
              "type": "keypointlabels"}
    region.update(extra)
    return region


def rectangle():
    return {"original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": 10, "y": 10, "width": 50, "height": 50, "rectanglelabels": ["cat"]},
            "id": "r", "from_name": "rect", "to_name": "image", "type": "rectanglelabels"}


def payload(image="ok.png", regions=None, task_id=1):
    return {"tasks": [{"id": task_id, "data": {"image": image}}], "label_config": CONFIG,
            "project": "1.1", "params": {"context": {"result": [keypoint()] if regions is None
                                                     else regions}}}


class Clickers:
    """Eight clients clicking on an embedded image in a loop; every answer must be a 200."""

    def __init__(self, url: str, n: int = 8):
        self.url = url
        self.ok = 0
        self.failures: List[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(n)]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int):
        session = requests.Session()
        rng = np.random.default_rng(index)
        while not self._stop.is_set():
            x, y = (float(v) for v in rng.uniform(5, 95, 2))
            try:
                r = session.post(self.url + "/predict", json=payload(regions=[keypoint(x, y)]),
                                 timeout=30)
                if r.status_code == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"HTTP {r.status_code}: {r.text[:200]}")
            except requests.RequestException as exc:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {exc!r}")
            self._stop.wait(0.5)  # eight annotators clicking fast, not a load test

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def post(url: str, body, timeout: float = 30) -> requests.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(url, data=data, headers={"Content-Type": "application/json"},
                         timeout=timeout)


def assert_client_error(response: requests.Response, *needles: str, status=(400,)):
    assert response.status_code in status, (response.status_code, response.text[:500])
    message = response.json()["errors"][0]
    assert message and len(message) <= 2000
    assert message.isprintable()
    assert response.reason.isprintable() and len(response.reason) <= 300
    for needle in needles:
        assert needle in message, message
    return message


# -- the backend --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def docroot(tmp_path_factory):
    from tests.support.random_weights import synthetic_image

    root = tmp_path_factory.mktemp("docroot")
    cv2.imwrite(str(root / "ok.png"), cv2.cvtColor(synthetic_image(H, W, seed=1), cv2.COLOR_RGB2BGR))
    for seed in (2, 3, 4):  # warm-up images
        cv2.imwrite(str(root / f"warm{seed}.png"),
                    cv2.cvtColor(synthetic_image(1024, 1024, seed=seed), cv2.COLOR_RGB2BGR))
    for w, h in ((3000, 1), (5000, 2), (1, 3000), (1, 1)):
        cv2.imwrite(str(root / f"wide_{w}x{h}.png"), np.full((h, w, 3), 128, np.uint8))
    os.mkfifo(root / "fifo.png")
    (root / "zero.png").symlink_to("/dev/zero")
    (root / "dir.png").mkdir()
    outside = tmp_path_factory.mktemp("outside")  # links out of the root, to a real PNG too
    cv2.imwrite(str(outside / "secret.png"), np.full((64, 64, 3), 66, np.uint8))
    (root / "outlink").symlink_to(outside)
    (root / "etclink").symlink_to("/etc")
    return root


@pytest.fixture(scope="module")
def backend(checkpoint_factory, docroot, tmp_path_factory):
    checkpoint = checkpoint_factory("mobile_sam")
    port = free_port()
    env = {"LOCAL_FILES_DOCUMENT_ROOT": str(docroot),
           "SAM_BACKEND_IMAGE_CACHE_DIR": str(tmp_path_factory.mktemp("imgcache")),
           "SAM_BACKEND_IMAGE_TIMEOUT": str(IMAGE_TIMEOUT),
           "REQUEST_TIMEOUT": str(REQUEST_TIMEOUT), "IMAGE_MEMORY_MB": str(IMAGE_MEMORY_MB),
           "LABEL_CONFIG_CACHE_MB": "4"}
    process = BackendProcess(
        [sys.executable, "-m", "sam_backend.cli", "serve", "--host", "127.0.0.1", "-p", str(port),
         "--with", "model_name=mobile_sam", f"sam_checkpoint_file={checkpoint}", "device=cpu"],
        port, env, tmp_path_factory.mktemp("logs") / "backend.log")
    process.start(timeout=300)
    # warm up to a steady state: onnxruntime's arenas grow over the first few encoder runs
    # (measured: +280 MB on the second run, flat after), the decoder's with concurrent clicks
    for seed in (2, 3, 4):
        assert post(process.url + "/predict", payload(image=f"warm{seed}.png")).status_code == 200
    assert post(process.url + "/predict", payload()).status_code == 200
    with ThreadPoolExecutor(8) as pool:
        assert all(r.status_code == 200 for r in pool.map(
            lambda i: post(process.url + "/predict", payload(regions=[keypoint(10 + i, 20)])),
            range(16)))
    watch = RssWatch(process.process.pid)
    clickers = Clickers(process.url)
    time.sleep(1.0)
    yield process, watch, clickers
    clickers.stop()
    watch.stop()
    process.stop()


@pytest.fixture
def server(backend):
    """The backend's URL; afterwards: alive, RSS back near the test's baseline, and the eight
    clients' clicks all answered 200 meanwhile."""
    process, watch, clickers = backend
    baseline = watch.reset()
    clicks_before = clickers.ok
    yield process.url
    assert process.running, process.log_path.read_text()[-3000:]
    deadline = time.monotonic() + 20
    while process_tree_rss(process.process.pid) > baseline + RSS_SLACK and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    now = process_tree_rss(process.process.pid)
    assert now <= baseline + RSS_SLACK, f"RSS {now / MB:.0f} MiB, baseline {baseline / MB:.0f}"
    assert not clickers.failures, clickers.failures[:5]
    deadline = time.monotonic() + 60
    while clickers.ok <= clicks_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert clickers.ok > clicks_before, "the eight clients' clicks stopped being answered"
    assert requests.get(process.url + "/health", timeout=HEALTH_BOUND).status_code == 200


# -- 1. local files -----------------------------------------------------------------------------
LOCAL_REFUSED = ["/dev/zero", "file:///dev/zero", "/etc/passwd", "/etc/shadow", "file:///etc/passwd",
                 "../../../../etc/passwd", "fifo.png", "zero.png", "dir.png", "nope.png",
                 "/proc/self/environ", "ok.png\x00.txt", "file://otherhost/etc/passwd",
                 "etclink/shadow", "outlink/secret.png"]


def test_local_paths_outside_the_root_devices_and_fifos_are_one_message(server, docroot):
    messages = set()
    for url in LOCAL_REFUSED + [str(docroot / "fifo.png"), (docroot / "zero.png").as_uri()]:
        started = time.monotonic()
        response = post(server + "/predict", payload(image=url))
        assert time.monotonic() - started < 5, url
        message = assert_client_error(response, "not available")
        assert "bytes" not in message and "directory" not in message and "permission" not in message
        messages.add(message.replace(url.replace("\x00", "?"), "<url>").split(" is not available")[1])
    assert len(messages) == 1, messages
    assert_client_error(post(server + "/predict", payload("/data/local-files/?d=../etc/passwd")),
                        "escapes")
    # inside the root, a regular file works, as a relative path, an absolute one and file://
    for url in ("ok.png", str(docroot / "ok.png"), (docroot / "ok.png").as_uri()):
        assert post(server + "/predict", payload(image=url)).status_code == 200


def test_opening_a_task_on_a_device_or_fifo_does_not_read_it(server):
    for url in ("/dev/zero", "zero.png", "fifo.png", "/dev/urandom"):
        body = payload(image=url, regions=[])
        started = time.monotonic()
        response = post(server + "/predict", body)
        assert response.status_code == 200 and response.json()["results"] == []
        assert time.monotonic() - started < 2
    time.sleep(2.0)  # the background precompute tried them meanwhile; the guard checks RSS


# -- 2. unbounded work per request --------------------------------------------------------------
def test_too_many_points_tasks_or_bytes_are_refused_at_once(server):
    points = [keypoint(float(i % 100), float(i // 100 % 100)) for i in range(10_000)]
    started = time.monotonic()
    assert_client_error(post(server + "/predict", payload(regions=points)), "max_points")
    body = payload()
    body["tasks"] = [{"id": i, "data": {"image": "ok.png"}} for i in range(10_000)]
    assert_client_error(post(server + "/predict", body), "max_tasks")
    assert_client_error(post(server + "/predict", "[" * 100_000), "nested too deeply")
    assert time.monotonic() - started < 20

    # a 200 MB body announced: refused from its headers, before it is read
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 209715200\r\n\r\n" + b"{" * 65536)
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]

    # a chunked body without a length: read up to the limit, then refused
    def chunks():
        for _ in range(40):
            yield b" " * MB

    try:
        response = requests.post(server + "/predict", data=chunks(), timeout=30,
                                 headers={"Content-Type": "application/json"})
        assert response.status_code == 413, response.text[:300]
    except requests.ConnectionError:
        pass  # the server answered 413 and closed while the client was still sending


# -- 3. memory across requests ------------------------------------------------------------------
def endless_stream(conn: socket.socket):
    read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n")
    block = b"\x89PNG" + b"\0" * (MB - 4)
    for _ in range(1229):  # 1.2 GiB, no Content-Length
        conn.sendall(block)


def test_parallel_huge_downloads_stay_within_the_memory_budget(server, backend):
    _, watch, _ = backend
    baseline = watch.reset()
    remote = RawServer(endless_stream)
    try:
        with ThreadPoolExecutor(8) as pool:
            started = time.monotonic()
            responses = list(pool.map(
                lambda i: post(server + "/predict", payload(image=f"{remote.url}/big{i}.png")),
                range(8)))
            elapsed = time.monotonic() - started
    finally:
        remote.close()
    for response in responses:
        assert_client_error(response, status=(400, 503))
    assert elapsed < 3 * IMAGE_TIMEOUT + 30
    assert watch.peak - baseline < IMAGE_MEMORY_MB * MB + RSS_SLACK, watch.peak / MB


@pytest.mark.slow
def test_parallel_float_tiffs_decode_one_budget_at_a_time(server, backend, docroot):
    from PIL import Image

    path = docroot / "float.tif"
    if not path.exists():
        image = Image.new("F", (5000, 5000), 0.25)  # 25 MP float: 100 MB of pixels, ~100 KB file
        image.save(path, compression="tiff_adobe_deflate")
        del image
    _, watch, _ = backend
    baseline = watch.reset()
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: post(server + "/predict", payload(
            image="float.tif", regions=[keypoint(10.0 + i, 10.0)]), timeout=120), range(4)))
    for response in responses:
        assert response.status_code in (200, 400, 503), response.text[:300]
        if response.status_code != 200:
            assert_client_error(response, status=(400, 503))
    assert any(r.status_code == 200 for r in responses)
    assert watch.peak - baseline < IMAGE_MEMORY_MB * MB + RSS_SLACK, watch.peak / MB


def test_entity_amplified_or_oversized_label_configs_are_refused(server):
    entities = "<!DOCTYPE View [<!ENTITY a \"" + "x" * 1000 + "\">]>"
    amplified = entities + "<View><Image name=\"image\" value=\"$image\"/>" + \
        "<Label value=\"&a;&a;&a;&a;\"/>" * 1000 + "</View>"
    body = payload()
    body["label_config"] = amplified
    assert_client_error(post(server + "/predict", body), "DTD")
    body["label_config"] = CONFIG.replace("</View>", "<!--" + "x" * (2 * MB) + "--></View>")
    assert_client_error(post(server + "/predict", body), "max_label_config_kb")
    for bad in (5, [CONFIG], {"a": 1}, True):
        body["label_config"] = bad
        assert_client_error(post(server + "/predict", body), "label_config")


def test_setup_remembers_a_bounded_number_of_projects(server, backend):
    _, watch, _ = backend
    baseline = watch.reset()
    labels = "".join(f'<Label value="label-{i:06d}-{"y" * 40}"/>' for i in range(6000))
    for project in range(300):  # 300 configs of ~400 KB: 120 MB of text if all were kept
        schema = CONFIG.replace('<Label value="cat"/></RectangleLabels>',
                                f'<Label value="cat"/>{labels}<Label value="p{project}"/>'
                                '</RectangleLabels>')
        response = post(server + "/setup", {"project": f"{project}.1", "schema": schema})
        assert response.status_code == 200
    time.sleep(1.0)
    # all kept: 120 MB of text plus ~200 MB of parsed labels; bounded: 2 x 4 MiB plus what the
    # C heap keeps of the 120 MB of request bodies that passed through (measured ~115 MB)
    assert process_tree_rss(backend[0].process.pid) - baseline < 180 * MB


# -- 4. time ------------------------------------------------------------------------------------
def dribble(conn: socket.socket, version: str = "1.1"):
    read_request(conn)
    conn.sendall(f"HTTP/{version} 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000"
                 "\r\n\r\n".encode())
    for _ in range(100000):
        conn.sendall(b"\0")
        time.sleep(0.5)


def black_hole(conn: socket.socket):
    time.sleep(IMAGE_TIMEOUT * 4)


@pytest.mark.parametrize("version", ["1.0", "1.1"])  # http.client handles their sockets apart
def test_a_slow_image_server_is_given_one_deadline_for_the_whole_download(server, version):
    remote = RawServer(lambda conn: dribble(conn, version))
    try:
        started = time.monotonic()
        response = post(server + "/predict", payload(image=f"{remote.url}/slow.png"))
        elapsed = time.monotonic() - started
    finally:
        remote.close()
    assert_client_error(response, f"within {IMAGE_TIMEOUT:g} s")
    assert elapsed < IMAGE_TIMEOUT + 10  # without the deadline: 50 000 s


def test_health_answers_while_clients_stall_and_image_hosts_hang(server):
    port = int(server.rsplit(":", 1)[1])
    stalled = []
    for _ in range(8):  # announce a body, send a little, go quiet
        s = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT + 10)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{\"tasks\": ")
        stalled.append(s)
    s = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT + 10)
    s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # half a header
    stalled.append(s)
    hole = RawServer(black_hole)
    pool = ThreadPoolExecutor(8)
    health_times = []
    try:
        clicks = [pool.submit(post, server + "/predict", payload(image=f"{hole.url}/{i}.png"))
                  for i in range(8)]
        started = time.monotonic()
        while time.monotonic() - started < REQUEST_TIMEOUT + 1:
            t0 = time.monotonic()
            try:
                assert requests.get(server + "/health", timeout=HEALTH_BOUND).status_code == 200
            except requests.Timeout:
                pytest.fail(f"/health took > {HEALTH_BOUND} s at {t0 - started:.1f} s into the "
                            f"stall; the earlier ones: {health_times}")
            health_times.append(round(time.monotonic() - t0, 2))
            time.sleep(0.2)
        for click in clicks:
            assert_client_error(click.result(timeout=3 * IMAGE_TIMEOUT + 30), status=(400, 503))
        # the stalled clients were cut off at request_timeout: an error answer, or closed
        for s in stalled:
            answer = s.recv(4096)
            assert answer == b"" or answer.startswith((b"HTTP/1.1 408", b"HTTP/1.1 400")), answer
    finally:
        pool.shutdown(wait=True)
        hole.close()
        for s in stalled:
            s.close()
    assert max(health_times) < HEALTH_BOUND


class SlowClients:
    """``n`` loopback connections that each send an unfinished request line, headers or body,
    then one byte a second; a connection the server answers or drops is reconnected. One thread,
    non-blocking sockets; it stops itself after ``seconds`` (or at :meth:`stop`)."""

    STARTS = (b"POST /predi",  # an unfinished request line
              b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Slow: ",
              b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100000\r\n\r\n{\"tasks\": ")

    def __init__(self, port: int, n: int, seconds: float):
        self.port, self.n = port, n
        self.answers: Dict[bytes, int] = {}  # status code -> how many
        self.connects = self.drops = 0
        self.max_open = 0
        self._stop = threading.Event()
        self._until = time.monotonic() + seconds
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _connect(self, index: int):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        s.setblocking(False)
        self.connects += 1
        return [s, self.STARTS[index % 3], b""]  # socket, start still to send, what came back

    def _run(self):
        conns = [self._connect(i) for i in range(self.n)]
        try:
            while not self._stop.is_set() and time.monotonic() < self._until:
                open_now = 0
                for i, conn in enumerate(conns):
                    s, pending, got = conn
                    alive = True
                    try:
                        data = s.recv(65536)
                        if data:
                            conn[2] = got + data
                        else:
                            alive = False
                    except BlockingIOError:
                        pass
                    except OSError:
                        alive = False
                    if alive:
                        try:  # the start at once, then one byte a second
                            conn[1] = pending[s.send(pending or b"x"):]
                        except BlockingIOError:
                            pass
                        except OSError:
                            alive = False
                    if not alive:
                        status = conn[2][9:12]
                        self.answers[status] = self.answers.get(status, 0) + 1
                        self.drops += 1
                        s.close()
                        conns[i] = self._connect(i)
                    else:
                        open_now += 1
                self.max_open = max(self.max_open, open_now)
                self._stop.wait(1.0)
        finally:
            for conn in conns:
                conn[0].close()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive()


def test_a_hundred_slow_clients_do_not_lock_out_health_or_clicks(server):
    """Issue 21 (3): with 100 connections sending one byte a second, /health answered 0 of 15
    polls and a click timed out. A thread only gets a complete request now: /health answers
    every poll within its bound, clicks keep answering, the slow ones are cut at the deadline."""
    port = int(server.rsplit(":", 1)[1])
    seconds = 3 * REQUEST_TIMEOUT + 3
    slow = SlowClients(port, 100, seconds)
    health_times: List[float] = []
    click_times: List[float] = []
    try:
        time.sleep(1.5)  # every slow connection open and started
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < seconds - 2.5:
            t0 = time.monotonic()
            try:
                response = requests.get(server + "/health", timeout=HEALTH_BOUND)
            except requests.Timeout:
                pytest.fail(f"/health took > {HEALTH_BOUND} s at {t0 - started:.1f} s; the "
                            f"earlier ones: {health_times}")
            assert response.status_code == 200
            health_times.append(round(time.monotonic() - t0, 3))
            if i % 2 == 0:
                t0 = time.monotonic()
                click = post(server + "/predict", payload(regions=[keypoint(20.0 + i, 30.0)]),
                             timeout=30)
                assert click.status_code == 200, click.text[:300]
                click_times.append(round(time.monotonic() - t0, 3))
            i += 1
            time.sleep(0.5)
    finally:
        slow.stop()
    print(f"/health under 100 slow clients: {len(health_times)} polls, median "
          f"{sorted(health_times)[len(health_times) // 2] * 1000:.0f} ms, max "
          f"{max(health_times) * 1000:.0f} ms; clicks: {len(click_times)}, max "
          f"{max(click_times) * 1000:.0f} ms; slow connections: {slow.connects} opened, "
          f"answers {slow.answers}")
    assert len(health_times) >= 10 and max(health_times) < HEALTH_BOUND
    assert slow.max_open >= 90  # they really were there at once
    assert slow.answers.get(b"408", 0) >= 100, slow.answers  # each cut at request_timeout


def test_a_body_not_received_within_request_timeout_is_408_and_closed(server):
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT + 10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{")
        # a byte a second does not extend the deadline
        data, elapsed = trickle_until_answered(s, b" ", 1.0, REQUEST_TIMEOUT + 5)
        s.settimeout(10)
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 408 408 Request Timeout: the request was not "
                               b"received within 4 s (request_timeout)\r\n"), head
        assert b"Connection: close" in head
        assert body.startswith(b'{"status": "error", "errors": ["408 Request Timeout')
        assert_closed(s)
    assert REQUEST_TIMEOUT - 0.1 < elapsed < REQUEST_TIMEOUT + 2, elapsed


def test_work_whose_client_disconnected_stops(server, backend):
    """Issue 21 (5): a /predict of 64 tasks on a 1 Mpx image kept working for its whole length
    after its client had gone. The server notices the closed connection between tasks: the work
    stops (one log line), its answer is never made, and the backend keeps serving."""
    process = backend[0]
    port = int(server.rsplit(":", 1)[1])
    log_before = len(process.log_path.read_bytes())
    body = json.dumps({
        "tasks": [{"id": i, "data": {"image": "warm2.png"}} for i in range(64)],
        "label_config": CONFIG, "project": "1.1",
        "params": {"context": {"result": [keypoint(40, 60)]}}}).encode()
    # the same request answered in full: how long 64 tasks take on this machine now
    started = time.monotonic()
    assert post(server + "/predict", body).status_code == 200
    full = time.monotonic() - started
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(min(1.0, full / 4))
    gone = time.monotonic()
    stopped = None
    while time.monotonic() - gone < full + 10:
        log = process.log_path.read_bytes()[log_before:].decode(errors="replace")
        if "the client disconnected" in log:
            stopped = time.monotonic() - gone
            break
        time.sleep(0.1)
    assert stopped is not None, log[-2000:]
    assert stopped < max(3.0, full / 2), (stopped, full)  # between two tasks, not at the end
    assert log.count("predict: 64 result(s)") == 1  # only the request that was read


def test_chunked_and_sized_bodies_of_exactly_max_request_mb_are_taken(server):
    """Issue 21 (8): a chunked body of exactly 32 MiB was 413 while the same body with a
    Content-Length was 200. Both are taken; one byte more is 413 both ways, and the connection
    is closed after it (also while the client is still sending)."""
    limit = 32 * MB
    body = json.dumps(payload()).encode()
    body += b" " * (limit - len(body))

    def pieces(data: bytes):
        for start in range(0, len(data), MB):
            yield data[start:start + MB]

    headers = {"Content-Type": "application/json"}
    for data in (body, pieces(body)):
        response = requests.post(server + "/predict", data=data, headers=headers, timeout=60)
        assert response.status_code == 200, response.text[:300]
    port = int(server.rsplit(":", 1)[1])
    for chunked in (False, True):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            data = body + b" "
            if chunked:
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                          b"\r\n")
                for piece in pieces(data):
                    s.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                s.sendall(b"0\r\n\r\n")
            else:
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                          % len(data))  # refused from the header: the body is not sent
            head, answer = read_answer(s)
            assert head.startswith(b"HTTP/1.1 413 413 Request Entity Too Large: the request "
                                   b"body is larger than 32 MiB (max_request_mb)"), head
            assert b"Connection: close" in head and b'"errors"' in answer
            assert_closed(s)
    # a 413 while the client is still sending: the answer, then the connection closed
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"%x\r\n" % (limit + 4096) + b" " * (limit + 1))
        head, _ = read_answer(s)
        assert head.startswith(b"HTTP/1.1 413"), head
        started = time.monotonic()
        with pytest.raises(OSError):  # reset or broken pipe once the server has closed
            while time.monotonic() - started < 15:
                s.sendall(b" " * 65536)
        assert time.monotonic() - started < 10


# -- 5. a 400 naming the field, never a 500 -----------------------------------------------------
def with_change(base: dict, path: tuple, value):
    body = json.loads(json.dumps(base))
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


REGION = ("params", "context", "result", 0)
ISSUE_CASES = {
    "to_name as a list": (REGION + ("to_name",), ["image"], "to_name"),
    "item_index 1e999": (REGION + ("item_index",), float("inf"), "item_index"),
    "original_width 1e999": (REGION + ("original_width",), float("inf"), "original_width"),
    "label_config a number": (("label_config",), 5, "label_config"),
    "label_config a list": (("label_config",), [CONFIG], "label_config"),
    "port 99999": (("tasks", 0, "data", "image"), "http://127.0.0.1:99999/a.png", "not a valid URL"),
    "NUL in a path": (("tasks", 0, "data", "image"), "ok\x00.png", "not available"),
    "NUL in a URL": (("tasks", 0, "data", "image"), "http://127.0.0.1:1/a\x00.png", "a?.png"),
    "task id 1e999": (("tasks", 0, "id"), float("inf"), "tasks[0].id"),
    "params a list": (("params",), [], "params"),
    "project a dict": (("project",), {}, "project"),
}


@pytest.mark.parametrize("name", list(ISSUE_CASES))
def test_malformed_fields_get_a_400_naming_them(server, name):
    path, value, needle = ISSUE_CASES[name]
    assert_client_error(post(server + "/predict", with_change(payload(), path, value)), needle)


FUZZ_VALUES = [None, True, 0, -1, 1e308, float("inf"), float("nan"), 2 ** 70, "", "x" * 5000,
               "\x00\x1b[31m\r\n", [], [1, [2]], {}, {"a": {"b": 1}}]
FUZZ_PATHS = [("tasks",), ("tasks", 0), ("tasks", 0, "id"), ("tasks", 0, "data"),
              ("tasks", 0, "data", "image"), ("label_config",), ("project",), ("params",),
              ("params", "context"), ("params", "context", "result"), REGION]
FUZZ_PATHS += [REGION + (k,) for k in ("type", "from_name", "to_name", "value", "is_positive",
                                         "item_index", "original_width", "original_height",
                                         "image_rotation")]
FUZZ_PATHS += [REGION + ("value", k) for k in ("x", "y", "keypointlabels")]
FUZZ_PATHS += [REGION + ("value", "keypointlabels", 0)]


@pytest.mark.parametrize("base", ["keypoint", "rectangle"])
def test_fuzzed_predict_shapes_never_answer_500(server, base):
    body = payload() if base == "keypoint" else payload(regions=[rectangle()])
    paths = FUZZ_PATHS if base == "keypoint" else FUZZ_PATHS[:-4] + [
        REGION + ("value", k) for k in ("x", "y", "width", "height", "rectanglelabels")]
    seen: Dict[int, int] = {}
    for path in paths:
        for value in FUZZ_VALUES:
            response = post(server + "/predict", with_change(body, path, value), timeout=60)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code in (200, 400), (path, value, response.text[:300])
            if response.status_code == 400:
                assert_client_error(response)
    assert seen[400] > len(paths) * 5


def test_fuzzed_setup_shapes_never_answer_500(server):
    base = {"project": "9.1", "schema": CONFIG, "hostname": "http://127.0.0.1:1",
            "access_token": "t"}
    for name in base:
        for value in FUZZ_VALUES:
            response = post(server + "/setup", with_change(base, (name,), value))
            assert response.status_code in (200, 400), (name, value, response.text[:300])
            if response.status_code == 400:
                assert_client_error(response)
    for bad in ("[" * 100_000, "{\"project\": " * 50_000, b"\xff\xfe", "null", "[]"):
        assert_client_error(post(server + "/setup", bad))


@pytest.mark.parametrize("size", [(3000, 1), (5000, 2), (1, 3000), (1, 1)])
def test_extreme_aspect_ratios_segment(server, size):
    from label_studio_converter.brush import decode_rle

    w, h = size
    region = keypoint(50.0, 50.0, original_width=w, original_height=h)
    response = post(server + "/predict", payload(image=f"wide_{w}x{h}.png", regions=[region]))
    assert response.status_code == 200, response.text[:300]
    for result in response.json()["results"][0]["result"]:
        assert (result["original_width"], result["original_height"]) == (w, h)
        if result["type"] == "brushlabels":
            assert decode_rle(result["value"]["rle"]).size == w * h * 4


# -- 6. echo ------------------------------------------------------------------------------------
def evil_reason(conn: socket.socket):
    read_request(conn)
    conn.sendall(b"HTTP/1.1 418 \x01\x1b[31mI am\x7f a teapot" + b" very" * 2000 +
                 b"\r\nContent-Length: 0\r\n\r\n")


def test_reason_phrases_and_echoed_values_are_printable_and_short(server):
    remote = RawServer(evil_reason)
    try:
        response = post(server + "/predict", payload(image=f"{remote.url}/tea.png"))
    finally:
        remote.close()
    message = assert_client_error(response, "HTTP 418 I'm a Teapot")  # never the host's phrase
    assert "I am" not in message and "very" not in message
    assert "\x1b" not in message and "very very" not in message[:100] or len(message) < 2000
    response = post(server + "/predict",
                    payload(image="http://127.0.0.1:1/a\x1b[2J\r\nX-Evil: 1\r\n.png"))
    assert_client_error(response)
    assert "X-Evil" not in response.headers
    huge = payload(regions=[keypoint()])
    huge["params"]["context"]["result"][0]["value"]["keypointlabels"] = ["L" * (4 * MB)]
    response = post(server + "/predict", huge)
    message = assert_client_error(response, "is not in the labeling config")
    assert len(response.content) < 4000
