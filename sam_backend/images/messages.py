"""What a user reads when a download fails: connection errors, HTTP statuses, refused credentials.

Each message names the image (its URL redacted), what went wrong and what to configure. The
explanations are tables (first match wins), so a new case is a row, not a branch. Messages never
contain a token, and URLs in them pass :func:`~sam_backend.common.text.redact_url`. Nothing a
remote server wrote reaches them: an HTTP status is named by its code and standard phrase
(:func:`status_text`), never by the server's reason phrase or body.
"""
from __future__ import annotations

from http import HTTPStatus
from typing import Optional
from urllib.parse import urlsplit

import requests.exceptions as rex

from sam_backend.common.text import redact_url
from sam_backend.errors import ImageError

PAT_HOWTO = "Account & Settings -> Personal Access Token"

KIND_LABELS = {"legacy": "legacy token", "pat": "personal access token",
               "access": "JWT access token", "none": "none"}


def kind_label(kind: str) -> str:
    """How a token kind (:func:`~sam_backend.images.credentials.token_kind`) is named to users."""
    return KIND_LABELS.get(kind, kind)


def host_of(url: str) -> str:
    try:
        return urlsplit(url).netloc.rsplit("@", 1)[-1] or url
    except ValueError:
        return "<unparseable host>"


def where(url: str, display: Optional[str]) -> str:
    """The image as the task names it, plus the request's URL when that differs."""
    shown = redact_url(url)
    if display is None or shown == display:
        return shown
    return f"{display} (request to {shown})"


def too_big(display: str, limit: int, download: bool = True, media=None) -> ImageError:
    """``media``: a :class:`~sam_backend.images.sources.Media` (default: an image)."""
    what = ": the download is" if download else " is"
    noun, option = (media.noun, media.limit) if media is not None else \
        ("image", "SAM_BACKEND_MAX_IMAGE_BYTES")
    return ImageError(f"{noun} {display}{what} larger than {limit:,} bytes ({option})")


def unavailable(display: str) -> ImageError:
    """One message for every local path that cannot be read: it must not tell a stranger what
    exists on the backend's disk."""
    return ImageError(
        f"image {display} is not available. Local paths and file:// URLs are read only from "
        "inside LOCAL_FILES_DOCUMENT_ROOT (regular image files), and only when it is set; "
        "in Label Studio use uploads, local-files storage or a cloud storage")


# -- connection errors ---------------------------------------------------------------------------

_BODY_TIMEOUT = ("{host} did not send the whole {noun} within {timeout:g} s "
                 "({timeout_option}, for the whole download)")
_CONNECT_TIMEOUT = "timed out after {timeout:g} s connecting to {host}"
# (error types, also for any error during the body?, words of the error text (any), reason)
_CONNECTION_REASONS = (
    ((rex.ConnectTimeout,), False, (), _CONNECT_TIMEOUT),
    ((rex.ReadTimeout,), False, (), _BODY_TIMEOUT),
    ((), True, ("timed out",), _BODY_TIMEOUT),
    ((rex.SSLError,), False, (), "TLS/SSL error talking to {host} (certificate not trusted? set "
                                 "REQUESTS_CA_BUNDLE to your CA bundle)"),
    ((rex.ChunkedEncodingError, rex.ContentDecodingError), True, (),
     "the connection to {host} broke off during the download"),
    ((rex.ConnectionError,), False, ("refused",), "connection to {host} refused (nothing listens "
                                                  "there)"),
    ((rex.ConnectionError,), False, ("name or service not known", "nodename nor servname",
                                     "temporary failure in name resolution", "name resolution",
                                     "getaddrinfo failed"), "host name {hostname} cannot be resolved"),
    ((rex.ConnectionError,), False, ("unreachable", "no route to host"), "host {host} is unreachable"),
    ((rex.ConnectionError,), False, ("timed out",), _CONNECT_TIMEOUT),
    ((rex.ConnectionError,), False, (), "cannot connect to {host}"),
    ((rex.InvalidURL, rex.MissingSchema, rex.InvalidSchema), False, (), "the URL is invalid"),
)


def connection_error(exc: Exception, url: str, what: str, timeout: float,
                     ls: Optional[str] = None, ls_source: str = "",
                     during_body: bool = False, media=None) -> ImageError:
    """``exc`` (a requests error) while fetching ``what`` from ``url``; ``ls`` is Label Studio's
    address when the request went to Label Studio (``ls_source`` says where it was configured);
    ``media``: a :class:`~sam_backend.images.sources.Media` (default: an image)."""
    noun = media.noun if media is not None else "image"
    timeout_option = media.timeout_option if media is not None else "SAM_BACKEND_IMAGE_TIMEOUT"
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    low = str(exc).lower()
    reason = type(exc).__name__
    for types, in_body, words, text in _CONNECTION_REASONS:
        if (isinstance(exc, types) or (in_body and during_body)) and (
                not words or any(w in low for w in words)):
            reason = text.format(host=host, hostname=parts.hostname, timeout=timeout, noun=noun,
                                 timeout_option=timeout_option)
            break
    if ls is not None:
        hint = (f"Check {ls_source} (now {ls}): the backend must reach Label Studio at that "
                "address. Inside Docker, 'localhost' is the backend's own container: use the "
                "Label Studio service name or the host's address, and set LABEL_STUDIO_URL.")
    else:
        hint = "Check that the backend can reach that host (network, proxy settings)."
    return ImageError(f"cannot fetch {what} from {redact_url(url)}: {reason}. {hint}")


# -- credentials refused ---------------------------------------------------------------------------

_AUTH_DETAILS = {
    "none": ("the backend has no Label Studio API key. Set LABEL_STUDIO_API_KEY in the backend's "
             f"environment to a personal access token (Label Studio -> {PAT_HOWTO}) or to a "
             "legacy API token"),
    "legacy": ("the legacy API token ({source}) was not accepted. Label Studio 1.23 disables "
               "legacy tokens by default: set LABEL_STUDIO_API_KEY to a personal access token "
               f"({PAT_HOWTO}), or enable legacy tokens in Label Studio (Organization -> API "
               "Tokens Settings) and check the token is current"),
    "pat": ("the access token obtained from the personal access token ({source}) was refused "
            "even after refreshing it. Check that personal access tokens are enabled "
            "(Organization -> API Tokens Settings) and that its user has access to this "
            "project, or create a new personal access token and set LABEL_STUDIO_API_KEY to it"),
    "access": ("the API key ({source}) is a JWT access token, not a personal access token; set "
               f"LABEL_STUDIO_API_KEY to a personal access token ({PAT_HOWTO}) or a legacy token"),
}


def auth_error(status: int, ls: Optional[str], where_: str, kind: str, source: str,
               html: bool = False) -> ImageError:
    """Label Studio refused the image with our credentials (of ``kind``, from ``source``)."""
    what = ("answered with an HTML page (its login page) instead of the image" if html
            else f"refused the download (HTTP {status})")
    detail = _AUTH_DETAILS.get(kind, _AUTH_DETAILS["access"]).format(source=source)
    if kind == "legacy" and status == 403:
        detail += "; if the token is accepted, its user may lack access to this project"
    return ImageError(f"Label Studio at {ls} {what} for image {where_}: {detail}")


# -- HTTP statuses -------------------------------------------------------------------------------

_AUTH = object()  # the row's answer is :func:`auth_error`
# (statuses, to Label Studio? (None: either), a further condition on the context or None, message)
_HTTP_RULES = (
    ((403,), True, lambda c: c["rel"].startswith("/data/local-files")
     and "LOCAL_FILES_SERVING_ENABLED" in c["body"],
     "Label Studio at {ls} refused to serve local file {where} (HTTP 403): local files serving "
     "is disabled in Label Studio. Set LOCAL_FILES_DOCUMENT_ROOT in the backend to the directory "
     "Label Studio reads them from (the backend then reads them directly), or start Label Studio "
     "with LOCAL_FILES_SERVING_ENABLED=true"),
    ((401, 403), True, None, _AUTH),
    ((424,), True, None,
     "Label Studio at {ls} could not read {display} from its cloud storage (HTTP 424): check the "
     "credentials and bucket of the project's Cloud Storage in Label Studio"),
    ((500,), True, lambda c: c["rel"].startswith("/data/upload/"),
     "Label Studio at {ls} failed on image {where} (HTTP 500). Label Studio answers 500 for an "
     "upload it does not know: check that {ls_source} points to the Label Studio instance the "
     "task comes from and that the file was not deleted; otherwise see Label Studio's logs"),
    ((401, 403), None, lambda c: c["kind_of_source"] == "cloud",
     "the storage refused the presigned download of {where} (HTTP {status}): the presigned URL "
     "may have expired (check the storage's presign TTL and the clocks) or the credentials of "
     "the cloud storage configured in Label Studio lack read permission"),
    ((401, 403), None, None,
     "{host} refused access to image {where} (HTTP {status}). Label Studio credentials are only "
     "sent to Label Studio ({ls_or_unset}); make the image publicly readable, or import it "
     "through a Label Studio storage"),
    ((404,), True, lambda c: c["kind_of_source"] == "cloud" and "/presign/" in c["url"],
     "Label Studio at {ls} could not presign {display} (HTTP 404 from {shown}): the task does not "
     "exist or no cloud storage connected to the project covers this URI; check the project's "
     "Cloud Storage settings and that {ls_source} is the right Label Studio"),
    ((404,), True, None,
     "Label Studio at {ls} has no file for image {where} (HTTP 404): check that {ls_source} "
     "points to the Label Studio instance the task comes from and that the file still "
     "exists.{note}"),
    ((404,), False, None, "image {where} not found (HTTP 404 from {host})"),
    ((407,), None, None, "image {where}: the HTTP proxy requires authentication (HTTP 407); "
                         "check HTTPS_PROXY/HTTP_PROXY"),
)


def status_text(status: int) -> str:
    """``status`` with its standard phrase (``"418 I'm a Teapot"``; a code without one: the
    number alone). A server's own reason phrase is never used: it is whatever the server chose
    to write, and our message becomes our own HTTP reason phrase."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def http_error(status: int, url: str, display: str, source_kind: str, note: str,
               ls: Optional[str], ls_source: str, to_ls: bool, kind: str, credential_source: str,
               body: str = "", attempts: int = 1) -> ImageError:
    """An HTTP error status for an image request to ``url`` (of a source of ``source_kind``,
    shown as ``display``). ``body``: the start of the answer, only to recognise Label Studio's
    own errors (never shown), like the server's reason phrase (not even taken).
    ``attempts``: how many times the request was sent (retries)."""
    context = {
        "ls": ls, "ls_source": ls_source, "ls_or_unset": ls or "unknown: LABEL_STUDIO_URL not set",
        "where": where(url, display), "display": display, "shown": redact_url(url),
        "host": host_of(url), "status": status, "url": url, "body": body,
        "kind_of_source": source_kind, "note": f" {note}" if note else "",
        "rel": urlsplit(url).path[len(urlsplit(ls).path):] if to_ls and ls else "",
    }
    for statuses, for_ls, condition, text in _HTTP_RULES:
        if status in statuses and for_ls in (None, to_ls) and (condition is None or condition(context)):
            if text is _AUTH:
                return auth_error(status, ls, context["where"], kind, credential_source)
            return ImageError(text.format(**context))
    who = f"Label Studio at {ls}" if to_ls else context["host"]
    text = f"{who} answered HTTP {status_text(status)} for image {context['where']}"
    if attempts > 1:
        text += f" ({attempts} attempts)"
    return ImageError(text + ("; check Label Studio's logs" if to_ls and status >= 500 else ""))


__all__ = ["auth_error", "connection_error", "host_of", "http_error", "kind_label",
           "status_text", "too_big", "unavailable", "where"]
