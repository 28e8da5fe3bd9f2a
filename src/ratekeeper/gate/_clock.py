"""The gate's one clock: the event loop's time in async code, a thread's view of it elsewhere.

Every time the gate reads (grants, deadlines, refills) comes from ``GateClock.now``.
Under asyncio that is the loop's clock, under trio trio's (which may be virtual, as
trio's ``MockClock`` is); in a plain thread it is ``time.monotonic`` moved onto the
event loop's clock as last seen, so times taken in threads and in tasks agree.
A user's ``clock=`` replaces all of that.

``offset`` shifts every reading by a constant, which changes nothing the gate
does (it only ever compares and subtracts its own readings): tests set a random
one (``RATEKEEPER_CLOCK_OFFSET`` is read at construction) so that a stray
``time.monotonic()`` mixed with the gate's times fails loudly, as trio's
``SystemClock`` does with its random offset.
"""

from __future__ import annotations

import os
import sys
import time
from asyncio import AbstractEventLoop, BaseEventLoop
from asyncio import _get_running_loop as _running_loop
from collections.abc import Callable
from typing import final

import anyio
import sniffio

__all__ = ["GateClock", "in_async_context"]

_BASE_LOOP_TIME = BaseEventLoop.time  # ``return time.monotonic()``


@final
class GateClock:
    """Seconds, from ``user`` if given, else the running event loop, else a thread's estimate of it."""

    __slots__ = ("_thread_offset", "monotonic_loop", "offset", "user")

    def __init__(self, user: Callable[[], float] | None = None, *, offset: float | None = None) -> None:
        self.user = user
        if offset is None:
            offset = float(os.environ.get("RATEKEEPER_CLOCK_OFFSET", "0") or 0)
        self.offset = offset if user is None else 0.0
        self._thread_offset = 0.0
        #: the last asyncio loop seen whose ``time()`` is ``time.monotonic()`` itself (asyncio's
        #: own loops; not uvloop's): the fast paths read the clock without the method's call
        self.monotonic_loop: AbstractEventLoop | None = None

    def now(self) -> float:
        """The current time on the gate's clock."""
        user = self.user
        if user is not None:
            return user()
        loop = _running_loop()
        if loop is not None:  # asyncio: what anyio.current_time() returns, without its lookups
            if loop is self.monotonic_loop:
                return time.monotonic() + self.offset
            return self.loop_time(loop) + self.offset
        if "trio" not in sys.modules:
            # no trio loop can run without trio imported, and asyncio's was looked for above:
            # a plain thread, known without anyio's lookup and the exception it raises here
            return time.monotonic() + self._thread_offset + self.offset
        try:
            now = anyio.current_time()
        except (RuntimeError, sniffio.AsyncLibraryNotFoundError):
            # a plain thread: time.monotonic, moved onto the event loop's clock as last seen
            # (asyncio's is time.monotonic itself; trio's is offset from it)
            return time.monotonic() + self._thread_offset + self.offset
        self._thread_offset = now - time.monotonic()
        return now + self.offset

    def loop_time(self, loop: AbstractEventLoop) -> float:
        """``loop.time()``, noting the loop as ``monotonic_loop`` if that is ``time.monotonic()``."""
        if type(loop).time is _BASE_LOOP_TIME:
            self.monotonic_loop = loop
        return loop.time()

    def __repr__(self) -> str:
        source = "user clock" if self.user is not None else "event loop"
        return f"<GateClock {source} offset={self.offset:g}>"


def in_async_context() -> bool:
    """Whether ``sniffio.current_async_library()`` names a library (else it raises).

    In a plain thread sniffio raises twice to say no (asyncio's ``current_task``, then
    its own error), ~4 us a sync request asks it twice for. Each place it looks is read
    here first without raising: when all say no, so would it.
    """
    if (
        _running_loop() is None
        and sniffio.thread_local.name is None
        and sniffio.current_async_library_cvar.get() is None
        and "curio" not in sys.modules
    ):
        return False
    try:
        sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return False
    return True
