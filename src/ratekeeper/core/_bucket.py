"""A token bucket with explicit time: the unit every limit in ratekeeper is built from."""

from __future__ import annotations

import math
from typing import final

__all__ = ["TokenBucket", "adjust", "take_request"]

# Relative slack when comparing a level with an amount. ``time_until`` divides
# and ``level_at`` multiplies back, so a take exactly at the promised instant can
# land a few ulps short; the slack makes that take succeed without letting a take
# measurably early through.
_REL_EPS = 1e-9


def _check_amount(amount: float, name: str = "amount") -> float:
    if not amount >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be a non-negative number, got {amount!r}")
    return float(amount)


def _check_capacity(capacity: float) -> float:
    if not capacity > 0 or capacity == math.inf:
        raise ValueError(f"capacity must be a positive finite number, got {capacity!r}")
    return float(capacity)


def _check_rate(rate: float) -> float:
    if not rate >= 0 or rate == math.inf:
        raise ValueError(f"rate must be a non-negative finite number, got {rate!r}")
    return float(rate)


def _check_now(now: float) -> float:
    if not math.isfinite(now):  # an infinite time would refill an empty bucket or freeze it for good
        raise ValueError(f"now must be a finite number, got {now!r}")
    return float(now)


@final
class TokenBucket:
    """A bucket that refills continuously at ``rate`` tokens per second up to ``capacity``.

    Every method takes ``now`` (seconds, any epoch, as a float) instead of
    reading a clock, so the same object serves real time, virtual time and
    tests alike. A ``now`` earlier than one already seen counts as that latest
    time: going back and forward again never earns the same interval twice.

    The level may go below zero, down to ``-debt_limit``, through ``charge``:
    that is how a request that turned out to cost more than it reserved is
    settled. ``try_take`` never goes below zero.

    >>> b = TokenBucket(capacity=10, rate=1.0, level=0.0, now=0.0)
    >>> b.try_take(3, now=2.0)
    False
    >>> b.time_until(3, now=2.0)
    1.0
    >>> b.try_take(3, now=3.0)
    True
    >>> b.level_at(3.0)
    0.0
    """

    __slots__ = ("_capacity", "_debt_limit", "_level", "_rate", "_t")

    def __init__(
        self,
        capacity: float,
        rate: float,
        *,
        level: float | None = None,
        now: float = 0.0,
        debt_limit: float | None = None,
    ) -> None:
        self._capacity = _check_capacity(capacity)
        self._rate = _check_rate(rate)
        self._debt_limit = self._capacity if debt_limit is None else _check_amount(debt_limit, "debt_limit")
        self._t = _check_now(now)
        if level is None:
            self._level = self._capacity
        else:
            if math.isnan(level):
                raise ValueError("level must be a number, got nan")
            self._level = min(max(float(level), -self._debt_limit), self._capacity)

    # -- read-only views ---------------------------------------------------

    @property
    def capacity(self) -> float:
        """The most tokens the bucket holds."""
        return self._capacity

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self._rate

    @property
    def debt_limit(self) -> float:
        """How far below zero ``charge`` may take the level."""
        return self._debt_limit

    @property
    def last_time(self) -> float:
        """The latest ``now`` this bucket has seen."""
        return self._t

    def level_at(self, now: float) -> float:
        """The level at ``now``, without changing the bucket."""
        dt = now - self._t
        if dt <= 0:  # never mint tokens from a clock that went back
            return self._level
        if not dt < math.inf:  # NaN or +inf
            _check_now(now)
        level = self._level + dt * self._rate
        return level if level < self._capacity else self._capacity

    def time_until(self, amount: float, now: float) -> float:
        """Seconds from ``now`` until ``amount`` tokens are available.

        ``0.0`` if they are available now, ``math.inf`` if they never will be
        (more than the capacity, or no refill).
        """
        amount = _check_amount(amount)
        now = _check_now(now)
        if amount > self._capacity:
            return math.inf
        t = self._t if now < self._t else now
        level = self.level_at(t)
        enough = amount - _REL_EPS * max(1.0, amount)
        if level >= enough:
            return 0.0
        if self._rate == 0.0:
            return math.inf
        wait = (t - now) + (amount - level) / self._rate
        # ``now + wait`` is rounded to a float, which can land an ulp or two short of
        # the instant the tokens are there (at epoch seconds, or when ``now`` < 0):
        # step the wait forward, doubling the step, until a take there succeeds.
        step = math.ulp(now + wait)
        while now + wait < math.inf and self.level_at(now + wait) < enough:
            wait += step
            step *= 2
        return wait

    # -- changes -------------------------------------------------------------

    def _advance(self, now: float) -> None:
        if now > self._t:
            self._level = self.level_at(now)  # rejects +inf
            self._t = now
        elif not now > -math.inf:  # NaN or -inf
            _check_now(now)

    def try_take(self, amount: float, now: float) -> bool:
        """Take ``amount`` tokens if they are there now; report whether it did."""
        amount = _check_amount(amount)
        self._advance(now)
        if self._level >= amount - _REL_EPS * max(1.0, amount):
            self._level = max(self._level - amount, min(self._level, 0.0))
            return True
        return False

    def charge(self, amount: float, now: float) -> None:
        """Take ``amount`` whether or not it is there, going into debt (at most ``debt_limit``).

        Used when the server already spent the tokens: an extra charge at
        settlement, or traffic learned about after the fact.
        """
        amount = _check_amount(amount)
        self._advance(now)
        self._level = max(self._level - amount, -self._debt_limit)

    def give_back(self, amount: float, now: float) -> None:
        """Return ``amount`` tokens (a refund); the level never exceeds the capacity."""
        amount = _check_amount(amount)
        self._advance(now)
        level = self._level + amount
        self._level = level if level < self._capacity else self._capacity

    def set_level(self, level: float, now: float) -> None:
        """Set the level at ``now``, clamped to ``[-debt_limit, capacity]``."""
        if math.isnan(level):
            raise ValueError("level must be a number, got nan")
        self._advance(now)
        self._level = min(max(float(level), -self._debt_limit), self._capacity)

    def resync(self, remaining: float, now: float, *, allow_increase: bool = False) -> float:
        """Pull the level down to what a server reports as ``remaining``.

        The level only goes down unless ``allow_increase``: a report can be
        stale, and the client must never admit more than the server would.
        Returns the change applied (negative when tokens were removed).
        """
        if math.isnan(remaining):
            raise ValueError("remaining must be a number, got nan")
        self._advance(now)
        before = self._level
        target = min(max(float(remaining), -self._debt_limit), self._capacity)
        if target < before or allow_increase:
            self._level = target
        return self._level - before

    def set_limits(self, now: float, *, capacity: float | None = None, rate: float | None = None) -> None:
        """Change capacity and/or rate in place, after bringing the level up to ``now``.

        What was used stays used: a bucket that grows keeps its deficit (the
        server's bucket was that size all along), one that shrinks is clamped.
        """
        new_capacity = self._capacity if capacity is None else _check_capacity(capacity)
        new_rate = self._rate if rate is None else _check_rate(rate)
        self._advance(now)
        used = self._capacity - self._level
        if self._debt_limit == self._capacity:
            self._debt_limit = new_capacity
        self._capacity = new_capacity
        self._rate = new_rate
        self._level = min(max(new_capacity - used, -self._debt_limit), new_capacity)

    def __repr__(self) -> str:
        return (
            f"TokenBucket(capacity={self._capacity:g}, rate={self._rate:g}/s, "
            f"level={self._level:g} at t={self._t:g})"
        )


def take_request(
    requests: TokenBucket,
    inp: TokenBucket,
    out: TokenBucket,
    tokens: TokenBucket | None,
    input_tokens: float,
    output_tokens: float,
    now: float,
) -> tuple[float, float, float, float] | None:
    """Charge one request, ``input_tokens`` and ``output_tokens`` (and their sum to
    ``tokens``, if given) if every bucket holds its amount at ``now``.

    Returns the four levels after the charge (``nan`` for an absent ``tokens``).
    All or nothing: None (and nothing changed) if one does not fit, or if an
    amount exceeds a bucket's ``debt_limit`` (no wait would ever help; the
    caller's general path says so). An amount above the capacity fits a full
    bucket and leaves it in debt, as ``Pool.wait_time`` allows.

    The limiter's uncontended path: the checks ``try_take`` and ``charge`` make on
    every argument are the caller's job here (amounts are non-negative floats it
    computed, ``now`` is finite), which saves most of their cost.

    >>> r, i, o = TokenBucket(5, 1.0), TokenBucket(10, 1.0), TokenBucket(5, 1.0)
    >>> take_request(r, i, o, None, 4.0, 6.0, now=0.0) is None
    True
    >>> take_request(r, i, o, None, 4.0, 5.0, now=0.0)
    (4.0, 6.0, 0.0, nan)
    """
    # Unrolled, one block per bucket: this runs for every uncontended request. A
    # level that passes its check stays >= -debt_limit once charged (the amount is
    # at most the debt limit, and is taken from a full bucket when above capacity).
    # A zero draw fits even a bucket in debt, as in ``Pool.wait_time``.
    rt, rl, rc = requests._t, requests._level, requests._capacity
    if now > rt:
        rl += (now - rt) * requests._rate
    if (rl < 1.0 and rl < rc) or requests._debt_limit < 1.0:
        return None
    it, il, ic = inp._t, inp._level, inp._capacity
    if now > it:
        il += (now - it) * inp._rate
    if (
        input_tokens > 0.0 and il < (input_tokens if input_tokens < ic else ic)
    ) or inp._debt_limit < input_tokens:
        return None
    ot, ol, oc = out._t, out._level, out._capacity
    if now > ot:
        ol += (now - ot) * out._rate
    if (
        output_tokens > 0.0 and ol < (output_tokens if output_tokens < oc else oc)
    ) or out._debt_limit < output_tokens:
        return None
    if tokens is not None:
        amount = input_tokens + output_tokens
        tt, tl, tc = tokens._t, tokens._level, tokens._capacity
        if now > tt:
            tl += (now - tt) * tokens._rate
        if (amount > 0.0 and tl < (amount if amount < tc else tc)) or tokens._debt_limit < amount:
            return None
        tokens._level = tl = (tl if tl < tc else tc) - amount
        if now > tt:
            tokens._t = now
    else:
        tl = math.nan
    requests._level = (rl if rl < rc else rc) - 1.0
    inp._level = (il if il < ic else ic) - input_tokens
    out._level = (ol if ol < oc else oc) - output_tokens
    if now > rt:
        requests._t = now
    if now > it:
        inp._t = now
    if now > ot:
        out._t = now
    return (requests._level, inp._level, out._level, tl)


def adjust(bucket: TokenBucket, amount: float, now: float) -> None:
    """``give_back(amount)`` when positive, ``charge(-amount)`` when negative, without their checks.

    For settling a request on the limiter's fast path (``amount`` is a finite
    float it computed, ``now`` finite).

    >>> b = TokenBucket(10, 0.0, level=5.0)
    >>> adjust(b, 8.0, now=0.0); b.level_at(0.0)
    10.0
    >>> adjust(b, -25.0, now=0.0); b.level_at(0.0)
    -10.0
    """
    if now > bucket._t:
        capacity = bucket._capacity
        level = bucket._level + (now - bucket._t) * bucket._rate
        bucket._level = level if level < capacity else capacity
        bucket._t = now
    level = bucket._level + amount
    if amount > 0.0:
        capacity = bucket._capacity
        bucket._level = level if level < capacity else capacity
    else:
        floor = -bucket._debt_limit
        bucket._level = level if level > floor else floor
