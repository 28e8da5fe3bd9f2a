"""What the pure core costs per call, next to a minimal hand-written equivalent in the same run.

Run: pytest benchmarks/test_bench_bucket.py --benchmark-only --benchmark-columns=min,median,mean,ops
"""

from __future__ import annotations

from collections.abc import Callable

from pytest_benchmark.fixture import BenchmarkFixture

from ratekeeper import AccountingRules, Cost, Demand, TokenBucket

Take = Callable[[float, float], bool]
Wait = Callable[[float, float], float]

# 8 tokens/s and steps of 1/16 s: half a token per step, exact in binary, so a
# bucket of 1 grants every other take of 1.
RATE, STEP = 8.0, 1 / 16


def minimal_bucket(capacity: float, rate: float, level: float, now: float) -> tuple[Take, Wait]:
    """The baseline: the same arithmetic with no checks, no slack, no object."""
    last = now

    def try_take(n: float, now: float) -> bool:
        nonlocal level, last
        if now > last:
            level, last = min(capacity, level + (now - last) * rate), now
        if level >= n:
            level -= n
            return True
        return False

    def time_until(n: float, now: float) -> float:
        current = min(capacity, level + (max(now, last) - last) * rate)
        return max(0.0, (n - current) / rate)

    return try_take, time_until


def alternating(take: Take) -> Callable[[], bool]:
    """A step: move the clock on by STEP and take 1 token; succeeds every other call."""
    clock = [0.0]

    def step() -> bool:
        clock[0] += STEP
        return take(1.0, clock[0])

    assert [step() for _ in range(6)] == [True, False, True, False, True, False]
    return step


def test_try_take(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "try_take (alternating success)"
    bucket = TokenBucket(1, RATE, level=0.5, now=0.0)
    benchmark(alternating(bucket.try_take))


def test_try_take_baseline(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "try_take (alternating success)"
    take, _ = minimal_bucket(1, RATE, 0.5, 0.0)
    benchmark(alternating(take))


def test_time_until(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "time_until (positive wait)"
    bucket = TokenBucket(10, RATE, level=0.0, now=1000.0)
    assert bucket.time_until(4, 1000.25) == 0.25
    benchmark(bucket.time_until, 4, 1000.25)


def test_time_until_baseline(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "time_until (positive wait)"
    _, time_until = minimal_bucket(10, RATE, 0.0, 1000.0)
    assert time_until(4, 1000.25) == 0.25
    benchmark(time_until, 4, 1000.25)


DEMAND = Demand(
    input_tokens=1000, max_tokens=4000, cache_read_input_tokens=5000, cache_creation_input_tokens=200
)
EXPECTED = Cost(requests=1.0, input_tokens=1200.0, output_tokens=4000.0)


def test_admission_cost(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "admission cost"
    rules = AccountingRules()
    assert benchmark(rules.admission_cost, DEMAND) == EXPECTED


def test_admission_cost_baseline(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "admission cost"

    def direct(d: Demand) -> Cost:
        return Cost(1.0, float(d.input_tokens + d.cache_creation_input_tokens), float(d.max_tokens))

    assert benchmark(direct, DEMAND) == EXPECTED
