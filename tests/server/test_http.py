"""The HTTP server both start commands use (``sam_backend/server/http.py``, waitress) around a
tiny Flask app, on loopback, with small limits: the request deadline, exact body limits, closing
after an error, a client's disconnect seen by its request, slow readers and many connections.
No model is loaded; ``test_hardening.py`` replays the same against a real ``sam-backend serve``."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator, Tuple

import pytest
import requests
from flask import Flask, Response, request

from sam_backend.common.deadline import WorkScope
from sam_backend.server import http
from sam_backend.settings import Settings
from tests.support.hardening import assert_closed, read_answer, trickle_until_answered

MIB = 2 ** 20
LIMIT = MIB  # max_request_mb=1
TIMEOUT = 2.0  # request_timeout


def make_app() -> Tuple[Flask, dict]:
    app = Flask("probe")
    seen: dict = {"gone": threading.Event(), "started": threading.Event()}

    @app.route("/health")
    def health():
        return {"status": "UP"}

    @app.route("/echo", methods=["POST"])
    def echo():
        return {"bytes": len(request.get_data())}

    @app.route("/wait", methods=["POST"])
    def wait():  # what /predict does with the environ's check, until the client leaves
        scope = WorkScope(30, request.environ.get("waitress.client_disconnected"), "test")
        seen["started"].set()
        while not scope.client_gone() and scope.remaining() > 0:
            time.sleep(0.05)
        if scope.client_gone():
            seen["gone"].set()
        return {"gone": scope.client_gone()}

    @app.route("/big")
    def big():  # written in pieces: past 16 MiB unsent, the thread waits for the client
        return Response((b"x" * MIB for _ in range(64)), mimetype="application/octet-stream")

    return app, seen


@contextlib.contextmanager
def served(threads: int = 4, **options) -> Iterator[Tuple[str, int, dict]]:
    app, seen = make_app()
    settings = Settings.load({"max_request_mb": 1, "request_timeout": TIMEOUT, **options},
                             environ={})
    server = http.make_server(app, settings, "127.0.0.1", 0, threads=threads)
    port = int(server.effective_listen[0][1])
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", port, seen
    finally:
        server.close()
        thread.join(10)


def connect(port: int, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def chunked(size: int, piece: int = 65536) -> bytes:
    body = b""
    for start in range(0, size, piece):
        n = min(piece, size - start)
        body += b"%x\r\n" % n + b" " * n + b"\r\n"
    return body + b"0\r\n\r\n"


def test_a_body_of_exactly_the_limit_is_taken_one_byte_more_is_413_and_closed():
    with served() as (url, port, _):
        assert requests.post(url + "/echo", data=b" " * LIMIT).json() == {"bytes": LIMIT}
        for body, encoding in ((b" " * LIMIT, "length"), (chunked(LIMIT), "chunked"),
                               (chunked(LIMIT, piece=1000), "chunked")):
            with connect(port) as s:
                framing = (b"Transfer-Encoding: chunked" if encoding == "chunked" else
                           b"Content-Length: %d" % len(body))
                s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n" + body)
                head, answer = read_answer(s)
                assert head.startswith(b"HTTP/1.1 200"), (encoding, head)
                assert answer == b'{"bytes":%d}\n' % LIMIT
        for body, encoding in ((b" " * (LIMIT + 1), "length"), (chunked(LIMIT + 1), "chunked")):
            with connect(port) as s:
                framing = (b"Transfer-Encoding: chunked" if encoding == "chunked" else
                           b"Content-Length: %d" % len(body))
                s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n" + body)
                head, answer = read_answer(s)
                assert head.startswith(b"HTTP/1.1 413 413 Request Entity Too Large: the request "
                                       b"body is larger than 1 MiB (max_request_mb)"), head
                assert b"Connection: close" in head
                assert b'"errors": ["413 Request Entity Too Large' in answer
                assert_closed(s)


def test_after_a_413_a_client_still_sending_its_body_reads_the_answer_then_the_close():
    with served() as (url, port, _):
        for framing in (b"Content-Length: %d" % (64 * MIB), b"Transfer-Encoding: chunked"):
            with connect(port) as s:
                s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n")
                if b"chunked" in framing:
                    s.sendall(b"%x\r\n" % (LIMIT + 10) + b" " * (LIMIT + 10))  # unfinished chunk
                else:
                    s.sendall(b" " * 1000)  # announced 64 MiB: refused from the header
                head, _ = read_answer(s)
                assert head.startswith(b"HTTP/1.1 413"), head
                started = time.monotonic()
                with pytest.raises((BrokenPipeError, ConnectionResetError, socket.timeout)):
                    s.settimeout(10)
                    while time.monotonic() - started < 10:  # keeps sending: cut off
                        s.sendall(b" " * 65536)
                assert time.monotonic() - started < http.LINGER + 3
        # the server goes on serving
        assert requests.get(url + "/health", timeout=5).status_code == 200


@pytest.mark.parametrize("stall", ["request line", "headers", "body"])
def test_a_request_not_received_within_request_timeout_is_408_even_when_trickling(stall):
    start = {"request line": b"POST /ec",
             "headers": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Len",
             "body": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{"}[stall]
    with served() as (url, port, _):
        with connect(port) as s:
            s.sendall(start)
            answer, elapsed = trickle_until_answered(  # 4 bytes a second
                s, b"x" if stall != "headers" else b"X-", 0.25, TIMEOUT + 5)
            head, body = read_answer_from(s, answer)
        assert TIMEOUT - 0.1 <= elapsed < TIMEOUT + 1.5, elapsed
        assert head.startswith(b"HTTP/1.1 408 408 Request Timeout: the request was not "
                               b"received within 2 s (request_timeout)\r\n"), head
        assert b"Connection: close" in head
        assert b'{"status": "error", "errors": ["408 Request Timeout' in body
        assert requests.get(url + "/health", timeout=5).status_code == 200


def read_answer_from(sock: socket.socket, data: bytes) -> Tuple[bytes, bytes]:
    class Buffered:
        def __init__(self):
            self.pending = data

        def recv(self, n):
            if self.pending:
                out, self.pending = self.pending, b""
                return out
            return sock.recv(n)

    head, body = read_answer(Buffered())  # type: ignore[arg-type]
    assert_closed(sock)
    return head, body


def test_a_request_sees_its_client_disconnect():
    with served() as (url, port, seen):
        s = connect(port)
        s.sendall(b"POST /wait HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        assert seen["started"].wait(10)
        time.sleep(0.3)
        assert not seen["gone"].is_set()  # still connected: the check says so
        s.close()
        assert seen["gone"].wait(3), "waitress.client_disconnected() did not turn true"


def test_an_answer_the_client_does_not_read_frees_its_thread():
    with served(threads=1) as (url, port, _):
        stuck = connect(port)
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")  # 64 MiB, never read
        time.sleep(1.0)
        started = time.monotonic()
        assert requests.get(url + "/health", timeout=TIMEOUT + 10).status_code == 200
        assert time.monotonic() - started < TIMEOUT + 3
        stuck.close()


def test_idle_kept_alive_connections_are_closed(monkeypatch):
    monkeypatch.setattr(http, "KEEPALIVE", 1.0)
    with served() as (url, port, _):
        with connect(port) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            head, _ = read_answer(s)
            assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head
            started = time.monotonic()
            assert_closed(s, within=5)
            assert 0.9 <= time.monotonic() - started < 3


def test_hundreds_of_stalled_connections_leave_room_and_threads():
    with served(threads=2) as (url, port, _):
        stalled = []
        try:
            for i in range(300):  # waitress's own connection_limit is 100
                s = connect(port)
                s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
                stalled.append(s)
            for _ in range(5):
                started = time.monotonic()
                assert requests.get(url + "/health", timeout=2).status_code == 200
                assert time.monotonic() - started < 1
        finally:
            for s in stalled:
                s.close()


def test_the_open_files_limit_is_raised_to_fit_max_connections():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        now = http.raise_open_files_limit(1000)
        assert now == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert now >= min(2256, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_run_serves_until_sigterm_then_exits_0_and_a_busy_port_is_an_error(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests.support.server_utils import free_port

    port = free_port()
    code = ("import logging, sys\nfrom flask import Flask\nfrom sam_backend.server import http\n"
            "logging.basicConfig(level='INFO')\n"
            "from sam_backend.settings import Settings\n"
            "app = Flask('probe')\napp.route('/health')(lambda: 'UP')\n"
            "http.run(app, Settings.load({}, environ={}), '127.0.0.1', int(sys.argv[1]), 2, "
            "access=True)\n")
    repo = Path(__file__).resolve().parents[2]
    process = subprocess.Popen([sys.executable, "-c", code, str(port)], cwd=repo, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert requests.get(f"http://127.0.0.1:{port}/health", timeout=2).text == "UP"
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
        app, _ = make_app()
        with pytest.raises(OSError):  # the port is taken: an error, not a silent second server
            http.make_server(app, Settings.load({}, environ={}), "127.0.0.1", port)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert f"serving on http://127.0.0.1:{port}" in output
    assert '"GET /health HTTP/1.1" 200' in output  # the access log
