"""The limiter's queue: order, backfilling, other pools, waking, cancellation and timeouts.

Orders are driven by releases at a frozen ``FakeClock`` (each release of an
unsent permit gives back exactly one request's worth), so they are exact on
asyncio and trio alike; times are asserted under trio's autojumping
``MockClock`` only.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest
from limiter_support import (
    HAIKU,
    POOL,
    SONNET,
    FakeClock,
    drain_requests,
    headers,
    levels,
    queued,
    settle_soon,
)

from ratekeeper import AcquireTimeout, CapacityExceeded, Limiter, Permit
from ratekeeper.gate._state import Waiter

pytestmark = pytest.mark.anyio


class Recorder:
    """Starts waiters one at a time (so their queue order is known) and records their grants."""

    def __init__(self, limiter: Limiter, tg: anyio.abc.TaskGroup) -> None:
        self.limiter = limiter
        self.tg = tg
        self.order: list[str] = []
        self.times: dict[str, float] = {}
        self.errors: dict[str, BaseException] = {}

    async def start(self, name: str, *, priority: int = 0, hold: bool = False, **cost: int) -> None:
        """Start a waiter that sends its request (``observe``) and, with ``hold``, keeps its permit."""

        def progress() -> int:
            return self.limiter.statistics()[POOL].queue_depth + len(self.order) + len(self.errors)

        before = progress()
        self.spawn(name, priority=priority, hold=hold, send=True, **cost)
        await settle_soon(lambda: progress() > before)  # queued, or through, or refused

    def spawn(
        self, name: str, *, priority: int = 0, hold: bool = False, send: bool = False, **cost: int
    ) -> None:
        async def run() -> None:
            try:
                async with self.limiter.acquire(SONNET, priority=priority, **cost) as permit:  # type: ignore[arg-type]
                    self.order.append(name)
                    self.times[name] = anyio.current_time()
                    if send:
                        permit.observe({})
                    if hold:
                        await anyio.sleep_forever()
            except (CapacityExceeded, AcquireTimeout) as exc:
                self.errors[name] = exc

        self.tg.start_soon(run)


def release_one(permits: list[Permit]) -> None:
    permits.pop().release()  # never sent: its request token comes back


async def test_fifo_within_a_priority_and_higher_priority_first() -> None:
    limiter = Limiter("tier-1", opening=60, clock=FakeClock())
    blockers = drain_requests(limiter)
    async with anyio.create_task_group() as tg:
        rec = Recorder(limiter, tg)
        for name in ("a", "b", "c"):
            await rec.start(name, max_tokens=1)
        await rec.start("urgent", priority=5, max_tokens=1)
        await rec.start("d", max_tokens=1)
        await rec.start("low", priority=-1, max_tokens=1)
        assert limiter.statistics()[POOL].queue_depth == 6
        for granted in range(1, 7):
            release_one(blockers)
            await settle_soon(lambda n=granted: len(rec.order) == n)  # type: ignore[misc]
    assert rec.order == ["urgent", "a", "b", "c", "d", "low"]


async def test_head_goes_at_its_computed_time(anyio_backend_name: str) -> None:
    limiter = Limiter("tier-1", opening=60)
    start = anyio.current_time()
    limiter.acquire_nowait(SONNET, max_tokens=8_000)
    async with anyio.create_task_group() as tg:
        rec = Recorder(limiter, tg)
        await rec.start("first", max_tokens=2_000)  # 15 s at 8,000 per minute
        await rec.start("second", max_tokens=2_000)
        if anyio_backend_name != "trio":
            tg.cancel_scope.cancel()
    if anyio_backend_name == "trio":
        assert rec.order == ["first", "second"]
        assert rec.times["first"] - start == pytest.approx(15.0)
        assert rec.times["second"] - start == pytest.approx(30.0)
        stats = limiter.statistics()[POOL]
        assert stats.wait_p50 == pytest.approx(15.0)
        assert stats.wait_p99 == pytest.approx(30.0)


async def test_another_pool_never_waits_behind_this_one(anyio_backend_name: str) -> None:
    limiter = Limiter("tier-1", opening=60)
    limiter.acquire_nowait(SONNET, max_tokens=8_000)
    async with anyio.create_task_group() as tg:
        rec = Recorder(limiter, tg)
        for i in range(100):
            rec.spawn(f"sonnet-{i}", max_tokens=1_000)
        await settle_soon(queued(limiter, 100))
        before = anyio.current_time()
        for _ in range(10):
            async with limiter.acquire(HAIKU, input_tokens=100, max_tokens=100) as permit:
                permit.observe({})
                permit.settle({"input_tokens": 100, "output_tokens": 10})
        if anyio_backend_name == "trio":
            assert anyio.current_time() == before
        assert limiter.statistics()[POOL].queue_depth == 100
        tg.cancel_scope.cancel()


# ---------------------------------------------------------------- backfilling


async def test_backfill_lets_small_requests_pass_only_when_the_head_is_not_delayed(
    anyio_backend_name: str,
) -> None:
    """EASY backfilling: the head waits for input tokens; fully cached requests don't need any.

    ITPM 30,000 = 500 tokens/s. After a 25,000-token request the head (20,000)
    needs 30 s. Requests reading their prompt from the cache draw no ITPM and
    go at once, more of them than the window holds; requests that would take
    input tokens wait behind the head.
    """
    clock = None if anyio_backend_name == "trio" else FakeClock()
    limiter = Limiter("tier-1", opening=60, clock=clock)
    start = anyio.current_time()
    limiter.acquire_nowait(SONNET, input_tokens=25_000, max_tokens=10)
    async with anyio.create_task_group() as tg:
        rec = Recorder(limiter, tg)
        await rec.start("head", input_tokens=20_000, max_tokens=10)
        for i in range(40):  # more than the 16-waiter window
            await rec.start(f"cached-{i}", cache_read_input_tokens=5_000, max_tokens=10, hold=True)
        await rec.start("uncached", input_tokens=100, max_tokens=10)
        await rec.start("cached-late", cache_read_input_tokens=5_000, max_tokens=10)
        assert rec.order == [f"cached-{i}" for i in range(40)] + ["cached-late"]
        assert limiter.statistics()[POOL].queue_depth == 2
        if anyio_backend_name == "trio":
            await anyio.sleep(31)
            assert len(rec.order) == 43
            assert rec.times["head"] - start == pytest.approx(30.0)  # not delayed by the 41
            assert rec.times["uncached"] - start == pytest.approx(30.2)  # behind the head
        tg.cancel_scope.cancel()


async def test_a_stream_of_small_requests_does_not_starve_a_large_head(anyio_backend_name: str) -> None:
    """Small requests keep coming every 0.25 s; each would take input tokens the head is waiting for."""
    limiter = Limiter("tier-1", opening=60)
    start = anyio.current_time()
    limiter.acquire_nowait(SONNET, input_tokens=25_000, max_tokens=10)
    async with anyio.create_task_group() as tg:
        rec = Recorder(limiter, tg)
        await rec.start("head", input_tokens=20_000, max_tokens=10)  # 30 s

        async def stream() -> None:
            for i in range(40):
                rec.spawn(f"small-{i}", input_tokens=100, max_tokens=10)
                await anyio.sleep(0.25)

        if anyio_backend_name == "trio":
            tg.start_soon(stream)
            await anyio.sleep(45)
            assert rec.times["head"] - start == pytest.approx(30.0)
            assert rec.order[0] == "head"  # none of the 40 went first
            assert rec.order == ["head"] + [f"small-{i}" for i in range(40)]  # then in order
        else:
            for i in range(40):
                rec.spawn(f"small-{i}", input_tokens=100, max_tokens=10)
            await settle_soon(queued(limiter, 41))
            assert rec.order == []
        tg.cancel_scope.cancel()


async def test_backfill_never_passes_a_paused_pool() -> None:
    clock = FakeClock()
    limiter = Limiter("tier-1", clock=clock)
    permit = limiter.acquire_nowait(SONNET, input_tokens=25_000, max_tokens=10)
    permit.observe(headers(retry_after=30), status=429, body={"error": {"type": "rate_limit_error"}})
    async with anyio.create_task_group() as tg:
        rec = Recorder(limiter, tg)
        await rec.start("cached", cache_read_input_tokens=5_000, max_tokens=10)
        assert rec.order == []
        tg.cancel_scope.cancel()


async def test_backfill_can_be_turned_off() -> None:
    limiter = Limiter("tier-1", clock=FakeClock(), backfill_window=0)
    limiter.acquire_nowait(SONNET, input_tokens=25_000, max_tokens=10)
    async with anyio.create_task_group() as tg:
        rec = Recorder(limiter, tg)
        await rec.start("head", input_tokens=20_000, max_tokens=10)
        await rec.start("cached", cache_read_input_tokens=5_000, max_tokens=10)
        assert rec.order == []
        tg.cancel_scope.cancel()


# ---------------------------------------------------------------- waking


async def test_a_grant_wakes_only_the_granted_waiter_and_the_head(monkeypatch: pytest.MonkeyPatch) -> None:
    wakes: list[object] = []
    original: Callable[[Waiter], None] = Waiter.wake

    def counting_wake(self: Waiter) -> None:
        wakes.append(self)
        original(self)

    monkeypatch.setattr(Waiter, "wake", counting_wake)
    limiter = Limiter("tier-1", clock=FakeClock())
    blockers = drain_requests(limiter)
    async with anyio.create_task_group() as tg:
        rec = Recorder(limiter, tg)
        for i in range(200):
            rec.spawn(f"w{i}", hold=True)
        await settle_soon(queued(limiter, 200))
        wakes.clear()
        release_one(blockers)
        await settle_soon(lambda: len(rec.order) == 1)
        assert len(wakes) <= 2  # the granted waiter, and the new head re-planning its timer
        assert len(set(map(id, wakes))) == len(wakes)
        tg.cancel_scope.cancel()


async def test_set_limits_wakes_waiters_at_once(anyio_backend_name: str) -> None:
    limiter = Limiter("tier-1", opening=60)
    limiter.acquire_nowait(SONNET, max_tokens=8_000)
    async with anyio.create_task_group() as tg:
        rec = Recorder(limiter, tg)
        await rec.start("waiting", max_tokens=4_000)  # 30 s at 8,000 per minute
        before = anyio.current_time()
        limiter.set_limits(POOL, output_tokens=16_000)  # what was used stays used: 8,000 free
        with anyio.fail_after(5):
            await settle_soon(lambda: rec.order == ["waiting"])
        if anyio_backend_name == "trio":
            assert anyio.current_time() == before


async def test_a_limit_lowered_below_a_waiters_cost_fails_it_at_once() -> None:
    limiter = Limiter("tier-1", clock=FakeClock())
    limiter.acquire_nowait(SONNET, max_tokens=8_000)
    async with anyio.create_task_group() as tg:
        rec = Recorder(limiter, tg)
        await rec.start("big", max_tokens=6_000)
        await rec.start("small", max_tokens=1_000)
        limiter.set_limits(POOL, output_tokens=4_000)
        await settle_soon(lambda: "big" in rec.errors)
        assert str(rec.errors["big"]) == (
            "claude-sonnet-4-5 (sonnet-4.x pool): a request needing 6,000 output_tokens can never be "
            "admitted: the output_tokens bucket holds at most 4,000"
        )
        assert limiter.statistics()[POOL].queue_depth == 1
        tg.cancel_scope.cancel()


async def test_a_429_makes_the_head_replan(anyio_backend_name: str) -> None:
    limiter = Limiter("tier-1", opening=60, adaptive_burst=False)
    start = anyio.current_time()
    sent = limiter.acquire_nowait(SONNET, max_tokens=8_000)
    async with anyio.create_task_group() as tg:
        rec = Recorder(limiter, tg)
        await rec.start("head", max_tokens=1_000)  # would go at 7.5 s
        sent.observe(headers(retry_after=20), status=429, body={"error": {"type": "rate_limit_error"}})
        if anyio_backend_name != "trio":
            assert limiter.statistics()[POOL].paused_for == pytest.approx(20, abs=0.5)
            tg.cancel_scope.cancel()
    if anyio_backend_name == "trio":
        assert rec.times["head"] - start == pytest.approx(20.0)


async def test_learning_a_higher_limit_lets_waiters_go_at_once(anyio_backend_name: str) -> None:
    limiter = Limiter(opening=60)
    first = limiter.acquire_nowait(SONNET, max_tokens=8_000)
    async with anyio.create_task_group() as tg:
        rec = Recorder(limiter, tg)
        await rec.start("waiting", max_tokens=4_000)
        before = anyio.current_time()
        first.observe(headers(output_tokens=(400_000, 392_000)))
        with anyio.fail_after(5):
            await settle_soon(lambda: rec.order == ["waiting"])
        if anyio_backend_name == "trio":
            assert anyio.current_time() == before


# ---------------------------------------------------------------- cancellation and timeouts


async def test_cancelling_a_thousand_waiters_leaves_the_buckets_exactly_as_before() -> None:
    clock = FakeClock()
    limiter = Limiter("tier-1", opening=60, clock=clock)
    reference = Limiter("tier-1", opening=60, clock=clock)  # the same requests, without the waiters
    blockers = drain_requests(limiter)
    reference_blockers = drain_requests(reference)
    async with anyio.create_task_group() as tg:
        rec = Recorder(limiter, tg)
        for i in range(1_000):
            rec.spawn(f"w{i}", priority=i % 3, hold=True, input_tokens=i, max_tokens=10)
        await settle_soon(queued(limiter, 1_000))
        stats = limiter.statistics()[POOL]
        assert stats.queue_depth == 1_000
        assert stats.levels == levels(reference)
        # some waiters are granted and cancelled before they ever run again
        for _ in range(5):
            release_one(blockers)
            release_one(reference_blockers)
        tg.cancel_scope.cancel()
    after = limiter.statistics()[POOL]
    assert after.queue_depth == 0
    assert after.in_flight == len(blockers) == 45
    assert after.levels == levels(reference)


async def test_timeout_leaves_nothing_reserved(anyio_backend_name: str) -> None:
    limiter = Limiter("tier-1", opening=60)
    start = anyio.current_time()
    limiter.acquire_nowait(SONNET, max_tokens=8_000)
    timeout = 5.0 if anyio_backend_name == "trio" else 0.02
    async with anyio.create_task_group() as tg:
        rec = Recorder(limiter, tg)
        await rec.start("patient", max_tokens=4_000)  # 30 s
        with pytest.raises(
            AcquireTimeout, match=rf"^sonnet-4\.x: no capacity within the {timeout:g}s timeout$"
        ):
            await limiter.acquire(SONNET, max_tokens=100, timeout=timeout)
        if anyio_backend_name == "trio":
            assert anyio.current_time() - start == pytest.approx(5.0)
        stats = limiter.statistics()[POOL]
        assert stats.queue_depth == 1
        assert stats.in_flight == 1
        if anyio_backend_name == "trio":
            await anyio.sleep(26)
            assert rec.order == ["patient"]
            assert rec.times["patient"] - start == pytest.approx(30.0)  # not delayed by the timed-out one
        tg.cancel_scope.cancel()


async def test_cancel_scope_deadline_leaves_nothing_reserved() -> None:
    clock = FakeClock()
    limiter = Limiter("tier-1", clock=clock)
    limiter.acquire_nowait(SONNET, max_tokens=8_000)
    before = levels(limiter)
    with anyio.move_on_after(0.01) as scope:
        await limiter.acquire(SONNET, max_tokens=4_000)
    assert scope.cancelled_caught
    assert levels(limiter) == before
    assert limiter.statistics()[POOL].queue_depth == 0
