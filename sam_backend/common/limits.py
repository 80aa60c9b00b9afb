"""Bounds on what requests may take: memory across concurrent image loads, concurrent loads,
and how much of a client's input is echoed back.

The limits' values are options (:class:`~sam_backend.settings.Settings`, the README's "Limits"
table); this module holds the mechanisms:

* :class:`MemoryBudget`: downloaded bytes and decoded pixels of every image being loaded at once,
  the full-size masks of clicks being answered and the results (regions, their JSON) of every
  /predict until its answer is sent stay under one byte budget. A load reserves as it goes
  (download chunks, then the decode's estimated peak once the header gives the size); when the
  budget is full it waits, up to a deadline, and then fails with 503. A single image that needs
  more than the whole budget fails at once with 400. A reservation can give part of what it
  holds back (:meth:`Reservation.shrink`: a task's working memory once only its result is kept)
  and can outlive a ``with`` block (:meth:`MemoryBudget.hold`: a response until it is sent).
* :class:`LoadGate`: at most N holders at once (requests decoding and encoding a new image;
  downloads); more are refused with 503 right away instead of holding a server thread each (a
  host that never answers must not take every thread, or ``/health`` stops answering).
* :func:`shown` and :func:`printable`: a client's value in an error message is printable and
  short.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sized

from sam_backend.errors import BusyError, ImageError, RequestError

MIB = 1024 * 1024
# after a load that reserved this much, freed memory is handed back to the system at once
RELEASE_AFTER_BYTES = 64 * MIB

log = logging.getLogger(__name__)


_trim = threading.Event()  # set when a large load or mask has finished since the last trim


def release_memory() -> None:
    """Collect unreachable objects and hand the C heap's free pages back to the system
    (glibc keeps freed heap mapped otherwise: see "Memory notes" in benchmarks/README.md)."""
    _trim.clear()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def release_memory_if_due() -> None:
    """:func:`release_memory` if a large reservation ended since the last call (the server calls
    this after each request, when the request's own objects are gone)."""
    if _trim.is_set():
        release_memory()


def printable(text: str, limit: int) -> str:
    """``text`` with control and other unprintable characters replaced by ``?``, whitespace runs
    collapsed, cut to ``limit`` characters (``...`` marks a cut)."""
    text = " ".join(str(text).split())
    text = "".join(c if c.isprintable() else "?" for c in text[:limit + 1])
    return text if len(text) <= limit else text[:max(0, limit - 3)] + "..."


def check_count(items: Sized, limit: int, holder: str, unit: str, option: str) -> None:
    """A RequestError (400) when ``items`` holds more than ``limit`` entries, e.g. "the request
    has 70 tasks, more than the limit of 64 (max_tasks)"; ``option`` is the setting to raise."""
    if len(items) > limit:
        raise RequestError(f"{holder} has {len(items)} {unit}, more than the limit of {limit} "
                           f"({option})")


def shown(value: Any, limit: int = 60) -> str:
    """A client-sent value as it may appear in an error message: its repr, printable, short."""
    try:
        text = repr(value) if not isinstance(value, str) else repr(value[:limit + 2])
    except Exception:  # noqa: BLE001 - a repr must never fail an error message
        text = f"<{type(value).__name__}>"
    return printable(text, limit)


class MemoryBudget:
    """A byte budget shared by concurrent loads (thread-safe)."""

    def __init__(self, max_bytes: int, name: str = "image_memory_mb"):
        self.max_bytes = int(max_bytes)
        self.name = name
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def reservation(self, wait_seconds: float) -> Iterator["Reservation"]:
        """A reservation that grows as the load goes and is returned in full at the end;
        waiting for room ends ``wait_seconds`` from now."""
        held = self.hold(wait_seconds)
        try:
            yield held
        except BaseException:
            big = held.held >= RELEASE_AFTER_BYTES
            held.release()
            if big:
                release_memory()
            raise
        finally:
            held.release()

    def hold(self, wait_seconds: float) -> "Reservation":
        """An empty reservation that the caller releases (:meth:`Reservation.release`) when what
        it counts is gone, e.g. a response once it has been sent; waiting for room ends
        ``wait_seconds`` from now unless a :meth:`Reservation.grow` gives its own wait."""
        return Reservation(self, time.monotonic() + wait_seconds)

    def _take(self, nbytes: int, deadline: float, what: str = "") -> None:
        with self._cond:
            while self.used + nbytes > self.max_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BusyError(
                        f"the backend's memory for images and results is in use ("
                        f"{self.used // MIB} MiB of {self.name}={self.max_bytes // MIB})"
                        + (f", no room for {what}" if what else "") + ": retry in a moment")
                self._cond.wait(remaining)
            self.used += nbytes
            self.peak = max(self.peak, self.used)

    def _give(self, nbytes: int) -> None:
        if nbytes:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


class Reservation:
    def __init__(self, budget: MemoryBudget, deadline: float):
        self.budget = budget
        self.deadline = deadline
        self.held = 0

    def grow(self, nbytes: int, what: str, wait: Optional[float] = None,
             advice: str = "downscale it") -> None:
        """Reserve ``nbytes`` more for ``what`` (an image, for messages); ``wait``: seconds
        from now to wait for room (default: until the reservation's deadline). 400 when this
        reservation alone would need more than the whole budget (the message ends with
        ``advice``, "or raise <the budget's option>"), 503 when there is no room in time."""
        nbytes = int(nbytes)
        if nbytes <= 0:
            return
        budget = self.budget
        if self.held + nbytes > budget.max_bytes:
            raise ImageError(
                f"{what} needs more than {budget.max_bytes // MIB} MiB of memory "
                f"({budget.name}): {advice}, or raise {budget.name}")
        deadline = self.deadline if wait is None else time.monotonic() + max(0.0, wait)
        budget._take(nbytes, deadline, what)
        self.held += nbytes

    def shrink(self, nbytes: int) -> None:
        """Give ``nbytes`` of what is held back (at most all of it): memory that is gone
        while the rest is still in use."""
        nbytes = min(max(0, int(nbytes)), self.held)
        self.held -= nbytes
        self.budget._give(nbytes)
        if nbytes >= RELEASE_AFTER_BYTES:
            _trim.set()

    def release(self) -> None:
        held, self.held = self.held, 0
        self.budget._give(held)
        if held >= RELEASE_AFTER_BYTES:
            _trim.set()


class LoadGate:
    """At most ``slots`` holders at once; :meth:`admit` never waits. ``doing``: what the holders
    do, for the 503's message (``{held}`` is their number)."""

    def __init__(self, slots: int, name: str = "max_concurrent_loads",
                 doing: str = "loading {held} new images"):
        self.slots = int(slots)
        self.name = name
        self.doing = doing
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        return self._held

    def _busy(self) -> BusyError:
        return BusyError(f"the backend is {self.doing.format(held=self._held)} already "
                         f"({self.name}={self.slots}): retry in a moment")

    def check(self) -> None:
        """The 503 :meth:`admit` would raise now, before work that leads to it is started (a
        slot may still be gone when :meth:`admit` is called)."""
        with self._lock:
            if self._held >= self.slots:
                raise self._busy()

    @contextmanager
    def admit(self) -> Iterator[None]:
        with self._lock:
            if self._held >= self.slots:
                raise self._busy()
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1
