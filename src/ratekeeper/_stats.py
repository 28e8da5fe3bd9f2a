"""Statistics snapshots and events of the limiter."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any, final

import attrs

__all__ = ["LimiterEvent", "LimiterStatistics", "PoolStatistics"]


@final
@attrs.frozen
class PoolStatistics:
    """A snapshot of one pool.

    ``limits`` are per minute, ``levels`` what each bucket holds now,
    ``capacity`` what it can hold (the per-minute limit times ``burst``).
    ``utilization`` is, per dimension, the fraction of the per-minute limit
    admitted over the last 60 seconds of the limiter's clock.
    """

    name: str
    limits: Mapping[str, float]
    levels: Mapping[str, float]
    capacity: Mapping[str, float]
    burst: float
    in_flight: int
    queue_depth: int
    granted: int
    wait_p50: float
    wait_p99: float
    rate_limited: int
    rate_limited_predicted: int
    overloaded: int
    resyncs: int
    paused_for: float
    pause_reason: str
    utilization: Mapping[str, float]


@final
@attrs.frozen
class LimiterStatistics:
    """A snapshot of the whole limiter: one ``PoolStatistics`` per pool."""

    time: float
    pools: Mapping[str, PoolStatistics]
    wallet_balance: float | None
    spend_limited: bool

    def __getitem__(self, pool: str) -> PoolStatistics:
        return self.pools[pool]


@final
@attrs.frozen
class LimiterEvent:
    """Something the limiter did or learned, passed to the ``on_event`` hook.

    ``kind`` is one of ``grant``, ``pause``, ``resync``, ``limit_change``,
    ``rate_limited``, ``overloaded``, ``spend_limit``, ``unified_warning``,
    ``burst_change``, ``insufficient_credits``.
    """

    kind: str
    pool: str
    time: float
    detail: Mapping[str, Any] = attrs.field(factory=dict)


class WaitSamples:
    """The most recent wait times (bounded), for p50/p99."""

    __slots__ = ("_samples",)

    def __init__(self, size: int = 2048) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, wait: float) -> None:
        self._samples.append(wait)

    def quantile(self, q: float) -> float:
        if not self._samples:
            return 0.0
        ordered = sorted(self._samples)
        index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[index]


class AdmittedWindow:
    """Admitted amounts over the last ``span`` seconds, for utilization.

    Adding is an append and one comparison (it sits on the grant path);
    the sums are computed only when statistics are asked for.
    """

    __slots__ = ("_entries", "_span")

    def __init__(self, span: float = 60.0) -> None:
        self._span = span
        self._entries: deque[tuple[float, Mapping[str, float], float]] = deque()

    def add(self, now: float, draws: Mapping[str, float], sign: float = 1.0) -> None:
        entries = self._entries
        entries.append((now, draws, sign))
        if entries[0][0] <= now - self._span:
            self._expire(now)

    def _expire(self, now: float) -> None:
        entries = self._entries
        cutoff = now - self._span
        while entries and entries[0][0] <= cutoff:
            entries.popleft()

    def totals(self, now: float) -> dict[str, float]:
        self._expire(now)
        out: dict[str, float] = {}
        for _, draws, sign in self._entries:
            for dim, amount in draws.items():
                out[dim] = out.get(dim, 0.0) + sign * amount
        return out
