"""The explanation tables on their own: each row gives its text for its case, and the first row
that applies wins (HTTP statuses, refused credentials, connection errors)."""
from __future__ import annotations

import requests.exceptions as rex

from sam_backend.images import messages

LS = "http://ls:8080"


def http(status, url, to_ls=True, source_kind="ls", body="", kind="legacy", attempts=1):
    return str(messages.http_error(status, url, "/data/upload/1/x.jpg", source_kind, "",
                                   LS, "LABEL_STUDIO_URL", to_ls, kind, "from LABEL_STUDIO_API_KEY",
                                   body, attempts))


def test_http_statuses_from_label_studio():
    upload = LS + "/data/upload/1/x.jpg"
    assert "could not read /data/upload/1/x.jpg from its cloud storage (HTTP 424)" in http(424, upload)
    assert "Label Studio answers 500 for an upload it does not know" in http(500, upload)
    assert http(500, LS + "/tasks/1/presign/?fileuri=x").startswith(
        f"Label Studio at {LS} answered HTTP 500 Internal Server Error for image")  # the last row
    local = LS + "/data/local-files/?d=a.png"
    assert "LOCAL_FILES_SERVING_ENABLED=true" in http(403, local, body="... LOCAL_FILES_SERVING_ENABLED ...")
    # the same 403 without Label Studio's own explanation: refused credentials
    assert "the legacy API token (from LABEL_STUDIO_API_KEY) was not accepted" in http(403, local)
    assert "its user may lack access to this project" in http(403, local)
    assert "could not presign" in http(404, LS + "/tasks/1/presign/?fileuri=x", source_kind="cloud")
    assert "has no file for image" in http(404, upload)
    shown = http(503, upload, attempts=3)
    assert shown.endswith("answered HTTP 503 Service Unavailable for image /data/upload/1/x.jpg "
                          f"(request to {upload}) (3 attempts); check Label Studio's logs")


def test_http_statuses_from_other_hosts():
    url = "https://cdn.example/x.jpg?X-Amz-Signature=secret"
    assert "the storage refused the presigned download" in http(403, url, False, "cloud")
    refused = http(401, url, False, "http")
    assert refused.startswith("cdn.example refused access to image") and "secret" not in refused
    assert http(404, url, False, "http").endswith("not found (HTTP 404 from cdn.example)")
    assert "the HTTP proxy requires authentication (HTTP 407)" in http(407, url, False, "http")
    assert "check Label Studio's logs" not in http(502, url, False, "http")


def test_a_status_is_named_by_its_code_and_standard_phrase():
    assert messages.status_text(418) == "418 I'm a Teapot"
    assert messages.status_text(502) == "502 Bad Gateway"
    assert messages.status_text(599) == "599"  # no standard phrase: the code alone
    assert http(599, "https://cdn.example/x.jpg", False, "http").startswith(
        "cdn.example answered HTTP 599 for image")


def test_refused_credentials_of_each_kind():
    def auth(kind, html=False):
        return str(messages.auth_error(401, LS, "/data/upload/1/x.jpg", kind, "from X", html))

    assert "has no Label Studio API key" in auth("none")
    assert "legacy API token (from X) was not accepted" in auth("legacy")
    assert "refused even after refreshing it" in auth("pat")
    assert "is a JWT access token, not a personal access token" in auth("access")
    assert "answered with an HTML page (its login page)" in auth("none", html=True)


def test_connection_reasons():
    def reason(exc, during_body=False, to_ls=False):
        return str(messages.connection_error(exc, "http://user:pw@h:81/x.png?sig=s", "image X",
                                             7.0, LS if to_ls else None, "LABEL_STUDIO_URL",
                                             during_body))

    assert "connection to h:81 refused" in reason(rex.ConnectionError("[Errno 111] Connection refused"))
    assert "host name h cannot be resolved" in reason(rex.ConnectionError("Name or service not known"))
    assert "timed out after 7 s connecting to h:81" in reason(rex.ConnectTimeout("x"))
    assert "did not send the whole image within 7 s" in reason(rex.ConnectionError("read timed out"),
                                                             during_body=True)
    assert "broke off during the download" in reason(rex.ConnectionError("reset"), during_body=True)
    assert "TLS/SSL error talking to h:81" in reason(rex.SSLError("bad cert"))
    assert "cannot fetch image X from http://user:***@h:81/x.png?sig=***: TooManyRedirects." \
        in reason(rex.TooManyRedirects("x"))
    assert "Check LABEL_STUDIO_URL (now http://ls:8080)" in reason(rex.ConnectionError("x"), to_ls=True)
