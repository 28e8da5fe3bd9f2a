"""The uncontended gate of this checkout against another tree's, in one process.

    git archive main src | tar -x -C /tmp/base
    python benchmarks/limiter_against.py /tmp/base/src [rounds]

One round is ``test_bench_limiter.ROUNDS`` ``async with`` blocks on one asyncio loop,
for each of: the minimal one-bucket gate, ``aiolimiter``, the floor (``ToyGate``), the
other tree's three-dimension acquire+settle and this one's, in turn (the order
reversed every other round). Each figure is the fastest round and the median, per
call; the ratios are over the floor and over aiolimiter of the same statistic, so
load from other work weighs on all of them alike.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from aiolimiter import AsyncLimiter
from sdk_overhead_against import _other
from test_bench_limiter import POOL, ROUNDS, SONNET, UNLIMITED, MiniGate, ToyGate

import ratekeeper


def _ratekeeper(module: Any) -> Callable[[], Coroutine[Any, Any, None]]:
    limiter = module.Limiter("tier-1", limits=UNLIMITED)
    usage = module.Usage(input_tokens=1_000, output_tokens=500)

    async def rounds() -> None:
        for _ in range(ROUNDS):
            async with limiter.acquire(SONNET, input_tokens=1_000, max_tokens=1_000) as permit:
                permit.settle(usage)
        assert limiter.statistics()[POOL].in_flight == 0

    return rounds


def _minimal() -> Callable[[], Coroutine[Any, Any, None]]:
    gate = MiniGate(1e9, 1e12)

    async def rounds() -> None:
        for _ in range(ROUNDS):
            async with gate.acquire(1.0):
                pass

    return rounds


def _floor() -> Callable[[], Coroutine[Any, Any, None]]:
    gate = ToyGate((1e12, 1e15, 1e15), (1e12, 1e15, 1e15))

    async def rounds() -> None:
        for _ in range(ROUNDS):
            async with gate.acquire(1_000, 1_000) as permit:
                permit.settle(1_000, 500)

    return rounds


def _aiolimiter() -> Callable[[], Coroutine[Any, Any, None]]:
    limiter = AsyncLimiter(1e12, 60)

    async def rounds() -> None:
        for _ in range(ROUNDS):
            async with limiter:
                pass

    return rounds


def main() -> None:
    """Measure, then print one table row per side."""
    other_src = Path(sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    with tempfile.TemporaryDirectory() as tmp:
        other, _ = _other(other_src, Path(tmp))
        sides = {
            "minimal": _minimal(),
            "aiolimiter": _aiolimiter(),
            "floor": _floor(),
            "other": _ratekeeper(other),
            "this": _ratekeeper(ratekeeper),
        }
        loop = asyncio.new_event_loop()
        times: dict[str, list[float]] = {side: [] for side in sides}
        for r in range(rounds + 3):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for side in order:
                start = time.perf_counter()
                loop.run_until_complete(sides[side]())
                if r >= 3:  # the first rounds warm up
                    times[side].append((time.perf_counter() - start) / ROUNDS * 1e6)
        loop.close()
    fastest = {side: min(t) for side, t in times.items()}
    median = {side: statistics.median(t) for side, t in times.items()}
    print(f"{rounds} rounds of {ROUNDS}; the other tree: {other_src}")
    ratios = "over floor | over aiolimiter"
    print(f"| side | fastest µs/call | {ratios} | median µs/call | {ratios} |")
    print("|---|---|---|---|---|---|---|")
    for side in sides:
        f, m = fastest[side], median[side]
        print(
            f"| {side} | {f:.2f} | {f / fastest['floor']:.2f}x | {f / fastest['aiolimiter']:.2f}x"
            f" | {m:.2f} | {m / median['floor']:.2f}x | {m / median['aiolimiter']:.2f}x |"
        )


if __name__ == "__main__":
    main()
