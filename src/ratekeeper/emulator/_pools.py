"""Per-pool buckets: admission, charges recorded in the ledger, and the rate-limit headers."""

from __future__ import annotations

import datetime as dt
import math
from collections import deque
from collections.abc import Mapping

import attrs

from ratekeeper.emulator._bucket import ServerBucket
from ratekeeper.emulator._log import Ledger
from ratekeeper.emulator._wire import rfc3339, round_thousand

__all__ = ["Pool", "Refusal"]

_HEADER_NAME = {"requests": "requests", "input_tokens": "input-tokens", "output_tokens": "output-tokens"}
_UNIT = {"requests": "requests", "input_tokens": "input tokens", "output_tokens": "output tokens"}
_SLACK = 1e-9


@attrs.frozen
class Refusal:
    """Why a request does not fit: the first dimension short, and when all would fit."""

    dimension: str
    limit: int
    wait: float

    @property
    def never(self) -> bool:
        """True when no amount of waiting helps (the cost exceeds the per-minute limit)."""
        return math.isinf(self.wait)

    def message(self) -> str:
        """The 429 message, worded like the real API's."""
        return (
            f"This request would exceed your organization's rate limit of {self.limit:,} "
            f"{_UNIT.get(self.dimension, self.dimension)} per minute. For details, refer to: "
            "https://docs.claude.com/en/api/rate-limits. You can see the response headers for current "
            "usage. Please reduce the prompt length or the maximum tokens requested, or try again later."
        )

    def retry_after(self) -> int:
        """The ``retry-after`` header: whole seconds, at least 1 (60 when waiting cannot help)."""
        return 60 if self.never else max(1, math.ceil(self.wait - 1e-9))


class Pool:
    """The buckets of one pool (a model class, or the count_tokens / batches endpoints).

    ``limits`` maps dimension to per-minute limit; ``interval`` maps dimension
    to the enforcement interval (capacity = limit x interval / 60).
    """

    def __init__(
        self,
        name: str,
        limits: Mapping[str, int],
        interval: Mapping[str, float],
        now: float,
        ledger: Ledger,
        drain: Mapping[str, float] | None = None,
    ) -> None:
        self.name = name
        self.limits = dict(limits)
        self.ledger = ledger
        self.buckets = {
            dim: ServerBucket(
                capacity=lim * interval[dim] / 60.0,
                rate=lim / 60.0,
                now=now,
                drain=(drain or {}).get(dim, 0.0) / 60.0,
            )
            for dim, lim in self.limits.items()
        }
        self.admissions: deque[float] = deque()
        self.foreign_rpm = (drain or {}).get("requests", 0.0)

    def check(self, costs: Mapping[str, float], now: float) -> Refusal | None:
        """None if ``costs`` fit now; else the refusal (first short dimension, longest wait)."""
        first: str | None = None
        wait = 0.0
        for dim, cost in costs.items():
            bucket = self.buckets[dim]
            if cost > self.limits[dim]:
                return Refusal(dim, self.limits[dim], math.inf)
            need = min(cost, bucket.capacity)
            if bucket.level_at(now) >= need - _SLACK * max(1.0, need):
                continue
            first = first or dim
            wait = max(wait, bucket.time_until(need, now))
        if first is None:
            return None
        return Refusal(first, self.limits[first], wait)

    def charge(self, dim: str, amount: float, now: float, request_id: str) -> None:
        """Take ``amount`` from ``dim`` (may go into debt) and record it."""
        if amount:
            self.buckets[dim].charge(amount, now)
            self.ledger.record(self.name, dim, now, amount, request_id)

    def refund(self, dim: str, amount: float, now: float, request_id: str) -> None:
        """Give ``amount`` back to ``dim`` and record it."""
        if amount > 0:
            self.buckets[dim].refund(amount, now)
            self.ledger.record(self.name, dim, now, -amount, request_id)

    def headers(self, epoch: dt.datetime, now: float, *, combined: bool) -> list[tuple[str, str]]:
        """The ``anthropic-ratelimit-*`` headers at ``now``.

        Token ``-remaining`` is rounded to the nearest thousand, requests exact;
        ``-reset`` is when that bucket would be full. With ``combined`` the
        ``tokens-*`` headers show input plus output.
        """
        out: list[tuple[str, str]] = []
        for dim, lim in self.limits.items():
            b = self.buckets[dim]
            level = b.level_at(now)
            remaining = max(0, math.floor(level)) if dim == "requests" else round_thousand(level)
            name = _HEADER_NAME[dim]
            out += [
                (f"anthropic-ratelimit-{name}-limit", str(lim)),
                (f"anthropic-ratelimit-{name}-remaining", str(remaining)),
                (f"anthropic-ratelimit-{name}-reset", rfc3339(epoch, now + b.full_in(now))),
            ]
        if combined and "input_tokens" in self.buckets and "output_tokens" in self.buckets:
            bi, bo = self.buckets["input_tokens"], self.buckets["output_tokens"]
            full = max(bi.full_in(now), bo.full_in(now))
            out += [
                (
                    "anthropic-ratelimit-tokens-limit",
                    str(self.limits["input_tokens"] + self.limits["output_tokens"]),
                ),
                ("anthropic-ratelimit-tokens-remaining", str(round_thousand(bi.level + bo.level))),
                ("anthropic-ratelimit-tokens-reset", rfc3339(epoch, now + full)),
            ]
        return out

    def capacity(self, dim: str) -> float:
        """The burst capacity of ``dim``."""
        return self.buckets[dim].capacity
