"""Future server events (settlements, progressive charges, batch ends), applied in time order."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

import attrs

__all__ = ["Scheduler"]

Action = Callable[[float], None]


@attrs.define(order=False)
class _Item:
    at: float
    seq: int
    owner: str
    action: Action
    cancelled: bool = False

    def __lt__(self, other: _Item) -> bool:
        return (self.at, self.seq) < (other.at, other.seq)


class Scheduler:
    """A heap of actions, each run once at its time, cancellable by owner."""

    def __init__(self) -> None:
        self._heap: list[_Item] = []
        self._by_owner: dict[str, list[_Item]] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def at(self, when: float, owner: str, action: Action) -> None:
        """Run ``action(when)`` once the server reaches ``when``."""
        item = _Item(when, next(self._seq), owner, action)
        heapq.heappush(self._heap, item)
        self._by_owner.setdefault(owner, []).append(item)

    def run_until(self, now: float) -> None:
        """Run every pending action due at or before ``now``, earliest first."""
        while self._heap and self._heap[0].at <= now:
            item = heapq.heappop(self._heap)
            items = self._by_owner.get(item.owner)
            if items is not None:
                items.remove(item)
                if not items:
                    del self._by_owner[item.owner]
            if not item.cancelled:
                item.action(item.at)

    def cancel(self, owner: str) -> int:
        """Cancel ``owner``'s pending actions; returns how many there were."""
        items = self._by_owner.pop(owner, [])
        for item in items:
            item.cancelled = True
        return len(items)

    def pending(self, owner: str) -> bool:
        """True if ``owner`` has actions still to run."""
        return bool(self._by_owner.get(owner))

    @property
    def next_time(self) -> float | None:
        """When the earliest pending action is due."""
        return self._heap[0].at if self._heap else None
