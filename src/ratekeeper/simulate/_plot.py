"""Draw a simulation: the server's bucket level, admitted traffic and 429s over time, per strategy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from ratekeeper.errors import MissingDependency
from ratekeeper.simulate._metrics import BIN_SECONDS
from ratekeeper.simulate._report import headline, twins
from ratekeeper.simulate._run import SimulationResult

__all__ = ["LEVEL_FLOOR", "figure", "plot"]

_DIM_NAMES: Final = {"requests": "RPM", "input_tokens": "ITPM", "output_tokens": "OTPM"}
#: The level panel reads no lower than this (% of capacity); a bucket in deeper debt is drawn at the
#: edge and the panel says how deep it went, so one spike cannot squash every other line flat.
LEVEL_FLOOR: Final = -100.0
_COLOURS: Final = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
#: Legends beside the panels, where they hide no line.
_BESIDE: Final[dict[str, Any]] = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": "small"}


def _figure() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependency("matplotlib", "plot") from None
    return Figure(figsize=(12, 9), layout="constrained")


def plot(result: SimulationResult, path: str | Path, *, dimension: str | None = None) -> Path:
    """Write a PNG of ``result`` (see ``figure``) to ``path`` and return it."""
    out = Path(path)
    figure(result, dimension=dimension).savefig(out, dpi=100)
    return out


def figure(result: SimulationResult, *, dimension: str | None = None) -> Any:
    """The matplotlib ``Figure`` of ``result``, for ``plot`` to save.

    Three panels over simulated time, one line per strategy, for ``dimension``
    (default: the binding one): the emulator's bucket level as a share of its
    capacity; what successful requests were charged over the last minute,
    against the per-minute limit; and the 429s the server sent. The title
    carries the headline (429s and failed requests per strategy); a strategy
    whose run repeated another's is drawn dashed over it and labelled so, and
    every panel has its legend. Needs the ``plot`` extra (matplotlib), drawn
    without pyplot so nothing global changes.
    """
    fig = _figure()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    dim = dimension or result.binding_dimension or "output_tokens"
    ax_level, ax_rate, ax_429 = fig.subplots(3, 1, sharex=True, height_ratios=(3, 3, 2))
    lowest = _strategy_lines(result, dim, ax_level, ax_rate, ax_429)
    _level_panel(ax_level, result, dim, lowest)
    _rate_panel(ax_rate, result, dim)
    _429_panel(ax_429, result)
    for ax in (ax_level, ax_rate, ax_429):
        ax.grid(True, alpha=0.3)
    fig.suptitle(_title(result))
    return fig


def _strategy_lines(result: SimulationResult, dim: str, ax_level: Any, ax_rate: Any, ax_429: Any) -> float:
    """Draw each strategy's line on the three panels; returns the lowest bucket level met (%, <= 0).

    The level panel draws no lower than ``LEVEL_FLOOR``; the lowest level is
    returned so that panel can say how far below it the bucket went.
    """
    same = twins(result)
    colour = {r.strategy: _COLOURS[i % len(_COLOURS)] for i, r in enumerate(result.results)}
    lowest = 0.0
    for r in result.results:
        s = r.series
        twin = same.get(r.strategy)
        label = r.strategy if twin is None else f"{r.strategy} (= {twin}, dashed over it)"
        # a repeat is drawn dashed on top of the thicker original, so both stay visible
        style: dict[str, Any] = {"color": colour[r.strategy], "label": label}
        if twin is not None:
            style.update(linestyle=(0, (4, 3)), linewidth=1.4, zorder=3)
        else:
            style.update(linewidth=2.6 if r.strategy in same.values() else 1.2, zorder=2)
        minutes = [t / 60.0 for t in s.level_times]
        levels = [100 * v for v in s.levels.get(dim, ())]
        lowest = min([lowest, *levels])
        ax_level.plot(minutes, [max(LEVEL_FLOOR, v) for v in levels], **style)
        bins = [t / 60.0 for t in s.bin_times]
        ax_rate.plot(bins, list(s.admitted[dim]), **style)
        if r.rate_limited:  # lines of zeros would lie on one another: those are named instead
            style_429 = {**style, "label": f"{label}: {r.rate_limited}"}
            ax_429.step(bins, list(s.rate_limited), where="pre", **style_429)
    return lowest


def _level_panel(ax_level: Any, result: SimulationResult, dim: str, lowest: float) -> None:
    """Finish the bucket-level panel: the full start marked, the axis cut at ``LEVEL_FLOOR``, labels."""
    name = _DIM_NAMES[dim]
    capacity = result.capacity[dim]
    # the bucket starts full, so the first minute may take its capacity on top of a minute's refill
    ax_level.plot([0.0], [100.0], marker="o", color="black", linestyle="none")
    ax_level.annotate(
        "full at the start; the first wave\ntakes its share at once",
        xy=(0.0, 100.0),
        xytext=(1.0, -0.4),
        textcoords="offset fontsize",
        fontsize="small",
        va="top",
    )
    floor = max(LEVEL_FLOOR, lowest)
    ax_level.set_ylim(floor - 5.0, 105.0)
    if lowest < LEVEL_FLOOR:  # said above the panel, where it hides no line
        ax_level.set_title(
            f"clipped at {LEVEL_FLOOR:.0f}%: the bucket went down to {lowest:,.0f}% of its capacity "
            "(a charge beyond what it holds leaves it in debt)",
            loc="left",
            fontsize="small",
        )
    ax_level.set_ylabel(f"{name} bucket level\n(% of capacity, {capacity:,.0f})")
    ax_level.legend(**_BESIDE)


def _rate_panel(ax_rate: Any, result: SimulationResult, dim: str) -> None:
    """Finish the admitted-traffic panel: the limit (and what other clients leave of it), labels."""
    name = _DIM_NAMES[dim]
    sc = result.scenario
    limit = result.limits[dim]
    capacity = result.capacity[dim]
    ax_rate.axhline(limit, color="black", linestyle="--", linewidth=1, label=f"{name} limit (per minute)")
    if sc.foreign_traffic:
        ax_rate.axhline(
            limit * (1 - sc.foreign_traffic),
            color="grey",
            linestyle=":",
            linewidth=1,
            label="limit - foreign",
        )
    ax_rate.annotate(
        f"first minute: the full bucket ({capacity:,.0f})\nplus a minute's refill may go in",
        xy=(1.0, limit + capacity),
        xytext=(0.5, 1.0),
        textcoords="offset fontsize",
        fontsize="small",
        va="bottom",
    )
    # room above for the first minute's peak, which may reach the limit plus the full bucket
    ax_rate.set_ylim(0.0, max(limit + capacity, *ax_rate.get_ylim()) * 1.15)
    ax_rate.set_ylabel(f"admitted {name}\n(over the last minute)")
    ax_rate.legend(**_BESIDE)


def _429_panel(ax_429: Any, result: SimulationResult) -> None:
    """Finish the 429 panel: the strategies that met none named beside it, labels, the totals."""
    calm = [r.strategy for r in result.results if not r.rate_limited]
    if calm:
        ax_429.text(  # beside the panel, under its legend: over the lines it could hide a spike
            1.01,
            0.0,
            "no 429s:\n" + "\n".join(calm),
            transform=ax_429.transAxes,
            fontsize="small",
            va="bottom",
        )
    ax_429.set_ylim(bottom=0.0)
    ax_429.set_ylabel(f"429s per {BIN_SECONDS:g} s")
    ax_429.set_xlabel("simulated minutes")
    if any(r.rate_limited for r in result.results):
        ax_429.legend(**_BESIDE, title="429s in all", title_fontsize="small")


def _title(result: SimulationResult) -> str:
    """The figure's title: the scenario on the first line, the headline (429s, failures) on the second."""
    sc = result.scenario
    return (
        f"{sc.preset} · {sc.workload.model} · {sc.workload.concurrency} workers · enforcement "
        f"{sc.enforcement_interval:g}s · OTPM rule {sc.output_rule}"
        + (f" · foreign {sc.foreign_traffic:.0%}" if sc.foreign_traffic else "")
        + f"\n{headline(result)}"
    )
