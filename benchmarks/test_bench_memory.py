"""What ratekeeper keeps in memory: per in-flight permit, and over a long run of distinct prompts.

* ``test_memory_per_in_flight_permit``: tracemalloc over 10,000 permits held at once
  (granted, not settled): bytes per permit, the limiter's own and in all.
* ``test_no_growth_over_distinct_prompts``: every request of a long run has a prompt
  never seen before, behind a cache breakpoint, and goes through what the SDK wrapper
  does per request: estimate the body, acquire, note the cache write when the response
  starts, settle on its usage, calibrate on it. The traced memory's peak is read for each
  quarter of the run; once the bounded tables are full (the cache predictor's 4,096
  entries, the prefix encoding's string memo of 4,096 strings or 4 MiB, one calibration
  per model family, the statistics' one-minute window) it must not grow. Under pytest
  the run is 20,000 requests; the docs' figure is
  ``python benchmarks/test_bench_memory.py 1000000``.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc
from typing import Any

from ratekeeper import Limiter, TokenEstimator, Usage

SONNET = "claude-sonnet-4-5"
POOL = "sonnet-4.x"
UNLIMITED = {POOL: {"requests": 1e12, "input_tokens": 1e15, "output_tokens": 1e15}}
#: Seconds between requests: 1,000 a minute, so the 5-minute cache TTL spans 5,000 prompts.
STEP = 0.06
#: How much higher the last quarter's peak may be than the second's, the tables full (noise).
SLACK = 256 * 1024


class _Clock:
    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _body(i: int) -> dict[str, Any]:
    system = f"Session {i}: you are a careful assistant. " + "Follow the house style. " * 200
    return {
        "model": SONNET,
        "max_tokens": 1024,
        "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": f"Question number {i}: what changed since {i - 1}?"}],
    }


def run_distinct_prompts(n: int, checkpoints: int = 4) -> list[tuple[int, int]]:
    """``n`` requests of distinct prompts: the traced bytes' peak over each of ``checkpoints`` parts.

    Peaks, not the bytes at one moment: the prefix encoding's string memo fills and is
    cleared (at 4,096 strings or 4 MiB of long ones), a sawtooth that a reading at a
    fixed interval would sample at any phase.
    """
    clock = _Clock()
    limiter = Limiter("tier-4", limits=UNLIMITED, clock=clock)
    estimator = TokenEstimator()
    marks = {n * (k + 1) // checkpoints for k in range(checkpoints)}
    seen: list[tuple[int, int]] = []
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(1, n + 1):
            clock.now += STEP
            estimate = estimator.estimate(_body(i), clock.now)
            demand = estimate.demand
            permit = limiter.acquire_nowait(
                SONNET,
                input_tokens=demand.input_tokens,
                max_tokens=demand.max_tokens,
                cache_read_input_tokens=demand.cache_read_input_tokens,
                cache_creation_input_tokens=demand.cache_creation_input_tokens,
            )
            estimator.predictor.record(estimate, clock.now)
            usage = Usage(
                input_tokens=20,
                output_tokens=300,
                cache_creation_input_tokens=demand.cache_creation_input_tokens,
                cache_read_input_tokens=0,
            )
            permit.settle(usage)
            estimator.observe(estimate, usage)
            if i in marks:
                seen.append((i, tracemalloc.get_traced_memory()[1] - base))
                tracemalloc.reset_peak()
    finally:
        tracemalloc.stop()
    assert limiter.statistics()[POOL].in_flight == 0
    return seen


def test_no_growth_over_distinct_prompts() -> None:
    seen = run_distinct_prompts(20_000)
    print(f"\npeak traced bytes in each quarter of 20,000 distinct prompts: {[b for _, b in seen]}")
    assert seen[-1][1] < seen[1][1] + SLACK, seen  # the last quarter's peak: no higher than the second's


def test_memory_per_in_flight_permit() -> None:
    """Bytes per permit held (granted, not yet settled): the gate's own, and in all."""
    n = 10_000
    limiter = Limiter("tier-4", limits=UNLIMITED, clock=_Clock())
    limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10).release()  # the pool exists
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        permits = [limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=1_024) for _ in range(n)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    stats = after.compare_to(before, "filename")
    total = sum(s.size_diff for s in stats)
    gate = sum(s.size_diff for s in stats if "ratekeeper" in s.traceback[0].filename)
    print(f"\nper in-flight permit: {gate / n:.0f} bytes in ratekeeper's code, {total / n:.0f} in all")
    assert 0 < gate / n < 4_000
    for p in permits:
        p.release()
    assert limiter.statistics()[POOL].in_flight == 0


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    for done, peak in run_distinct_prompts(count, checkpoints=10):
        print(f"{done:>9,} requests: peak {peak / 1024:8.0f} KiB traced since the last line")
