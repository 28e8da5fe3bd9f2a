"""Show a simulation's results: a table (rich when installed, plain text otherwise) or JSON lines."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import IO, Final

from ratekeeper.simulate._metrics import DIMENSIONS, StrategyResult
from ratekeeper.simulate._run import SimulationResult, concurrency_to_reach

__all__ = [
    "COLUMNS",
    "REACHED",
    "describe",
    "findings",
    "headline",
    "json_lines",
    "render_rich",
    "render_text",
    "table_rows",
    "twins",
]

_DIM_NAMES: Final = {"requests": "RPM", "input_tokens": "ITPM", "output_tokens": "OTPM"}
_WIDTH: Final = 116
#: Below this goodput for every strategy, the workload did not reach the limit and the report says so.
REACHED: Final = 0.5
#: Column headers of the table, in order.
COLUMNS: Final = (
    "strategy",
    "ok",
    "429s",
    "failed",
    "goodput",
    "RPM",
    "ITPM",
    "OTPM",
    "idle reserve",
    "wait p50",
    "wait p99",
)


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def _secs(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.2f}s" if x < 100 else f"{x:.0f}s"


def _n(x: float) -> str:
    return f"{x:,.0f}"


def describe(result: SimulationResult) -> list[str]:
    """The lines above the table: the server's limits and rules, the workload, the binding dimension."""
    sc = result.scenario
    w = sc.workload
    lim = result.limits
    limits = ", ".join(f"{_n(lim[d])} {_DIM_NAMES[d]}" for d in DIMENSIONS)
    enforcement = (
        "a full minute" if sc.enforcement_interval >= 60 else f"{sc.enforcement_interval:g}s of burst"
    )
    lines = [
        f"{sc.preset} · {w.model} · {result.pool} pool: {limits}",
        f"{sc.minutes:g} simulated minutes · enforcement: {enforcement} · OTPM rule: {sc.output_rule}"
        + (f" · foreign traffic: {sc.foreign_traffic:.0%} of every limit" if sc.foreign_traffic else ""),
        f"workload: {w.concurrency} workers"
        + (f" + {w.arrival_rate:g} arrivals/min" if w.arrival_rate else "")
        + f", prompts {_n(w.prompt_tokens)} tokens (±{w.prompt_spread:.0%} uncached)"
        + (f" with {w.cache_hit_ratio:.0%} cached" if w.cache_hit_ratio else "")
        + f", max_tokens {_n(w.max_tokens)}, output {w.output_ratio:.0%} of it (±{w.output_spread:.0%})"
        + (", streamed" if w.stream else "")
        + f", seed {w.seed}",
    ]
    binding = result.binding_dimension
    if binding:
        cap = result.capacity[binding]
        allowed = cap + lim[binding] / 60.0 * sc.duration
        name = _DIM_NAMES[binding]
        lines.append(
            f"binding: {name} · goodput = successful {name} admitted / ({_n(cap)} capacity + "
            f"{_n(lim[binding])}/min x {sc.minutes:g} min = {_n(allowed)})"
        )
    return lines


def table_rows(result: SimulationResult) -> list[tuple[str, ...]]:
    """One row of cells per strategy, matching ``COLUMNS``."""
    rows: list[tuple[str, ...]] = []
    same = twins(result)
    for r in result.results:
        u = r.utilization
        failed = str(r.requests_failed) + (
            f" (+{r.requests_unfinished} cut)" if r.requests_unfinished else ""
        )
        rows.append(
            (
                r.strategy + (f" (= {same[r.strategy]})" if r.strategy in same else ""),
                str(r.requests_ok),
                str(r.rate_limited),
                failed,
                _pct(r.goodput_fraction),
                _pct(u["requests"]),
                _pct(u["input_tokens"]),
                _pct(u["output_tokens"]),
                _pct(r.idle_reserve_fraction) if result.scenario.output_rule == "max_tokens" else "-",
                _secs(r.wait_p50_s),
                _secs(r.wait_p99_s),
            )
        )
    return rows


_FOOTER: Final = (
    "ok/failed: simulated requests the SDK returned / raised for (after its retries), whose last attempt "
    "reached the server within the run; 429s: refusals the server sent. RPM/ITPM/OTPM: used / allowed per "
    "dimension. idle reserve: output capacity held by max_tokens beyond what was produced, as a share of "
    "OTPM. wait: per request, ok or failed, from wanting to send to its last attempt reaching the server "
    "(the one that succeeded, or the last refused before the SDK gave up). See docs/simulate.md."
)


def _signature(r: StrategyResult) -> str:
    d = r.as_dict()
    del d["strategy"], d["wall_s"]
    return json.dumps(d, sort_keys=True) + repr(r.series)


def twins(result: SimulationResult) -> dict[str, str]:
    """Strategy -> the earlier strategy whose run it repeated exactly (same counts, waits and series)."""
    first: dict[str, str] = {}
    out: dict[str, str] = {}
    for r in result.results:
        key = _signature(r)
        if key in first:
            out[r.strategy] = first[key]
        else:
            first[key] = r.strategy
    return out


def headline(result: SimulationResult) -> str:
    """Per strategy, the 429s it met and the requests that failed: ``sdk 993 429s, 283 failed · ...``."""
    parts = [f"{r.strategy} {r.rate_limited} 429s, {r.requests_failed} failed" for r in result.results]
    return " · ".join(parts)


def findings(result: SimulationResult) -> list[str]:
    """What the table cannot say by itself: rows that repeat another, a limit the workload never reached."""
    lines = []
    by_name = {r.strategy: r for r in result.results}
    for name, twin in twins(result).items():
        line = f"{name} = {twin}: the same requests at the same moments; it never held one back"
        if name == "rpm-only" or twin == "rpm-only":
            rpm = by_name[name].utilization["requests"]
            line += f" (RPM, the only limit it keeps, was at {rpm:.0%} of what the server allowed)"
        lines.append(line)
    best = max((r.goodput_fraction for r in result.results), default=math.nan)
    if result.results and not best >= REACHED:
        name = _DIM_NAMES.get(result.binding_dimension, result.binding_dimension)
        w = result.scenario.workload
        load = f"{w.concurrency} workers" + (f" + {w.arrival_rate:g}/min" if w.arrival_rate else "")
        line = (
            f"the workload did not reach the limit: at most {_pct(best)} of what {result.scenario.preset} "
            f"allowed in {name}, its busiest dimension; {load} ask for too little for the strategies "
            "to differ"
        )
        suggest = concurrency_to_reach(result.scenario.preset, w)
        if suggest > w.concurrency:
            line += f"; --concurrency {suggest} would ask for about twice the limit"
        lines.append(line)
    return lines


def render_text(result: SimulationResult, *, notes: Sequence[str] = ()) -> str:
    """The plain-text table, with the description above it and ``findings`` (then ``notes``) below."""
    rows = [COLUMNS, *table_rows(result)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    out = describe(result)
    out.append("")
    for k, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    out.extend(f"note: {line}" for line in [*findings(result), *notes])
    out.append("")
    out.append(_FOOTER)
    return "\n".join(out)


def render_rich(result: SimulationResult, file: IO[str] | None = None, *, notes: Sequence[str] = ()) -> None:
    """Print the table with rich (raises ``ImportError`` without it).

    In a terminal too narrow for every column, the per-dimension ones (RPM,
    ITPM, OTPM) are left out rather than squeezed; ``--json`` has them all.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file, highlight=False)
    if not console.is_terminal:  # a pipe or a file: don't squeeze the table into 80 columns
        console = Console(file=file, highlight=False, width=max(console.width, _WIDTH))
    rows = table_rows(result)
    keep = list(range(len(COLUMNS)))
    natural = sum(max(len(r[i]) for r in [COLUMNS, *rows]) + 2 for i in keep)
    if natural > console.width:
        keep = [i for i, name in enumerate(COLUMNS) if name not in _DIM_NAMES.values()]
    for line in describe(result):
        console.print(line, style="dim" if line.startswith("workload") else None)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold", pad_edge=False)
    for i in keep:
        table.add_column(COLUMNS[i], justify="left" if i == 0 else "right", no_wrap=True)
    for row, r in zip(rows, result.results, strict=True):
        style = "bold" if r.strategy == "ratekeeper" else None
        table.add_row(*(row[i] for i in keep), style=style)
    console.print(table)
    for line in [*findings(result), *notes]:
        console.print(f"note: {line}", style="bold")
    console.print(_FOOTER, style="dim")


def json_lines(result: SimulationResult) -> list[str]:
    """One JSON object per strategy (see ``StrategyResult.as_dict``), with the scenario and its workload.

    ``workload`` is everything that decided what was sent (so runs can be told
    apart); ``identical_to`` names an earlier strategy whose run this one repeated.
    """
    sc = result.scenario
    w = sc.workload
    same = twins(result)
    extra = {
        "preset": sc.preset,
        "model": sc.workload.model,
        "minutes": sc.minutes,
        "enforcement_interval": sc.enforcement_interval,
        "output_rule": sc.output_rule,
        "foreign_traffic": sc.foreign_traffic,
        "seed": sc.workload.seed,
        "report_moment": sc.report_moment,
        "opening": sc.opening,
        "max_retries": sc.max_retries,
        "strategies": list(sc.strategies),
        "pool": result.pool,
        "limits": result.limits,
        "workload": {
            "concurrency": w.concurrency,
            "arrival_rate": w.arrival_rate,
            "prompt_tokens": w.prompt_tokens,
            "prompt_spread": w.prompt_spread,
            "max_tokens": w.max_tokens,
            "output_ratio": w.output_ratio,
            "output_spread": w.output_spread,
            "cache_hit_ratio": w.cache_hit_ratio,
            "stream": w.stream,
            "seed": w.seed,
        },
    }
    return [
        json.dumps({**r.as_dict(), "identical_to": same.get(r.strategy), **extra}) for r in result.results
    ]
