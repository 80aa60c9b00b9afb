"""Loopback HTTP hosts that behave like Label Studio, a cloud storage and a redirecting stranger;
tokens, images and a fake clock for the image-access tests."""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np
import pytest
from PIL import Image, ImageFile


# --------------------------------------------------------------------------------------------
# Helpers: tokens, images, a fake clock


def _b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def make_jwt(payload: dict) -> str:
    signature = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    return f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64(payload)}.{signature}"


LEGACY_TOKEN = "4f1d2c3b5a69788796a5b4c3d2e1f00112233445"
SIGNATURE = "SIGsecretSIGNATUREvalue0123456789"


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def exif_rotated_jpeg() -> bytes:
    """Stored 60 wide x 40 high, EXIF orientation 6 (display = stored rotated 90 deg clockwise).
    Stored top-left block red, stored bottom-left block green, the rest blue."""
    img = Image.new("RGB", (60, 40), BLUE)
    img.paste(RED, (0, 0, 15, 10))
    img.paste(GREEN, (0, 30, 15, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=95, exif=exif)


def rgb_png(size=(8, 6), colour=(10, 20, 30)) -> bytes:
    return encode(Image.new("RGB", size, colour), "PNG")


def close(a, b, tol=40) -> bool:
    return bool(np.all(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)) <= tol))


def assert_rotated_cat(arr: np.ndarray) -> None:
    """The EXIF-rotated JPEG decoded in the display frame: 40 wide x 60 high; the stored top-left
    (red) is at the top right, the stored bottom-left (green) at the top left."""
    assert arr.shape == (60, 40, 3) and arr.dtype == np.uint8
    assert close(arr[5, 35], RED)
    assert close(arr[5, 4], GREEN)
    assert close(arr[50, 20], BLUE)
    # A Label Studio click at x=95%, y=10% (percent of the natural, rotated size) lands on red.
    x, y = 95.0, 10.0
    px, py = int(x / 100 * arr.shape[1]), int(y / 100 * arr.shape[0])
    assert close(arr[py, px], RED)


# --------------------------------------------------------------------------------------------
# Loopback servers


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address):  # a client that timed out: not a failure
        pass


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", ctype="application/octet-stream", headers=None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


class _LoopbackHost:
    """A server of ours on 127.0.0.1 (its own port: its own host), run in a thread."""

    def _start(self):
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.server.state = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class FakeLabelStudio(_LoopbackHost):
    """Uploads, local files, presign, token refresh; legacy tokens on/off; JWT expiry."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.legacy_enabled = True
        self.legacy_token = LEGACY_TOKEN
        self.pat = make_jwt({"token_type": "refresh", "exp": int(clock() + 10 * 365 * 86400),
                             "iat": int(clock()), "jti": "pat-1", "user_id": 1})
        self.access_lifetime = 300
        self.issued = []
        self.revoked = set()
        self.files = {}  # path -> (bytes, content type)
        self.cloud = {}  # uri -> redirect target (str) or the bytes themselves (proxy mode)
        self.local_root = None
        self.login_redirect = False
        self.slow = {}  # path -> seconds
        self.requests = []  # (method, path, Authorization header or None)
        self.faults = {}  # path -> statuses answered first, one per GET (an iterator: for ever)
        self.fault_headers = {}  # headers sent with those answers (e.g. Retry-After)
        self.refreshes = 0
        self.rejected = []  # (path, scheme) of refused credentials
        self.lock = threading.Lock()
        self._start()

    def count(self, prefix: str) -> int:
        return sum(1 for _m, path, _a in self.requests if path.startswith(prefix))

    def authenticated(self, auth: str | None) -> bool:
        auth = auth or ""
        if auth.startswith("Token "):
            return self.legacy_enabled and auth[6:] == self.legacy_token
        if auth.startswith("Bearer "):
            token = auth[7:]
            if token not in self.issued or token in self.revoked:
                return False
            payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
            return payload["token_type"] == "access" and payload["exp"] > self.clock()
        return False

    def _handler(self):
        state = self

        class Handler(_Handler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with state.lock:
                    state.requests.append(("POST", self.path, self.headers.get("Authorization")))
                if self.path != "/api/token/refresh/":
                    return self.reply(404)
                try:
                    refresh = json.loads(body)["refresh"]
                except (ValueError, KeyError):
                    return self.reply(400, b'{"refresh": ["This field is required."]}',
                                      "application/json")
                if refresh != state.pat:
                    return self.reply(401, b'{"detail": "Token is invalid or expired", '
                                           b'"code": "token_not_valid"}', "application/json")
                now = state.clock()
                access = make_jwt({"token_type": "access", "exp": int(now + state.access_lifetime),
                                   "iat": int(now), "jti": f"a{len(state.issued)}", "user_id": 1})
                with state.lock:
                    state.issued.append(access)
                    state.refreshes += 1
                self.reply(200, json.dumps({"access": access}).encode(), "application/json")

            def do_GET(self):
                auth = self.headers.get("Authorization")
                with state.lock:
                    state.requests.append(("GET", self.path, auth))
                parts = urlsplit(self.path)
                fault = next(iter(state.faults.get(parts.path, ())), None)
                if fault is not None:
                    if isinstance(state.faults[parts.path], list):
                        state.faults[parts.path].pop(0)
                    return self.reply(fault, b"busy", "text/plain", state.fault_headers)
                if parts.path in state.slow:
                    time.sleep(state.slow[parts.path])
                if not state.authenticated(auth):
                    if auth:
                        state.rejected.append((parts.path, auth.split(" ")[0]))
                    if state.login_redirect:
                        return self.reply(302, headers={"Location": "/user/login/?next=" +
                                                        quote(self.path)})
                    return self.reply(401, b'{"detail": "Authentication credentials were not '
                                           b'provided."}', "application/json")
                query = parse_qs(parts.query)
                if parts.path.startswith("/data/upload/"):
                    if parts.path not in state.files:
                        return self.reply(404, b"<html>Not found</html>", "text/html")
                    body, ctype = state.files[parts.path]
                    return self.reply(200, body, ctype)
                if parts.path == "/data/local-files/":
                    if state.local_root is None:  # like LS without LOCAL_FILES_SERVING_ENABLED
                        return self.reply(403, b"Serving local files can be dangerous, so it's "
                                               b"disabled by default. You can enable it with "
                                               b"LOCAL_FILES_SERVING_ENABLED environment variable",
                                          "text/html; charset=utf-8")
                    path = os.path.join(state.local_root, query["d"][0])
                    if not os.path.isfile(path):
                        return self.reply(404)
                    with open(path, "rb") as fh:
                        return self.reply(200, fh.read(), "image/png")
                m = re.fullmatch(r"/tasks/(\d+)/presign/", parts.path)
                if m:
                    uri = base64.urlsafe_b64decode(query["fileuri"][0].encode()).decode()
                    target = state.cloud.get(uri)
                    if target is None:
                        return self.reply(404, b'{"detail": "Not found."}', "application/json")
                    if isinstance(target, bytes):
                        return self.reply(200, target, "image/jpeg")
                    return self.reply(303, headers={"Location": target})
                self.reply(404)

        return Handler


class FakeStorage(_LoopbackHost):
    """Another host (a different port): serves presigned objects and public files, records the
    headers of every request it receives."""

    def __init__(self):
        self.files = {}
        self.headers = []  # one dict per request
        self._start()

    def presigned(self, path: str) -> str:
        return (f"{self.url}{path}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE"
                f"&X-Amz-Expires=3600&X-Amz-Signature={SIGNATURE}")

    def _handler(self):
        state = self

        class Handler(_Handler):
            def do_GET(self):
                state.headers.append({k.lower(): v for k, v in self.headers.items()})
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                if parts.path.startswith("/expired/"):
                    return self.reply(403, b"<Error><Code>AccessDenied</Code></Error>",
                                      "application/xml")
                if not parts.path.startswith("/public/"):
                    if query.get("X-Amz-Signature") != [SIGNATURE]:
                        return self.reply(403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>",
                                          "application/xml")
                if parts.path not in state.files:
                    return self.reply(404)
                body, ctype = state.files[parts.path]
                self.reply(200, body, ctype)

        return Handler


class Redirector(_LoopbackHost):
    """A loopback host that answers every GET with a redirect to ``target`` and counts them."""

    def __init__(self, target: str):
        self.target = target
        self.paths = []
        self._start()

    def _handler(self):
        state = self

        class Handler(_Handler):
            def do_GET(self):
                state.paths.append(self.path)
                self.reply(302, headers={"Location": state.target})

        return Handler
