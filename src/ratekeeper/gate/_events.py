"""Where the limiter's events go: INFO lines a person can read, and the ``on_event`` hook.

Both engines (the local ``Limiter`` and the Redis one) raise every event through
``Limiter._emit``, which hands it to ``EventLog.record`` and, if there is a hook,
to ``HookLock.post``. ``EventLog`` is pure: it takes the event's time, so what
it says and holds back is the same in a test with a fake clock as in production.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Final

from ratekeeper.core._stats import LimiterEvent

__all__ = ["LOG_EVERY", "SLOW_WAIT", "EventLog", "HookLock"]

#: At most one INFO line per pool and kind of event in this many seconds of the limiter's
#: clock; the lines held back are counted in the next one (a storm of 429s is one line per
#: pool every 10 s, not one per request).
LOG_EVERY: Final = 10.0
#: A request that waited at least this long in the queue is said at INFO; shorter waits at DEBUG.
SLOW_WAIT: Final = 5.0

#: The kinds said at INFO. ``spend_limit`` and ``unified_warning`` have their own ERROR and
#: WARNING lines; ``resync`` (a correction on every response) and quick grants are DEBUG.
_INFO_KINDS: Final = frozenset(
    {"rate_limited", "pause", "limit_change", "burst_change", "share_change", "transit_change", "overloaded"}
)
#: The kinds said at WARNING: the limit itself cannot be used as configured.
_WARNING_KINDS: Final = frozenset({"bucket_too_small"})
#: ``LogRecord`` attributes: an ``extra`` key among them makes ``logging`` raise.
_RESERVED: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _seconds(value: object) -> str:
    return f"{value:.3g} s" if isinstance(value, int | float) else repr(value)


def _say(kind: str, pool: str, detail: Mapping[str, Any]) -> str:
    """The line for one event, in words."""
    if kind == "rate_limited":
        known = "predicted" if detail.get("predicted") else "not predicted"
        return f"{pool}: 429 rate limited ({known}); retrying after {_seconds(detail.get('retry_after'))}"
    if kind == "pause":
        return f"{pool}: paused for {_seconds(detail.get('seconds'))} ({detail.get('reason')})"
    if kind == "limit_change":
        limits = ", ".join(f"{dim}={value:g}" for dim, value in detail.items())
        return f"{pool}: limit now {limits} per minute"
    if kind == "burst_change":
        burst = detail.get("burst", 1.0)
        how = "bucket length fitted to the headers" if detail.get("from") == "headers" else "burst now"
        return f"{pool}: {how}: {burst:.3g} of a minute's limit ({burst * 60.0:.3g} s of refill)"
    if kind == "share_change":
        return f"{pool}: counting on {detail.get('share', 1.0):.0%} of the refill (others use the same limit)"
    if kind == "transit_change":
        return (
            f"{pool}: requests are taken to reach the server up to {_seconds(detail.get('transit'))}"
            " after they are sent (a refusal the reports did not foresee)"
        )
    if kind == "overloaded":
        return f"{pool}: 529 overloaded; backing off {_seconds(detail.get('backoff'))}"
    if kind == "grant":
        return f"{pool}: a request waited {_seconds(detail.get('waited'))} in the queue"
    if kind == "bucket_too_small":
        return (
            f"{pool}: the server's {detail.get('dimension')} bucket holds {detail.get('capacity', 0):,.0f},"
            f" less than a request reserves ({detail.get('reserved', 0):,.0f}): each such request waits for"
            " a full bucket and leaves it in debt; lower max_tokens or send smaller requests"
        )
    return f"{pool}: {kind} {dict(detail)}"


class EventLog:
    """Says the limiter's events on a logger: what a user should hear at INFO, the rest at DEBUG.

    Each line carries ``extra`` fields: ``event`` (the kind), ``pool``, the event's
    detail (``seconds``, ``reason``, ``predicted``, ``retry_after``, ``burst``,
    ``share``, ``dimension``, ``waited``...; a limit change's new values as ``limits``)
    and ``suppressed``, the lines of that pool and kind held back since the last one.
    Not thread-safe by itself: the limiter calls it under its lock.
    """

    __slots__ = ("_every", "_held", "_last", "_logger", "_slow")

    def __init__(
        self, logger: logging.Logger, every: float = LOG_EVERY, slow_wait: float = SLOW_WAIT
    ) -> None:
        self._logger = logger
        self._every = every
        self._slow = slow_wait
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}

    def debug_on(self) -> bool:
        """Whether a DEBUG line (a ``resync``, a quick grant) would be logged at all."""
        return self._logger.isEnabledFor(logging.DEBUG)

    def record(self, kind: str, pool: str, now: float, detail: Mapping[str, Any]) -> None:
        """Log one event raised at ``now`` (the limiter's clock)."""
        info = kind in _INFO_KINDS or (kind == "grant" and detail.get("waited", 0.0) >= self._slow)
        level = logging.WARNING if kind in _WARNING_KINDS else logging.INFO if info else logging.DEBUG
        logger = self._logger
        if not logger.isEnabledFor(level):
            return
        held = 0
        if info:
            key = (pool, kind)
            last = self._last.get(key)
            # a clock that went back (another engine's time) does not silence the pool for long
            if last is not None and last <= now < last + self._every:
                self._held[key] = self._held.get(key, 0) + 1
                return
            if len(self._last) >= 1024:  # pool names come from configuration, but stay bounded
                self._last.clear()
                self._held.clear()
            self._last[key] = now
            held = self._held.pop(key, 0)
        message = _say(kind, pool, detail)
        if held:
            message += f" (and {held} more like it in the last {self._every:g} s)"
        logger.log(level, "%s", message, extra=self._extra(kind, pool, detail, held))

    @staticmethod
    def _extra(kind: str, pool: str, detail: Mapping[str, Any], held: int) -> dict[str, Any]:
        extra: dict[str, Any] = {"event": kind, "pool": pool, "suppressed": held}
        if kind == "limit_change":
            extra["limits"] = dict(detail)
            if len(detail) == 1:
                extra["dimension"] = next(iter(detail))
            return extra
        for name, value in detail.items():
            extra[f"detail_{name}" if name in _RESERVED or name in extra else name] = value
        return extra


class HookLock:
    """The limiter's lock when it has an ``on_event`` hook: the hook runs after the lock is let go.

    Events posted while the lock is held are queued and delivered, in order, by the
    thread that raised them, once it releases: a slow hook holds up no other thread,
    and a hook may call back into the limiter. With no hook the limiter keeps a plain
    ``threading.Lock`` (the uncontended path is timed in nanoseconds).
    """

    __slots__ = ("_deliver", "_lock", "_owner", "_pending")

    def __init__(self, deliver: Callable[[LimiterEvent], None]) -> None:
        self._lock = threading.Lock()
        self._deliver = deliver
        self._owner: int | None = None
        self._pending: list[LimiterEvent] = []

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._lock.acquire(blocking, timeout)
        if got:
            self._owner = threading.get_ident()
        return got

    def release(self) -> None:
        self._owner = None
        pending = self._pending
        if not pending:
            self._lock.release()
            return
        self._pending = []  # swapped under the lock: only its holder appends
        self._lock.release()
        for event in pending:
            self._deliver(event)

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def post(self, event: LimiterEvent) -> None:
        """Deliver ``event`` now, or, if this thread holds the lock, as soon as it lets go."""
        if self._owner == threading.get_ident():
            self._pending.append(event)
        else:
            self._deliver(event)
