"""HTTP layer: gunicorn's threaded worker with a deadline for receiving each request.

gunicorn's ``gthread`` worker hands a connection to a thread once it becomes readable and then
reads the request with a blocking socket that has no timeout: a client that sends half a header,
or announces a large body and goes quiet, holds that thread for as long as it likes, and eight
such clients take every thread (``/health`` then stops answering). This worker gives every
request ``request_timeout`` seconds in total, from the moment a thread takes the connection, to
arrive (headers and body); a client that is slower gets its connection closed (or, when the
application is already reading the body, a 408). Sending the response is bounded the same way
per send (by the kernel, ``SO_SNDTIMEO``). Everything else is gunicorn's ``gthread``.
"""
from __future__ import annotations

import socket
import struct
import time
import weakref

from gunicorn.workers.gthread import ThreadWorker

_DEADLINES: "weakref.WeakKeyDictionary[socket.socket, float]" = weakref.WeakKeyDictionary()
LINGER = 0.2  # seconds a closing connection waits for the peer's FIN


def _armed(name: str, arm: str):
    """``socket.socket.<name>`` that first calls ``self.<arm>()`` (sets the timeout it runs under)."""
    base = getattr(socket.socket, name)

    def method(self, *args):
        getattr(self, arm)()
        return base(self, *args)

    method.__name__ = name
    return method


class _DeadlineSocket(socket.socket):
    """A socket whose reads share one deadline per request (set when gunicorn makes the socket
    blocking for a new request) and whose sends each get ``timeout`` seconds."""

    __slots__ = ()
    request_timeout = 10.0

    def setblocking(self, flag: bool) -> None:
        if flag:
            _DEADLINES[self] = time.monotonic() + self.request_timeout
            super().settimeout(self.request_timeout)
        else:
            super().setblocking(False)

    def _arm(self) -> None:
        deadline = _DEADLINES.get(self)
        if deadline is None or self.gettimeout() == 0.0:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("the request was not received within request_timeout")
        super().settimeout(remaining)

    def shutdown(self, how: int) -> None:
        # gunicorn closes "gracefully" on its main loop: after shutting down the write side it
        # waits up to 2 s for the peer's FIN. A stalled peer never sends one, and a few of them
        # would hold the loop (and every new connection, /health included) for seconds: the
        # wait is cut to LINGER.
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            _DEADLINES[self] = time.monotonic() + LINGER
        super().shutdown(how)

    def _arm_send(self) -> None:
        if self.gettimeout() != 0.0:
            # a blocking send bounded by the kernel (SO_SNDTIMEO): a large answer goes out in
            # one system call instead of Python's poll-and-send loop of a socket with a timeout
            super().settimeout(None)
            seconds = self.request_timeout
            self.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))
            # the request has been read and answered: reads after the response (gunicorn drains
            # an unread body before keeping the connection alive) get a window of their own,
            # so a slow answer does not cost the client its kept-alive connection
            _DEADLINES[self] = time.monotonic() + self.request_timeout

    recv = _armed("recv", "_arm")
    recv_into = _armed("recv_into", "_arm")
    send = _armed("send", "_arm_send")
    sendall = _armed("sendall", "_arm_send")


class DeadlineThreadWorker(ThreadWorker):
    """``gthread`` with :class:`_DeadlineSocket` connections; set ``request_timeout`` (seconds)
    with :func:`worker_class` before gunicorn forks."""

    def handle(self, conn):
        if type(conn.sock) is socket.socket:
            conn.sock.__class__ = _DeadlineSocket
        return super().handle(conn)


def worker_class(request_timeout: float) -> type:
    """The worker class, its connections bounded by ``request_timeout`` seconds."""
    _DeadlineSocket.request_timeout = float(request_timeout)
    return DeadlineThreadWorker
