"""One pool's buckets: the pure state behind admission, settlement and resync.

A pool is one shared limit on the server (a model class such as ``sonnet-4``,
the batch endpoints, ...). It holds one ``TokenBucket`` per limited dimension
and knows nothing of queues, tasks or clocks: every call takes ``now``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import final

from ratekeeper.core._bucket import TokenBucket, adjust, take_request
from ratekeeper.errors import CapacityExceeded

__all__ = ["Pool"]

# The adaptive burst never shrinks below one second's worth of the limit: the
# tightest enforcement the server is documented to use ("60 RPM as 1 per second").
MIN_BURST = 1.0 / 60.0


@final
class Pool:
    """The buckets of one shared limit, with pauses and an adaptive burst.

    ``limits`` maps a dimension (``requests``, ``input_tokens``, ...) to its
    per-minute limit. Each bucket refills at ``limit / 60`` per second and holds
    ``limit * burst`` tokens. A request costing more than the bucket holds (but
    no more than the per-minute limit) is admitted when the bucket is full and
    leaves it in debt, as a server enforcing a shorter interval would, so a
    small burst never makes a legal request impossible.

    >>> p = Pool("sonnet-4", {"requests": 50, "output_tokens": 8000}, now=0.0)
    >>> p.wait_time({"requests": 1, "output_tokens": 8000}, now=0.0)
    0.0
    >>> p.take({"requests": 1, "output_tokens": 8000}, now=0.0)
    >>> round(p.wait_time({"requests": 1, "output_tokens": 4000}, now=0.0), 6)
    30.0
    """

    __slots__ = (
        "_burst",
        "buckets",
        "ceiling",
        "clean_since",
        "limits",
        "name",
        "pause_reason",
        "paused_until",
        "plain",
        "version",
    )

    def __init__(
        self,
        name: str,
        limits: Mapping[str, float],
        *,
        now: float,
        burst: float = 1.0,
        rate_scale: float = 1.0,
    ) -> None:
        self.name = name
        self._burst = _check_burst(burst)
        self.limits: dict[str, float] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.paused_until = -math.inf
        self.pause_reason = ""
        #: since when no 429 has cut the burst (``grow_burst`` waits for ``clean_for`` of it)
        self.clean_since = now
        #: the largest burst the headers allow (fit_burst, widen_burst); 1.0 until they show less
        self.ceiling = 1.0
        #: the buckets of an ordinary request (requests, input, output, tokens), found by
        #: ``plain_buckets`` at the first call; None again whenever a bucket is replaced
        self.plain: tuple[TokenBucket | None, ...] | None = None
        #: counts the changes of a bucket's capacity (a level noted before one is not comparable)
        self.version = 0
        for dim, limit in limits.items():
            self._add(dim, limit, now, rate_scale)

    def _add(self, dim: str, limit: float, now: float, rate_scale: float) -> None:
        if not limit > 0 or limit == math.inf:
            raise ValueError(f"{self.name}: the {dim} limit must be a positive finite number, got {limit!r}")
        self.limits[dim] = float(limit)
        capacity = max(limit * self._burst, 1.0) if dim == "requests" else limit * self._burst
        self.buckets[dim] = TokenBucket(capacity, limit / 60.0 * rate_scale, now=now, debt_limit=limit)
        self.plain = None
        self.version += 1

    # -- queries ---------------------------------------------------------------

    @property
    def burst(self) -> float:
        """The fraction of the per-minute limit a bucket holds (1.0 = a full minute)."""
        return self._burst

    def check(self, draws: Mapping[str, float]) -> None:
        """Raise ``CapacityExceeded`` if some draw could never be admitted."""
        limits = self.limits
        for dim, amount in draws.items():
            limit = limits.get(dim)
            if limit is not None and amount > limit:
                raise CapacityExceeded(self.name, dim, amount, limit)

    def wait_time(self, draws: Mapping[str, float], now: float) -> float:
        """Seconds until every draw fits at once (0.0: now; inf: never, e.g. no refill)."""
        wait = self.paused_until - now
        if wait < 0.0:
            wait = 0.0
        buckets = self.buckets
        for dim, amount in draws.items():
            bucket = buckets.get(dim)
            if bucket is None or amount <= 0.0:
                continue
            need = amount if amount < bucket.capacity else bucket.capacity
            if bucket.level_at(now) >= need:  # the usual case, without time_until's arithmetic
                continue
            t = bucket.time_until(need, now)
            if t > wait:
                wait = t
        return wait

    def fits_without_delaying(
        self, draws: Mapping[str, float], head: Mapping[str, float], head_wait: float, now: float
    ) -> bool:
        """Whether ``draws`` can go now without pushing ``head``'s grant past ``now + head_wait``.

        The backfill rule (EASY backfilling): a small request may pass a large
        one that is waiting only if the large one still goes at the time it
        would have gone anyway.
        """
        if self.paused_until > now:
            return False
        buckets = self.buckets
        for dim, amount in draws.items():
            bucket = buckets.get(dim)
            if bucket is None or amount <= 0.0:
                continue
            level = bucket.level_at(now)
            need = amount if amount < bucket.capacity else bucket.capacity
            if level < need - 1e-9 * max(1.0, need):
                return False
            head_amount = head.get(dim, 0.0)
            if head_amount > 0.0:
                head_need = head_amount if head_amount < bucket.capacity else bucket.capacity
                if level - amount + bucket.rate * head_wait < head_need - 1e-9 * max(1.0, head_need):
                    return False
        return True

    def levels(self, now: float) -> dict[str, float]:
        """The level of every bucket at ``now``."""
        return {dim: b.level_at(now) for dim, b in self.buckets.items()}

    # -- changes -----------------------------------------------------------------

    def take(self, draws: Mapping[str, float], now: float) -> None:
        """Take every draw (call after ``wait_time`` returned 0)."""
        buckets = self.buckets
        for dim, amount in draws.items():
            bucket = buckets.get(dim)
            if bucket is not None and amount > 0.0:
                bucket.charge(amount, now)

    def take_plain(
        self, input_tokens: float, output_tokens: float, now: float
    ) -> tuple[float, float, float, float] | None:
        """``wait_time`` and ``take`` in one step for an ordinary request, if it fits now.

        The draws are one request, ``input_tokens``, ``output_tokens`` and their sum
        on a combined ``tokens`` limit, if the pool has one. Returns the levels
        after the charge (requests, input, output, tokens: ``nan`` without that
        limit); None, with nothing taken, if the pool is paused, a bucket is short, a draw exceeds its limit,
        or the pool lacks one of the three usual buckets: the general path then
        waits, or says why it can't. Arguments must be finite, non-negative
        floats (the limiter's fast path).

        >>> p = Pool("sonnet-4", {"requests": 50, "input_tokens": 30000, "output_tokens": 8000}, now=0.0)
        >>> p.take_plain(1000.0, 8000.0, now=0.0), p.take_plain(1000.0, 1.0, now=0.0)
        ((49.0, 29000.0, 0.0, nan), None)
        """
        if self.paused_until > now:
            return None
        requests, inp, out, tokens = self.plain or self.plain_buckets()
        if requests is None or inp is None or out is None:
            return None
        return take_request(requests, inp, out, tokens, input_tokens, output_tokens, now)

    def give_back_plain(self, input_tokens: float, output_tokens: float, now: float) -> None:
        """``give_back`` of an ordinary request's settlement: input, output and their sum.

        Positive amounts are refunds, negative ones charges; arguments are finite
        floats (the limiter's fast path).

        >>> p = Pool("sonnet-4", {"requests": 50, "input_tokens": 30000, "output_tokens": 8000}, now=0.0)
        >>> p.take_plain(1000.0, 8000.0, now=0.0) is not None
        True
        >>> p.give_back_plain(-200.0, 7500.0, now=0.0)
        >>> p.levels(0.0)
        {'requests': 49.0, 'input_tokens': 28800.0, 'output_tokens': 7500.0}
        """
        _, inp, out, tokens = self.plain or self.plain_buckets()
        if input_tokens and inp is not None:
            adjust(inp, input_tokens, now)
        if output_tokens and out is not None:
            adjust(out, output_tokens, now)
        both = input_tokens + output_tokens
        if both and tokens is not None:
            adjust(tokens, both, now)

    def plain_buckets(self) -> tuple[TokenBucket | None, ...]:
        """The requests, input, output and tokens buckets (None where absent), kept as ``plain``."""
        get = self.buckets.get
        self.plain = (get("requests"), get("input_tokens"), get("output_tokens"), get("tokens"))
        return self.plain

    def give_back(self, amounts: Mapping[str, float], now: float) -> None:
        """Refund positive amounts and charge negative ones (a settlement's difference)."""
        buckets = self.buckets
        for dim, amount in amounts.items():
            bucket = buckets.get(dim)
            if bucket is None or amount == 0.0:
                continue
            if amount > 0.0:
                bucket.give_back(amount, now)
            else:
                bucket.charge(-amount, now)

    def set_limit(self, dim: str, limit: float, now: float, *, rate_scale: float = 1.0) -> bool:
        """Set a dimension's per-minute limit (adding the bucket if new). True if it changed."""
        bucket = self.buckets.get(dim)
        if bucket is None:
            self._add(dim, limit, now, rate_scale)
            return True
        if self.limits[dim] == limit:
            return False
        if not limit > 0 or limit == math.inf:
            raise ValueError(f"{self.name}: the {dim} limit must be a positive finite number, got {limit!r}")
        self.limits[dim] = float(limit)
        self._resize(dim, now, capacity=self._capacity(dim, limit), rate=limit / 60.0 * rate_scale)
        return True

    def _capacity(self, dim: str, limit: float) -> float:
        capacity = limit * self._burst
        return max(capacity, 1.0) if dim == "requests" else capacity

    def _resize(
        self, dim: str, now: float, *, capacity: float, rate: float | None = None, keep_used: bool = True
    ) -> None:
        """Give a bucket a new capacity (and rate).

        With ``keep_used`` what was used stays used (a limit learned from the
        headers: the server's bucket was that size all along); without it the
        level is only clamped to the new capacity (a burst change: the server's
        bucket is smaller than assumed, and what it holds is whatever the
        headers say, not our deficit carried over).

        The bucket is rebuilt rather than resized in place so that it may still
        owe up to its per-minute limit: ``TokenBucket.set_limits`` would tie the
        debt limit to a capacity it happened to equal (at ``burst=1``), and a
        request costing the whole limit would then be charged only in part.
        """
        old = self.buckets[dim]
        t = max(now, old.last_time)
        level = old.level_at(t)
        new_level = capacity - (old.capacity - level) if keep_used else min(level, capacity)
        self.buckets[dim] = TokenBucket(
            capacity,
            old.rate if rate is None else rate,
            level=new_level,
            now=t,
            debt_limit=self.limits[dim],
        )
        self.plain = None
        self.version += 1

    def scale_rates(self, rate_scale: float, now: float) -> None:
        """Scale every refill rate (a warm-up ramp); levels are brought up to ``now`` first.

        Buckets that do not refill (a concurrency cap such as the batch queue) stay so.
        """
        for dim, bucket in self.buckets.items():
            if bucket.rate > 0.0:
                bucket.set_limits(now, rate=self.limits[dim] / 60.0 * rate_scale)

    def set_burst(self, burst: float, now: float) -> None:
        """Resize every refilling bucket to ``burst`` times its per-minute limit.

        Levels are clamped, not shifted: a bucket that grows gains nothing at
        once (it refills), one that shrinks keeps at most its new capacity.
        """
        self._burst = _check_burst(burst)
        for dim, bucket in list(self.buckets.items()):
            if bucket.rate > 0.0:
                self._resize(dim, now, capacity=self._capacity(dim, self.limits[dim]), keep_used=False)

    def fit_burst(self, burst: float, now: float) -> bool:
        """The server's bucket holds at most ``burst``: shrink to it if smaller.

        ``burst`` is an upper bound read from a response's headers. The smallest
        one seen also caps how far clean traffic grows the burst back
        (``grow_burst``), until ``widen_burst`` shows a larger bucket. Returns
        True if the burst shrank.
        """
        burst = max(MIN_BURST, min(1.0, burst))
        if burst < self.ceiling:
            self.ceiling = burst
        if burst >= self._burst:
            return False
        self.set_burst(burst, now)
        self.clean_since = now
        return True

    def widen_burst(self, burst: float, now: float) -> bool:
        """The server's bucket holds at least ``burst`` (its remaining showed as much): grow to it.

        Returns True if the burst grew. Levels do not jump: a bucket that grows
        gains nothing at once, it refills.
        """
        burst = min(1.0, burst)
        if burst <= self._burst:
            return False
        if burst > self.ceiling:
            self.ceiling = burst
        self.set_burst(burst, now)
        return True

    def resync(self, dim: str, target: float, now: float) -> float:
        """Lower a bucket to ``target`` if it holds more; return the change (<= 0)."""
        bucket = self.buckets.get(dim)
        if bucket is None:
            return 0.0
        return bucket.resync(target, now)

    def pause(self, until: float, reason: str) -> bool:
        """Admit nothing before ``until``; True if that extends the current pause."""
        if until > self.paused_until:
            self.paused_until = until
            self.pause_reason = reason
            return True
        return False

    # -- adaptive burst ------------------------------------------------------------

    def shrink_burst(self, now: float, factor: float = 0.5) -> float:
        """An unpredicted 429: the server enforces a shorter interval than assumed."""
        self.set_burst(max(MIN_BURST, self._burst * factor), now)
        self.clean_since = now
        return self._burst

    def grow_burst(self, now: float, *, clean_for: float = 60.0, factor: float = 1.25) -> float:
        """After ``clean_for`` seconds without a 429, let the burst grow back by ``factor``.

        Never past the smallest bucket the headers showed (``fit_burst``): growing
        into a size the server has proven it does not have only buys 429s.
        """
        ceiling = self.ceiling
        if self._burst < ceiling and now - self.clean_since >= clean_for:
            self.set_burst(min(ceiling, self._burst * factor), now)
            self.clean_since = now
        return self._burst

    def __repr__(self) -> str:
        dims = ", ".join(f"{d}={b.level_at(b.last_time):g}/{b.capacity:g}" for d, b in self.buckets.items())
        return f"Pool({self.name!r}, {dims}, burst={self._burst:g})"


def _check_burst(burst: float) -> float:
    if not (MIN_BURST - 1e-12 <= burst <= 1.0):
        raise ValueError(f"burst must be between 1/60 and 1, got {burst!r}")
    return float(burst)


def total(draws: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Sum draws dimension by dimension."""
    out: dict[str, float] = {}
    for d in draws:
        for dim, amount in d.items():
            out[dim] = out.get(dim, 0.0) + amount
    return out
