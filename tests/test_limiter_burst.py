"""The burst a pool assumes: read from the headers, fitted, clamped; and the rounding tolerance of resync.

All synchronous, on a hand-moved clock: ``acquire_nowait`` and ``observe``.
"""

from __future__ import annotations

import pytest

from ratekeeper import Limiter
from ratekeeper.core._pool import MIN_BURST, Pool

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
    # the tightest bound is ITPM's: (0 remaining + 500 rounding + 500/s * 1 s) / 30,000 = 2/60
    # (RPM's is (0 + 1 + 50/60 * 1) / 50 = 0.037, OTPM's (0 + 500 + 8000/60 * 1) / 8,000 = 0.079);
    # two seconds at most, and no report showed more than one: the documented one-second bucket
    assert stats.burst == pytest.approx(MIN_BURST)
    assert stats.rate_limited == 0
    assert stats.capacity["input_tokens"] == pytest.approx(30_000 * stats.burst)


def test_full_minute_headers_leave_the_burst_alone() -> None:
    clock = Clock()
    limiter = Limiter("tier-1", opening=60, clock=clock)
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


def test_stale_headers_of_a_long_request_leave_a_full_minute_burst_alone() -> None:
    """A non-streamed response's buckets were read when its request arrived, its date when it ended."""
    clock = Clock()
    limiter = Limiter("tier-1", opening=60, clock=clock)
    permit = limiter.acquire_nowait(SONNET, input_tokens=2000, max_tokens=1000)
    clock.now += 12.0  # the request ran 12 s
    # Read at arrival: 20,000 input tokens left, full 20 s later; the date is 12 s on. Taken as
    # fresh, remaining + rate * (reset - date) = 20,000 + 500/s * 8 s = 24,000: a 0.8-minute bucket.
    permit.observe(
        headers(
            requests=(49, "2026-01-05T00:00:11Z"),
            input_=(20_000, "2026-01-05T00:00:18Z"),
            output=(7_000, "2026-01-05T00:00:17Z"),
        )
        | {"date": "Mon, 05 Jan 2026 00:00:10 GMT"}
    )
    assert limiter.statistics()[POOL].burst == 1.0
    # the same report, fresh (its request admitted just now) shows the smaller bucket
    fresh = limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)
    fresh.observe(
        headers(
            requests=(49, "2026-01-05T00:00:11Z"),
            input_=(20_000, "2026-01-05T00:00:18Z"),
            output=(7_000, "2026-01-05T00:00:17Z"),
        )
    )
    assert limiter.statistics()[POOL].burst == pytest.approx((20_000 + 500 + 500 * 8) / 30_000)


def test_a_reset_in_the_past_is_no_evidence() -> None:
    clock = Clock()
    limiter = Limiter("tier-1", opening=60, clock=clock)
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
    limiter = Limiter("tier-1", opening=60, clock=clock)
    permit = limiter.acquire_nowait(SONNET, input_tokens=2000, max_tokens=1000)
    tight = headers(
        requests=(0, "2026-01-05T00:00:11Z"),
        input_=(0, "2026-01-05T00:00:11Z"),
        output=(0, "2026-01-05T00:00:11Z"),
    )
    permit.observe({**tight, "retry-after": "1"}, status=429)
    stats = limiter.statistics()[POOL]
    assert stats.burst == pytest.approx(MIN_BURST)
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


def test_fit_burst_only_shrinks_and_never_below_one_second() -> None:
    pool = Pool("p", {"requests": 60}, now=0.0)
    assert not pool.fit_burst(2.0, now=0.0)
    assert pool.fit_burst(0.97, now=0.0)  # an upper bound: any smaller one is evidence
    assert pool.burst == pytest.approx(0.97)
    assert pool.fit_burst(0.001, now=0.0)
    assert pool.burst == MIN_BURST


def test_growth_stops_at_the_smallest_bucket_the_headers_showed() -> None:
    pool = Pool("p", {"input_tokens": 60_000}, now=0.0)
    assert pool.fit_burst(0.4, now=0.0)
    pool.shrink_burst(now=0.0)  # an unexplained 429: 0.2
    for minute in range(1, 6):
        pool.grow_burst(now=60.0 * minute)
    assert pool.burst == pytest.approx(0.4)  # not 1.0: the headers showed at most 0.4
    # a report of more left than that bucket holds proves a bigger one
    assert pool.widen_burst(0.55, now=300.0)
    assert pool.burst == pytest.approx(0.55)
    assert not pool.widen_burst(0.5, now=300.0)
    pool.shrink_burst(now=300.0)
    for minute in range(6, 12):
        pool.grow_burst(now=60.0 * minute)
    assert pool.burst == pytest.approx(0.55)


def test_a_report_of_more_left_than_the_burst_holds_widens_it() -> None:
    clock = Clock()
    limiter = Limiter("tier-1", opening=60, clock=clock)
    permit = limiter.acquire_nowait(SONNET, input_tokens=2000, max_tokens=1000)
    permit.observe({"retry-after": "0"}, status=429)  # unexplained: the burst halves
    assert limiter.statistics()[POOL].burst == 0.5
    clock.now += 1.0
    later = limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)
    later.observe(
        headers(
            requests=(20, "2026-01-05T00:00:46Z"),
            input_=(25_000, "2026-01-05T00:01:10Z"),
            output=(5_000, "2026-01-05T00:00:32Z"),
        )
    )
    # 25,000 - 500 rounding left of 30,000 (RPM: 20 of 50, OTPM: 4,500 of 8,000):
    # the server's bucket holds at least 0.817 of a minute
    assert limiter.statistics()[POOL].burst == pytest.approx(24_500 / 30_000)


def test_reports_whose_dimensions_disagree_on_the_bucket_settle_the_burst_once() -> None:
    """One dimension shows a bucket of at most a few seconds, another more left than that holds.

    One burst serves every dimension of a pool, so it takes the smaller (safe) and stays
    there: it used to shrink to the upper bound on one report and widen to the lower on the
    next, resizing every bucket (and saying so) on every response.
    """
    clock = Clock()
    changes: list[object] = []
    limiter = Limiter(
        "tier-1",
        clock=clock,
        opening=60,
        on_event=lambda event: changes.append(event.detail) if event.kind == "burst_change" else None,
    )
    report = headers(
        # RPM full again a second after the date with 30 of 50 left: at most 31.8/50 of a minute
        requests=(30, "2026-01-05T00:00:11Z"),
        # OTPM 7,900 of 8,000 left: the bucket holds at least 0.925 of a minute
        input_=(29_000, "2026-01-05T00:00:12Z"),
        output=(7_900, "2026-01-05T00:00:11Z"),
    )
    for _ in range(6):
        permit = limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)
        permit.settle({"input_tokens": 10, "output_tokens": 10}, headers=report)
        clock.now += 0.01
    bursts = [limiter.statistics()[POOL].burst]
    assert len(changes) == 1, changes
    assert bursts[0] == pytest.approx((30 + 1 + 50 / 60 * 1.01) / 50, rel=0.02)


def test_request_resync_is_exact() -> None:
    pool = Pool("p", {"requests": 50}, now=0.0)
    assert pool.resync("requests", 49.0, 0.0) == -1.0
    assert pool.levels(0.0)["requests"] == 49.0


def test_429s_others_caused_cut_the_share_of_the_refill_once_per_event() -> None:
    """AIMD on the refill rate: others' traffic, seen only as 429s the headers explain."""
    from ratekeeper.gate._resync import MIN_SHARE, SHARE_DECREASE, SHARE_STEP, SHARE_STEP_EVERY

    clock = Clock()
    events: list[tuple[str, dict[str, float]]] = []
    limiter = Limiter(
        "tier-1", opening=60, clock=clock, on_event=lambda e: events.append((e.kind, dict(e.detail)))
    )
    first = limiter.acquire_nowait(SONNET, input_tokens=2000, max_tokens=1000)
    second = limiter.acquire_nowait(SONNET, input_tokens=2000, max_tokens=1000)
    # the server had 1,000 input tokens left (another client took the rest); its bucket is a
    # minute's (full in 58 s at 500/s): the refusal is explained, the burst is right
    explained = headers(
        requests=(48, "2026-01-05T00:00:12Z"),
        input_=(1_000, "2026-01-05T00:01:08Z"),
        output=(6_000, "2026-01-05T00:00:25Z"),
    )
    first.observe({**explained, "retry-after": "2"}, status=429)
    rate = 30_000 / 60
    share = SHARE_DECREASE
    assert ("share_change", {"share": share}) in events
    stats = limiter.statistics()[POOL]
    assert (stats.burst, stats.rate_limited, stats.rate_limited_predicted) == (1.0, 1, 1)
    assert stats.share == pytest.approx(share)
    # a 429 of a request admitted before the cut is the same event: no second cut
    second.observe({**explained, "retry-after": "2"}, status=429)
    assert [k for k, _ in events].count("share_change") == 1
    first.release()
    second.release()
    # the buckets now refill at the share of the rate
    before = limiter.statistics()[POOL].levels["input_tokens"]
    clock.now += 4.0
    assert limiter.statistics()[POOL].levels["input_tokens"] == pytest.approx(before + 4.0 * rate * share)
    # a request admitted after the cut, refused the same way: a new event
    clock.now += 60.0  # the buckets full again
    third = limiter.acquire_nowait(SONNET, input_tokens=2000, max_tokens=100)
    third.observe({**explained, "retry-after": "0"}, status=429)
    third.release()
    share *= SHARE_DECREASE
    shares = [d["share"] for k, d in events if k == "share_change"]
    assert shares == [pytest.approx(SHARE_DECREASE), pytest.approx(share)]
    # clean responses raise it back, one step per SHARE_STEP_EVERY seconds
    for _ in range(3):
        clock.now += SHARE_STEP_EVERY
        ok = limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)
        ok.observe({}, status=200)
        ok.settle({"input_tokens": 10, "output_tokens": 5})
        share = min(1.0, share + SHARE_STEP)
    kind, detail = events[-1]
    assert kind == "share_change"
    assert detail["share"] == pytest.approx(share)
    assert MIN_SHARE <= share < 1.0


def test_a_limit_set_by_hand_keeps_the_cut_share() -> None:
    from ratekeeper.gate._resync import SHARE_DECREASE

    clock = Clock()
    limiter = Limiter("tier-1", clock=clock)
    permit = limiter.acquire_nowait(SONNET, input_tokens=2000, max_tokens=1000)
    explained = headers(
        requests=(48, "2026-01-05T00:00:12Z"),
        input_=(1_000, "2026-01-05T00:01:08Z"),
        output=(6_000, "2026-01-05T00:00:25Z"),
    )
    permit.observe({**explained, "retry-after": "0"}, status=429)
    permit.release()
    limiter.set_limits(POOL, input_tokens=60_000)
    before = limiter.statistics()[POOL].levels["input_tokens"]
    clock.now += 2.0
    after = limiter.statistics()[POOL].levels["input_tokens"]
    assert after - before == pytest.approx(2.0 * 60_000 / 60 * SHARE_DECREASE)


def test_a_request_sent_long_after_its_grant_is_still_replayed_after_a_report() -> None:
    """The look back over recent sends reaches as far as the slowest grant-to-send seen."""
    clock = Clock()
    limiter = Limiter("tier-1", opening=60, clock=clock)
    first = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
    first.mark_sent()
    late = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
    clock.now += 3.0  # held three seconds between its grant and its send
    late.mark_sent()
    rt = limiter._pools[POOL]
    assert rt.look_back() == pytest.approx(3.0)
    replay = rt.changes_since(clock.now - 1.0, first.seq)
    assert replay is not None
    assert [change["requests"] for _, change in replay] == [-1.0]  # the late send, drawn after
