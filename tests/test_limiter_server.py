"""What the server says back: resync, 429 pauses, adaptive burst, 529, spend and subscription limits.

Also the warm-up ramp. Step tables run at fixed instants of a ``FakeClock``;
waits are timed under trio's autojumping ``MockClock`` only.
"""

from __future__ import annotations

import datetime as dt

import anyio
import pytest
from limiter_support import (
    HAIKU,
    HAIKU_POOL,
    OVERLOADED_BODY,
    POOL,
    RATE_LIMIT_BODY,
    SEED_WAIT,
    SONNET,
    SPEND_BODY,
    Events,
    FakeClock,
    headers,
    levels,
    queued,
    settle_soon,
    unified_headers,
)

from ratekeeper import Limiter, Permit, SpendLimitReached, WouldBlock

pytestmark = pytest.mark.anyio


# ---------------------------------------------------------------- resync


def test_foreign_traffic_seen_only_through_headers_is_respected() -> None:
    clock = FakeClock()
    limiter = Limiter("tier-1", opening=60, clock=clock)
    permit = limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=1_000)
    # another process spent most of the minute: the server has far less than we think
    permit.observe(headers(requests=(50, 20), input_tokens=(30_000, 10_000), output_tokens=(8_000, 2_000)))
    permit.settle({"input_tokens": 1_000, "output_tokens": 1_000})
    # token remainders are rounded to the nearest thousand: assume the worst (-500)
    assert levels(limiter) == {"requests": 20, "input_tokens": 9_500, "output_tokens": 1_500}
    limiter.acquire_nowait(SONNET, input_tokens=9_000, max_tokens=1_000)
    with pytest.raises(WouldBlock):
        limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=1)
    assert limiter.statistics()[POOL].resyncs == 3


def test_resync_raises_to_what_the_server_provably_holds() -> None:
    """The server counts less than the model did (an over-estimate, a refund missed): rise to it.

    Settled with its answer's headers, which say the server still holds everything: taken
    at admission or at the response, the report says the same here (nothing else was
    granted or refilled since), so the level rises to its lowest reading.
    """
    limiter = Limiter("tier-1", clock=FakeClock())
    permit = limiter.acquire_nowait(SONNET, input_tokens=10_000, max_tokens=1_000)
    permit.mark_sent()
    permit.settle(
        {"input_tokens": 10_000, "output_tokens": 1_000},
        headers=headers(requests=(50, 50), input_tokens=(30_000, 30_000), output_tokens=(8_000, 8_000)),
    )
    assert levels(limiter) == {"requests": 50, "input_tokens": 29_500, "output_tokens": 7_500}
    stats = limiter.statistics()[POOL]
    assert (stats.resyncs, stats.raised) == (0, 3)


def test_a_report_read_before_its_request_settles_lifts_no_input() -> None:
    """It already counts the request's real input, which the settlement would give back again
    as our estimate's excess; a request and a max_tokens reservation are the server's too."""
    limiter = Limiter("tier-1", opening=60, clock=FakeClock())
    permit = limiter.acquire_nowait(SONNET, input_tokens=10_000, max_tokens=1_000)
    permit.observe(headers(requests=(50, 50), input_tokens=(30_000, 30_000), output_tokens=(8_000, 8_000)))
    assert levels(limiter) == {"requests": 50, "input_tokens": 20_000, "output_tokens": 7_500}
    assert limiter.statistics()[POOL].raised == 2


def test_resync_counts_own_requests_admitted_later_as_unseen() -> None:
    limiter = Limiter("tier-1", opening=60, clock=FakeClock())
    first = limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=1_000)
    limiter.acquire_nowait(SONNET, input_tokens=2_000, max_tokens=500)  # after first: unseen by it
    # first's response: the server saw first (and 17,000 of foreign input) but not the second
    first.observe(headers(requests=(50, 49), input_tokens=(30_000, 12_000), output_tokens=(8_000, 7_000)))
    assert levels(limiter) == {
        "requests": 48,  # exact: 49 - 1
        "input_tokens": 9_500,  # 12,000 - 500 - 2,000
        "output_tokens": 6_000,  # 7,000 - 500 - 500
    }


def test_resync_counts_requests_finished_since_as_spent() -> None:
    """A later request that already finished is no longer in flight, but the report predates it too."""
    limiter = Limiter("tier-1", opening=60, clock=FakeClock())
    slow = limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=100)
    quick = limiter.acquire_nowait(SONNET, input_tokens=8_000, max_tokens=100)
    quick.observe({})
    quick.settle({"input_tokens": 8_000, "output_tokens": 100})
    # slow's response, from before quick reached the server; foreign traffic took 19,000
    slow.observe(headers(input_tokens=(30_000, 10_000)))
    assert levels(limiter)["input_tokens"] == 1_500  # 10,000 - 500 - quick's 8,000


def test_a_refused_requests_headers_leave_it_out() -> None:
    """A 429's remaining does not count the refused request: giving its tokens back must not over-credit."""
    limiter = Limiter("tier-1", opening=60, clock=FakeClock(), adaptive_burst=False)
    permit = limiter.acquire_nowait(SONNET, input_tokens=20_000, max_tokens=10)
    # another client left 15,000: too few for this one, so the server refuses it outright
    permit.observe(headers(input_tokens=(30_000, 15_000), retry_after=1), status=429, body=RATE_LIMIT_BODY)
    permit.release()  # the tokens come back
    assert levels(limiter)["input_tokens"] == 14_500  # what the server has, less the rounding


def test_resync_counts_earlier_requests_not_sent_yet_as_unseen() -> None:
    limiter = Limiter("tier-1", opening=60, clock=FakeClock())
    early = limiter.acquire_nowait(SONNET, input_tokens=10_000, max_tokens=10)  # admitted, not sent yet
    sent = limiter.acquire_nowait(SONNET, input_tokens=5_000, max_tokens=10)
    sent.mark_sent()
    # the server saw only `sent`, and 12,000 from another client: 30,000 - 12,000 - 5,000
    sent.observe(headers(input_tokens=(30_000, 13_000)))
    assert levels(limiter)["input_tokens"] == 2_500  # 13,000 - 500 - early's 10,000
    early.release()  # it never left after all
    assert levels(limiter)["input_tokens"] == 12_500  # not above the server's 13,000


def test_an_earlier_request_given_back_unsent_is_no_news_to_the_server() -> None:
    limiter = Limiter("tier-1", opening=60, clock=FakeClock())
    early = limiter.acquire_nowait(SONNET, input_tokens=10_000, max_tokens=10)
    sent = limiter.acquire_nowait(SONNET, input_tokens=5_000, max_tokens=10)
    sent.mark_sent()
    early.release()  # never sent: back to 25,000 here, and the server never saw it
    sent.observe(headers(input_tokens=(30_000, 13_000)))  # 12,000 from another client
    assert levels(limiter)["input_tokens"] == 12_500


def test_resync_orders_by_admission_not_by_arrival_in_the_queue() -> None:
    """A waiter granted after a permit is unseen by that permit's response, however early it queued."""

    async def main() -> None:
        clock = FakeClock()
        limiter = Limiter("tier-1", opening=60, clock=clock)
        # sent well before everything else: the report below has seen it
        limiter.acquire_nowait(SONNET, input_tokens=25_000, max_tokens=10).mark_sent()
        clock.advance(1)
        granted: list[Permit] = []

        async def want(**cost: int) -> None:
            async with limiter.acquire(SONNET, **cost) as permit:  # type: ignore[arg-type]
                granted.append(permit)
                permit.mark_sent()
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: want(input_tokens=20_000, max_tokens=10))  # queued first
            await settle_soon(queued(limiter, 1))
            tg.start_soon(lambda: want(cache_read_input_tokens=5_000, max_tokens=10))  # backfilled
            await settle_soon(lambda: len(granted) == 1)
            (cached,) = granted
            clock.advance(30)  # the head's time
            limiter.set_limits(POOL)  # wake the queue at the new instant
            await settle_soon(lambda: len(granted) == 2)
            assert len(granted) == 2
            assert levels(limiter)["input_tokens"] == 500
            clock.advance(1)  # the head has reached the server
            # cached's response: 5,000 left. Taken at cached's admission (before the head's grant;
            # up to a quarter second after its send at t = 1, so its refill counts from 1.25), it
            # means 4,500 at the least then, 29.75 s of refill (19,375), the head's 20,000 at t = 31
            # (and 5% more: unsettled, its estimate may fall short) and a second of refill: -1,125
            # now. Taken now, 4,500. The lower is the one safe under both (lowering to the report
            # less the head's 20,000, -15,500, would forget the refill)
            cached.observe(headers(input_tokens=(30_000, 5_000)))
            assert levels(limiter)["input_tokens"] == -1_125
            tg.cancel_scope.cancel()

    anyio.run(main)


# ---------------------------------------------------------------- 429


async def test_a_long_retry_after_pauses_only_its_pool(anyio_backend_name: str) -> None:
    """A subscription 429 with retry-after 7999 s holds Sonnet; Haiku keeps flowing."""
    limiter = Limiter("tier-1", opening=60)
    start = anyio.current_time()
    granted: list[float] = []
    async with limiter.acquire(SONNET, input_tokens=100, max_tokens=100) as permit:
        permit.observe(headers(retry_after=7999), status=429, body=RATE_LIMIT_BODY)

    async def sonnet() -> None:
        async with limiter.acquire(SONNET, input_tokens=100, max_tokens=100):
            granted.append(anyio.current_time() - start)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(sonnet)
        await settle_soon(queued(limiter, 3))
        with pytest.raises(WouldBlock, match=r"^sonnet-4\.x: .*: 429 rate_limit_error$") as info:
            limiter.acquire_nowait(SONNET, max_tokens=1)
        assert info.value.retry_after == pytest.approx(7999, abs=1)
        for _ in range(20):  # Haiku is not held up at all
            async with limiter.acquire(HAIKU, input_tokens=100, max_tokens=100) as other:
                other.observe({})
        if anyio_backend_name == "trio":
            assert anyio.current_time() == start
        stats = limiter.statistics()
        assert stats[POOL].queue_depth == 3
        assert stats[POOL].paused_for == pytest.approx(7999, abs=1)
        assert stats[POOL].pause_reason == "429 rate_limit_error"
        assert stats[HAIKU_POOL].paused_for == 0
        assert stats[HAIKU_POOL].granted == 20
        if anyio_backend_name != "trio":
            tg.cancel_scope.cancel()
    if anyio_backend_name == "trio":
        assert granted == [pytest.approx(7999)] * 3


def test_a_refusal_event_lengthens_the_transit_once_per_event() -> None:
    """0.25 s assumed at first; 0.5 after the first refusal, then doubled per event, at most 3 s.

    The refusals here are explained by the reported remaining (the burst stays a minute's), so
    the cap is 5% of a 60 s bucket. Two permits granted before the first refusal are one
    event: the second 429 teaches nothing.
    """
    clock = FakeClock()
    events = Events()
    limiter = Limiter("tier-1", opening=60, clock=clock, on_event=events)
    empty = headers(requests=(50, 0), retry_after=1)
    first = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
    same_wave = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
    first.observe(empty, status=429, body=RATE_LIMIT_BODY)
    first.release()
    same_wave.observe(empty, status=429, body=RATE_LIMIT_BODY)
    same_wave.release()
    assert [e.detail["transit"] for e in events.of("transit_change")] == [0.5]
    for _ in range(5):
        clock.advance(120)
        later = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
        later.observe(empty, status=429, body=RATE_LIMIT_BODY)
        later.release()
    assert limiter.statistics()[POOL].burst == 1.0
    assert [e.detail["transit"] for e in events.of("transit_change")] == [0.5, 1.0, 2.0, 3.0]


def test_on_a_short_bucket_the_transit_learned_stays_a_small_share_of_it() -> None:
    """Unexplained refusals halve the burst (0.5, 0.25, ...): the transit follows at 5% of it.

    Where buckets are short the refusals are the bucket's, not late requests': a transit near
    the bucket's length would leave most of every report's refill uncounted (measured: the
    5 s streamed regime fell from 80% to 71% of the limit before this cap, 78.6% with it).
    """
    clock = FakeClock()
    events = Events()
    limiter = Limiter("tier-1", opening=60, clock=clock, on_event=events)
    for _ in range(4):
        clock.advance(120)
        permit = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
        permit.observe(headers(retry_after=1), status=429, body=RATE_LIMIT_BODY)
        permit.release()
    assert [e.detail["burst"] for e in events.of("burst_change")][:2] == [0.5, 0.25]
    assert [e.detail["transit"] for e in events.of("transit_change")] == [0.5, 0.75]


def test_a_limiter_without_adaptive_burst_keeps_its_transit() -> None:
    events = Events()
    limiter = Limiter("tier-1", clock=FakeClock(), on_event=events, adaptive_burst=False)
    permit = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
    permit.observe(headers(retry_after=1), status=429, body=RATE_LIMIT_BODY)
    permit.release()
    assert events.of("transit_change") == []


def test_an_unpredicted_429_shrinks_the_burst_and_clean_traffic_grows_it_back() -> None:
    """Measured: 0.5 after the 429, then x1.25 per 60 clean seconds: back to 1.0 after 240 s."""
    clock = FakeClock()
    events = Events()
    limiter = Limiter("tier-1", opening=60, clock=clock, on_event=events)
    permit = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
    permit.observe(headers(retry_after=1), status=429, body=RATE_LIMIT_BODY)
    permit.release()
    stats = limiter.statistics()[POOL]
    assert stats.burst == 0.5
    assert stats.capacity == {"requests": 25, "input_tokens": 15_000, "output_tokens": 4_000}
    assert (stats.rate_limited, stats.rate_limited_predicted) == (1, 0)
    assert [e.detail["burst"] for e in events.of("burst_change")] == [0.5]

    history: list[tuple[float, float]] = []
    for second in range(2, 302, 2):  # a clean request every 2 s (30 per minute)
        clock.advance(2)
        ok = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
        ok.observe({})
        ok.settle({"input_tokens": 100, "output_tokens": 50})
        burst = limiter.statistics()[POOL].burst
        if not history or history[-1][1] != burst:
            history.append((second, burst))
    assert history == [(2, 0.5), (60, 0.625), (120, 0.78125), (180, 0.9765625), (240, 1.0)]


def test_a_burst_of_429s_from_one_event_shrinks_the_burst_once() -> None:
    clock = FakeClock()
    limiter = Limiter("tier-1", opening=60, clock=clock)
    permits = [limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=100) for _ in range(10)]
    for permit in permits:  # all sent before the server said no
        permit.observe(headers(retry_after=5), status=429, body=RATE_LIMIT_BODY)
    assert limiter.statistics()[POOL].burst == 0.5
    clock.advance(5)
    late = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
    late.observe(headers(retry_after=5), status=429, body=RATE_LIMIT_BODY)  # admitted after: news
    assert limiter.statistics()[POOL].burst == 0.25


def test_a_predicted_429_does_not_shrink_the_burst() -> None:
    limiter = Limiter("tier-1", opening=60, clock=FakeClock())
    permit = limiter.acquire_nowait(SONNET, input_tokens=5_000, max_tokens=100)
    permit.observe(headers(input_tokens=(30_000, 2_000), retry_after=3), status=429, body=RATE_LIMIT_BODY)
    stats = limiter.statistics()[POOL]
    assert stats.burst == 1.0
    assert (stats.rate_limited, stats.rate_limited_predicted) == (1, 1)
    assert stats.paused_for == 3


def test_a_shrunk_burst_still_charges_a_whole_request() -> None:
    """After two shrinks the OTPM bucket holds 2,000; an 8,000 request leaves 6,000 of debt."""
    clock = FakeClock()
    limiter = Limiter("tier-1", opening=60, clock=clock)
    for _ in range(2):
        permit = limiter.acquire_nowait(SONNET, max_tokens=1)
        permit.observe(headers(retry_after=1), status=429, body=RATE_LIMIT_BODY)
        permit.release()
        clock.advance(120)
    assert limiter.statistics()[POOL].capacity["output_tokens"] == 2_000
    limiter.acquire_nowait(SONNET, max_tokens=8_000)
    assert levels(limiter)["output_tokens"] == -6_000
    with pytest.raises(WouldBlock) as info:
        limiter.acquire_nowait(SONNET, max_tokens=100)
    assert info.value.retry_after == pytest.approx(6_100 / (8_000 / 60))


async def test_a_429_whose_headers_show_room_lets_no_waiter_in_before_its_pause() -> None:
    """The refusal's report shows the server holds more than the model (which lifts the level),
    but the pause it carries comes first: a waiter let in by the lift would be sent into the
    retry-after."""
    clock = FakeClock()
    limiter = Limiter("tier-1", opening=60, clock=clock, adaptive_burst=False)
    spent = limiter.acquire_nowait(SONNET, max_tokens=8_000)  # the output bucket, all of it
    spent.settle({"input_tokens": 0, "output_tokens": 8_000})
    clock.advance(1.0)  # long enough for the server to have seen it
    permit = limiter.acquire_nowait(SONNET, max_tokens=0)
    granted: list[Permit] = []

    async def waiter() -> None:
        async with limiter.acquire(SONNET, max_tokens=4_000) as later:
            granted.append(later)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await settle_soon(queued(limiter, 1))
        full = headers(requests=(50, 49), input_tokens=(30_000, 30_000), output_tokens=(8_000, 8_000))
        permit.observe({**full, "retry-after": "5"}, status=429, body=RATE_LIMIT_BODY)
        for _ in range(20):
            await anyio.sleep(0)
        assert granted == []
        stats = limiter.statistics()[POOL]
        assert stats.queue_depth == 1
        assert stats.paused_for == pytest.approx(5.0)
        tg.cancel_scope.cancel()
    permit.release()


def test_a_429_without_retry_after_pauses_a_second() -> None:
    clock = FakeClock()
    limiter = Limiter("tier-1", clock=clock, adaptive_burst=False)
    permit = limiter.acquire_nowait(SONNET, max_tokens=10)
    permit.observe({}, status=429, body=RATE_LIMIT_BODY)
    assert limiter.statistics()[POOL].paused_for == 1.0


# ---------------------------------------------------------------- 529


async def test_529_backs_off_without_touching_limits_or_burst(anyio_backend_name: str) -> None:
    limiter = Limiter("tier-1", opening=60)
    start = anyio.current_time()
    permit = limiter.acquire_nowait(SONNET, max_tokens=10)
    before = limiter.statistics()[POOL]
    permit.observe({}, status=529, body=OVERLOADED_BODY)
    permit.release()
    after = limiter.statistics()[POOL]
    assert (after.limits, after.capacity, after.burst) == (before.limits, before.capacity, before.burst)
    assert after.overloaded == 1
    assert after.rate_limited == 0
    assert after.pause_reason == "529 overloaded"
    assert after.paused_for == pytest.approx(0.5, abs=0.01)
    if anyio_backend_name == "trio":
        async with limiter.acquire(SONNET, max_tokens=10) as again:
            assert anyio.current_time() - start == pytest.approx(0.5)
            again.observe({}, status=529, body=OVERLOADED_BODY)  # the next backoff doubles
        async with limiter.acquire(SONNET, max_tokens=10) as ok:
            assert anyio.current_time() - start == pytest.approx(1.5)
            ok.observe({})
        assert limiter.statistics()[POOL].burst == 1.0


def test_an_overloaded_error_in_a_stream_backs_off_too() -> None:
    limiter = Limiter("tier-1", clock=FakeClock())
    permit = limiter.acquire_nowait(SONNET, max_tokens=10)
    permit.observe({}, status=200, body=OVERLOADED_BODY)
    assert limiter.statistics()[POOL].overloaded == 1


# ---------------------------------------------------------------- spend limit


async def test_spend_limit_fails_every_waiter_at_once() -> None:
    events = Events()
    limiter = Limiter("tier-1", clock=FakeClock(), on_event=events)
    limiter.acquire_nowait(SONNET, max_tokens=8_000)
    limiter.acquire_nowait(HAIKU, max_tokens=10_000)
    failures: list[BaseException] = []

    async def want(model: str) -> None:
        try:
            await limiter.acquire(model, max_tokens=1_000)
        except SpendLimitReached as exc:
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        for model in (SONNET, SONNET, HAIKU):
            tg.start_soon(want, model)
        await settle_soon(lambda: queued(limiter, 2)() and queued(limiter, 1, HAIKU_POOL)())
        # another request's response: no retry-after, a spend-limit error code
        limiter.observe({"date": "Sat, 02 Aug 2025 20:27:04 GMT"}, model=SONNET, status=429, body=SPEND_BODY)
    assert len(failures) == 3
    for failure in failures:
        assert isinstance(failure, SpendLimitReached)
        assert failure.resets_at == dt.datetime(2025, 9, 1, tzinfo=dt.UTC)
        assert str(failure) == (
            "the organization's monthly spend limit is reached; usage resumes at 2025-09-01T00:00:00Z "
            "(You have reached your specified API usage limits.)"
        )
    with pytest.raises(
        SpendLimitReached,
        match=r"^the organization's monthly spend limit is reached; usage resumes at 2025-09-01T00:00:00Z$",
    ):
        await limiter.acquire(SONNET, max_tokens=1)
    assert limiter.statistics().spend_limited
    assert [e.detail["resets_at"] for e in events.of("spend_limit")] == [
        dt.datetime(2025, 9, 1, tzinfo=dt.UTC)
    ]


def test_spend_limit_in_december_resets_in_january() -> None:
    limiter = Limiter("tier-1", clock=FakeClock())
    permit = limiter.acquire_nowait(SONNET, max_tokens=1)
    permit.observe({"date": "Wed, 31 Dec 2025 23:59:59 GMT"}, status=429, body=SPEND_BODY)
    with pytest.raises(SpendLimitReached) as info:
        limiter.acquire_nowait(SONNET, max_tokens=1)
    assert info.value.resets_at == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_a_broken_hook_does_not_stop_the_spend_limit_failing_waiters() -> None:
    def broken(event: object) -> None:
        raise RuntimeError("hook bug")

    async def main() -> None:
        limiter = Limiter("tier-1", clock=FakeClock(), on_event=broken)
        limiter.acquire_nowait(SONNET, max_tokens=8_000)
        failures: list[BaseException] = []

        async def want() -> None:
            try:
                await limiter.acquire(SONNET, max_tokens=1_000)
            except SpendLimitReached as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(want)
            await settle_soon(queued(limiter, 1))
            limiter.observe({}, model=SONNET, status=429, body=SPEND_BODY)
            limiter.observe(unified_headers("allowed_warning"), model=SONNET)
        assert len(failures) == 1

    anyio.run(main)


# ---------------------------------------------------------------- subscription (unified) status


async def test_unified_rejected_holds_until_the_unified_reset(anyio_backend_name: str) -> None:
    limiter = Limiter("tier-1")
    start = anyio.current_time()
    permit = limiter.acquire_nowait(HAIKU, max_tokens=1)
    permit.observe(unified_headers("rejected"), status=200)
    permit.release()
    stats = limiter.statistics()
    assert stats[HAIKU_POOL].paused_for == pytest.approx(SEED_WAIT, abs=0.5)  # reset - date
    assert stats[HAIKU_POOL].pause_reason == "subscription limit (five_hour)"
    if anyio_backend_name == "trio":
        async with limiter.acquire(HAIKU, max_tokens=1):
            assert anyio.current_time() - start == pytest.approx(SEED_WAIT)
    else:
        with pytest.raises(WouldBlock):
            limiter.acquire_nowait(SONNET, max_tokens=1)  # every model pool: the window is account-wide


def test_unified_allowed_warning_emits_one_event_per_window() -> None:
    events = Events()
    limiter = Limiter("tier-1", opening=60, clock=FakeClock(), on_event=events)
    for _ in range(3):
        permit = limiter.acquire_nowait(HAIKU, max_tokens=1)
        permit.observe(unified_headers("allowed_warning"))
        permit.release()
    permit = limiter.acquire_nowait(HAIKU, max_tokens=1)
    permit.observe(unified_headers("allowed_warning", reset="1754197200"))  # the next window
    warnings = events.of("unified_warning")
    assert [(w.pool, w.detail["claim"], w.detail["reset"]) for w in warnings] == [
        (HAIKU_POOL, "five_hour", dt.datetime(2025, 8, 3, 0, 0, tzinfo=dt.UTC)),
        (HAIKU_POOL, "five_hour", dt.datetime(2025, 8, 3, 5, 0, tzinfo=dt.UTC)),
    ]
    assert limiter.statistics()[HAIKU_POOL].paused_for == 0  # a warning admits as before


def test_unified_allowed_does_nothing() -> None:
    events = Events()
    limiter = Limiter("tier-1", clock=FakeClock(), on_event=events)
    permit = limiter.acquire_nowait(HAIKU, max_tokens=1)
    permit.observe(unified_headers("allowed"))
    assert events.kinds() == []


# ---------------------------------------------------------------- warm-up


def test_warmup_ramps_admission_up() -> None:
    """60 s of slow start from 10%: requests admitted per 10 s grow, then match the plain limit."""
    clock = FakeClock()
    limiter = Limiter("tier-1", opening=60, warmup=60, clock=clock)
    plain = Limiter("tier-1", opening=60, clock=clock)
    counts: list[int] = []
    plain_counts: list[int] = []
    for _window in range(12):
        count = plain_count = 0
        for _ in range(100):
            clock.advance(0.1)
            for lim in (limiter, plain):
                try:
                    lim.acquire_nowait(SONNET, max_tokens=1).observe({})
                except WouldBlock:
                    continue
                if lim is limiter:
                    count += 1
                else:
                    plain_count += 1
        counts.append(count)
        plain_counts.append(plain_count)
    assert counts[:6] == [6, 3, 4, 5, 6, 8]  # 5 at once (10% of the bucket), then a rising rate
    assert plain_counts[:6] == [58, 8, 8, 9, 8, 8]  # a whole bucket at once, then 50 per minute
    assert sum(counts[6:]) == sum(plain_counts[6:]) == 50  # warm: 50 per minute, as without a warm-up
    assert limiter.statistics()[POOL].capacity == plain.statistics()[POOL].capacity


# ---------------------------------------------------------------- the moment a report describes


def test_a_reset_before_the_date_shows_a_report_taken_before_the_answer() -> None:
    """The bucket was full again before the answer left: its numbers are older than the answer."""
    clock = FakeClock()
    limiter = Limiter("tier-1", clock=clock)
    for _ in range(2):
        permit = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=10)
        permit.mark_sent()
        clock.advance(10)
        permit.observe(
            headers(
                requests=(50, 49),
                date="Mon, 05 Jan 2026 00:00:10 GMT",
                anthropic_ratelimit_requests_reset="2026-01-05T00:00:02Z",
            )
        )
        permit.settle({"input_tokens": 100, "output_tokens": 10})
    assert limiter.statistics()[POOL].report_moment == "admission"


def test_opening_spends_a_little_of_the_limit_until_the_first_report() -> None:
    clock = FakeClock()
    limiter = Limiter("tier-1", clock=clock, opening=5.0)  # 5 s of 30,000 ITPM: 2,500
    first = limiter.acquire_nowait(SONNET, input_tokens=2_000, max_tokens=10)
    with pytest.raises(WouldBlock):
        limiter.acquire_nowait(SONNET, input_tokens=2_000, max_tokens=10)
    first.mark_sent()
    # the server's bucket holds the full minute: the first report lifts the level to it
    first.settle(
        {"input_tokens": 2_000, "output_tokens": 10},
        headers=headers(requests=(50, 49), input_tokens=(30_000, 28_000), output_tokens=(8_000, 8_000)),
    )
    assert levels(limiter)["input_tokens"] == 27_500
    limiter.acquire_nowait(SONNET, input_tokens=20_000, max_tokens=10)


def test_a_settlement_at_the_reports_instant_of_a_request_granted_after_it_is_replayed() -> None:
    """Granted after the reported request at the same instant, and settled then with more input
    than estimated: the report, of the first admission, cannot hold that charge."""
    clock = FakeClock()
    limiter = Limiter("tier-1", clock=clock, opening=60)
    first = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=10)
    second = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=10)
    first.mark_sent()
    second.mark_sent()
    second.settle({"input_tokens": 601, "output_tokens": 10})
    first.settle(
        {"input_tokens": 100, "output_tokens": 10},
        headers=headers(requests=(50, 49), input_tokens=(30_000, 30_000), output_tokens=(8_000, 8_000)),
    )
    assert levels(limiter)["input_tokens"] <= 30_000 - 100 - 601  # what the server has left


def test_a_report_shown_older_than_its_answer_is_read_as_of_its_reset_at_the_latest() -> None:
    """Where the server is known to report either moment: a report whose reset is 8 s before
    its date is not of the answer's moment, and is read as taken anywhere from the admission
    to that reset, not as the lower of the two readings (40 left now, as if at the answer)."""
    clock = FakeClock()
    limiter = Limiter("tier-1", clock=clock, opening=60)
    moment = limiter._pools[limiter.pool_of(SONNET)].moment
    moment.refuted_admission = moment.refuted_response = 2  # both readings refuted: "mixed"
    permit = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=10)
    permit.mark_sent()
    clock.advance(10)
    permit.settle(
        {"input_tokens": 100, "output_tokens": 10},
        headers=headers(
            requests=(50, 40),
            date="Mon, 05 Jan 2026 00:00:10 GMT",
            anthropic_ratelimit_requests_reset="2026-01-05T00:00:02Z",
        ),
    )
    # 40 left then, and the refill since the latest it can have been: the reset, 2 s after
    # the send, and 1.5 s for the headers' rounding to the second
    assert levels(limiter)["requests"] == pytest.approx(40 + (10 - 2 - 1.5) * 50 / 60)


def test_a_new_pool_holds_one_second_of_the_limit_until_a_report_shows_more() -> None:
    """A minute's limit may be enforced over one second: the first wave goes at the refill rate
    (a request larger than a second still goes alone into a full bucket), and a report of a
    full-minute bucket opens the whole of it."""
    clock = FakeClock()
    limiter = Limiter("tier-1", clock=clock)  # 1 s of 30,000 ITPM: 500; of 50 RPM: one request
    first = limiter.acquire_nowait(SONNET, input_tokens=2_000, max_tokens=10)
    assert limiter.statistics()[POOL].capacity["input_tokens"] == 500
    with pytest.raises(WouldBlock):
        limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=10)
    first.mark_sent()
    clock.advance(1)
    first.settle(
        {"input_tokens": 2_000, "output_tokens": 10},
        headers=headers(requests=(50, 49), input_tokens=(30_000, 28_000), output_tokens=(8_000, 8_000)),
    )
    assert levels(limiter)["input_tokens"] == 27_500
    for _ in range(5):
        limiter.acquire_nowait(SONNET, input_tokens=5_000, max_tokens=10)


def test_a_report_of_no_more_than_a_second_keeps_the_pace() -> None:
    clock = FakeClock()
    limiter = Limiter("tier-1", clock=clock)
    permit = limiter.acquire_nowait(SONNET, input_tokens=400, max_tokens=100)
    permit.mark_sent()
    clock.advance(0.5)
    permit.settle(
        {"input_tokens": 400, "output_tokens": 100},
        headers=headers(requests=(50, 0), input_tokens=(30_000, 0), output_tokens=(8_000, 0)),
    )
    capacity = limiter.statistics()[POOL].capacity
    assert capacity == {"requests": 1.0, "input_tokens": 500.0, "output_tokens": 8_000 / 60}


def test_a_streams_report_lifts_input_less_its_own_estimate() -> None:
    """Read at the first byte, before the settlement that may give the estimate's excess back."""
    clock = FakeClock()
    limiter = Limiter("tier-1", clock=clock)
    permit = limiter.acquire_nowait(SONNET, input_tokens=2_000, max_tokens=100)
    permit.mark_sent()
    clock.advance(0.5)
    permit.observe(headers(requests=(50, 49), input_tokens=(30_000, 28_000), output_tokens=(8_000, 8_000)))
    assert levels(limiter)["input_tokens"] == 27_500 - 2_000
    permit.settle({"input_tokens": 1_500, "output_tokens": 100})  # the estimate was 500 over
    assert levels(limiter)["input_tokens"] == 27_500 - 2_000 + 500


def test_under_the_real_time_rule_a_report_lifts_output_less_what_requests_under_way_may_produce() -> None:
    clock = FakeClock()
    limiter = Limiter("tier-1", clock=clock, output_rule="actual")
    first = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=1_000)
    first.mark_sent()
    clock.advance(1.2)  # one request a second until a report shows more
    under_way = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=1_000)  # reserves no output
    under_way.mark_sent()
    clock.advance(2)
    first.settle(
        {"input_tokens": 100, "output_tokens": 300},
        headers=headers(requests=(50, 48), input_tokens=(30_000, 30_000), output_tokens=(8_000, 8_000)),
    )
    # the report less its rounding, less the 1,000 the request under way may still produce
    assert levels(limiter)["output_tokens"] == pytest.approx(8_000 - 500 - 1_000)


def test_opening_is_checked() -> None:
    with pytest.raises(ValueError, match=r"opening must be a number of seconds in \(0, 60\]"):
        Limiter("tier-1", opening=0)


def test_settling_with_the_headers_reads_them_after_the_refund() -> None:
    """A complete answer's headers may count its own settlement: read with it applied, nothing
    is counted twice, and whoever the refund lets in is woken only after the report is read."""
    clock = FakeClock()
    limiter = Limiter("tier-1", clock=clock)
    permit = limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=4_000)
    permit.mark_sent()
    clock.advance(2)
    # taken as the answer left, after its settlement: 8,000 - 4,000 + 3,900 given back, + refill
    permit.settle(
        {"input_tokens": 1_000, "output_tokens": 100},
        headers=headers(requests=(50, 49), input_tokens=(30_000, 29_000), output_tokens=(8_000, 8_000)),
    )
    assert levels(limiter)["output_tokens"] == pytest.approx(7_500)
    assert not limiter.statistics()[POOL].in_flight


def test_a_bucket_smaller_than_a_reservation_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    """One-second buckets of Tier 1's 8,000 OTPM hold 133 tokens: max_tokens 1,000 never fits."""
    clock = FakeClock()
    events = Events()
    limiter = Limiter("tier-1", clock=clock, on_event=events)
    for _ in range(3):
        permit = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=1_000)
        permit.mark_sent()
        with caplog.at_level("WARNING", logger="ratekeeper"):
            permit.observe(
                headers(
                    output_tokens=(8_000, 0),
                    date="Mon, 05 Jan 2026 00:00:00 GMT",
                    anthropic_ratelimit_output_tokens_reset="2026-01-05T00:00:01Z",
                )
            )
        permit.settle({"input_tokens": 100, "output_tokens": 10})
        clock.advance(10)
    said = [e for e in events.seen if e.kind == "bucket_too_small"]
    assert [e.detail["dimension"] for e in said] == ["output_tokens"]
    assert said[0].detail["reserved"] == 1_000
    warned = [r for r in caplog.records if "less than a request reserves" in r.getMessage()]
    assert len(warned) == 1
    assert "lower max_tokens" in warned[0].getMessage()
