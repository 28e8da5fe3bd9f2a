"""What the Limiter costs: uncontended admission, and grants with a long queue.

Run: ``pytest benchmarks/test_bench_limiter.py --benchmark-only``; results in docs/benchmarks.md.

* ``limiter-uncontended``: one round is ``ROUNDS`` ``async with`` blocks on one
  asyncio loop (amortizing the loop's own cost): ratekeeper's three-dimension
  acquire and settle, a minimal one-bucket async gate written here,
  ``aiolimiter.AsyncLimiter``, and a floor: the least a three-bucket gate with a
  settlement can do (``ToyGate``: a lock, three refills and charges, a refund;
  no permit, queue, statistics or resync notes), which says what is possible
  in CPython at all.
* ``limiter-queue``: N waiters queued at a frozen clock, then one request given
  back; each waiter, once granted, gives its request back too, so the grants
  run as a chain through the whole queue. Time per grant (``extra_info``)
  must not grow with N.
* ``test_memory_per_waiter``: tracemalloc, per queued waiter.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from aiolimiter import AsyncLimiter
from pytest_benchmark.fixture import BenchmarkFixture

from ratekeeper import Limiter, Usage

SONNET = "claude-sonnet-4-5"
POOL = "sonnet-4.x"
ROUNDS = 2_000
USAGE = Usage(input_tokens=1_000, output_tokens=500)
UNLIMITED = {POOL: {"requests": 1e12, "input_tokens": 1e15, "output_tokens": 1e15}}


class MiniGate:
    """The least an async gate does: one token bucket, the loop's clock, an async context manager."""

    __slots__ = ("_capacity", "_level", "_rate", "_t")

    def __init__(self, per_second: float, capacity: float) -> None:
        self._rate = per_second
        self._capacity = capacity
        self._level = capacity
        self._t = time.monotonic()

    def acquire(self, amount: float = 1.0) -> _MiniAcquire:
        return _MiniAcquire(self, amount)


class _MiniAcquire:
    __slots__ = ("_amount", "_gate")

    def __init__(self, gate: MiniGate, amount: float) -> None:
        self._gate = gate
        self._amount = amount

    async def __aenter__(self) -> None:
        gate = self._gate
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            level = min(gate._capacity, gate._level + (now - gate._t) * gate._rate)
            gate._t = now
            if level >= self._amount:
                gate._level = level - self._amount
                return
            gate._level = level
            await asyncio.sleep((self._amount - level) / gate._rate)

    async def __aexit__(self, *exc: object) -> None:
        return None


class ToyGate:
    """Three token buckets (requests, input, output) behind a lock, admitted and settled.

    Nothing else: no permit state, no queue, no statistics, no notes for resync.
    """

    def __init__(self, rates: tuple[float, float, float], capacities: tuple[float, float, float]) -> None:
        self.lock = threading.Lock()
        self.rates = rates
        self.caps = capacities
        self.levels = list(capacities)
        self.t = time.monotonic()

    def acquire(self, input_tokens: int, max_tokens: int) -> _ToyAcquire:
        return _ToyAcquire(self, float(input_tokens), float(max_tokens))


class _ToyAcquire:
    __slots__ = ("_gate", "_inp", "_out")

    def __init__(self, gate: ToyGate, inp: float, out: float) -> None:
        self._gate = gate
        self._inp = inp
        self._out = out

    async def __aenter__(self) -> _ToyAcquire:
        gate = self._gate
        with gate.lock:
            now = asyncio.get_running_loop().time()
            dt = now - gate.t
            gate.t = now
            lv, rates, caps = gate.levels, gate.rates, gate.caps
            r = min(caps[0], lv[0] + dt * rates[0])
            i = min(caps[1], lv[1] + dt * rates[1])
            o = min(caps[2], lv[2] + dt * rates[2])
            if r < 1.0 or i < self._inp or o < self._out:
                raise RuntimeError("the toy gate never waits: the benchmark's limits are huge")
            lv[0], lv[1], lv[2] = r - 1.0, i - self._inp, o - self._out
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def settle(self, input_tokens: int, output_tokens: int) -> None:
        gate = self._gate
        with gate.lock:
            lv, caps = gate.levels, gate.caps
            lv[1] = min(caps[1], lv[1] + self._inp - input_tokens)
            lv[2] = min(caps[2], lv[2] + self._out - output_tokens)


def run_rounds(benchmark: BenchmarkFixture, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
    loop = asyncio.new_event_loop()
    try:
        benchmark.extra_info["calls_per_round"] = ROUNDS
        benchmark(lambda: loop.run_until_complete(make()))
    finally:
        loop.close()


@pytest.mark.benchmark(group="limiter-uncontended")
def test_ratekeeper_acquire_and_settle(benchmark: BenchmarkFixture) -> None:
    limiter = Limiter("tier-1", limits=UNLIMITED)

    async def rounds() -> None:
        for _ in range(ROUNDS):
            async with limiter.acquire(SONNET, input_tokens=1_000, max_tokens=1_000) as permit:
                permit.settle(USAGE)

    run_rounds(benchmark, rounds)
    assert limiter.statistics()[POOL].in_flight == 0


@pytest.mark.benchmark(group="limiter-uncontended")
def test_minimal_one_bucket_gate(benchmark: BenchmarkFixture) -> None:
    gate = MiniGate(1e9, 1e12)

    async def rounds() -> None:
        for _ in range(ROUNDS):
            async with gate.acquire(1.0):
                pass

    run_rounds(benchmark, rounds)


@pytest.mark.benchmark(group="limiter-uncontended")
def test_floor_three_buckets_and_a_settle(benchmark: BenchmarkFixture) -> None:
    gate = ToyGate((1e12, 1e15, 1e15), (1e12, 1e15, 1e15))

    async def rounds() -> None:
        for _ in range(ROUNDS):
            async with gate.acquire(1_000, 1_000) as permit:
                permit.settle(1_000, 500)

    run_rounds(benchmark, rounds)


@pytest.mark.benchmark(group="limiter-uncontended")
def test_aiolimiter(benchmark: BenchmarkFixture) -> None:
    limiter = AsyncLimiter(1e12, 60)

    async def rounds() -> None:
        for _ in range(ROUNDS):
            async with limiter:
                pass

    run_rounds(benchmark, rounds)


# ---------------------------------------------------------------------- a long queue


class FrozenClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _queue_up(limiter: Limiter, waiters: int, done: list[int]) -> list[asyncio.Task[None]]:
    async def waiter() -> None:
        async with limiter.acquire(SONNET, input_tokens=10, max_tokens=10):
            done.append(1)  # leaves unsent: its request goes back to the next in line

    tasks = [asyncio.create_task(waiter()) for _ in range(waiters)]
    while limiter.statistics()[POOL].queue_depth < waiters:
        await asyncio.sleep(0)
    return tasks


@pytest.mark.benchmark(group="limiter-queue")
@pytest.mark.parametrize("waiters", [100, 1_000, 10_000])
def test_grant_cost_does_not_grow_with_the_queue(benchmark: BenchmarkFixture, waiters: int) -> None:
    loop = asyncio.new_event_loop()
    state: dict[str, Any] = {}

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        limiter = Limiter("tier-1", clock=FrozenClock())
        limiter.pool_of(SONNET)
        blockers = []
        while limiter.statistics()[POOL].levels["requests"] >= 1:
            blockers.append(limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10))
        done: list[int] = []
        tasks = loop.run_until_complete(_queue_up(limiter, waiters, done))
        state.update(limiter=limiter, blocker=blockers[0], done=done, tasks=tasks)
        return (), {}

    async def chain() -> None:
        state["blocker"].release()  # one request back: the head goes, gives it back, the next goes...
        await asyncio.gather(*state["tasks"])

    try:
        benchmark.pedantic(  # type: ignore[no-untyped-call]
            lambda: loop.run_until_complete(chain()), setup=setup, rounds=5, iterations=1
        )
    finally:
        loop.close()
    assert len(state["done"]) == waiters
    assert state["limiter"].statistics()[POOL].queue_depth == 0
    if benchmark.stats is not None:  # not under --benchmark-disable
        per_grant = benchmark.stats.stats.min / waiters
        benchmark.extra_info["per_grant_us"] = round(per_grant * 1e6, 2)


@pytest.mark.benchmark(group="limiter-queue-priorities")
@pytest.mark.parametrize("levels", ["one", "distinct"])
def test_queue_and_cancel_at_distinct_priorities(benchmark: BenchmarkFixture, levels: str) -> None:
    """10,000 waiters queued, then all cancelled: at one priority, and each at its own.

    The two should cost about the same (the queue keeps its priority levels sorted as they
    come and go instead of sorting them at every dispatch).
    """
    waiters = 10_000
    loop = asyncio.new_event_loop()
    state: dict[str, Any] = {}

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        limiter = Limiter("tier-1", clock=FrozenClock())
        limiter.pool_of(SONNET)
        while limiter.statistics()[POOL].levels["requests"] >= 1:
            limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)
        state["limiter"] = limiter
        return (), {}

    async def queue_and_cancel() -> None:
        limiter: Limiter = state["limiter"]

        async def waiter(priority: int) -> None:
            async with limiter.acquire(SONNET, input_tokens=10, max_tokens=10, priority=priority):
                pass

        tasks = [asyncio.create_task(waiter(i if levels == "distinct" else 0)) for i in range(waiters)]
        await asyncio.sleep(0)  # every task runs up to its wait
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        benchmark.pedantic(  # type: ignore[no-untyped-call]
            lambda: loop.run_until_complete(queue_and_cancel()), setup=setup, rounds=3, iterations=1
        )
    finally:
        loop.close()
    assert state["limiter"].statistics()[POOL].queue_depth == 0


@pytest.mark.benchmark(group="wait-queue-levels")
@pytest.mark.parametrize("levels", ["one", "distinct"])
def test_wait_queue_at_100k_priorities(benchmark: BenchmarkFixture, levels: str) -> None:
    """The ``WaitQueue`` alone: 100,000 waiters pushed in random priority order, then drained.

    Distinct priorities cost a level's appearance and removal each (O(log p) on the heap);
    a sorted list of the levels moved up to p machine words instead (21-22x one level here
    at 1c23e92, 9.5-12x with the heap: the rest is a deque per level; docs/benchmarks.md).
    """
    import random

    from ratekeeper.gate._queue import WaiterState, WaitQueue

    n = 100_000
    priorities = list(range(n)) if levels == "distinct" else [0] * n
    random.Random(1).shuffle(priorities)

    class W:
        __slots__ = ("priority", "state")

        def __init__(self, priority: int) -> None:
            self.priority = priority
            self.state = WaiterState.WAITING

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return ([W(p) for p in priorities],), {}

    def push_and_drain(ws: list[W]) -> None:
        q: WaitQueue[W] = WaitQueue()
        for w in ws:
            q.push(w)
        assert len(q.first(17)) == 17
        while (head := q.head()) is not None:
            head.state = WaiterState.GRANTED
        assert not q

    benchmark.pedantic(push_and_drain, setup=setup, rounds=3, iterations=1)  # type: ignore[no-untyped-call]


def test_memory_per_waiter() -> None:
    """Bytes per queued waiter: the limiter's own share, and with its asyncio task."""
    waiters = 10_000
    loop = asyncio.new_event_loop()
    limiter = Limiter("tier-1", clock=FrozenClock())
    limiter.pool_of(SONNET)
    while limiter.statistics()[POOL].levels["requests"] >= 1:
        limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        tasks = loop.run_until_complete(_queue_up(limiter, waiters, []))
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    total = sum(s.size_diff for s in after.compare_to(before, "filename"))
    own = sum(
        s.size_diff
        for s in after.compare_to(before, "filename")
        if "/ratekeeper/gate/" in s.traceback[0].filename
        or s.traceback[0].filename.endswith("anyio/_core/_synchronization.py")
    )
    per_waiter, own_per_waiter = total / waiters, own / waiters
    print(
        f"\nmemory per waiter: {per_waiter:.0f} B in all, {own_per_waiter:.0f} B in the limiter and its Event"
    )
    assert own_per_waiter < 1_500
    assert per_waiter < 5_000
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.close()
    assert limiter.statistics()[POOL].queue_depth == 0
