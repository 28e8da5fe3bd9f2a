"""Statistics snapshots and events of the limiter."""

from __future__ import annotations

import datetime
import math
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, final

import attrs

from ratekeeper.errors import UnknownPoolError

__all__ = ["EventSummary", "LimiterEvent", "LimiterStatistics", "PoolStatistics"]


@final
@attrs.frozen
class EventSummary:
    """What a pool learned or went through, by kind of event: how often, how long ago, the last detail.

    ``kind`` is a ``LimiterEvent`` kind (``limit_change``, ``burst_change``,
    ``share_change``, ``pause``, ``rate_limited``, ``overloaded``); ``seconds_ago``
    counts back from the snapshot, ``at`` is the same moment as an aware UTC datetime.
    """

    kind: str
    count: int
    seconds_ago: float
    at: datetime.datetime
    detail: Mapping[str, Any]


@final
@attrs.frozen
class PoolStatistics:
    """A snapshot of one pool; ``str()`` (or ``format()``) says it in lines a person can read.

    ``limits`` are per minute, ``levels`` what each bucket holds now,
    ``capacity`` what it can hold (the per-minute limit times ``burst``).
    ``used`` is, per dimension, what was admitted (net of refunds) over the last
    60 seconds of the limiter's clock (to within a second). ``utilization`` is
    the share of what the bucket offered over those 60 seconds that was admitted:
    ``used / (used + level now)``, from 0 to 1. (A share of the per-minute limit
    could read 180% in a clean run: a full bucket plus a minute's refill may go in
    the first minute, as the server allows.) ``share`` is the fraction of the refill
    rate the pool counts on: below 1.0 after 429s that show other clients drawing on
    the same limit. Times are seconds from the snapshot (``paused_for``) or aware
    UTC datetimes (``paused_until``); ``events`` is what the pool learned or went
    through, by kind (see ``EventSummary``).
    ``resyncs`` counts corrections down from response headers, ``raised``
    corrections up (a reading of the reports' moment refuted gave back what it
    took). ``report_moment`` is what the headers have shown of the moment they
    describe: ``admission``, ``response``, ``mixed`` (each, in turn), or
    ``unknown`` so far (corrections then take the lower of the two readings).
    ``reported`` is, per dimension, the ``remaining`` of the last response
    headers that gave one (the server's word, next to the model's ``levels``);
    empty until a response reports.
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
    share: float = 1.0
    used: Mapping[str, float] = attrs.field(factory=dict)
    paused_until: datetime.datetime | None = None
    events: Mapping[str, EventSummary] = attrs.field(factory=dict)
    raised: int = 0
    report_moment: str = "unknown"
    reported: Mapping[str, float] = attrs.field(factory=dict)

    def format(self) -> str:
        """The pool in a few lines: traffic, each bucket, what it learned."""
        lines = [
            f"{self.name}: {self.granted} granted, {self.in_flight} in flight, {self.queue_depth} waiting;"
            f" wait p50 {_num(self.wait_p50)} s, p99 {_num(self.wait_p99)} s"
        ]
        for dim, limit in self.limits.items():
            level = self.levels.get(dim, 0.0)
            used = self.used.get(dim, 0.0)
            use = self.utilization.get(dim, 0.0)
            capacity = self.capacity.get(dim, limit)
            lines.append(
                f"  {dim}: {_num(level)} of {_num(capacity)} left, limit {_num(limit)}/min;"
                f" last 60 s used {_num(used)} ({use:.0%} of what was on offer)"
            )
        lines.append(
            f"  429s {self.rate_limited} ({self.rate_limited_predicted} predicted), 529s {self.overloaded},"
            f" resyncs {self.resyncs} down, {self.raised} up; reports read at: {self.report_moment};"
            f" burst {_num(self.burst)} ({_num(self.burst * 60.0)} s of refill), share {self.share:.0%}"
        )
        if self.paused_until is not None:
            lines.append(
                f"  paused {_num(self.paused_for)} s more, until {self.paused_until:%Y-%m-%d %H:%M:%S} UTC"
                f" ({self.pause_reason})"
            )
        for e in self.events.values():
            detail = ", ".join(f"{k}={_num(v) if isinstance(v, float) else v}" for k, v in e.detail.items())
            lines.append(f"  {e.kind} x{e.count}, last {_num(e.seconds_ago)} s ago: {detail}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


@final
@attrs.frozen
class LimiterStatistics:
    """A snapshot of the whole limiter: one ``PoolStatistics`` per pool, by name.

    ``time`` is the limiter's own clock (to compare with ``LimiterEvent.time``);
    ``taken_at`` is the moment as an aware UTC datetime. ``str()`` says it all.
    """

    time: float
    pools: Mapping[str, PoolStatistics]
    wallet_balance: float | None
    spend_limited: bool
    taken_at: datetime.datetime = attrs.field(factory=lambda: datetime.datetime.now(datetime.UTC))

    def __getitem__(self, pool: str) -> PoolStatistics:
        try:
            return self.pools[pool]
        except KeyError:
            raise UnknownPoolError(pool, tuple(self.pools)) from None

    def format(self) -> str:
        """Every pool, then the wallet and spend limit if any."""
        head = f"ratekeeper statistics at {self.taken_at:%Y-%m-%d %H:%M:%S} UTC"
        if self.wallet_balance is not None:
            head += f"; wallet {_num(self.wallet_balance)} credits"
        if self.spend_limited:
            head += "; monthly spend limit reached"
        parts = [head, *(p.format() for p in self.pools.values())]
        if not self.pools:
            parts.append("no pools yet (a pool is made at its first request)")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.format()


def _num(value: object) -> str:
    """A number as a person writes it: ``12``, ``0.5``, ``27,000``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"


@final
@attrs.frozen
class LimiterEvent:
    """Something the limiter did or learned, passed to the ``on_event`` hook.

    ``kind`` is one of ``grant``, ``pause``, ``resync``, ``limit_change``,
    ``rate_limited``, ``overloaded``, ``spend_limit``, ``unified_warning``,
    ``burst_change``, ``share_change`` (the share of the refill a pool counts on),
    ``insufficient_credits``, ``bucket_too_small`` (the server's bucket, as its
    headers show it, holds less than a request reserves: said once per dimension).
    """

    kind: str
    pool: str
    time: float
    detail: Mapping[str, Any] = attrs.field(factory=dict)


class WaitSamples:
    """The most recent wait times (bounded), for p50/p99."""

    __slots__ = ("_samples", "add")

    def __init__(self, size: int = 2048) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        #: add one wait (the deque's own append: this runs on every grant)
        self.add: Callable[[float], None] = self._samples.append

    def quantile(self, q: float) -> float:
        if not self._samples:
            return 0.0
        ordered = sorted(self._samples)
        index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[index]


#: What ``AdmittedWindow.mark`` returns: requests, input and output tokens, the other dimensions.
Mark = tuple[float, float, float, Mapping[str, float]]


class AdmittedWindow:
    """Admitted amounts over the last ``span`` seconds, for utilization.

    Running totals, and a copy of them every ``resolution`` seconds (taken at
    the first add after each step): memory stays bounded however fast requests
    come, adding is a few float additions (it sits on the grant path), and the
    window is exact to within ``resolution``. The running totals also serve the
    limiter's tally of what it has spent (``mark``, ``since``). There is no
    ``tokens`` total: that draw is always input plus output, and ``with_tokens``
    adds it where amounts are read.

    >>> w = AdmittedWindow()
    >>> w.add(0.0, {"requests": 1.0, "input_tokens": 500.0, "priority_input_tokens": 5.0})
    >>> w.add_request(30.0, 1.0, 100.0, 20.0)
    >>> w.totals(30.0)["input_tokens"], w.totals(65.0)["tokens"], w.totals(95.0)["requests"]
    (600.0, 120.0, 0.0)
    """

    __slots__ = (
        "_resolution",
        "_snapshots",
        "_span",
        "input_tokens",
        "next_snapshot",
        "other",
        "output_tokens",
        "requests",
    )

    def __init__(self, span: float = 60.0, resolution: float = 1.0) -> None:
        self._span = span
        self._resolution = resolution
        self.requests = 0.0
        self.input_tokens = 0.0
        self.output_tokens = 0.0
        #: totals of the rarer dimensions (priority tier, batch queue); replaced, never changed in place
        self.other: Mapping[str, float] = {}
        self._snapshots: deque[tuple[float, Mark]] = deque()
        self.next_snapshot = -math.inf

    def add(self, now: float, draws: Mapping[str, float], sign: float = 1.0) -> None:
        """Add ``draws`` (or with ``sign=-1`` take them off: a refund) at ``now``."""
        if now >= self.next_snapshot:
            self.snapshot(now)
        other: dict[str, float] | None = None
        for dim, amount in draws.items():
            if dim == "requests":
                self.requests += sign * amount
            elif dim == "input_tokens":
                self.input_tokens += sign * amount
            elif dim == "output_tokens":
                self.output_tokens += sign * amount
            elif dim != "tokens":
                if other is None:
                    other = dict(self.other)
                other[dim] = other.get(dim, 0.0) + sign * amount
        if other is not None:
            self.other = other

    def add_request(self, now: float, requests: float, input_tokens: float, output_tokens: float) -> None:
        """``add`` of requests, input and output (and so their sum, ``tokens``), without a mapping."""
        if now >= self.next_snapshot:
            self.snapshot(now)
        self.requests += requests
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens

    def mark(self) -> Mark:
        """The running totals now, for ``since``."""
        return (self.requests, self.input_tokens, self.output_tokens, self.other)

    def since(self, mark: Mark) -> dict[str, float]:
        """What was added (net of refunds) since ``mark``, per dimension, ``tokens`` included."""
        requests, input_tokens, output_tokens, other = mark
        out = {
            "requests": self.requests - requests,
            "input_tokens": self.input_tokens - input_tokens,
            "output_tokens": self.output_tokens - output_tokens,
        }
        now_other = self.other
        if now_other is not other:
            for dim, amount in now_other.items():
                out[dim] = amount - other.get(dim, 0.0)
        return with_tokens(out)

    def snapshot(self, now: float) -> None:
        """Keep a copy of the running totals at ``now`` (due at ``next_snapshot``); drop the old."""
        snapshots = self._snapshots
        snapshots.append((now, self.mark()))
        self.next_snapshot = now + self._resolution
        cutoff = now - self._span
        while snapshots[0][0] <= cutoff:
            snapshots.popleft()

    def totals(self, now: float) -> dict[str, float]:
        """Per dimension, what was admitted (net of refunds) in the ``span`` seconds to ``now``."""
        cutoff = now - self._span
        for t, before in self._snapshots:
            if t > cutoff:
                return self.since(before)
        return self.since(self.mark())


def with_tokens(amounts: dict[str, float]) -> dict[str, float]:
    """``amounts`` with the combined ``tokens`` draw: input plus output."""
    amounts["tokens"] = amounts.get("input_tokens", 0.0) + amounts.get("output_tokens", 0.0)
    return amounts
