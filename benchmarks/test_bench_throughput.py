"""Throughput on the emulator: how much of the limit each strategy uses, and how many 429s it meets.

Every scenario runs ``ratekeeper.simulate`` (the official SDK against the
in-process emulator, on trio's virtual clock) for every strategy: the SDK
alone, ratekeeper, an RPM-only leaky bucket and a fixed-window token counter.
A run is deterministic for its seed, so one round is the measurement; the
benchmark's time is the wall time of the whole scenario.

Run ``python benchmarks/test_bench_throughput.py [NAME ...]`` for the table in
``docs/benchmarks.md`` (section "Throughput (simulate)"); each scenario is also
``ratekeeper simulate`` with the flags printed in the table. As tests, the
scenarios check what must hold whatever the numbers: ratekeeper meets no 429
at full-minute enforcement without foreign traffic, and never meets more 429s
than the SDK alone.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Final

import attrs
import pytest

from ratekeeper.simulate import Scenario, SimulationResult, Workload, simulate


@attrs.frozen
class Case:
    """A named scenario and the ``ratekeeper simulate`` flags that run it."""

    name: str
    flags: str
    scenario: Scenario


def _case(name: str, flags: str, preset: str, *, minutes: float = 5.0, **options: Any) -> Case:
    """A case; ``options`` are ``Workload`` fields and ``Scenario`` fields mixed."""
    workload = {k: v for k, v in options.items() if k in attrs.fields_dict(Workload)}
    rest = {k: v for k, v in options.items() if k not in workload}
    scenario = Scenario(preset=preset, minutes=minutes, workload=Workload(**workload), **rest)
    return Case(name, f"--preset {preset} --minutes {minutes:g} {flags}".strip(), scenario)


#: The scenarios of docs/benchmarks.md, in its order. Concurrency is set a little above what
#: keeps the binding limit busy (rate x latency), so the SDK alone is not drowned in 429s; the
#: biggest limits run fewer minutes (the wall time grows with the requests simulated).
CASES: Final = (
    _case("tier-1 default (ITPM-bound)", "", "tier-1", minutes=10.0),
    _case(
        "tier-1 OTPM-bound",
        "--concurrency 4 --prompt-tokens 500 --max-tokens 2048 --output-ratio 0.75",
        "tier-1",
        minutes=10.0,
        concurrency=4,
        prompt_tokens=500,
        max_tokens=2048,
        output_ratio=0.75,
    ),
    _case(
        "tier-1 RPM-bound (short requests)",
        "--prompt-tokens 300 --max-tokens 256",
        "tier-1",
        minutes=10.0,
        prompt_tokens=300,
        max_tokens=256,
    ),
    _case(
        "tier-1, 1 s enforcement",
        "--enforcement-interval 1",
        "tier-1",
        minutes=10.0,
        enforcement_interval=1.0,
    ),
    _case(
        "tier-1, 25% foreign traffic",
        "--foreign-traffic 0.25",
        "tier-1",
        minutes=10.0,
        foreign_traffic=0.25,
    ),
    _case(
        "tier-2 ITPM-bound, streamed",
        "--concurrency 16 --prompt-tokens 6000 --stream",
        "tier-2",
        concurrency=16,
        prompt_tokens=6000,
        stream=True,
    ),
    _case(
        "tier-2 OTPM-bound",
        "--concurrency 32 --prompt-tokens 1000 --max-tokens 2048 --output-ratio 0.75",
        "tier-2",
        concurrency=32,
        prompt_tokens=1000,
        max_tokens=2048,
        output_ratio=0.75,
    ),
    _case(
        "tier-2, max_tokens 8x the output",
        "--concurrency 48 --max-tokens 4096 --output-ratio 0.125",
        "tier-2",
        concurrency=48,
        max_tokens=4096,
        output_ratio=0.125,
    ),
    _case(
        "the same, actual-output OTPM rule",
        "--concurrency 48 --max-tokens 4096 --output-ratio 0.125 --output-rule actual",
        "tier-2",
        concurrency=48,
        max_tokens=4096,
        output_ratio=0.125,
        output_rule="actual",
    ),
    _case(
        "tier-2, 80% cache hits",
        "--concurrency 24 --prompt-tokens 10000 --cache-hit-ratio 0.8 --max-tokens 512",
        "tier-2",
        concurrency=24,
        prompt_tokens=10000,
        cache_hit_ratio=0.8,
        max_tokens=512,
    ),
    _case(
        "tier-2, 1 s enforcement",
        "--concurrency 16 --prompt-tokens 6000 --enforcement-interval 1",
        "tier-2",
        concurrency=16,
        prompt_tokens=6000,
        enforcement_interval=1.0,
    ),
    _case(
        "tier-2, 25% foreign traffic",
        "--concurrency 16 --prompt-tokens 6000 --foreign-traffic 0.25",
        "tier-2",
        concurrency=16,
        prompt_tokens=6000,
        foreign_traffic=0.25,
    ),
    _case(
        "tier-4 ITPM-bound",
        "--concurrency 96 --prompt-tokens 8000",
        "tier-4",
        minutes=2.0,
        concurrency=96,
        prompt_tokens=8000,
    ),
    _case(
        "start, 1 s enforcement",
        "--concurrency 48 --prompt-tokens 8000 --enforcement-interval 1",
        "start",
        minutes=3.0,
        concurrency=48,
        prompt_tokens=8000,
        enforcement_interval=1.0,
    ),
    _case(
        "scale ITPM-bound",
        "--concurrency 160 --prompt-tokens 20000",
        "scale",
        minutes=1.0,
        concurrency=160,
        prompt_tokens=20000,
    ),
)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def row(case: Case, result: SimulationResult, wall: float) -> str:
    """One markdown row: the scenario, then goodput and 429s per strategy, ratekeeper's waits."""
    cells = [case.name]
    for name in ("sdk", "ratekeeper", "rpm-only", "fixed-window"):
        r = result[name]
        cells.append(f"{_pct(r.goodput_fraction)} / {r.rate_limited}")
    rk = result["ratekeeper"]
    cells.append(f"{rk.wait_p50_s:.1f} / {rk.wait_p99_s:.1f} s")
    cells.append(f"{result.binding_dimension.split('_')[0]}")
    cells.append(f"{wall:.0f} s")
    return "| " + " | ".join(cells) + " |"


HEADER: Final = (
    "| scenario | sdk | ratekeeper | rpm-only | fixed-window | ratekeeper wait p50 / p99 | binding | wall |\n"
    "|---|---|---|---|---|---|---|---|"
)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_throughput(case: Case, benchmark: Any) -> None:
    result: SimulationResult = benchmark.pedantic(simulate, args=(case.scenario,), rounds=1, iterations=1)
    rk, sdk = result["ratekeeper"], result["sdk"]
    benchmark.extra_info.update({r.strategy: r.as_dict() for r in result.results})
    sc = case.scenario
    if sc.enforcement_interval >= 60 and not sc.foreign_traffic:
        assert rk.rate_limited == 0
    assert rk.rate_limited <= sdk.rate_limited
    assert rk.requests_failed <= sdk.requests_failed
    assert rk.goodput_fraction > 0.2  # a sanity floor: 1-second enforcement is at 0.3-0.45 (docs)


def main(names: list[str]) -> None:
    """Print the markdown table (all scenarios, or those whose name contains one of ``names``)."""
    print(HEADER)
    for case in CASES:
        if names and not any(n in case.name for n in names):
            continue
        started = time.perf_counter()
        result = simulate(case.scenario)
        print(row(case, result, time.perf_counter() - started), flush=True)
    print()
    for case in CASES:
        if not names or any(n in case.name for n in names):
            print(f"- {case.name}: `ratekeeper simulate {case.flags}`")


if __name__ == "__main__":
    main(sys.argv[1:])
