"""Clocks for the sync transport: real time, or virtual time that jumps when slept on."""

from __future__ import annotations

import threading
import time
from typing import Protocol, final

__all__ = ["Clock", "RealClock", "VirtualClock"]


class Clock(Protocol):
    """A time source with its own sleep, for the sync transport."""

    def now(self) -> float:
        """Seconds, monotonic."""

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""


@final
class RealClock:
    """Wall-clock time: ``time.monotonic`` and ``time.sleep``."""

    def now(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        """``time.sleep``."""
        if seconds > 0:
            time.sleep(seconds)


@final
class VirtualClock:
    """A clock that only moves when slept on: ``sleep(d)`` advances it by ``d`` at once."""

    def __init__(self, start: float = 0.0) -> None:
        self._t = float(start)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"VirtualClock(now={self._t:.3f})"

    def now(self) -> float:
        """The virtual time."""
        return self._t

    def sleep(self, seconds: float) -> None:
        """Advance by ``seconds`` without waiting."""
        if seconds > 0:
            with self._lock:
                self._t += seconds

    def advance(self, seconds: float) -> None:
        """Same as ``sleep``: move time forward."""
        self.sleep(seconds)
