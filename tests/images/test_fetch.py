"""Downloads against loopback hosts: limits, HTML instead of an image, HTTP errors, presigned
storage URLs, credentials only for Label Studio, and the retries of transient failures."""
from __future__ import annotations

import base64
import itertools
import logging
import socket
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from sam_backend.errors import ImageError
from sam_backend.images.fetch import MAX_RETRIES

from tests.support.loopback_hosts import LEGACY_TOKEN, SIGNATURE, assert_rotated_cat, exif_rotated_jpeg, rgb_png


def test_download_size_limit_and_data_urls(ls, make_loader):
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN, max_download_bytes=100)
    with pytest.raises(ImageError, match="SAM_BACKEND_MAX_IMAGE_BYTES"):
        loader.load("/data/upload/1/x.jpg")
    png = rgb_png(colour=(9, 8, 7))
    arr = loader.load("data:image/png;base64," + base64.b64encode(png).decode())
    assert arr[0, 0].tolist() == [9, 8, 7]


def test_html_instead_of_image(ls, make_loader):
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    with pytest.raises(ImageError) as err:
        loader.load("/data/upload/1/page.jpg")
    assert "HTML" in str(err.value) and "/data/upload/1/page.jpg" in str(err.value)


def test_http_errors(ls, make_loader):
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN, timeout=0.3)
    with pytest.raises(ImageError, match="HTTP 404") as err:
        loader.load("/data/upload/1/missing.jpg")
    assert "/data/upload/1/missing.jpg" in str(err.value)
    assert "LABEL_STUDIO_URL" in str(err.value)

    ls.slow["/data/upload/1/y.png"] = 1.5
    start = time.monotonic()
    with pytest.raises(ImageError, match="did not send the whole image within") as err:
        loader.load("/data/upload/1/y.png")
    assert time.monotonic() - start < 1.4
    assert "/data/upload/1/y.png" in str(err.value)

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    loader = make_loader(label_studio_url=dead, api_key=LEGACY_TOKEN)
    with pytest.raises(ImageError) as err:
        loader.load("/data/upload/1/x.jpg")
    msg = str(err.value)
    assert "refused" in msg and "LABEL_STUDIO_URL" in msg and dead in msg


def test_presign_redirect_does_not_leak_credentials(ls, storage, make_loader):
    uri = "s3://bucket/cat.jpg"
    ls.cloud[uri] = storage.presigned("/bucket/cat.jpg")
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    assert_rotated_cat(loader.load(uri, task_id=7))
    presign = [r for r in ls.requests if r[1].startswith("/tasks/7/presign/")]
    assert len(presign) == 1 and presign[0][2] == f"Token {LEGACY_TOKEN}"
    fileuri = parse_qs(urlsplit(presign[0][1]).query)["fileuri"][0]
    assert base64.urlsafe_b64decode(fileuri).decode() == uri
    assert len(storage.headers) == 1
    assert "authorization" not in storage.headers[0] and "cookie" not in storage.headers[0]

    # The same with a personal access token: no Bearer token to the storage either.
    loader = make_loader(label_studio_url=ls.url, api_key=ls.pat)
    loader.load(uri, task_id=7)
    assert all("authorization" not in h for h in storage.headers)


def test_presign_proxy_mode_and_errors(ls, storage, make_loader):
    ls.cloud["gs://b/direct.jpg"] = exif_rotated_jpeg()  # LS streams the bytes itself
    ls.cloud["azure-blob://c/old.jpg"] = storage.url + f"/expired/old.jpg?sig={SIGNATURE}&se=1"
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    assert_rotated_cat(loader.load("gs://b/direct.jpg", task_id=3))
    with pytest.raises(ImageError, match="task id"):
        loader.load("gs://b/direct.jpg")
    with pytest.raises(ImageError) as err:
        loader.load("azure-blob://c/old.jpg", task_id=3)
    msg = str(err.value)
    assert "403" in msg and "presigned" in msg and "azure-blob://c/old.jpg" in msg
    assert SIGNATURE not in msg
    with pytest.raises(ImageError, match="could not presign"):
        loader.load("s3://nope/none.jpg", task_id=3)


def test_plain_urls_get_credentials_only_on_label_studio_host(ls, storage, make_loader):
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    arr = loader.load(storage.url + "/public/pic.png")
    assert arr[0, 0].tolist() == [1, 2, 3]
    assert "authorization" not in storage.headers[-1]
    loader.load(ls.url + "/data/upload/1/y.png")
    assert ls.requests[-1][2] == f"Token {LEGACY_TOKEN}"
    with pytest.raises(ImageError, match="404"):
        loader.load(storage.url + "/public/missing.png")



# --------------------------------------------------------------------------------------------
# Transient failures: bounded retries of idempotent GETs, never of a 4xx


def test_transient_503_is_retried_and_succeeds(ls, make_loader, caplog):
    caplog.set_level(logging.INFO, logger="sam_backend.images")
    ls.faults["/data/upload/1/y.png"] = [503]
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    assert loader.load("/data/upload/1/y.png")[0, 0].tolist() == [10, 20, 30]
    assert ls.count("/data/upload/1/y.png") == 2
    assert "HTTP 503; retrying" in caplog.text


@pytest.mark.parametrize("status", [502, 503, 504])
def test_5xx_for_ever_gives_up_after_the_retries(ls, make_loader, status):
    ls.faults["/data/upload/1/y.png"] = itertools.repeat(status)
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    with pytest.raises(ImageError) as err:
        loader.load("/data/upload/1/y.png")
    assert ls.count("/data/upload/1/y.png") == 1 + MAX_RETRIES
    msg = str(err.value)
    assert f"answered HTTP {status}" in msg and f"({1 + MAX_RETRIES} attempts)" in msg
    assert "/data/upload/1/y.png" in msg and "check Label Studio's logs" in msg


def test_4xx_and_500_are_not_retried(ls, make_loader):
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN)
    with pytest.raises(ImageError, match="has no file for image /data/upload/1/missing.jpg"):
        loader.load("/data/upload/1/missing.jpg")  # the fake Label Studio's own 404
    assert ls.count("/data/upload/1/missing.jpg") == 1
    for status, message in ((403, "refused the download \\(HTTP 403\\)"),
                            (429, "answered HTTP 429"),
                            (500, "Label Studio answers 500 for an upload it does not know")):
        path = f"/data/upload/1/{status}.png"
        ls.files[path] = (rgb_png(), "image/png")
        ls.faults[path] = itertools.repeat(status)
        ls.fault_headers = {"Retry-After": "0"}  # not even when the server asks for a retry
        with pytest.raises(ImageError, match=message) as err:
            loader.load(path)
        assert ls.count(path) == 1, status
        assert "attempts" not in str(err.value)


def test_retry_after_is_honoured_within_the_deadline_only(ls, make_loader, caplog):
    caplog.set_level(logging.INFO, logger="sam_backend.images")
    loader = make_loader(label_studio_url=ls.url, api_key=LEGACY_TOKEN, timeout=5.0)
    ls.fault_headers = {"Retry-After": "1"}
    ls.faults["/data/upload/1/y.png"] = [503]
    loader.load("/data/upload/1/y.png")
    assert ls.count("/data/upload/1/y.png") == 2
    assert "HTTP 503; retrying in 1.00 s" in caplog.text
    # a wait beyond the whole download's deadline: the 503 stands, no second request
    ls.fault_headers = {"Retry-After": "60"}
    ls.faults["/data/upload/1/y.png"] = [503]
    with pytest.raises(ImageError, match="answered HTTP 503"):
        loader.load("/data/upload/1/y.png")
    assert ls.count("/data/upload/1/y.png") == 3
    assert "HTTP 503; no retry (wait 60.0 s" in caplog.text
    ls.fault_headers = {"Retry-After": "soon"}  # unreadable: no guessing
    ls.faults["/data/upload/1/y.png"] = [503]
    with pytest.raises(ImageError, match="answered HTTP 503"):
        loader.load("/data/upload/1/y.png")
    assert ls.count("/data/upload/1/y.png") == 4


def test_dropped_connections_are_retried(make_loader, caplog):
    """A host that accepts each connection and closes it at once: every attempt is seen, and
    urllib3's own retry warnings do not show the URL's query (a presigned URL's signature)."""
    caplog.set_level(logging.DEBUG)
    accepted, stop = [], threading.Event()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(0.05)

        def serve():
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    continue
                accepted.append(1)
                conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{server.getsockname()[1]}/pic.png?X-Amz-Signature={SIGNATURE}"
        try:
            with pytest.raises(ImageError, match="cannot connect to 127.0.0.1"):
                make_loader().load(url)
        finally:
            stop.set()
            thread.join(5)
    assert len(accepted) == 1 + MAX_RETRIES
    retried = [r for r in caplog.records if r.name == "urllib3.connectionpool"
               and r.getMessage().startswith("Retrying")]
    assert len(retried) == MAX_RETRIES
    assert all(SIGNATURE not in r.getMessage() for r in retried)
