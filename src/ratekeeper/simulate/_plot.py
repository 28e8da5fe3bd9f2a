"""Draw a simulation: the server's bucket level, admitted traffic and 429s over time, per strategy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from ratekeeper.errors import MissingDependency
from ratekeeper.simulate._metrics import BIN_SECONDS
from ratekeeper.simulate._run import SimulationResult

__all__ = ["plot"]

_DIM_NAMES: Final = {"requests": "RPM", "input_tokens": "ITPM", "output_tokens": "OTPM"}


def _figure() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependency("matplotlib", "plot") from None
    return Figure(figsize=(10, 8), layout="constrained")


def plot(result: SimulationResult, path: str | Path, *, dimension: str | None = None) -> Path:
    """Write a PNG of ``result`` to ``path`` and return it.

    Three panels over simulated time, one line per strategy, for ``dimension``
    (default: the binding one): the emulator's bucket level as a share of its
    capacity; what successful requests were charged over the last minute,
    against the per-minute limit; and the 429s the server sent. Needs the ``plot`` extra (matplotlib),
    drawn without pyplot so nothing global changes.
    """
    fig = _figure()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    dim = dimension or result.binding_dimension or "output_tokens"
    name = _DIM_NAMES[dim]
    sc = result.scenario
    ax_level, ax_rate, ax_429 = fig.subplots(3, 1, sharex=True, height_ratios=(3, 3, 2))
    for r in result.results:
        s = r.series
        minutes = [t / 60.0 for t in s.level_times]
        ax_level.plot(minutes, [100 * v for v in s.levels.get(dim, ())], label=r.strategy, linewidth=1.2)
        bins = [t / 60.0 for t in s.bin_times]
        ax_rate.plot(bins, list(s.admitted[dim]), label=r.strategy, linewidth=1.2)
        ax_429.step(bins, list(s.rate_limited), where="pre", label=r.strategy, linewidth=1.2)
    limit = result.limits[dim]
    ax_rate.axhline(limit, color="black", linestyle="--", linewidth=1, label=f"{name} limit")
    if sc.foreign_traffic:
        ax_rate.axhline(
            limit * (1 - sc.foreign_traffic),
            color="grey",
            linestyle=":",
            linewidth=1,
            label="limit - foreign",
        )
    ax_level.set_ylabel(f"{name} bucket level\n(% of capacity)")
    ax_level.set_ylim(bottom=min(0.0, ax_level.get_ylim()[0]))
    ax_rate.set_ylim(bottom=0.0)
    ax_rate.set_ylabel(f"admitted {name}\n(over the last minute)")
    ax_429.set_ylabel(f"429s per {BIN_SECONDS:g} s")
    ax_429.set_xlabel("simulated minutes")
    ax_level.legend(loc="best", fontsize="small", ncols=len(result.results))
    ax_rate.legend(loc="lower right", fontsize="small", ncols=3)
    for ax in (ax_level, ax_rate, ax_429):
        ax.grid(True, alpha=0.3)
    fig.suptitle(
        f"{sc.preset} · {sc.workload.model} · enforcement {sc.enforcement_interval:g}s · "
        f"OTPM rule {sc.output_rule}" + (f" · foreign {sc.foreign_traffic:.0%}" if sc.foreign_traffic else "")
    )
    out = Path(path)
    fig.savefig(out, dpi=100)
    return out
