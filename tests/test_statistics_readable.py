"""``statistics()`` read by a person: wall-clock times, a utilization that means something,
what the pool learned, a clear error for a pool not made yet, and ``str()`` to print it."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from limiter_support import POOL, RATE_LIMIT_BODY, SONNET, FakeClock, headers

from ratekeeper import EventSummary, Limiter, UnknownPoolError


def test_utilization_is_a_share_of_what_was_on_offer_never_above_one() -> None:
    clock = FakeClock()
    limiter = Limiter("tier-1", clock=clock, opening=60)  # 50 requests per minute, a full bucket to start
    for _ in range(50):
        limiter.acquire_nowait(SONNET, max_tokens=1).settle({"output_tokens": 1})
    clock.advance(30)  # 25 more refill in
    for _ in range(25):
        limiter.acquire_nowait(SONNET, max_tokens=1).settle({"output_tokens": 1})
    stats = limiter.statistics()[POOL]
    # 75 requests in 30 s of a 50-per-minute limit, no 429: what the server allows too
    assert stats.used["requests"] == 75
    assert stats.utilization["requests"] == 1.0  # everything on offer was taken (was 1.5)
    clock.advance(15)  # 12.5 refill, untouched
    assert limiter.statistics()[POOL].utilization["requests"] == pytest.approx(75 / 87.5)


def test_times_are_aware_datetimes_and_seconds_from_the_snapshot() -> None:
    clock = FakeClock(now=123_456.0)  # a monotonic clock's value: meaningless to a person
    limiter = Limiter("tier-1", clock=clock)
    permit = limiter.acquire_nowait(SONNET, max_tokens=10)
    permit.observe(headers(requests=(60, 40), retry_after=20), status=429, body=RATE_LIMIT_BODY)
    clock.advance(5)
    before = dt.datetime.now(dt.UTC)
    snapshot = limiter.statistics()
    after = dt.datetime.now(dt.UTC)
    assert before <= snapshot.taken_at <= after
    stats = snapshot[POOL]
    assert stats.paused_for == 15
    assert stats.paused_until == snapshot.taken_at + dt.timedelta(seconds=15)
    pause = stats.events["pause"]
    assert pause == EventSummary(
        "pause", 1, 5.0, snapshot.taken_at - dt.timedelta(seconds=5), {"seconds": 20.0, "reason": "429"}
    )
    assert dict(stats.events["limit_change"].detail) == {"requests": 60}  # learned from the headers
    assert stats.events["rate_limited"].count == 1
    assert set(stats.events) == {"limit_change", "burst_change", "pause", "rate_limited", "transit_change"}


def test_a_pool_not_made_yet_is_a_clear_error() -> None:
    limiter = Limiter("tier-1", clock=FakeClock())
    limiter.acquire_nowait(SONNET, max_tokens=10)
    with pytest.raises(UnknownPoolError) as info:
        limiter.statistics()["haiku-4.5"]
    assert str(info.value) == (
        "no pool 'haiku-4.5' in these statistics: a pool is made at its first request "
        "(a model's pool is limiter.pool_of(model)); pools now: sonnet-4.x"
    )
    assert isinstance(info.value, KeyError)  # as a mapping's lookup, for code that catches that
    assert (info.value.pool, info.value.pools) == ("haiku-4.5", ("sonnet-4.x",))


def test_str_says_the_snapshot_in_lines() -> None:
    clock = FakeClock()
    limiter = Limiter("tier-1", opening=60, clock=clock)
    permit = limiter.acquire_nowait(SONNET, input_tokens=3_000, max_tokens=800)
    permit.observe(headers(retry_after=12), status=429, body=RATE_LIMIT_BODY)
    clock.advance(2)
    text = str(limiter.statistics())
    head, *lines = text.splitlines()
    assert re.fullmatch(r"ratekeeper statistics at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", head)
    lines[5] = re.sub(r"until .* UTC", "until T", lines[5])
    assert lines == [
        "sonnet-4.x: 1 granted, 1 in flight, 0 waiting; wait p50 0 s, p99 0 s",
        "  requests: 25 of 25 left, limit 50/min; last 60 s used 1 (4% of what was on offer)",
        "  input_tokens: 15,000 of 15,000 left, limit 30,000/min;"
        " last 60 s used 3,000 (17% of what was on offer)",
        "  output_tokens: 4,000 of 4,000 left, limit 8,000/min;"
        " last 60 s used 800 (17% of what was on offer)",
        "  429s 1 (0 predicted), 529s 0, resyncs 0 down, 0 up; reports read at: unknown;"
        " burst 0.5 (30 s of refill), share 100%",
        "  paused 10 s more, until T (429 rate_limit_error)",
        "  burst_change x1, last 2 s ago: burst=0.5",
        "  transit_change x1, last 2 s ago: transit=0.5",
        "  pause x1, last 2 s ago: seconds=12, reason=429",
        "  rate_limited x1, last 2 s ago: predicted=False, retry_after=12",
    ]
    assert str(Limiter("tier-1").statistics()).splitlines()[1] == (
        "no pools yet (a pool is made at its first request)"
    )
