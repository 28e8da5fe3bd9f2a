"""The server's continuous token bucket, written independently of the client's.

It refills at ``rate`` per second up to ``capacity``. Charges may drive it
below zero (a settlement larger than the reservation, or a request larger
than a short-interval bucket admitted when full); refunds never raise it above
capacity. ``drain`` is foreign traffic: other clients of the organization
taking ``drain`` per second from whatever is there, never into debt.
"""

from __future__ import annotations

import math

__all__ = ["ServerBucket"]


class ServerBucket:
    """A continuous token bucket with debt, refunds and a foreign drain.

    >>> b = ServerBucket(capacity=10.0, rate=1.0, now=0.0)
    >>> b.charge(10.0, now=0.0)
    >>> b.level_at(4.0)
    4.0
    >>> b.time_until(6.0, now=4.0)
    2.0
    """

    __slots__ = ("capacity", "drain", "foreign_taken", "level", "rate", "updated")

    def __init__(self, capacity: float, rate: float, now: float, drain: float = 0.0) -> None:
        self.capacity = float(capacity)
        self.rate = float(rate)
        self.drain = float(drain)
        self.level = self.capacity
        self.updated = float(now)
        self.foreign_taken = 0.0

    def advance(self, now: float) -> None:
        """Bring the level up to ``now``; a time earlier than the last one changes nothing."""
        dt = now - self.updated
        if dt <= 0:
            return
        self.updated = now
        level = self.level
        if level < 0:  # repaying debt: foreign traffic gets nothing meanwhile
            repay = min(dt, -level / self.rate) if self.rate > 0 else dt
            level += self.rate * repay
            dt -= repay
            if dt <= 0:
                self.level = level
                return
        net = self.rate - self.drain
        if net >= 0:
            new = min(self.capacity, level + net * dt)
            self.foreign_taken += self.drain * dt
        else:  # foreign clients take the refill and what was left, down to empty
            new = max(0.0, level + net * dt)
            self.foreign_taken += level + self.rate * dt - new
        self.level = new

    def level_at(self, now: float) -> float:
        """The level at ``now`` (advancing the bucket)."""
        self.advance(now)
        return self.level

    def charge(self, amount: float, now: float) -> None:
        """Take ``amount`` unconditionally; the level may go negative."""
        self.advance(now)
        self.level -= amount

    def refund(self, amount: float, now: float) -> None:
        """Give back ``amount``, never above capacity."""
        self.advance(now)
        self.level = min(self.capacity, self.level + amount)

    def time_until(self, amount: float, now: float) -> float:
        """Seconds from ``now`` until the level reaches ``amount`` (``inf`` if never)."""
        level = self.level_at(now)
        if level >= amount:
            return 0.0
        if amount > self.capacity:
            return math.inf
        if level < 0:
            to_zero = -level / self.rate if self.rate > 0 else math.inf
            net = self.rate - self.drain
            return to_zero + (amount / net if net > 0 else math.inf)
        net = self.rate - self.drain
        return (amount - level) / net if net > 0 else math.inf

    def full_in(self, now: float) -> float:
        """Seconds until the bucket would be full at its refill rate (what ``-reset`` shows)."""
        level = self.level_at(now)
        return max(0.0, self.capacity - level) / self.rate if self.rate > 0 else 0.0

    def __repr__(self) -> str:
        return f"ServerBucket(level={self.level:.1f}/{self.capacity:g}, rate={self.rate:g}/s)"
