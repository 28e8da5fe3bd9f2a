"""The burst a pool assumes: read from the headers, fitted, clamped; and the rounding tolerance of resync.

All synchronous, on a hand-moved clock: ``acquire_nowait`` and ``observe``.
"""

from __future__ import annotations

import pytest

from ratekeeper import Limiter
from ratekeeper._pool import MIN_BURST, Pool

SONNET = "claude-sonnet-4-5"
POOL = "sonnet-4.x"
DATE = "Mon, 05 Jan 2026 00:00:10 GMT"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def headers(*, requests: tuple[int, str], input_: tuple[int, str], output: tuple[int, str]) -> dict[str, str]:
    """Tier 1 Sonnet headers with the given (remaining, reset) per dimension."""
    out = {"date": DATE}
    for name, limit, (remaining, reset) in (
        ("requests", 50, requests),
        ("input-tokens", 30_000, input_),
        ("output-tokens", 8_000, output),
    ):
        out[f"anthropic-ratelimit-{name}-limit"] = str(limit)
        out[f"anthropic-ratelimit-{name}-remaining"] = str(remaining)
        out[f"anthropic-ratelimit-{name}-reset"] = reset
    return out


def test_a_one_second_bucket_is_read_from_the_headers_before_any_429() -> None:
    clock = Clock()
    limiter = Limiter("tier-1", clock=clock)
    permit = limiter.acquire_nowait(SONNET, input_tokens=2000, max_tokens=1000)
    # The server's buckets are full one second after the date although nearly
    # empty: they hold one second of the limit, not a minute.
    permit.observe(
        headers(
            requests=(0, "2026-01-05T00:00:11Z"),
            input_=(0, "2026-01-05T00:00:11Z"),
            output=(0, "2026-01-05T00:00:11Z"),
        )
    )
    stats = limiter.statistics()[POOL]
    # the tightest bound is ITPM's: (0 remaining + 500 rounding + 500/s * (1 s + 1 s precision)) / 30,000
    # (RPM's is (0 + 1 + 50/60 * 2) / 50 = 0.053, OTPM's (0 + 500 + 8000/60 * 2) / 8,000 = 0.096)
    assert stats.burst == pytest.approx(0.05)
    assert stats.rate_limited == 0
    assert stats.capacity["input_tokens"] == pytest.approx(30_000 * stats.burst)


def test_full_minute_headers_leave_the_burst_alone() -> None:
    clock = Clock()
    limiter = Limiter("tier-1", clock=clock)
    permit = limiter.acquire_nowait(SONNET, input_tokens=2000, max_tokens=1000)
    # 20,000 input tokens remaining, full in 20 s: 20,000 + 500/s * 20 s = 30,000, a minute's bucket
    permit.observe(
        headers(
            requests=(49, "2026-01-05T00:00:11Z"),
            input_=(20_000, "2026-01-05T00:00:30Z"),
            output=(7_000, "2026-01-05T00:00:17Z"),
        )
    )
    assert limiter.statistics()[POOL].burst == 1.0


def test_a_reset_in_the_past_is_no_evidence() -> None:
    clock = Clock()
    limiter = Limiter("tier-1", clock=clock)
    permit = limiter.acquire_nowait(SONNET, input_tokens=2000, max_tokens=1000)
    permit.observe(
        headers(
            requests=(0, "2026-01-05T00:00:00Z"),
            input_=(0, "2026-01-05T00:00:00Z"),
            output=(0, "2026-01-05T00:00:00Z"),
        )
    )
    assert limiter.statistics()[POOL].burst == 1.0


def test_a_429_after_the_burst_was_fitted_does_not_halve_it_again() -> None:
    clock = Clock()
    limiter = Limiter("tier-1", clock=clock)
    permit = limiter.acquire_nowait(SONNET, input_tokens=2000, max_tokens=1000)
    tight = headers(
        requests=(0, "2026-01-05T00:00:11Z"),
        input_=(0, "2026-01-05T00:00:11Z"),
        output=(0, "2026-01-05T00:00:11Z"),
    )
    permit.observe({**tight, "retry-after": "1"}, status=429)
    stats = limiter.statistics()[POOL]
    assert stats.burst == pytest.approx(0.05)
    assert (stats.rate_limited, stats.rate_limited_predicted) == (1, 0)


def test_shrinking_the_burst_clamps_the_level_instead_of_carrying_the_deficit() -> None:
    pool = Pool("p", {"input_tokens": 30_000}, now=0.0)
    pool.take({"input_tokens": 25_000}, now=0.0)  # level 5,000 of 30,000
    pool.set_burst(1 / 30, now=0.0)  # capacity 1,000
    assert pool.levels(0.0)["input_tokens"] == 1_000.0
    pool.set_burst(1.0, now=0.0)  # growing gains nothing at once: it refills
    assert pool.levels(0.0)["input_tokens"] == 1_000.0
    assert pool.levels(10.0)["input_tokens"] == 1_000.0 + 500.0 * 10


def test_a_learned_limit_keeps_what_was_used() -> None:
    pool = Pool("p", {"input_tokens": 30_000}, now=0.0)
    pool.take({"input_tokens": 25_000}, now=0.0)
    pool.set_limit("input_tokens", 450_000, now=0.0)
    assert pool.levels(0.0)["input_tokens"] == 450_000 - 25_000


def test_fit_burst_only_shrinks_clearly_and_never_below_one_second() -> None:
    pool = Pool("p", {"requests": 60}, now=0.0)
    assert not pool.fit_burst(0.97, now=0.0)  # within 5%: no evidence
    assert not pool.fit_burst(2.0, now=0.0)
    assert pool.fit_burst(0.001, now=0.0)
    assert pool.burst == MIN_BURST


def test_request_resync_is_exact() -> None:
    pool = Pool("p", {"requests": 50}, now=0.0)
    assert pool.resync("requests", 49.0, 0.0) == -1.0
    assert pool.levels(0.0)["requests"] == 49.0
