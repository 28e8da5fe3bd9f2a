"""The organization's monthly spend and its cap."""

from __future__ import annotations

import datetime as dt
import math

__all__ = ["SpendMeter"]


class SpendMeter:
    """Spend per calendar month (UTC) of server time; the cap blocks until the next month."""

    def __init__(self, cap_usd: float, initial_usd: float, epoch: dt.datetime) -> None:
        self.cap_usd = cap_usd
        self._epoch = epoch
        self._month = self._month_of(0.0)
        self._spent = initial_usd

    def _month_of(self, now: float) -> tuple[int, int]:
        t = (self._epoch + dt.timedelta(seconds=now)).astimezone(dt.UTC)
        return t.year, t.month

    def spent(self, now: float) -> float:
        """USD spent in the month of ``now``."""
        month = self._month_of(now)
        if month != self._month:
            self._month, self._spent = month, 0.0
        return self._spent

    def add(self, usd: float, now: float) -> None:
        """Add a settled request's cost."""
        self._spent = self.spent(now) + usd

    def reached(self, now: float) -> bool:
        """True once the month's spend is at or over the cap."""
        return not math.isinf(self.cap_usd) and self.spent(now) >= self.cap_usd

    def resets_at(self, now: float) -> dt.datetime:
        """00:00 UTC on the first of the next month."""
        year, month = self._month_of(now)
        return dt.datetime(year + month // 12, month % 12 + 1, 1, tzinfo=dt.UTC)
