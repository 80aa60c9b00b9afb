"""Downloading image bytes over HTTP: the session, redirects, the deadline, byte limits, retries.

* **Session.** One ``requests`` session per loader, mounted with the
  :class:`~sam_backend.images.netpolicy.NetworkPolicy` (no link-local / metadata addresses,
  optional ``image_hosts`` allowlist, checked in the connection layer on the addresses actually
  connected to). Cookies are never stored.
* **Redirects** are followed by hand (at most ``MAX_REDIRECTS``), so that Label Studio
  credentials never follow a redirect to another host: they are sent only where
  :meth:`~sam_backend.images.credentials.LabelStudioAccess.is_label_studio` says.
* **Time.** ``timeout`` bounds a whole download (redirects, retries, headers and body), not each
  read: every attempt's connect and read timeouts are cut to what is left, and at the deadline
  every socket of the download is shut down (:class:`DownloadScope`), whatever the HTTP version
  and however the host spaces its bytes (TLS handshake, headers, body).
* **Size.** A body larger than ``max_download_bytes`` is refused as soon as it is known to be;
  its bytes are reserved from the memory budget as they arrive.
* **Transient failures** (:class:`BoundedRetry`, urllib3's ``Retry``): a GET or HEAD is sent again
  at most ``MAX_RETRIES`` times when the connection fails or the server answers 502, 503 or 504,
  after ``0`` then ``2 x BACKOFF`` seconds, or after the server's ``Retry-After`` (503 only); a
  retry that would end after the deadline is not made. Never on a 4xx (the request itself is
  wrong or not allowed; 401/403 from Label Studio have their own single token refresh), and not
  on a 500: Label Studio answers 500 for an upload it does not know, which no retry mends. POSTs
  (the token refresh) are retried only when the connection could not be made.

URLs in logs and messages have their query values redacted (except ``d`` and ``fileuri``) and any
password removed.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import socket
import threading
import time
from http.cookiejar import DefaultCookiePolicy
from typing import Iterator, List, Optional, Tuple
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.exceptions import InvalidHeader, MaxRetryError, ResponseError
from urllib3.util.retry import Retry

from sam_backend.common.limits import Reservation
from sam_backend.common.text import redact_url
from sam_backend.errors import ConfigError, ImageError
from sam_backend.images import messages
from sam_backend.images.config import ImageAccessSettings
from sam_backend.images.credentials import LabelStudioAccess
from sam_backend.images.decode import looks_like_html, sniff_image_format
from sam_backend.images.messages import kind_label
from sam_backend.images.netpolicy import DestinationRefused, NetworkPolicy, mount, proxied
from sam_backend.images.sources import Media, Source

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 10
MAX_RETRIES = 2
BACKOFF = 0.25  # seconds; urllib3 waits 0, then 2 x BACKOFF
RETRY_STATUSES = frozenset({502, 503, 504})


class DownloadScope:
    """One download's deadline (:func:`deadline_in`), kept by shutting down its sockets.

    The connection layer hands over every socket a request of the download is sent on
    (:meth:`watch`, from :func:`~sam_backend.images.netpolicy.mount`); at the deadline a timer
    shuts them all down, which wakes any read blocked on them -- during the TLS handshake, the
    headers or the body, whatever the HTTP version: http.client takes the socket off the
    connection of an answer that closes the connection (every HTTP/1.0 answer), so the socket is
    held here from the moment it is connected, as a duplicate of its descriptor (a TLS wrapper
    takes the first socket object's descriptor over; a duplicate reaches the same connection
    either way). Read timeouts alone cannot do this: each bounds one gap between bytes, and a
    host that sends a byte now and then never lets one expire."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.fired = False
        self._lock = threading.Lock()
        self._closed = False
        self._sockets: List[socket.socket] = []
        self._timer = threading.Timer(max(0.0, seconds), self._fire)
        self._timer.daemon = True

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down at the deadline (at once if it has passed)."""
        try:
            held = socket.fromfd(sock.fileno(), sock.family, sock.type)
        except (OSError, ValueError):
            return  # already closed: nothing to wake
        with self._lock:
            if self._closed:
                held.close()
                return
            self._sockets.append(held)
            if self.fired:
                self._shut(held)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self._sockets:
                self._shut(sock)

    def start(self) -> None:
        self._timer.start()

    def close(self) -> None:
        """The download is over: no more shutting down (a kept-alive connection stays usable)."""
        self._timer.cancel()
        with self._lock:
            self._closed = True
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()


_scope: "contextvars.ContextVar[Optional[DownloadScope]]" = contextvars.ContextVar(
    "sam_backend_image_download", default=None)


def time_left() -> Optional[float]:
    """Seconds left before the current download's deadline; None outside a download."""
    scope = _scope.get()
    return None if scope is None else scope.left()


def _watch_socket(sock: socket.socket) -> None:
    scope = _scope.get()
    if scope is not None:
        scope.watch(sock)


@contextlib.contextmanager
def deadline_in(seconds: float) -> Iterator[DownloadScope]:
    """Requests made in this block (this thread) end, retries included, within ``seconds``:
    their sockets are shut down then (:class:`DownloadScope`, yielded; ``fired`` tells a
    failure caused by the deadline from others)."""
    scope = DownloadScope(seconds)
    token = _scope.set(scope)
    scope.start()
    try:
        yield scope
    finally:
        _scope.reset(token)
        scope.close()


class BoundedRetry(Retry):
    """urllib3's ``Retry`` that never waits past the current deadline (:func:`deadline_in`):
    a retry whose wait (backoff or ``Retry-After``) would use up the time left is not made, and
    the last answer or error stands."""

    RETRY_AFTER_STATUS_CODES = frozenset({503})  # a Retry-After never makes a 4xx retried

    def increment(self, method=None, url=None, response=None, error=None, _pool=None,
                  _stacktrace=None):
        try:
            new = super().increment(method, url, response, error, _pool, _stacktrace)
        except MaxRetryError:
            self._give_up(error)
            raise
        left = time_left()
        try:
            wait = new.get_retry_after(response) if response is not None else None
        except InvalidHeader:
            wait = math.inf  # a Retry-After we cannot read: no guessing, no retry
        if wait is None:
            wait = new.get_backoff_time()
        where = redact_url(f"{_pool.scheme}://{_pool.host}:{_pool.port}{url}") if _pool else url
        cause = f"HTTP {response.status}" if response is not None else type(error).__name__
        if wait >= (math.inf if left is None else left):
            logger.info("Image request %s %s: %s; no retry (wait %.1f s, %s s left)", method,
                        where, cause, wait, "no deadline" if left is None else f"{max(left, 0):.1f}")
            self._give_up(error)
            reason = error or ResponseError(cause)
            raise MaxRetryError(_pool, url, reason) from reason
        logger.info("Image request %s %s: %s; retrying in %.2f s", method, where, cause, wait)
        return new

    def _give_up(self, error: Optional[Exception]) -> None:
        """No more retries after a read error (a timeout, a dropped connection): raise the error
        itself, as without retries, so that it keeps its kind (a read timeout stays one)."""
        if error is not None and self._is_read_error(error):
            raise error


def retry_policy() -> BoundedRetry:
    """The retries of the image session (module docstring)."""
    return BoundedRetry(total=MAX_RETRIES, connect=MAX_RETRIES, read=MAX_RETRIES,
                        status=MAX_RETRIES, other=0, redirect=False,
                        allowed_methods=frozenset({"GET", "HEAD"}),
                        status_forcelist=RETRY_STATUSES, backoff_factor=BACKOFF,
                        raise_on_status=False, respect_retry_after_header=True)


class _RedactRetryWarning(logging.Filter):
    """urllib3 warns "Retrying ... <url>" with the URL's query (a presigned URL's signature)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Retrying") and record.args:
            record.args = tuple(redact_url(a) if isinstance(a, str) else a for a in record.args)
        return True


logging.getLogger("urllib3.connectionpool").addFilter(_RedactRetryWarning())


def image_session(policy: NetworkPolicy,
                  session: Optional[requests.Session] = None) -> requests.Session:
    """``session`` (default: a new one that keeps no cookies) mounted with ``policy`` and the
    retry policy."""
    if session is None:
        session = requests.Session()
        session.headers["User-Agent"] = "sam-backend-image-loader"
        session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # never keep cookies
    return mount(session, policy, retries=retry_policy(), time_left=time_left,
                 watch=_watch_socket)


def _peek(resp: requests.Response, limit: int = 4096) -> str:
    """The start of an error response's body, for recognising known Label Studio errors only
    (never shown: it could echo anything)."""
    try:
        return next(resp.iter_content(limit), b"")[:limit].decode("utf-8", "replace")
    except Exception:  # noqa: BLE001
        return ""


def _attempts(resp: requests.Response) -> int:
    retries = getattr(resp.raw, "retries", None)
    return 1 + len(retries.history) if retries is not None else 1


class Fetcher:
    """Downloads of resolved sources and Label Studio API calls (module docstring)."""

    def __init__(self, settings: ImageAccessSettings, access: LabelStudioAccess,
                 policy: NetworkPolicy, session: requests.Session):
        self.settings = settings
        self.access = access
        self.policy = policy
        self.session = session

    def _connection_error(self, exc: Exception, url: str, what: str, to_ls: bool,
                          during_body: bool = False, media: Optional[Media] = None
                          ) -> ImageError:
        timeout = (media.timeout if media is not None else None) or self.settings.timeout
        return messages.connection_error(exc, url, what, timeout,
                                         self.access.url if to_ls else None,
                                         self.access.url_source, during_body, media)

    def download(self, src: Source,
                 reservation: Optional[Reservation] = None) -> Tuple[bytes, Optional[str]]:
        """(body, Content-Type) of ``src``'s download, following redirects by hand; the whole
        download (every hop and retry, the headers and the body) must finish within
        ``settings.timeout`` seconds (``src.media.timeout`` when it has one)."""
        with deadline_in(src.media.timeout or self.settings.timeout) as scope:
            return self._download(src, reservation, scope)

    def _download(self, src: Source, reservation: Optional[Reservation],
                  scope: DownloadScope) -> Tuple[bytes, Optional[str]]:
        url = src.fetch_url
        assert url is not None
        hops = 0
        force_refresh = False
        retried_auth = False
        while True:
            to_ls = self.access.is_label_studio(url)
            headers = {"Accept": f"{src.media.noun}/*,*/*;q=0.8"}
            kind, source = "none", "not sent"
            if to_ls:
                header, kind, source = self.access.auth_header(force_refresh)
                force_refresh = False
                if header:
                    headers["Authorization"] = header
            logger.debug("Image %s: GET %s (%s)", src.display, redact_url(url),
                         f"Label Studio credentials: {kind_label(kind)}" if to_ls
                         else "no Label Studio credentials")
            remaining = scope.left()
            if remaining <= 0 or scope.fired:
                raise self._connection_error(requests.exceptions.ReadTimeout(), url,
                                             f"{src.media.noun} {src.display}", to_ls,
                                             media=src.media)
            try:
                self.policy.check_url(url, self.access.trusted_bases(),
                                      resolve=proxied(self.session, url))
                resp = self.session.get(url, headers=headers, timeout=remaining,
                                        allow_redirects=False, stream=True)
            except DestinationRefused as exc:
                where = messages.where(url, src.display)
                raise DestinationRefused(f"{src.media.noun} {where}: {exc}") from None
            except requests.RequestException as exc:
                if scope.fired:  # its sockets were shut down at the deadline
                    exc = requests.exceptions.ReadTimeout()
                raise self._connection_error(exc, url, f"{src.media.noun} {src.display}",
                                             to_ls, media=src.media) from None
            except ValueError:  # http.client refuses control characters, bad ports, ...
                raise ImageError(f"{src.media.noun} URL {messages.where(url, src.display)} is "
                                 "not a valid URL") from None
            with resp:
                if resp.is_redirect:
                    hops += 1
                    target = urljoin(url, resp.headers.get("Location", ""))
                    if to_ls and "/user/login" in urlsplit(target).path:
                        raise messages.auth_error(401, self.access.url,
                                                  messages.where(url, src.display), kind, source)
                    if hops > MAX_REDIRECTS:
                        raise ImageError(f"{src.media.noun} {src.display}: too many redirects (last: "
                                         f"{redact_url(target)})")
                    logger.debug("Image %s: HTTP %d redirect to %s", src.display,
                                 resp.status_code, redact_url(target))
                    url = target
                    continue
                status = resp.status_code
                if status in (401, 403) and to_ls and kind == "pat" and not retried_auth:
                    logger.info("Label Studio answered HTTP %d; refreshing the access token and "
                                "retrying once", status)
                    retried_auth = True
                    force_refresh = True
                    continue
                if status >= 400:
                    raise messages.http_error(
                        status, url, src.display, src.kind, src.note,
                        self.access.url, self.access.url_source, to_ls, kind, source,
                        _peek(resp) if to_ls else "", _attempts(resp))
                data = self._read_body(resp, url, src, scope, reservation)
                content_type = resp.headers.get("Content-Type")
            logger.debug("Image %s: downloaded %d bytes (%s)", src.display, len(data),
                         content_type or "no Content-Type")
            if (to_ls and kind == "none" and looks_like_html(data, content_type)
                    and not sniff_image_format(data)):
                raise messages.auth_error(200, self.access.url, messages.where(url, src.display),
                                          kind, source, html=True)
            return data, content_type

    def _read_body(self, resp: requests.Response, url: str, src: Source, scope: DownloadScope,
                   reservation: Optional[Reservation] = None) -> bytes:
        """The body, at most ``max_download_bytes``, reserved from the memory budget as it
        arrives. It grows in one buffer (large buffers are mapped memory, returned to the system
        as soon as they are dropped; thousands of small chunks would fragment the heap), which
        is dropped at once on any failure (no reference cycle keeps it: the errors are created
        where they are raised)."""
        limit = src.media.max_bytes or self.settings.max_download_bytes
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > limit:
            raise messages.too_big(src.display, limit, media=src.media)
        buffer = bytearray()
        reserved = 0
        step = 4 << 20
        try:
            for chunk in resp.iter_content(chunk_size=1 << 16):
                if len(buffer) + len(chunk) > limit:
                    raise messages.too_big(src.display, limit, media=src.media)
                if reservation is not None and len(buffer) + len(chunk) > reserved:
                    reservation.grow(step, f"{src.media.noun} {src.display}")
                    reserved += step
                buffer += chunk
            if scope.fired:  # a connection shut down at the deadline can look like a short body
                raise requests.exceptions.ReadTimeout()
        except requests.RequestException as exc:
            del buffer
            if scope.fired:
                exc = requests.exceptions.ReadTimeout()
            raise self._connection_error(exc, url, f"{src.media.noun} {src.display}",
                                         self.access.is_label_studio(url),
                                         during_body=True, media=src.media) from None
        except BaseException:
            del buffer
            raise
        return buffer

    def api_get(self, path: str, params: Optional[dict] = None):
        """GET a Label Studio API path (``/api/...``) with the configured credentials: the
        parsed JSON. A personal access token is refreshed once on 401/403."""
        ls = self.access.url
        if not ls:
            raise ConfigError("the Label Studio address is unknown: set LABEL_STUDIO_URL")
        url = ls + path
        for attempt in range(2):
            header, kind, source = self.access.auth_header(force_refresh=attempt > 0)
            headers = {"Accept": "application/json"}
            if header:
                headers["Authorization"] = header
            try:
                with deadline_in(self.settings.timeout) as scope:
                    resp = self.session.get(url, params=params, headers=headers,
                                            timeout=self.settings.timeout, allow_redirects=False)
            except requests.RequestException as exc:
                if scope.fired:
                    exc = requests.exceptions.ReadTimeout()
                raise self._connection_error(exc, url, f"Label Studio API {path}", True) from None
            if resp.status_code in (401, 403) and kind == "pat" and attempt == 0:
                continue
            if resp.status_code in (401, 403) or resp.is_redirect:
                raise ImageError(f"Label Studio at {ls} refused {path} (HTTP {resp.status_code}) "
                                 f"with the API key {source} ({kind_label(kind)}): set "
                                 "LABEL_STUDIO_API_KEY to a personal access token")
            if resp.status_code >= 400:
                raise ImageError(f"Label Studio at {ls} answered HTTP {resp.status_code} for "
                                 f"{path}")
            try:
                return resp.json()
            except ValueError:
                raise ImageError(f"Label Studio at {ls} answered {path} with something that is "
                                 "not JSON") from None
        raise AssertionError("unreachable")


__all__ = ["BACKOFF", "BoundedRetry", "DownloadScope", "Fetcher", "MAX_REDIRECTS", "MAX_RETRIES",
           "RETRY_STATUSES", "deadline_in", "image_session", "retry_policy", "time_left"]
