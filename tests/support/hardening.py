"""Helpers for tests that run a real backend process under a memory watchdog and give it
hostile neighbours: the RSS of a process tree, a sampler of its peak, and loopback TCP servers
whose connections do what a test says (hang, dribble, stream without end)."""
from __future__ import annotations

import os
import socket
import socketserver
import threading
import time
from typing import Callable, Tuple


def process_tree_rss(pid: int) -> int:
    """RSS in bytes of ``pid`` and its descendants (the server and any process it starts)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except (OSError, ValueError):
            continue
    return total


class RssWatch:
    """Samples the server's RSS every 50 ms; ``peak`` since the last :meth:`reset`."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, process_tree_rss(self.pid))

    def reset(self) -> int:
        self.peak = now = process_tree_rss(self.pid)
        return now

    def stop(self):
        self._stop.set()
        self._thread.join()



class RawServer:
    """A loopback TCP server whose connections are handled by ``handler(socket)``."""

    def __init__(self, handler: Callable[[socket.socket], None]):
        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                try:
                    handler(self.request)
                except OSError:
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def read_answer(sock: socket.socket) -> Tuple[bytes, bytes]:
    """(status line + headers, body) of one answer with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int([line.split(b":")[1] for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:")][0])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of the answer"
        body += chunk
    return head, body


def assert_closed(sock: socket.socket, within: float = 5.0) -> None:
    """The server closed the connection: EOF (or a reset) within ``within`` seconds, whatever
    the client still sends."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


def trickle_until_answered(sock: socket.socket, chunk: bytes, interval: float,
                           limit: float) -> Tuple[bytes, float]:
    """Send ``chunk`` every ``interval`` seconds until the server answers (an HTTP head has
    arrived), the connection is closed, or ``limit`` seconds pass: a client that keeps sending
    and never finishes its request. Returns what arrived and the seconds it took; the socket is
    left blocking."""
    started = time.monotonic()
    sock.setblocking(False)
    data = b""
    while b"\r\n\r\n" not in data and time.monotonic() - started < limit:
        try:
            sock.send(chunk)
        except OSError:
            break
        time.sleep(interval)
        try:
            data += sock.recv(65536)
        except BlockingIOError:
            pass
    elapsed = time.monotonic() - started
    sock.setblocking(True)
    return data, elapsed
