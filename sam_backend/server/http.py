"""HTTP layer: the WSGI server both start commands run the app on (waitress, one process).

``sam-backend serve`` and ``label-studio-ml start sam`` (``sam/_wsgi.py``) both call :func:`run`.
Waitress reads every connection in one event loop and hands a request to its thread pool only
once the request (headers and body) has fully arrived, so a client that sends slowly, or stops
half-way, costs a buffer and a file descriptor, never a thread: ``/health`` and clicks keep
finding free threads (``tests/server/test_hardening.py``: 100 such clients).

What this module adds to waitress:

* **A whole-request deadline** (``request_timeout``, from the request's first byte): a request
  not fully received by then is answered 408, ``Connection: close``, and its connection closed.
  It is a deadline, not an idle timeout: a client trickling one byte a second does not reset it.
* **Exact body limits** (``max_request_mb``): a body of exactly the limit is accepted, with
  ``Content-Length`` or chunked (the decoded bytes count, not the chunk framing); one byte more is
  413 (from the ``Content-Length`` before reading, or as soon as a chunked body passes it).
* **Errors in the app's shape**: 400/408/413/431/501 answered by the server itself are JSON
  ``{"status": "error", "errors": [message]}`` with the message as the reason phrase, and close
  the connection.
* **Lingering close**: after an answer that closes the connection (an error above, or a client's
  ``Connection: close``), the server stops sending (FIN) and discards what the client still sends
  for up to :data:`LINGER` seconds, so that a client still sending its body reads the answer
  instead of a connection reset.
* **Idle and stalled connections**: a kept-alive connection with no request is closed after
  :data:`KEEPALIVE` seconds; an answer the client does not read (no byte accepted for
  ``request_timeout``) closes the connection, which frees the thread writing it.
* **A connection limit** (``max_connections``, default 1000; waitress's own default is 100) and
  the open-files limit raised to fit it; ``poll`` instead of ``select`` (no 1024-descriptor cap).
* ``channel_request_lookahead`` = 1: a connection stays read while its request runs, so a client
  that disconnects is seen, and ``environ["waitress.client_disconnected"]()`` turns true (the
  routes hand it to their :class:`~sam_backend.common.deadline.WorkScope`).
"""
from __future__ import annotations

import json
import logging
import resource
import signal
import socket
import struct
import threading
import time
from typing import Any, Callable, Iterable, Optional

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher
from waitress.utilities import BadRequest, Error, RequestEntityTooLarge

from sam_backend.common.limits import MIB, printable

log = logging.getLogger(__name__)
access_log = logging.getLogger("sam_backend.access")

DEFAULT_THREADS = 32
KEEPALIVE = 15.0  # seconds an idle kept-alive connection stays open (clients pause between clicks)
LINGER = 2.0  # seconds a closing connection keeps discarding what the client still sends
TICK = 0.25  # seconds between two checks of every connection's deadlines
FILES_PER_CONNECTION = 2  # its socket, and a temporary file once its body passes 512 KiB
FILES_RESERVED = 256  # checkpoints, image downloads, the store, logs, the listening socket


class RequestTimeout(Error):
    code = 408
    reason = "Request Timeout"


class _Request(HTTPRequestParser):
    """Waitress's request parser that knows when its first byte came, and counts a chunked
    body's limit in decoded bytes (waitress counts the framing too: a chunked body of exactly the
    limit was refused)."""

    path = ""  # until the request line is parsed (waitress logs it on a disconnect)

    def __init__(self, adj):
        super().__init__(adj)
        self.started = time.monotonic()

    @property
    def body_limit(self) -> int:
        return self.adj.max_request_body_size - 1  # waitress refuses from max_request_body_size

    def _too_large(self) -> None:
        self.error = RequestEntityTooLarge(
            f"the request body is larger than {self.body_limit / MIB:g} MiB (max_request_mb)")
        self.completed = True

    def received(self, data: bytes) -> int:
        body = self.body_rcv
        if body is None or self.completed:  # the request line and headers: waitress's parser
            consumed = super().received(data)
            if isinstance(self.error, RequestEntityTooLarge):  # from the Content-Length
                self._too_large()
            return consumed
        consumed = body.received(data)
        self.body_bytes_received += consumed
        if len(body) > self.body_limit:
            self._too_large()
        elif body.error:
            self.error = body.error
            self.completed = True
        elif self.chunked and max(len(body.control_line), len(body.trailer)) > \
                self.adj.max_request_header_size:
            self.error = BadRequest("a chunk size line or the trailer is too long")
            self.completed = True
        elif body.completed:
            self.completed = True
            if self.chunked:  # the app sees a plain body of known length
                self.headers["CONTENT_LENGTH"] = str(len(body))
        return consumed


def _reason_phrase(message: str) -> str:
    return printable(message, 300).encode("latin-1", "replace").decode("latin-1")


class _JsonErrorTask(ErrorTask):
    """An error the server answers itself (the request never reached the app), in the app's
    error shape; the connection is closed after it."""

    def execute(self):
        error = self.request.error
        message = printable(f"{error.code} {error.reason}: {error.body}", 2000)
        body = json.dumps({"status": "error", "errors": [message]}).encode()
        self.status = f"{error.code} {_reason_phrase(message)}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    """One client connection: waitress's, with the deadlines above."""

    parser_class = _Request
    error_task_class = _JsonErrorTask
    timed_out = False  # its request missed the deadline: read nothing more
    linger_until: Optional[float] = None  # lingering close: FIN sent, discarding until then
    _linger_next = False
    sent_total = 0  # bytes the kernel accepted, to tell a slow reader from a stalled one
    _stall: Optional[tuple] = None  # (sent_total, when) while output waits

    def send(self, data, do_close=True):
        sent = super().send(data, do_close=do_close)
        if sent:
            self.sent_total += sent
        return sent

    def readable(self):
        if self.linger_until is not None:
            return True
        return not self.timed_out and super().readable()

    def writable(self):
        if self.linger_until is not None:  # nothing to send; "writable" once the linger is over
            return self.linger_until <= time.monotonic()
        return super().writable()

    def handle_read(self):
        if self.linger_until is None:
            return super().handle_read()
        try:
            data = self.socket.recv(65536)  # discarded
        except OSError:
            data = b""
        if not data:
            self.handle_close()

    def handle_write(self):
        if self.linger_until is not None:  # the linger is over
            self.handle_close()
            return
        # an answer that closes the connection has been flushed: close it lingering
        self._linger_next = self.close_when_flushed
        try:
            super().handle_write()
        finally:
            self._linger_next = False

    def handle_close(self):
        if self._linger_next and self.linger_until is None and self.socket is not None:
            self._linger_next = False
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            else:
                self.will_close = False
                self.linger_until = time.monotonic() + LINGER
                return
        super().handle_close()

    def check_deadlines(self, wall: float, now: float) -> None:
        """Called on the event loop every :data:`TICK` seconds, while it lists what to poll: it
        only marks connections (closing one here could hand its descriptor number to a new
        connection that then receives the stale poll event); they close in their handlers."""
        server = self.server
        if self.linger_until is not None or self.will_close or self.close_when_flushed:
            return
        request = self.request
        if request is not None and not request.completed and \
                now - request.started >= server.request_timeout:
            self._time_out(request)
        elif self.total_outbufs_len:
            if self._stall is None or self._stall[0] != self.sent_total:
                self._stall = (self.sent_total, now)
            elif now - self._stall[1] >= server.request_timeout:
                log.info("%s read nothing of its answer for %g s (request_timeout): closed",
                         self.addr[0] if self.addr else "a client", server.request_timeout)
                self._abort()
        else:
            self._stall = None
            if not self.requests and request is None and wall - self.last_activity >= KEEPALIVE:
                self.will_close = True

    def _abort(self) -> None:
        """Drop a connection whose client reads nothing: its send buffer is full, so it would
        never be reported writable (where waitress closes). Shut down both ways (reset on close:
        the unsent answer is abandoned), the poll reports a hang-up, and its handler closes it,
        which wakes a thread waiting to write more of the answer."""
        self.will_close = True
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _time_out(self, request: _Request) -> None:
        with self.requests_lock:
            if self.request is not request:
                return
            seconds = self.server.request_timeout
            request.error = RequestTimeout(
                f"the request was not received within {seconds:g} s (request_timeout)")
            request.completed = True
            if not request.headers_finished:  # the version is not parsed yet: answer as 1.1
                first_line = request.header_plus.lstrip().split(b"\r\n", 1)[0]
                request.version = "1.0" if first_line.endswith(b" HTTP/1.0") else "1.1"
            self.request = None
            self.timed_out = True
            self.requests.append(request)
            if len(self.requests) == 1:  # else the running request's end queues it
                self.server.add_task(self)


class _Server(TcpWSGIServer):
    channel_class = _Channel
    request_timeout = 10.0

    def maintenance(self, now):
        monotonic = time.monotonic()
        for channel in list(self.active_channels.values()):
            channel.check_deadlines(now, monotonic)


def _access_logged(app: Callable) -> Callable:
    """``app`` logging one line per request: client, method, path, status, time."""

    def logged(environ, start_response) -> Iterable[bytes]:
        started = time.perf_counter()
        status = ["-"]

        def start(code, headers, exc_info=None):
            status[0] = code.split(" ", 1)[0]
            return start_response(code, headers, exc_info)

        try:
            return app(environ, start)
        finally:
            access_log.info('%s "%s %s %s" %s %.0f ms', environ.get("REMOTE_ADDR", "-"),
                            environ.get("REQUEST_METHOD"), printable(environ.get("PATH_INFO", ""),
                                                                     200),
                            environ.get("SERVER_PROTOCOL"), status[0],
                            (time.perf_counter() - started) * 1000)

    return logged


def raise_open_files_limit(connections: int) -> int:
    """Raise this process's soft open-files limit to fit ``connections`` (each may hold
    :data:`FILES_PER_CONNECTION`); returns the soft limit now in force."""
    wanted = connections * FILES_PER_CONNECTION + FILES_RESERVED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < wanted:
        log.warning("max_connections=%d wants %d open files, the hard limit allows %d: raise it "
                    "(ulimit -Hn, LimitNOFILE=) or lower max_connections", connections, wanted,
                    new)
    return new


def make_server(app: Callable, settings: Any, host: str, port: int,
                threads: int = DEFAULT_THREADS, access: bool = False) -> MultiSocketServer:
    """The server, listening on ``host:port`` (0: a free port; ``.effective_listen`` says
    which); ``.run()`` serves until ``.close()`` (or SIGINT/SIGTERM under :func:`run`).

    ``settings``: the :class:`~sam_backend.settings.Settings` whose ``request_timeout``,
    ``max_request_mb`` and ``max_connections`` apply."""
    raise_open_files_limit(settings.max_connections)
    adj = Adjustments(
        host=host, port=port, threads=threads,
        connection_limit=settings.max_connections,
        max_request_body_size=int(settings.max_request_mb * MIB) + 1,
        channel_timeout=int(KEEPALIVE),
        channel_request_lookahead=1,  # see a client that disconnects while its request runs
        asyncore_use_poll=True,  # select() cannot watch descriptors past 1024
        expose_tracebacks=False)
    adj.cleanup_interval = adj.asyncore_loop_timeout = TICK  # waitress takes whole seconds only
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(threads)
    socket_map: dict = {}
    if access:
        app = _access_logged(app)
    listening = []
    try:
        for sockinfo in adj.listen:
            server = _Server(app, socket_map, dispatcher=dispatcher, adj=adj, sockinfo=sockinfo)
            server.request_timeout = float(settings.request_timeout)
            listening.append((server.effective_host, server.effective_port))
    except BaseException:
        dispatcher.shutdown()
        for server in list(socket_map.values()):
            server.close()
        raise
    return MultiSocketServer(socket_map, adj, listening, dispatcher, log.info)


def run(app: Callable, settings: Any, host: str, port: int, threads: int = DEFAULT_THREADS,
        access: bool = False) -> None:
    """Serve ``app`` on ``host:port`` until SIGINT or SIGTERM (then return: exit status 0).

    Raises OSError when it cannot listen there (the address is in use, ...)."""
    server = make_server(app, settings, host, port, threads, access)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_signal)
    for listen_host, listen_port in server.effective_listen:
        shown = f"[{listen_host}]" if ":" in str(listen_host) else listen_host
        log.info("serving on http://%s:%s (%d threads, request_timeout %g s, max_connections %d)",
                 shown, listen_port, threads, settings.request_timeout, settings.max_connections)
    server.run()


def _exit_on_signal(signum, _frame):
    raise SystemExit(0)  # waitress's loop stops its threads and closes every connection
