"""The Limiter's admission, settlement and bookkeeping, at fixed instants of a fake clock.

Queueing is in ``test_limiter_queue.py``, server feedback (resync, 429, 529,
spend and subscription limits, warm-up) in ``test_limiter_server.py``, threads
in ``test_limiter_threads.py`` and the stateful model in ``test_limiter_stateful.py``.
"""

from __future__ import annotations

import anyio
import attrs
import pytest
from limiter_support import (
    HAIKU,
    HAIKU_POOL,
    POOL,
    SONNET,
    Events,
    FakeClock,
    headers,
    levels,
    queued,
    settle_soon,
)

from ratekeeper import (
    AcquireTimeout,
    CapacityExceeded,
    ConfigurationError,
    Demand,
    InsufficientCredits,
    Limiter,
    LimiterStatistics,
    PoolStatistics,
    WouldBlock,
)

pytestmark = pytest.mark.anyio

TIER1_FULL = {"requests": 50.0, "input_tokens": 30_000.0, "output_tokens": 8_000.0}
CAPACITY_MESSAGE = (
    r"^claude-sonnet-4-5 \(sonnet-4\.x pool\): a request needing 64,000 output_tokens can never be "
    r"admitted: the output_tokens bucket holds at most 8,000$"
)


# ---------------------------------------------------------------- impossible requests


async def test_max_tokens_above_tier1_otpm_fails_at_once(anyio_backend_name: str) -> None:
    limiter = Limiter("tier-1", opening=60)
    start = anyio.current_time()
    with pytest.raises(CapacityExceeded, match=CAPACITY_MESSAGE) as info:
        async with limiter.acquire(SONNET, input_tokens=1_000, max_tokens=64_000):
            pytest.fail("admitted")
    if anyio_backend_name == "trio":
        assert anyio.current_time() == start  # no wait at all, not even under an autojumping clock
    assert (info.value.pool, info.value.dimension, info.value.cost, info.value.capacity) == (
        POOL,
        "output_tokens",
        64_000,
        8_000,
    )
    assert limiter.statistics()[POOL].levels == TIER1_FULL  # nothing taken


def test_capacity_error_is_the_same_for_nowait_and_threads() -> None:
    limiter = Limiter("tier-1", clock=FakeClock())
    with pytest.raises(CapacityExceeded, match=CAPACITY_MESSAGE):
        limiter.acquire_nowait(SONNET, max_tokens=64_000)
    with (
        pytest.raises(CapacityExceeded, match=CAPACITY_MESSAGE),
        limiter.acquire_sync(SONNET, Demand(max_tokens=64_000)),
    ):
        pytest.fail("admitted")
    with pytest.raises(
        CapacityExceeded,
        match=r"^claude-sonnet-4-5 \(sonnet-4\.x pool\): a request needing 30,001 input_tokens can never be "
        r"admitted: the input_tokens bucket holds at most 30,000$",
    ):
        limiter.acquire_nowait(SONNET, input_tokens=30_000, cache_creation_input_tokens=1)


def test_a_cost_up_to_the_limit_is_possible_with_a_small_burst() -> None:
    clock = FakeClock()
    limiter = Limiter("tier-1", opening=60, burst=0.25, clock=clock)
    permit = limiter.acquire_nowait(SONNET, max_tokens=8_000)  # the bucket holds 2,000: debt
    assert levels(limiter)["output_tokens"] == -6_000
    permit.release()
    assert levels(limiter)["output_tokens"] == 2_000


# ---------------------------------------------------------------- acquire, nowait, release


async def test_uncontended_acquire_takes_every_dimension_and_settles() -> None:
    # no refill between the steps, however slow the machine
    limiter = Limiter("tier-1", opening=60, clock=FakeClock())
    async with limiter.acquire(SONNET, input_tokens=1_200, max_tokens=1_024) as permit:
        assert permit.pool == POOL
        assert permit.model == SONNET
        assert dict(permit.reserved) == {
            "requests": 1,
            "input_tokens": 1_200,
            "output_tokens": 1_024,
            "tokens": 2_224,
        }
        assert limiter.statistics()[POOL].in_flight == 1
        permit.observe({})
        cost = permit.settle({"input_tokens": 1_200, "output_tokens": 100})
    assert (cost.requests, cost.input_tokens, cost.output_tokens) == (1, 1_200, 100)
    stats = limiter.statistics()[POOL]
    assert stats.in_flight == 0
    assert stats.granted == 1
    # what was used is gone
    assert stats.levels["requests"] == 49
    assert stats.levels["output_tokens"] == 7_900


async def test_await_gives_the_bare_permit() -> None:
    limiter = Limiter("tier-1", opening=60, clock=FakeClock())
    permit = await limiter.acquire(SONNET, input_tokens=10, max_tokens=10)
    assert permit.active
    permit.release()
    assert not permit.active
    assert levels(limiter) == TIER1_FULL


def test_nowait_raises_would_block_with_the_retry_time() -> None:
    clock = FakeClock()
    limiter = Limiter("tier-1", opening=60, clock=clock)
    limiter.acquire_nowait(SONNET, max_tokens=8_000)
    with pytest.raises(
        WouldBlock, match=r"^sonnet-4\.x: cannot admit the request now \(earliest in 7\.500s\)$"
    ) as info:
        limiter.acquire_nowait(SONNET, max_tokens=1_000)  # 1,000 tokens at 8,000/min
    assert info.value.retry_after == pytest.approx(7.5)
    clock.advance(7.5)
    limiter.acquire_nowait(SONNET, max_tokens=1_000)


async def test_timeout_zero_fails_at_once_without_queueing() -> None:
    limiter = Limiter("tier-1", clock=FakeClock())
    limiter.acquire_nowait(SONNET, max_tokens=8_000)
    with pytest.raises(AcquireTimeout, match=r"^sonnet-4\.x: no capacity within the 0s timeout$"):
        await limiter.acquire(SONNET, max_tokens=1, timeout=0)
    assert limiter.statistics()[POOL].queue_depth == 0


def test_release_semantics() -> None:
    """Not sent: all back. Sent, error status: only the RPM token kept. Sent, 2xx, unsettled: all kept."""
    clock = FakeClock()
    limiter = Limiter("tier-1", opening=60, clock=clock)

    not_sent = limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=2_000)
    not_sent.release()
    assert levels(limiter) == TIER1_FULL

    refused = limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=2_000)
    refused.observe({}, status=500)
    refused.release()
    assert levels(limiter) == {**TIER1_FULL, "requests": 49}

    charged = limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=2_000)
    charged.mark_sent()
    charged.observe({}, status=200)
    charged.release()
    assert levels(limiter) == {"requests": 48, "input_tokens": 29_000, "output_tokens": 6_000}
    assert limiter.statistics()[POOL].in_flight == 0

    sent_no_answer = limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=2_000)
    sent_no_answer.mark_sent()  # e.g. the connection dropped: the server may have charged it
    sent_no_answer.release()
    assert levels(limiter) == {"requests": 47, "input_tokens": 28_000, "output_tokens": 4_000}


async def test_leaving_the_block_releases() -> None:
    limiter = Limiter("tier-1", opening=60, clock=FakeClock())
    with pytest.raises(RuntimeError, match=r"^connect failed$"):
        async with limiter.acquire(SONNET, input_tokens=1_000, max_tokens=2_000):
            raise RuntimeError("connect failed")
    assert levels(limiter) == TIER1_FULL

    async with limiter.acquire(SONNET, input_tokens=1_000, max_tokens=2_000) as permit:
        permit.observe({}, status=500)
    assert levels(limiter) == {**TIER1_FULL, "requests": 49}


def test_settle_refunds_and_charges_extra() -> None:
    limiter = Limiter("tier-1", opening=60, clock=FakeClock())
    permit = limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=4_000)
    assert levels(limiter) == {"requests": 49, "input_tokens": 29_000, "output_tokens": 4_000}
    cost = permit.settle({"input_tokens": 1_500, "output_tokens": 1_000, "cache_read_input_tokens": 900})
    assert (cost.input_tokens, cost.output_tokens) == (1_500, 1_000)  # cache reads are free for Sonnet
    assert levels(limiter) == {"requests": 49, "input_tokens": 28_500, "output_tokens": 7_000}
    with pytest.raises(ConfigurationError, match=r"^this permit is already settled$"):
        permit.settle({"output_tokens": 1})
    permit.release()  # no effect once settled
    assert levels(limiter) == {"requests": 49, "input_tokens": 28_500, "output_tokens": 7_000}


def test_settle_accepts_sdk_like_usage_objects() -> None:
    class SdkUsage:
        input_tokens = 10
        output_tokens = 20
        cache_creation_input_tokens = None
        cache_read_input_tokens = 5

    limiter = Limiter("tier-1", clock=FakeClock())
    permit = limiter.acquire_nowait(HAIKU, input_tokens=10, max_tokens=100)
    cost = permit.settle(SdkUsage())
    assert (cost.input_tokens, cost.output_tokens) == (10, 20)


def test_settle_after_release_does_nothing() -> None:
    limiter = Limiter("tier-1", opening=60, clock=FakeClock())
    permit = limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=100)
    permit.release()
    assert permit.settle({"output_tokens": 5000}).output_tokens == 0
    assert levels(limiter) == TIER1_FULL


def test_priority_tier_settles_its_priority_output() -> None:
    """A Priority Tier request with no input still has its priority output settled, not refunded."""
    limiter = Limiter(
        "tier-1",
        clock=FakeClock(),
        opening=60,
        limits={POOL: {"priority_input_tokens": 10_000, "priority_output_tokens": 4_000}},
    )
    permit = limiter.acquire_nowait(SONNET, max_tokens=1_000, service_tier="priority")
    assert levels(limiter)["priority_output_tokens"] == 3_000
    permit.settle({"output_tokens": 800})
    assert levels(limiter)["priority_output_tokens"] == 3_200


def test_record_output_charges_progressively_under_the_actual_rule() -> None:
    limiter = Limiter("tier-1", opening=60, output_rule="actual", clock=FakeClock())
    permit = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=4_000, expected_output_tokens=500)
    assert levels(limiter)["output_tokens"] == 7_500
    permit.record_output(300)  # covered by the reservation
    assert levels(limiter)["output_tokens"] == 7_500
    permit.record_output(1_200)  # cumulative: 700 more than reserved
    assert levels(limiter)["output_tokens"] == 6_800
    permit.record_output(1_000)  # never goes back
    assert levels(limiter)["output_tokens"] == 6_800
    permit.settle({"input_tokens": 100, "output_tokens": 1_500})
    assert levels(limiter)["output_tokens"] == 6_500
    permit.record_output(2_000)  # after settlement: ignored
    assert levels(limiter)["output_tokens"] == 6_500


def test_output_still_to_come_is_kept_off_a_lift_not_off_what_the_reports_said() -> None:
    """Under the real-time rule a lift leaves room for what the requests under way may produce.

    That room is owed until the model learns of the output (it charges it then), not for
    ever: kept off the report's value, an older report read next took it off once more.
    """
    clock = FakeClock()
    limiter = Limiter("tier-1", opening=60, output_rule="actual", clock=clock)
    first = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=1_000)
    first.mark_sent()
    clock.advance(1.0)
    first.observe(headers(output_tokens=(8_000, 2_000)), status=200)
    first.settle({"input_tokens": 100, "output_tokens": 10})
    assert levels(limiter)["output_tokens"] == 1_490
    clock.advance(0.5)
    earlier, later = (limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=1_000) for _ in range(2))
    earlier.mark_sent()
    later.mark_sent()
    clock.advance(0.5)
    later.observe(headers(output_tokens=(8_000, 8_000)), status=200)
    # 7,500 (the report's lowest) less 1,000 each the two under way may still produce
    assert levels(limiter)["output_tokens"] == 5_500
    later.settle({"input_tokens": 100, "output_tokens": 10})
    # a report of an earlier grant, at the same instant: it bounds, and one request is under way
    earlier.observe(headers(output_tokens=(8_000, 8_000)), status=200)
    assert levels(limiter)["output_tokens"] == 7_500 - 10 - 1_000


def test_record_output_under_the_max_tokens_rule_is_covered_by_the_reservation() -> None:
    limiter = Limiter("tier-1", opening=60, clock=FakeClock())
    permit = limiter.acquire_nowait(SONNET, max_tokens=2_000)
    permit.record_output(1_999)
    assert levels(limiter)["output_tokens"] == 6_000
    permit.settle({"output_tokens": 1_999})
    assert levels(limiter)["output_tokens"] == 6_001


def test_unknown_output_rule_and_bad_options_say_what_is_allowed() -> None:
    with pytest.raises(ConfigurationError, match=r"^unknown output_rule 'sometimes'; choose one of: "):
        Limiter(output_rule="sometimes")
    with pytest.raises(ConfigurationError, match=r"^warmup must be a positive number of seconds, got 0$"):
        Limiter(warmup=0)
    with pytest.raises(ValueError, match=r"^burst must be between 1/60 and 1, got 2$"):
        Limiter(burst=2)


# ---------------------------------------------------------------- pools and learning


async def test_other_model_classes_have_their_own_pools() -> None:
    limiter = Limiter("tier-1", clock=FakeClock())
    limiter.acquire_nowait(SONNET, max_tokens=8_000)
    with pytest.raises(WouldBlock):
        limiter.acquire_nowait(SONNET, max_tokens=1)
    async with limiter.acquire(HAIKU, max_tokens=10_000) as permit:  # not held up by Sonnet
        assert permit.pool == HAIKU_POOL
    assert limiter.pool_of("claude-opus-4-1") == "opus-4.x"
    assert limiter.pool_of("claude-sonnet-4-20250514") == POOL


def test_without_a_preset_limits_are_learned_from_headers() -> None:
    clock = FakeClock()
    limiter = Limiter(opening=60, clock=clock)
    assert limiter.statistics().pools == {}
    permit = limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=1_000)
    assert limiter.statistics()[POOL].limits == TIER1_FULL  # Tier 1 until told otherwise
    with pytest.raises(CapacityExceeded):
        limiter.acquire_nowait(SONNET, max_tokens=64_000)

    permit.observe(
        headers(
            requests=(4_000, 3_999),
            input_tokens=(2_000_000, 1_999_000),
            output_tokens=(400_000, 399_000),
        )
    )
    permit.settle({"input_tokens": 1_000, "output_tokens": 1_000})
    stats = limiter.statistics()[POOL]
    assert stats.limits == {"requests": 4_000, "input_tokens": 2_000_000, "output_tokens": 400_000}
    assert stats.levels == {"requests": 3_999, "input_tokens": 1_998_500, "output_tokens": 398_500}
    limiter.acquire_nowait(SONNET, max_tokens=64_000)  # possible now
    # the other classes still start at Tier 1: each class learns on its own
    assert limiter.pool_of(HAIKU) == HAIKU_POOL
    assert limiter.statistics()[HAIKU_POOL].limits["requests"] == 50


def test_learning_a_combined_tokens_limit_only_when_it_binds() -> None:
    limiter = Limiter(clock=FakeClock())
    permit = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
    permit.observe(headers(tokens=(38_000, 37_000)))  # input + output: no separate limit
    assert "tokens" not in limiter.statistics()[POOL].limits
    permit.observe(headers(tokens=(20_000, 19_000)))  # a workspace limit below input + output
    assert limiter.statistics()[POOL].limits["tokens"] == 20_000


def test_learning_can_be_turned_off() -> None:
    limiter = Limiter("tier-1", learn_limits=False, clock=FakeClock())
    permit = limiter.acquire_nowait(SONNET, max_tokens=100)
    permit.observe(headers(requests=(4_000, 3_999)))
    assert limiter.statistics()[POOL].limits["requests"] == 50


def test_classes_tier1_does_not_list_start_from_the_newer_scheme() -> None:
    limiter = Limiter(clock=FakeClock())
    assert limiter.pool_of("claude-sonnet-5") == "sonnet-5"
    assert limiter.statistics()["sonnet-5"].limits["requests"] == 1_000


def test_limits_override_per_pool() -> None:
    limiter = Limiter("tier-1", opening=60, clock=FakeClock(), limits={POOL: {"tokens": 20_000}})
    limiter.acquire_nowait(SONNET, input_tokens=15_000, max_tokens=4_000)
    assert levels(limiter)["tokens"] == 1_000
    with pytest.raises(WouldBlock):
        limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=1)


async def test_batches_hold_their_queue_slots_until_finished() -> None:
    limiter = Limiter("tier-1", clock=FakeClock())
    async with limiter.acquire_batch(60_000) as permit:
        permit.observe({})
        permit.settle({})  # a batch has no usage: settling leaves its queue slots taken
    assert limiter.statistics()["batches"].levels == {"requests": 49, "queued_requests": 40_000}
    with pytest.raises(AcquireTimeout, match=r"^batches: no capacity within the 0s timeout$"):
        await limiter.acquire_batch(50_000, timeout=0)
    limiter.batch_finished(60_000)
    async with limiter.acquire_batch(50_000) as permit:
        permit.observe({})
    assert limiter.statistics()["batches"].levels == {"requests": 48, "queued_requests": 50_000}
    with pytest.raises(ConfigurationError, match=r"^a batch holds 1 to 100,000 requests, got 100001$"):
        limiter.acquire_batch(100_001)


# ---------------------------------------------------------------- wallet


def test_wallet_refuses_what_it_cannot_cover() -> None:
    limiter = Limiter("tier-1", opening=60, wallet_balance=100, clock=FakeClock())
    with pytest.raises(
        InsufficientCredits, match=r"^the wallet holds 100 credits but the request reserves 150$"
    ):
        limiter.acquire_nowait(SONNET, max_tokens=10, credits=150)
    assert levels(limiter) == TIER1_FULL  # refused before anything was taken
    first = limiter.acquire_nowait(SONNET, max_tokens=10, credits=60)
    with pytest.raises(
        InsufficientCredits, match=r"^the wallet holds 40 credits but the request reserves 60$"
    ):
        limiter.acquire_nowait(SONNET, max_tokens=10, credits=60)
    first.settle({"output_tokens": 10}, credits=25)  # the actual charge: 35 come back
    assert limiter.statistics().wallet_balance == 75
    limiter.acquire_nowait(SONNET, max_tokens=10, credits=60)
    assert limiter.statistics().wallet_balance == 15


def test_wallet_balance_learned_from_quota_headers() -> None:
    limiter = Limiter("tier-1", clock=FakeClock())
    permit = limiter.acquire_nowait(SONNET, max_tokens=10, credits=30)
    permit.observe({"x-quota-balance": "50", "x-quota-credits-used": "28"})
    permit.settle({"output_tokens": 10}, credits=28)
    assert limiter.statistics().wallet_balance == 50
    with pytest.raises(
        InsufficientCredits, match=r"^the wallet holds 50 credits but the request reserves 51$"
    ):
        limiter.acquire_nowait(SONNET, max_tokens=10, credits=51)


def test_a_final_quota_balance_already_holds_the_requests_charge() -> None:
    """observe() then settle(): the refund is not applied a second time on top of the reported balance."""
    limiter = Limiter("tier-1", opening=60, wallet_balance=1_000, clock=FakeClock())
    permit = limiter.acquire_nowait(SONNET, max_tokens=10, credits=30)
    later = limiter.acquire_nowait(SONNET, max_tokens=10, credits=40)  # admitted after: unseen
    assert limiter.statistics().wallet_balance == 930
    permit.observe({"x-quota-balance": "500", "x-quota-credits-used": "28"})  # others spent too
    assert limiter.statistics().wallet_balance == 460
    permit.settle({"output_tokens": 10}, credits=28)
    assert limiter.statistics().wallet_balance == 460
    later.settle({"output_tokens": 10}, credits=35)
    assert limiter.statistics().wallet_balance == 465


def test_a_streams_reserved_balance_is_settled_from_the_proxys_reservation() -> None:
    limiter = Limiter("tier-1", wallet_balance=1_000, clock=FakeClock())
    permit = limiter.acquire_nowait(SONNET, max_tokens=10, credits=30)
    permit.observe({"x-quota-balance-reserved": "600", "x-quota-credits-reserved": "50"})
    assert limiter.statistics().wallet_balance == 600
    permit.settle({"output_tokens": 10}, credits=20)  # the proxy refunds 50 - 20
    assert limiter.statistics().wallet_balance == 630


async def test_wallet_is_checked_again_when_a_waiter_is_granted() -> None:
    """Two queued requests that each fit the balance but not together: the second is refused."""
    clock = FakeClock()
    limiter = Limiter("tier-1", opening=60, wallet_balance=100, clock=clock)
    blocker = limiter.acquire_nowait(SONNET, max_tokens=8_000)
    results: dict[str, object] = {}

    async def want(name: str) -> None:
        try:
            async with limiter.acquire(SONNET, max_tokens=100, credits=60) as permit:
                results[name] = permit.credits
                permit.observe({})
        except InsufficientCredits as exc:
            results[name] = str(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(want, "first")
        await settle_soon(queued(limiter, 1))
        tg.start_soon(want, "second")
        await settle_soon(queued(limiter, 2))
        assert limiter.statistics()[POOL].queue_depth == 2
        blocker.release()  # both can go as far as the buckets are concerned
    assert results == {"first": 60, "second": "the wallet holds 40 credits but the request reserves 60"}
    assert limiter.statistics().wallet_balance == 40
    assert limiter.statistics()[POOL].in_flight == 0


# ---------------------------------------------------------------- statistics and events


def test_statistics_is_a_frozen_snapshot() -> None:
    clock = FakeClock()
    limiter = Limiter("tier-1", opening=60, clock=clock)
    permit = limiter.acquire_nowait(SONNET, input_tokens=3_000, max_tokens=800)
    snapshot = limiter.statistics()
    assert isinstance(snapshot, LimiterStatistics)
    stats = snapshot[POOL]
    assert isinstance(stats, PoolStatistics)
    assert stats == PoolStatistics(
        name=POOL,
        limits=TIER1_FULL,
        levels={"requests": 49, "input_tokens": 27_000, "output_tokens": 7_200},
        capacity=TIER1_FULL,
        burst=1.0,
        in_flight=1,
        queue_depth=0,
        granted=1,
        wait_p50=0.0,
        wait_p99=0.0,
        rate_limited=0,
        rate_limited_predicted=0,
        overloaded=0,
        resyncs=0,
        paused_for=0.0,
        pause_reason="",
        utilization={"requests": 0.02, "input_tokens": 0.1, "output_tokens": 0.1},
        used={"requests": 1, "input_tokens": 3_000, "output_tokens": 800},
    )
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.granted = 5  # type: ignore[misc]
    permit.release()
    assert snapshot[POOL].in_flight == 1  # the snapshot does not move
    assert limiter.statistics()[POOL].utilization == {"requests": 0, "input_tokens": 0, "output_tokens": 0}
    assert snapshot.wallet_balance is None
    assert not snapshot.spend_limited
    clock.advance(61)
    permit = limiter.acquire_nowait(SONNET, max_tokens=800)
    permit.mark_sent()
    permit.release()
    clock.advance(61)
    assert limiter.statistics()[POOL].utilization["output_tokens"] == 0  # out of the 60 s window


def test_repr_shows_live_state() -> None:
    limiter = Limiter("tier-2", clock=FakeClock())
    assert repr(limiter) == "<Limiter preset='tier-2' no pools yet>"
    permit = limiter.acquire_nowait(SONNET, max_tokens=10)
    assert repr(limiter) == "<Limiter preset='tier-2' sonnet-4.x: 0 waiting, 1 in flight>"
    assert repr(permit) == (
        "<Permit sonnet-4.x #0 active reserved={'requests': 1.0, 'input_tokens': 0.0, 'output_tokens': 10.0, "
        "'tokens': 10.0}>"
    )


def test_on_event_reports_and_a_broken_hook_does_not_break_admission() -> None:
    events = Events()
    clock = FakeClock()
    limiter = Limiter("tier-1", opening=60, clock=clock, on_event=events)
    permit = limiter.acquire_nowait(SONNET, max_tokens=10)
    permit.observe(headers(requests=(60, 10)))
    assert events.kinds() == ["limit_change", "resync"]
    grant, change, resync = events.seen
    assert (grant.kind, dict(grant.detail)) == ("grant", {"waited": 0.0})
    assert (change.pool, change.time, dict(change.detail)) == (POOL, 1000.0, {"requests": 60})
    assert dict(resync.detail) == {"dimension": "requests", "delta": -49.0}

    def broken(event: object) -> None:
        raise RuntimeError("hook bug")

    limiter = Limiter("tier-1", opening=60, clock=clock, on_event=broken)
    permit = limiter.acquire_nowait(SONNET, max_tokens=10)
    permit.observe(headers(requests=(60, 10)))
    permit.settle({"output_tokens": 1})
    assert limiter.statistics()[POOL].in_flight == 0
