"""Subscription ("unified") limits: a 5-hour and a 7-day window of usage (seed 000)."""

from __future__ import annotations

import datetime as dt
import math

import attrs

from ratekeeper.emulator._config import UnifiedConfig

__all__ = ["UnifiedWindows"]

_PREFIX = "anthropic-ratelimit-unified"


@attrs.define
class _Window:
    claim: str
    short: str
    duration: float
    budget: float
    start: float | None = None
    used: float = 0.0

    def roll(self, now: float) -> None:
        if self.start is not None and now >= self.start + self.duration:
            self.start, self.used = None, 0.0

    def reset(self, now: float) -> float:
        return (self.start if self.start is not None else now) + self.duration

    def utilization(self) -> float:
        return self.used / self.budget


class UnifiedWindows:
    """Usage in USD of list price against a 5-hour and a 7-day budget.

    A window opens at the first request after the previous one closed and
    resets ``duration`` later.
    """

    def __init__(self, config: UnifiedConfig) -> None:
        self.config = config
        self.windows = (
            _Window("five_hour", "5h", 5 * 3600.0, config.five_hour_budget_usd),
            _Window("seven_day", "7d", 7 * 86400.0, config.seven_day_budget_usd),
        )

    def _roll(self, now: float) -> None:
        for w in self.windows:
            w.roll(now)

    def binding(self, now: float) -> _Window:
        """The representative claim: the most used window (the 5-hour one on ties)."""
        self._roll(now)
        return max(self.windows, key=lambda w: (min(w.utilization(), 1.0), w.duration == 5 * 3600.0))

    def rejected_for(self, now: float) -> float | None:
        """Seconds until the blocking window resets, or None if requests are allowed."""
        self._roll(now)
        blocked = [w.reset(now) - now for w in self.windows if w.utilization() >= 1.0]
        return max(blocked) if blocked else None

    def admit(self, now: float) -> None:
        """Open the windows that are closed."""
        self._roll(now)
        for w in self.windows:
            if w.start is None:
                w.start = now

    def add(self, usd: float, now: float) -> None:
        """Count a settled request's cost in every window."""
        self.admit(now)
        for w in self.windows:
            w.used += usd

    def _status(self, u: float) -> str:
        if u >= 1.0:
            return "rejected"
        return "allowed_warning" if u >= self.config.warning_threshold else "allowed"

    def headers(self, epoch: dt.datetime, now: float) -> list[tuple[str, str]]:
        """The ``anthropic-ratelimit-unified-*`` headers at ``now``."""
        rep = self.binding(now)
        base = epoch.timestamp()
        worst = max(w.utilization() for w in self.windows)
        out = [
            (f"{_PREFIX}-status", self._status(worst)),
            (f"{_PREFIX}-reset", str(math.ceil(base + rep.reset(now)))),
            (f"{_PREFIX}-representative-claim", rep.claim),
            (f"{_PREFIX}-fallback-percentage", f"{self.config.fallback_percentage:g}"),
        ]
        if not self.config.detailed_headers:
            return out
        for w in self.windows:
            u = w.utilization()
            out += [
                (f"{_PREFIX}-{w.short}-status", self._status(u)),
                (f"{_PREFIX}-{w.short}-reset", str(math.ceil(base + w.reset(now)))),
                (f"{_PREFIX}-{w.short}-utilization", f"{round(min(u, 1.0), 4):g}"),
            ]
            if u >= self.config.warning_threshold:
                out.append((f"{_PREFIX}-{w.short}-surpassed-threshold", f"{self.config.warning_threshold:g}"))
        return out
