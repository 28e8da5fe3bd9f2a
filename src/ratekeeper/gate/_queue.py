"""The wait queue: waiters in line by priority (higher first), first come first served within one.

It knows nothing of buckets, costs or waking (trio's ``ParkingLot`` is the model): an
engine decides who may go and changes a waiter's state; the queue keeps the order and
forgets whoever is no longer waiting when it next meets them. Every operation is
O(log p) comparisons for ``p`` distinct priorities waiting, plus a list move of
``p`` machine words when a priority level appears or empties (at 20,000 levels an
insert and a delete take about 4.6 us together, by timeit), so a queue of tens of
thousands of waiters costs about what a short one does.
"""

from __future__ import annotations

import bisect
import enum
from collections import deque
from collections.abc import Iterator
from typing import Final, Generic, Protocol, TypeVar, final

__all__ = ["WaitQueue", "WaiterState"]


class WaiterState(enum.Enum):
    """Where a waiter stands. Only ``WAITING`` is in line; the others have left it."""

    WAITING = "waiting"
    #: Admitted: its permit is ready for the task (or thread) to pick up.
    GRANTED = "granted"
    #: Refused for good (its cost can never fit, a spend limit, no credits): ``error`` says why.
    FAILED = "failed"
    #: Left the line (cancelled, timed out) before a grant, or gave its grant back.
    GONE = "gone"
    #: Handed to the local fallback while the shared backend was unavailable.
    FALLBACK = "fallback"


#: Waiters kept that left the line (granted, failed, gone) before the queue drops them in one
#: pass: never more than this many plus as many as there are still waiting.
_SLACK: Final = 64

_WAITING: Final = WaiterState.WAITING


class _Queued(Protocol):  # the part of a waiter the queue reads
    priority: int
    state: WaiterState


W = TypeVar("W", bound=_Queued)


@final
class WaitQueue(Generic[W]):
    """Waiters in line: the head is the oldest of the highest priority still waiting.

    >>> from types import SimpleNamespace as W
    >>> q = WaitQueue()
    >>> a, b, c = (W(priority=p, state=WaiterState.WAITING) for p in (0, 5, 0))
    >>> for w in (a, b, c):
    ...     q.push(w)
    >>> q.head() is b
    True
    >>> b.state = WaiterState.GRANTED      # an engine let it go
    >>> q.head() is a, q.first(5) == [a, c]
    (True, True)
    """

    __slots__ = ("_compact_at", "_levels", "_order", "_stored")

    def __init__(self) -> None:
        self._levels: dict[int, deque[W]] = {}
        self._order: list[int] = []  # the priorities present, ascending: the head's is last
        self._stored = 0  # waiters held, whether still waiting or not
        self._compact_at = _SLACK

    def __bool__(self) -> bool:
        """Whether the queue holds any waiter at all (some may have left the line)."""
        return self._stored > 0

    def __len__(self) -> int:
        """How many waiters the queue holds, still waiting or not (``first`` counts the waiting)."""
        return self._stored

    def push(self, waiter: W) -> None:
        """``waiter`` joins the end of its priority's line."""
        level = self._levels.get(waiter.priority)
        if level is None:
            level = self._levels[waiter.priority] = deque()
            bisect.insort(self._order, waiter.priority)
        level.append(waiter)
        self._stored += 1
        if self._stored > self._compact_at:
            self._compact()

    def head(self) -> W | None:
        """The next waiter in line, or ``None``: those met before it that left are dropped."""
        order, levels = self._order, self._levels
        while order:
            priority = order[-1]
            level = levels[priority]
            self._trim(level)
            if level:
                return level[0]
            del levels[priority]
            order.pop()
        return None

    def first(self, n: int) -> list[W]:
        """Up to ``n`` waiters still waiting, in line order (a list: the caller may grant them)."""
        out: list[W] = []
        if n <= 0:
            return out
        emptied: list[int] = []
        for priority in reversed(self._order):
            level = self._levels[priority]
            self._trim(level)
            if not level:
                emptied.append(priority)
                continue
            for w in level:
                if w.state is _WAITING:
                    out.append(w)
                    if len(out) >= n:
                        break
            if len(out) >= n:
                break
        for priority in emptied:
            self._drop_level(priority)
        return out

    def waiting(self) -> Iterator[W]:
        """Every waiter still waiting, in line order, from a copy (the caller may change them)."""
        return iter(self.first(self._stored))

    def clear(self) -> None:
        """Forget every waiter (whoever still waits must have been told why by the caller)."""
        self._levels.clear()
        self._order.clear()
        self._stored = 0
        self._compact_at = _SLACK

    def _trim(self, level: deque[W]) -> None:
        """Drop the waiters at the front of ``level`` that have left the line."""
        while level and level[0].state is not _WAITING:
            level.popleft()
            self._stored -= 1

    def _drop_level(self, priority: int) -> None:
        del self._levels[priority]
        del self._order[bisect.bisect_left(self._order, priority)]

    def _compact(self) -> None:
        # Waiters that left from the middle of a line stay until reached; this pass drops them all
        # once they outnumber the ones still waiting, so the queue's size follows the line's.
        for priority in list(self._order):
            level = self._levels[priority]
            kept = deque(w for w in level if w.state is _WAITING)
            self._stored -= len(level) - len(kept)
            if kept:
                self._levels[priority] = kept
            else:
                self._drop_level(priority)
        self._compact_at = 2 * self._stored + _SLACK
