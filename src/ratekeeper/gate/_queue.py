"""The wait queue: waiters in line by priority (higher first), first come first served within one.

It knows nothing of buckets, costs or waking (trio's ``ParkingLot`` is the model): an
engine decides who may go and changes a waiter's state; the queue keeps the order and
forgets whoever is no longer waiting when it next meets them. The priorities present
are a binary heap, so a level appearing or emptying costs O(log p) for ``p`` distinct
priorities waiting, wherever it falls in the order (a sorted list moved ``p`` machine
words each time); a queue of tens of thousands of waiters at as many priorities costs
about what a short one does.
"""

from __future__ import annotations

import enum
import heapq
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

    __slots__ = ("_compact_at", "_heap", "_levels", "stored")

    def __init__(self) -> None:
        self._levels: dict[int, deque[W]] = {}
        # The priorities present, negated, as a min-heap: the head's level is ``-heap[0]``. It
        # holds exactly the keys of ``_levels``: a level that empties stays (empty) until it
        # reaches the top or a compaction pass rebuilds the heap.
        self._heap: list[int] = []
        #: waiters held, whether still waiting or not (``bool(queue)``, without the call)
        self.stored = 0
        self._compact_at = _SLACK

    def __bool__(self) -> bool:
        """Whether the queue holds any waiter at all (some may have left the line)."""
        return self.stored > 0

    def __len__(self) -> int:
        """How many waiters the queue holds, still waiting or not (``first`` counts the waiting)."""
        return self.stored

    def push(self, waiter: W) -> None:
        """``waiter`` joins the end of its priority's line."""
        level = self._levels.get(waiter.priority)
        if level is None:
            level = self._levels[waiter.priority] = deque()
            heapq.heappush(self._heap, -waiter.priority)
        level.append(waiter)
        self.stored += 1
        if self.stored > self._compact_at or len(self._levels) > self._compact_at:
            self._compact()

    def head(self) -> W | None:
        """The next waiter in line, or ``None``: those met before it that left are dropped."""
        heap, levels = self._heap, self._levels
        while heap:
            priority = -heap[0]
            level = levels[priority]
            self._trim(level)
            if level:
                return level[0]
            del levels[priority]
            heapq.heappop(heap)
        return None

    def first(self, n: int) -> list[W]:
        """Up to ``n`` waiters still waiting, in line order (a list: the caller may grant them)."""
        out: list[W] = []
        head = self.head()  # also drops the emptied levels at the top
        if head is None or n <= 0:
            return out
        heap, levels = self._heap, self._levels
        # The levels in order, read off the heap without changing it: a best-first walk of the
        # heap's tree (a parent sorts before its children), so only the levels the answer
        # reaches are touched, O(k log k) for k of them.
        frontier = [(heap[0], 0)]
        size = len(heap)
        while frontier:
            key, i = heapq.heappop(frontier)
            level = levels[-key]
            self._trim(level)  # an emptied level stays (empty) until it reaches the top
            for w in level:
                if w.state is _WAITING:
                    out.append(w)
                    if len(out) >= n:
                        return out
            child = 2 * i + 1
            if child < size:
                heapq.heappush(frontier, (heap[child], child))
                if child + 1 < size:
                    heapq.heappush(frontier, (heap[child + 1], child + 1))
        return out

    def waiting(self) -> Iterator[W]:
        """Every waiter still waiting, in line order, from a copy (the caller may change them)."""
        return iter(self.first(self.stored))

    def clear(self) -> None:
        """Forget every waiter (whoever still waits must have been told why by the caller)."""
        self._levels.clear()
        self._heap.clear()
        self.stored = 0
        self._compact_at = _SLACK

    def _trim(self, level: deque[W]) -> None:
        """Drop the waiters at the front of ``level`` that have left the line."""
        while level and level[0].state is not _WAITING:
            level.popleft()
            self.stored -= 1

    def _compact(self) -> None:
        # Waiters that left from the middle of a line stay until reached; this pass drops them all
        # once they outnumber the ones still waiting, so the queue's size follows the line's.
        for priority, level in list(self._levels.items()):
            kept = deque(w for w in level if w.state is _WAITING)
            self.stored -= len(level) - len(kept)
            if kept:
                self._levels[priority] = kept
            else:
                del self._levels[priority]
        self._heap = [-priority for priority in self._levels]
        heapq.heapify(self._heap)
        self._compact_at = 2 * self.stored + _SLACK
