"""The gate's one clock: the event loop's time, a thread's view of it, an offset that changes nothing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import anyio
import pytest
import sniffio

from ratekeeper import Limiter
from ratekeeper.gate._clock import GateClock, in_async_context

pytestmark = pytest.mark.anyio


async def test_in_a_task_it_is_the_loops_clock_moved_by_the_offset() -> None:
    clock = GateClock(offset=1234.5)
    assert clock.now() - anyio.current_time() == pytest.approx(1234.5, abs=1e-3)


async def test_a_thread_reads_the_same_clock_as_the_loop() -> None:
    clock = GateClock(offset=-77.0)
    in_task = clock.now()  # a task's reading teaches the thread where the loop's clock is
    seen: list[float] = []
    thread = threading.Thread(target=lambda: seen.append(clock.now()))
    thread.start()
    thread.join()
    # trio's MockClock stands still while a thread runs; asyncio's moves with time.monotonic
    assert seen[0] - in_task == pytest.approx(0.0, abs=0.5)


def test_a_users_clock_is_taken_as_it_is() -> None:
    clock = GateClock(lambda: 42.0, offset=1000.0)
    assert clock.now() == 42.0
    assert clock.offset == 0.0


def test_the_offset_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATEKEEPER_CLOCK_OFFSET", "5e5")
    assert GateClock().offset == 5e5
    monkeypatch.delenv("RATEKEEPER_CLOCK_OFFSET")
    assert GateClock().offset == 0.0


def test_the_test_suite_runs_with_an_offset() -> None:
    # conftest sets one, so a stray time.monotonic() mixed with the gate's times shows up
    assert abs(GateClock().offset) >= 1_000.0
    assert abs(GateClock().now() - time.monotonic()) >= 1_000.0


@pytest.mark.parametrize("anyio_backend", ["trio"], indirect=True)  # a second's wait, on a mock clock
async def test_a_limiter_waits_the_same_under_any_offset(
    anyio_backend: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    waited = []
    for offset in ("0", "-3e6", "7.25e8"):
        monkeypatch.setenv("RATEKEEPER_CLOCK_OFFSET", offset)
        limiter = Limiter("tier-1", opening=60, limits={"sonnet-4.x": {"requests": 60}})
        for _ in range(60):
            limiter.acquire_nowait("claude-sonnet-4-5").release()  # never sent: all given back
        for _ in range(60):
            limiter.acquire_nowait("claude-sonnet-4-5").mark_sent()
        start = anyio.current_time()
        async with limiter.acquire("claude-sonnet-4-5") as permit:
            permit.release()
        waited.append(anyio.current_time() - start)
    assert waited == [pytest.approx(waited[0], abs=0.05)] * 3
    assert waited[0] == pytest.approx(1.0, abs=0.05)


def test_a_thread_reads_monotonic_time_when_trio_is_not_imported() -> None:
    # the shortcut a program without trio takes must read what anyio's lookup would have
    code = (
        "import sys, time\n"
        "from ratekeeper.gate._clock import GateClock\n"
        "assert 'trio' not in sys.modules, sorted(m for m in sys.modules if 'trio' in m)\n"
        "c = GateClock(offset=100.0)\n"
        "before = time.monotonic(); t = c.now(); after = time.monotonic()\n"
        "assert before + 100.0 <= t <= after + 100.0, (before, t, after)\n"
        "import trio\n"
        "t2 = c.now()\n"
        "assert t2 - time.monotonic() == __import__('pytest').approx(100.0, abs=0.5)\n"
    )
    env = {**os.environ, "RATEKEEPER_CLOCK_OFFSET": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _sniffed() -> bool:
    try:
        sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return False
    return True


async def test_in_async_context_says_what_sniffio_says_in_a_task_and_its_worker_thread() -> None:
    assert in_async_context() is _sniffed() is True
    seen = await anyio.to_thread.run_sync(lambda: (in_async_context(), _sniffed()))
    assert seen[0] is seen[1]


def test_in_async_context_says_what_sniffio_says_outside_a_task() -> None:
    assert in_async_context() is _sniffed() is False
    token = sniffio.current_async_library_cvar.set("some-library")
    try:
        assert in_async_context() is _sniffed() is True
    finally:
        sniffio.current_async_library_cvar.reset(token)
    sniffio.thread_local.name = "another"
    try:
        assert in_async_context() is _sniffed() is True
    finally:
        sniffio.thread_local.name = None
    loop = asyncio.new_event_loop()  # a loop's callback: a running loop, but no task
    seen: list[tuple[bool, bool]] = []
    try:
        loop.call_soon(lambda: seen.append((in_async_context(), _sniffed())))
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        loop.close()
    assert seen == [(False, False)]


class _ShiftedLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose clock is its own (as uvloop's is): not ``time.monotonic()``."""

    def time(self) -> float:
        return time.monotonic() + 5_000.0


@pytest.mark.parametrize("loop_class", [asyncio.SelectorEventLoop, _ShiftedLoop])
def test_the_fast_paths_read_the_loops_own_clock(loop_class: type[asyncio.AbstractEventLoop]) -> None:
    """A grant and a settlement on the uncontended path take the running loop's time, also
    when that loop's ``time()`` is not ``time.monotonic()`` (only asyncio's own is read
    without the call)."""
    limiter = Limiter("tier-1")
    offset = limiter._time.offset

    async def run() -> tuple[float, float, float, float]:
        loop = asyncio.get_running_loop()
        before = loop.time() + offset
        async with limiter.acquire("claude-sonnet-4-5", input_tokens=10, max_tokens=10) as first:
            pass
        async with limiter.acquire("claude-sonnet-4-5", input_tokens=10, max_tokens=10) as second:
            # a charge on settling (more output than reserved) reads the clock too, and a sent
            # request's settlement is kept for replaying with its time
            second.mark_sent()
            second.settle({"input_tokens": 10, "output_tokens": 20})
        return before, first.started_at, second.started_at, limiter._pools["sonnet-4.x"].changes[-1][0]

    loop = loop_class()
    try:
        before, first, second, settled = loop.run_until_complete(run())
    finally:
        loop.close()
    assert before <= first <= second <= settled <= before + 5.0
    assert (limiter._time.monotonic_loop is loop) is (loop_class is asyncio.SelectorEventLoop)
