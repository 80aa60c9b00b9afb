"""Hosts that answer slowly or with hostile status lines, on a raw loopback socket: the image
deadline (``timeout``, one for the whole download) holds whatever the HTTP version, the framing of
the body and the gaps between bytes; a host's reason phrase never reaches our messages."""
from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from typing import Callable, List, Optional

import pytest

from sam_backend.errors import ImageError

from tests.support.hardening import read_request
from tests.support.loopback_hosts import rgb_png

TIMEOUT = 2.0
SLACK = 1.0  # the load must fail within TIMEOUT + SLACK


class RawHost:
    """A loopback host whose every connection is answered by ``answer(conn, stopped)`` once the
    request has arrived (over TLS with ``tls``; at once, on the bare socket, with ``raw``);
    ``stopped`` is set when the test is over (a trickle then ends)."""

    def __init__(self, answer: Callable[[socket.socket, threading.Event], None],
                 tls: Optional[ssl.SSLContext] = None, raw: bool = False):
        self._answer = answer
        self._tls = tls
        self._raw = raw
        self.stopped = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        scheme = "https" if tls is not None or raw else "http"
        self.url = f"{scheme}://127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads: List[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self._raw:
                    self._answer(conn, self.stopped)
                    return
                if self._tls is not None:
                    conn.settimeout(5)
                    conn = self._tls.wrap_socket(conn, server_side=True)
                if b"\r\n\r\n" not in read_request(conn):
                    return  # closed before its request was complete
                self._answer(conn, self.stopped)
            except OSError:
                pass  # the client went away (as it should at its deadline)

    def close(self) -> None:
        self.stopped.set()
        self._accepting.join(5)
        for thread in self._threads:
            thread.join(5)
        self._listener.close()


def trickle(head: bytes, pieces, gap: float = 1.0):
    """An answer: ``head`` at once, then each of ``pieces`` after ``gap`` seconds."""

    def answer(conn: socket.socket, stopped: threading.Event) -> None:
        conn.sendall(head)
        for piece in pieces:
            if stopped.wait(gap):
                return
            conn.sendall(piece)

    return answer


BYTES = [b"\0"] * 8  # 8 s: without the deadline, the load ends when the host stops
TRICKLES = {
    # http.client takes the socket off the connection of an HTTP/1.0 answer (and of any answer
    # that closes the connection): the deadline must still reach it
    "http/1.0": trickle(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n", BYTES),
    "http/1.0 content-length": trickle(
        b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\n", BYTES),
    "http/1.1 connection-close": trickle(
        b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n", BYTES),
    "http/1.1 content-length": trickle(
        b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\n", BYTES),
    "http/1.1 chunked": trickle(
        b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n",
        [b"1\r\n\0\r\n"] * 8),
    # the headers themselves, one byte at a time
    "http/1.0 headers": trickle(b"HTTP/1.0 200 OK\r\n", [b"X"] * 8),
    "http/1.1 headers": trickle(b"HTTP/1.1 200 OK\r\n", [b"X"] * 8),
}


@pytest.mark.parametrize("name", sorted(TRICKLES))
def test_a_trickle_is_cut_at_the_deadline_whatever_the_http_version(name, make_loader):
    host = RawHost(TRICKLES[name])
    loader = make_loader(timeout=TIMEOUT)
    try:
        started = time.monotonic()
        with pytest.raises(ImageError) as err:
            loader.load(f"{host.url}/slow.png")
        elapsed = time.monotonic() - started
    finally:
        host.close()
    assert f"did not send the whole image within {TIMEOUT:g} s" in str(err.value), str(err.value)
    assert elapsed < TIMEOUT + SLACK, (name, elapsed)


def test_the_deadline_covers_a_redirect_and_the_trickle_after_it(make_loader):
    slow = RawHost(TRICKLES["http/1.0"])

    def redirect(conn, stopped):
        time.sleep(0.8)
        conn.sendall(f"HTTP/1.0 302 Found\r\nLocation: {slow.url}/b.png\r\n\r\n".encode())

    first = RawHost(redirect)
    loader = make_loader(timeout=TIMEOUT)
    try:
        started = time.monotonic()
        with pytest.raises(ImageError, match=f"within {TIMEOUT:g} s"):
            loader.load(f"{first.url}/a.png")
        elapsed = time.monotonic() - started
    finally:
        first.close()
        slow.close()
    assert elapsed < TIMEOUT + SLACK, elapsed


def test_a_complete_answer_in_time_is_loaded_and_its_connection_reused(make_loader):
    png = rgb_png(colour=(4, 5, 6))
    connections = []

    def answer(conn, stopped):
        connections.append(conn)
        head = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(png)}\r\n\r\n"
        conn.sendall(head.encode() + png)
        while not stopped.is_set():  # keep-alive: a second request on the same connection
            request = conn.recv(4096)
            if not request:
                return
            conn.sendall(head.encode() + png)

    host = RawHost(answer)
    loader = make_loader(timeout=TIMEOUT)
    try:
        for _ in range(2):
            assert loader.load(f"{host.url}/ok.png")[0, 0].tolist() == [4, 5, 6]
        time.sleep(TIMEOUT + 0.5)  # a deadline of an earlier download must not cut it later
        assert loader.load(f"{host.url}/ok.png")[0, 0].tolist() == [4, 5, 6]
    finally:
        loader.close()
        host.close()
    assert len(connections) == 1


# -- over TLS --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (made by the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_server(tls_files, monkeypatch):
    """A server-side TLS context whose certificate the loader trusts."""
    cert, key = tls_files
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def slow_handshake(context: ssl.SSLContext):
    """An answer that sends the first 8 bytes of its part of the TLS handshake one a second, then
    waits (without the deadline, the load takes 8 s plus a read timeout)."""

    def answer(conn: socket.socket, stopped: threading.Event) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=True)
        conn.settimeout(5)
        data = b""
        while not data:  # until the whole ClientHello is in
            incoming.write(conn.recv(65536))
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
            data = outgoing.read()
        for byte in data[:8]:
            if stopped.wait(1.0):
                return
            conn.sendall(bytes([byte]))
        stopped.wait()

    return answer


def test_over_tls_a_trickle_is_cut_at_the_deadline(tls_server, make_loader):
    png = rgb_png(colour=(1, 2, 3))
    whole = RawHost(trickle(f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: "
                            f"{len(png)}\r\n\r\n".encode() + png, []), tls=tls_server)
    loader = make_loader(timeout=TIMEOUT)
    try:  # the certificate is trusted: a whole answer is loaded
        assert loader.load(f"{whole.url}/ok.png")[0, 0].tolist() == [1, 2, 3]
    finally:
        whole.close()
    # None: the handshake itself trickles (CPython already bounds a whole handshake by the
    # socket's timeout, which is cut to the time left; kept as a guard)
    for answer in (TRICKLES["http/1.0"], TRICKLES["http/1.1 chunked"], None):
        host = (RawHost(answer, tls=tls_server) if answer is not None
                else RawHost(slow_handshake(tls_server), raw=True))
        try:
            started = time.monotonic()
            with pytest.raises(ImageError, match=f"within {TIMEOUT:g} s"):
                loader.load(f"{host.url}/slow.png")
            elapsed = time.monotonic() - started
        finally:
            host.close()
        assert elapsed < TIMEOUT + SLACK, (answer, elapsed)


# -- reason phrases ----------------------------------------------------------------------------
HOSTILE = b"\x1b[31mDOWNLOAD https://evil.example/fix NOW\x7f" + b" very" * 200


@pytest.mark.parametrize("status, ours", [(418, "HTTP 418 I'm a Teapot for image"),
                                          (599, "HTTP 599 for image"),
                                          (503, "HTTP 503 Service Unavailable for image")])
def test_a_hosts_reason_phrase_never_reaches_our_message(status, ours, make_loader):
    host = RawHost(trickle(b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nRetry-After: 0\r\n\r\n"
                           % (status, HOSTILE), []))
    loader = make_loader(timeout=TIMEOUT)
    try:
        with pytest.raises(ImageError) as err:
            loader.load(f"{host.url}/tea.png")
    finally:
        host.close()
    message = str(err.value)
    assert ours in message, message
    assert "evil" not in message and "DOWNLOAD" not in message and "very" not in message


def test_label_studios_reason_phrase_never_reaches_our_message(make_loader):
    host = RawHost(trickle(b"HTTP/1.1 502 %s\r\nContent-Length: 0\r\n\r\n" % HOSTILE, []))
    loader = make_loader(label_studio_url=host.url, timeout=TIMEOUT)
    try:
        with pytest.raises(ImageError) as err:
            loader.load("/data/upload/1/x.jpg")
    finally:
        host.close()
    message = str(err.value)
    assert f"Label Studio at {host.url} answered HTTP 502 Bad Gateway for image" in message
    assert "evil" not in message and "DOWNLOAD" not in message


@pytest.mark.parametrize("content_type, shown", [
    (b"text/plain; charset=\"DOWNLOAD https://evil.example/fix NOW\"", ", Content-Type text/plain."),
    (b"DOWNLOAD https://evil.example/fix NOW", " bytes."),
    (b"text/html; x=evil.example", "Content-Type text/html)")])
def test_a_hosts_content_type_is_shown_only_as_a_media_type(content_type, shown, make_loader):
    host = RawHost(trickle(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: 13\r\n\r\n"
                           b"not an image!" % content_type, []))
    loader = make_loader(timeout=TIMEOUT)
    try:
        with pytest.raises(ImageError) as err:
            loader.load(f"{host.url}/x.png")
    finally:
        host.close()
    message = str(err.value)
    assert shown in message and "evil" not in message and "DOWNLOAD" not in message, message
