"""The feedback matrix of issue 12: ratekeeper against the SDK alone, under every reporting moment.

Run ``python benchmarks/feedback_matrix.py [--quick] [--json] [--minutes M] [NAME ...]``.
Every row is ``ratekeeper.simulate`` (the official SDK against the in-process
emulator, on trio's virtual clock) for the SDK alone and for ratekeeper, once
under each moment a non-streamed response's headers can describe
(``admission``, ``response``, ``mixed``). A run is deterministic for its seed,
so one round is the measurement.

Columns, per row and moment: goodput of ratekeeper and of the SDK alone (the
binding dimension's successful tokens over the starting bucket plus the refill
over the run: with foreign traffic this ceiling still includes what the others
took, so there the best possible is about 75%), their ratio, the 429s each met,
ratekeeper's 429s over its requests (an upper bound on the share of requests
that met a 429: a request can meet more than one), requests failed, ratekeeper's
wait p50/p99, and the permits its limiter still held when the run was over.
The last column checks ratekeeper against the issue's target for the row's
regime and says ``met`` or ``missed`` (and by what).

Not in the matrix: limits learned from headers (``Scenario`` always gives the
strategies the preset) and several processes through Redis (not a
``simulate`` strategy; see ``redis_processes_utilization.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any, Final

import attrs

import ratekeeper.simulate._strategies as _strategies
from ratekeeper.gate._limiter import Limiter
from ratekeeper.simulate import Scenario, SimulationResult, Workload, simulate

#: Every moment a non-streamed response's headers may describe (streams: the first byte).
MOMENTS: Final = ("admission", "response", "mixed")


@attrs.frozen
class Target:
    """The issue's target for a regime: a floor on goodput against the SDK alone, a cap on 429s."""

    regime: str
    min_ratio: float
    #: Most 429s ratekeeper may meet, as a share of its requests (``max_429s`` when None).
    max_share: float | None = None
    #: Most 429s in absolute terms ("none after the first response" is read as at most one).
    max_429s: int | None = None
    #: Least goodput as a fraction of the ceiling.
    min_goodput: float = 0.0


FULL_MINUTE: Final = Target("full-minute", 0.98, max_429s=1, min_goodput=0.95)
FIVE_SECONDS: Final = Target("5 s", 0.95, max_share=0.01)
ONE_SECOND: Final = Target("1 s", 0.90, max_share=0.02)
FOREIGN: Final = Target("foreign", 0.95, max_share=0.01)


@attrs.frozen
class Row:
    """A named regime: the scenario fields (the report moment is set per run) and its target."""

    name: str
    target: Target
    quick: bool
    preset: str = "tier-2"
    enforcement_interval: float = 60.0
    foreign_traffic: float = 0.0
    output_rule: str = "max_tokens"
    concurrency: int = 32
    max_tokens: int = 1024
    stream: bool = False
    #: The preset ratekeeper is told, if not ``preset``: it learns the limits from the headers.
    limiter_preset: str | None = None
    #: Simulated minutes: long enough that the SDK alone reaches the limit (``--minutes`` overrides).
    minutes: float = 1.0

    def scenario(self, moment: str, minutes: float, opening: float | None = None) -> Scenario:
        """The scenario of this row under ``moment``, SDK alone and ratekeeper."""
        return Scenario(
            opening=opening,
            preset=self.preset,
            limiter_preset=self.limiter_preset,
            minutes=minutes,
            enforcement_interval=self.enforcement_interval,
            foreign_traffic=self.foreign_traffic,
            output_rule=self.output_rule,
            report_moment=moment,
            strategies=("sdk", "ratekeeper"),
            workload=Workload(concurrency=self.concurrency, max_tokens=self.max_tokens, stream=self.stream),
        )

    def flags(self, moment: str, minutes: float, opening: float | None = None) -> str:
        """The ``ratekeeper simulate`` flags that run this row under ``moment``."""
        parts = [f"--preset {self.preset}", f"--minutes {minutes:g}", f"--concurrency {self.concurrency}"]
        if self.limiter_preset is not None:
            parts.append(f"--limiter-preset {self.limiter_preset}")
        if opening is not None:
            parts.append(f"--opening {opening:g}")
        parts.append(f"--max-tokens {self.max_tokens}")
        if self.enforcement_interval != 60.0:
            parts.append(f"--enforcement-interval {self.enforcement_interval:g}")
        if self.stream:
            parts.append("--stream")
        if self.foreign_traffic:
            parts.append(f"--foreign-traffic {self.foreign_traffic:g}")
        if self.output_rule != "max_tokens":
            parts.append(f"--output-rule {self.output_rule}")
        parts.append(f"--report-moment {moment} --strategies sdk,ratekeeper")
        return " ".join(parts)


#: The regimes of issue 12's table, on Tier 2's Sonnet limits with max_tokens 1024 (8 concurrent
#: requests draw far under Tier 2's limits, so that row is on Tier 1's). At 32 concurrent the
#: closed loop draws only a little over Tier 2's output refill, so in one minute the starting
#: bucket is never used up (the SDK alone meets no 429 and the row measures nothing): those rows
#: run 5 minutes.
ROWS: Final = (
    Row("full-minute, 64 concurrent", FULL_MINUTE, quick=True, concurrency=64),
    Row("full-minute, 32 concurrent", FULL_MINUTE, quick=False, minutes=5.0),
    Row(
        "limits learned (told tier-1), 32 concurrent",
        FULL_MINUTE,
        quick=False,
        limiter_preset="tier-1",
        minutes=5.0,
    ),
    Row(
        "tier-1 full-minute, 8 concurrent",
        FULL_MINUTE,
        quick=True,
        preset="tier-1",
        concurrency=8,
        minutes=3.0,
    ),
    Row(
        "5 s buckets, streamed, 32 concurrent",
        FIVE_SECONDS,
        quick=True,
        enforcement_interval=5.0,
        stream=True,
    ),
    Row("1 s buckets, 16 concurrent", ONE_SECOND, quick=False, enforcement_interval=1.0, concurrency=16),
    Row("25% foreign traffic, 32 concurrent", FOREIGN, quick=False, foreign_traffic=0.25, minutes=5.0),
    Row("output rule actual, 32 concurrent", FULL_MINUTE, quick=False, output_rule="actual", minutes=5.0),
)


@attrs.frozen
class Cell:
    """One row under one moment: both strategies' numbers and what ratekeeper's limiter still held."""

    row: Row
    moment: str
    result: SimulationResult
    in_flight: int
    queued: int
    inferred_moment: str
    wall_s: float

    @property
    def ratio(self) -> float:
        """Ratekeeper's goodput over the SDK alone's."""
        sdk = self.result["sdk"].goodput_fraction
        return self.result["ratekeeper"].goodput_fraction / sdk if sdk else float("inf")

    @property
    def share_429(self) -> float:
        """Ratekeeper's 429s over its requests: an upper bound on the share that met a 429."""
        rk = self.result["ratekeeper"]
        requests = rk.requests_ok + rk.requests_failed
        return min(rk.rate_limited, requests) / requests if requests else 0.0

    def misses(self) -> list[str]:
        """What of the row's target ratekeeper missed, each with the number (empty: all met)."""
        t = self.row.target
        rk = self.result["ratekeeper"]
        out = []
        if self.ratio < t.min_ratio:
            out.append(f"ratio {self.ratio:.3f} < {t.min_ratio:.2f}")
        if rk.goodput_fraction < t.min_goodput:
            out.append(f"goodput {100 * rk.goodput_fraction:.0f}% < {100 * t.min_goodput:.0f}%")
        if t.max_429s is not None and rk.rate_limited > t.max_429s:
            out.append(f"{rk.rate_limited} 429s > {t.max_429s}")
        if t.max_share is not None and self.share_429 > t.max_share:
            out.append(f"429 share {100 * self.share_429:.1f}% > {100 * t.max_share:g}%")
        if self.in_flight or self.queued:
            out.append(f"{self.in_flight} in flight, {self.queued} queued at the end")
        if rk.requests_failed:
            out.append(f"{rk.requests_failed} failed")
        return out

    def as_dict(self) -> dict[str, Any]:
        """The JSON line for ``--json``."""
        return {
            "row": self.row.name,
            "report_moment": self.moment,
            "target": self.row.target.regime,
            "ratio": round(self.ratio, 4),
            "share_429_upper_bound": round(self.share_429, 4),
            "in_flight_at_end": self.in_flight,
            "queued_at_end": self.queued,
            "inferred_report_moment": self.inferred_moment,
            "misses": self.misses(),
            "wall_s": round(self.wall_s, 2),
            "strategies": {r.strategy: r.as_dict() for r in self.result.results},
        }


@contextlib.contextmanager
def watched_limiters() -> Iterator[list[Limiter]]:
    """Keep every ``Limiter`` the ratekeeper strategy builds meanwhile, to read once the run is over.

    The strategy builds its limiter inside ``simulate`` and does not hand it
    out; this wraps the name it builds it by (the limiter itself is the real one).
    """
    made: list[Limiter] = []
    original = Limiter

    def build(*args: Any, **kwargs: Any) -> Limiter:
        limiter = original(*args, **kwargs)
        made.append(limiter)
        return limiter

    setattr(_strategies, "Limiter", build)  # noqa: B010 (an assignment would not type-check: a function for a class)
    try:
        yield made
    finally:
        setattr(_strategies, "Limiter", original)  # noqa: B010


def run_cell(row: Row, moment: str, minutes: float | None = None, opening: float | None = None) -> Cell:
    """Run ``row`` under ``moment`` (SDK alone, then ratekeeper) and read ratekeeper's limiter after.

    ``minutes`` overrides the row's own; ``opening`` is ratekeeper's ``Limiter(opening=...)``.
    """
    minutes = row.minutes if minutes is None else minutes
    started = time.perf_counter()
    with watched_limiters() as made:
        result = simulate(row.scenario(moment, minutes, opening))
    if len(made) != 1:
        raise RuntimeError(f"expected the ratekeeper strategy to build one Limiter, it built {len(made)}")
    stats = made[0].statistics()
    pools = stats.pools.values()
    beliefs = sorted({p.report_moment for p in pools})
    return Cell(
        row=row,
        moment=moment,
        result=result,
        in_flight=sum(p.in_flight for p in pools),
        queued=sum(p.queue_depth for p in pools),
        inferred_moment="/".join(beliefs) or "-",
        wall_s=time.perf_counter() - started,
    )


HEADER: Final = (
    "| regime | moment | goodput rk / sdk | rk/sdk | 429s rk / sdk | rk 429s / requests "
    "| failed rk / sdk | rk wait p50 / p99 | binding | rk inferred | target |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown_row(cell: Cell) -> str:
    """One markdown row of the matrix."""
    rk, sdk = cell.result["ratekeeper"], cell.result["sdk"]
    misses = cell.misses()
    verdict = "met" if not misses else "missed: " + ", ".join(misses)
    cells = [
        cell.row.name,
        cell.moment,
        f"{_pct(rk.goodput_fraction)} / {_pct(sdk.goodput_fraction)}",
        f"{cell.ratio:.2f}",
        f"{rk.rate_limited} / {sdk.rate_limited}",
        f"{rk.rate_limited} of {rk.requests_ok + rk.requests_failed} ({_pct(cell.share_429)})",
        f"{rk.requests_failed} / {sdk.requests_failed}",
        f"{rk.wait_p50_s:.1f} / {rk.wait_p99_s:.1f} s",
        cell.result.binding_dimension.split("_")[0],
        cell.inferred_moment,
        f"{cell.row.target.regime}: {verdict}",
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str]) -> int:
    """Run the matrix and print it (markdown, or one JSON line per cell with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="only the rows marked quick")
    parser.add_argument("--json", action="store_true", help="one JSON line per row and moment")
    parser.add_argument("--minutes", type=float, help="simulated minutes of every run (default: the row's)")
    parser.add_argument("--opening", type=float, help="ratekeeper's Limiter(opening=SECONDS) (default: 1)")
    parser.add_argument("names", nargs="*", help="only rows whose name contains one of these")
    args = parser.parse_args(argv)
    rows = [
        r
        for r in ROWS
        if (not args.quick or r.quick) and (not args.names or any(n in r.name for n in args.names))
    ]
    started = time.perf_counter()
    if not args.json:
        print(HEADER, flush=True)
    for row in rows:
        for moment in MOMENTS:
            cell = run_cell(row, moment, args.minutes, args.opening)
            print(json.dumps(cell.as_dict()) if args.json else markdown_row(cell), flush=True)
    if not args.json:
        print()
        for row in rows:
            flags = row.flags("<moment>", args.minutes or row.minutes, args.opening)
            print(f"- {row.name}: `ratekeeper simulate {flags}`")
        print(f"\nwall time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
