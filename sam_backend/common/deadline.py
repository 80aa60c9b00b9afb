"""How long a request's work may go on: a deadline, and whether its client is still there.

One :class:`WorkScope` per request, made by the HTTP layer and handed down (the service, the
concept pass, the image loader) to every step that can take long. Each such step calls
:meth:`WorkScope.check` between units of work (a task, a label, a phrase, a chunk) so that work
whose client has gone, or whose time is up, stops instead of going on for nobody.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

from sam_backend.errors import BusyError, SamBackendError


class ClientGone(SamBackendError):
    """The client closed its connection: the request's work was stopped (nobody reads it)."""


class WorkScope:
    """``seconds`` from now (``inf``: no deadline); ``cancelled()`` true once the client left.

    ``what`` names the option that sets the bound, for the message (``request_timeout``,
    ``concept_timeout``).
    """

    def __init__(self, seconds: float = math.inf,
                 cancelled: Optional[Callable[[], bool]] = None, what: str = "the request"):
        self.seconds = float(seconds)
        self.deadline = time.monotonic() + self.seconds
        self.cancelled = cancelled
        self.what = what

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def client_gone(self) -> bool:
        try:
            return bool(self.cancelled and self.cancelled())
        except Exception:  # a closed channel may raise instead of answering
            return True

    def check(self, doing: str = "the work") -> None:
        """Raise :class:`ClientGone` when the client has left, :class:`BusyError` (503, retry)
        when the time is up; return at once otherwise."""
        if self.client_gone():
            raise ClientGone(f"the client disconnected: {doing} stopped")
        if self.expired():
            raise BusyError(f"{doing} did not finish within {self.seconds:g} s ({self.what}): "
                            f"retry, or ask for less at once")


UNBOUNDED = WorkScope()
