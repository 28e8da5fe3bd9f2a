"""``acquire_sync`` from threads, sharing one limiter with async tasks.

The pool holds 10 requests and refills one a second, so while the workers
cycle through it (each holds a permit a moment, then gives it back unsent) no
more than 10 + (seconds elapsed) permits can ever be out at once.
"""

from __future__ import annotations

import threading
import time

import anyio
import pytest
from limiter_support import POOL, SONNET, FakeClock, drain_requests, levels

from ratekeeper import AcquireTimeout, ConfigurationError, Demand, Limiter

WORKERS = 4
ROUNDS = 25


class Gauge:
    """Counts permits held at once, from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.done = 0

    def enter(self) -> None:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self._lock:
            self.now -= 1
            self.done += 1


def small_pool_limiter() -> Limiter:
    # 60 RPM with a 10-second burst: 10 requests at once, one more a second
    return Limiter("tier-1", burst=1 / 6, limits={POOL: {"requests": 60}}, opening=60)


def thread_worker(limiter: Limiter, gauge: Gauge) -> None:
    for _ in range(ROUNDS):
        with limiter.acquire_sync(SONNET, Demand(input_tokens=10, max_tokens=1)):
            gauge.enter()
            time.sleep(0.0005)
            gauge.leave()


async def task_worker(limiter: Limiter, gauge: Gauge) -> None:
    for _ in range(ROUNDS):
        async with limiter.acquire(SONNET, input_tokens=10, max_tokens=1):
            gauge.enter()
            await anyio.sleep(0.0005)
            gauge.leave()


def test_plain_threads_and_asyncio_tasks_share_a_limiter() -> None:
    limiter = small_pool_limiter()
    gauge = Gauge()

    async def main() -> float:
        start = anyio.current_time()
        threads = [threading.Thread(target=thread_worker, args=(limiter, gauge)) for _ in range(WORKERS)]
        for thread in threads:
            thread.start()
        async with anyio.create_task_group() as tg:
            for _ in range(WORKERS):
                tg.start_soon(task_worker, limiter, gauge)
        for thread in threads:
            await anyio.to_thread.run_sync(thread.join)
        return anyio.current_time() - start

    elapsed = anyio.run(main)  # asyncio: its clock is time.monotonic, as in the threads
    assert gauge.done == 2 * WORKERS * ROUNDS
    assert 2 <= gauge.most <= 10 + elapsed
    stats = limiter.statistics()[POOL]
    assert (stats.in_flight, stats.queue_depth) == (0, 0)
    assert stats.granted == 2 * WORKERS * ROUNDS
    assert stats.levels["requests"] == pytest.approx(10)  # every permit went back: full again


def test_plain_threads_and_trio_tasks_share_a_limiter() -> None:
    """Trio's clock is not time.monotonic: the threads' times are moved onto it.

    The pool refills 1,000 requests a second and starts empty; every request is
    sent (kept), so each one waits for the refill, in the threads too.
    """
    limiter = Limiter(
        "tier-1", burst=1 / 60, limits={POOL: {"requests": 60_000, "input_tokens": 1e9, "output_tokens": 1e9}}
    )
    per_worker = 20
    done: list[int] = []
    drained: list[object] = []

    def thread_sender() -> None:
        for _ in range(per_worker):
            with limiter.acquire_sync(SONNET, Demand(input_tokens=1, max_tokens=1)) as permit:
                permit.mark_sent()
                done.append(1)

    async def task_sender() -> None:
        for _ in range(per_worker):
            async with limiter.acquire(SONNET, input_tokens=1, max_tokens=1) as permit:
                permit.mark_sent()
                done.append(1)

    async def main() -> None:
        drained.extend(
            drain_requests(limiter)
        )  # on trio's clock, some 10,000 s or more ahead of time.monotonic
        threads = [threading.Thread(target=thread_sender, daemon=True) for _ in range(2)]
        for thread in threads:
            thread.start()
        with anyio.fail_after(5):  # (without the clock shift, the threads would wait for hours)
            async with anyio.create_task_group() as tg:
                tg.start_soon(task_sender)
            for thread in threads:
                await anyio.to_thread.run_sync(thread.join, 5)

    start = time.monotonic()
    anyio.run(main, backend="trio")
    assert len(done) == 3 * per_worker
    assert time.monotonic() - start < 3  # 60 requests at 1,000 a second, not hours of skew
    stats = limiter.statistics()[POOL]
    assert (stats.in_flight, stats.queue_depth) == (len(drained), 0)


@pytest.mark.anyio
async def test_anyio_worker_threads_wait_in_the_event_loop() -> None:
    """``anyio.to_thread.run_sync`` workers (under trio: its clock, its tasks) share the limiter."""
    limiter = small_pool_limiter()
    gauge = Gauge()
    start = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for _ in range(WORKERS):
            tg.start_soon(task_worker, limiter, gauge)
            tg.start_soon(anyio.to_thread.run_sync, thread_worker, limiter, gauge)
    elapsed = anyio.current_time() - start
    assert gauge.done == 2 * WORKERS * ROUNDS
    assert gauge.most <= 10 + elapsed
    stats = limiter.statistics()[POOL]
    assert (stats.in_flight, stats.queue_depth, stats.granted) == (0, 0, 2 * WORKERS * ROUNDS)


def test_a_waiting_thread_is_woken_by_another_thread() -> None:
    limiter = Limiter("tier-1", opening=60, clock=FakeClock())
    blocker = limiter.acquire_nowait(SONNET, max_tokens=8_000)
    got: list[float] = []

    def waiter() -> None:
        with limiter.acquire_sync(SONNET, Demand(max_tokens=4_000)) as permit:
            got.append(permit.reserved["output_tokens"])

    thread = threading.Thread(target=waiter)
    thread.start()
    deadline = time.monotonic() + 5
    while limiter.statistics()[POOL].queue_depth != 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    blocker.release()  # the frozen clock never refills: only this can let it through
    thread.join(5)
    assert got == [4_000]
    assert levels(limiter)["output_tokens"] == 8_000


def test_a_thread_timeout_leaves_nothing_reserved() -> None:
    limiter = Limiter("tier-1")
    limiter.acquire_nowait(SONNET, max_tokens=8_000)
    before = limiter.statistics()[POOL]
    with (
        pytest.raises(AcquireTimeout, match=r"^sonnet-4\.x: no capacity within the 0\.01s timeout$"),
        limiter.acquire_sync(SONNET, Demand(max_tokens=4_000), timeout=0.01),
    ):
        pytest.fail("admitted")
    after = limiter.statistics()[POOL]
    assert (after.queue_depth, after.in_flight, after.granted) == (0, 1, before.granted)


@pytest.mark.anyio
async def test_acquire_sync_in_async_code_says_what_to_use() -> None:
    limiter = Limiter("tier-1")
    with (
        pytest.raises(
            ConfigurationError,
            match=r"^acquire_sync blocks; in async code use `async with limiter\.acquire\(\.\.\.\)`$",
        ),
        limiter.acquire_sync(SONNET, Demand(max_tokens=1)),
    ):
        pytest.fail("admitted")
