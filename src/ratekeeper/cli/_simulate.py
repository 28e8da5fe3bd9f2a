"""``ratekeeper simulate``: its arguments and what it runs (the logic is in ``ratekeeper.simulate``).

Only argparse is imported at module level, so ``ratekeeper --help`` works
without the ``cli`` extra; the simulation's dependencies load when it runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # for annotations only: the simulation's dependencies load when it runs
    from ratekeeper.simulate import Scenario, SimulationResult

__all__ = ["configure", "run"]


def _fraction(low_open: bool = False) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (0 < value <= 1 if low_open else 0 <= value < 1):
            bounds = "(0, 1]" if low_open else "[0, 1)"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value

    return parse


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def configure(p: argparse.ArgumentParser) -> None:
    """Add ``simulate``'s arguments to ``p``."""
    p.description = (
        "Run a workload against the in-process emulator on virtual time and compare strategies side by "
        "side: the SDK alone, ratekeeper, a requests-only limiter and a fixed-window token counter. "
        "No API key; minutes of traffic take seconds."
    )
    # --help lists the groups in the order they are added
    _server_arguments(p)
    _workload_arguments(p)
    _output_arguments(p)


def _server_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``server`` group: the emulated server, how long it runs, and who else draws on its limits."""
    s = p.add_argument_group("server")
    s.add_argument("--preset", default="tier-1", help="tier-1..tier-4, start, build, scale (default: tier-1)")
    s.add_argument("--model", default="claude-sonnet-4-5", help="model id (default: claude-sonnet-4-5)")
    s.add_argument(
        "--minutes", type=_positive(float), default=10.0, help="simulated minutes of traffic (default 10)"
    )
    s.add_argument(
        "--enforcement-interval",
        type=_positive(float),
        default=60.0,
        metavar="SECONDS",
        help="seconds of burst the server's buckets hold: 60 = a full minute (default), 1 = '60 RPM as 1/s'",
    )
    s.add_argument(
        "--output-rule",
        choices=["max_tokens", "actual"],
        default="max_tokens",
        help="how OTPM counts: max_tokens reserved at the start (2025 docs, default) or actual output",
    )
    s.add_argument(
        "--report-moment",
        choices=["admission", "response", "mixed"],
        default="admission",
        help="when non-streamed headers describe the buckets: at admission (default), at the response, "
        "or either at random",
    )
    s.add_argument(
        "--uplink",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="longest time a request takes to reach the server after it is sent (each draws its "
        "own, 0 to SECONDS; default 0)",
    )
    s.add_argument(
        "--opening",
        type=_positive(float),
        default=None,
        metavar="SECONDS",
        help="ratekeeper's buckets hold this many seconds of the limit until a response shows "
        "the server's bucket (Limiter(opening=...); default 1; 60: a full bucket from the start)",
    )
    s.add_argument(
        "--limiter-preset",
        default=None,
        metavar="PRESET",
        help="the preset ratekeeper's limiter is told instead of --preset, as by a user who does "
        "not know their tier: it learns the server's limits from the headers (default: --preset)",
    )
    s.add_argument(
        "--foreign-traffic",
        type=_fraction(),
        default=0.0,
        metavar="FRACTION",
        help="share of every limit used by other clients of the organization (default 0)",
    )


def _workload_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``workload`` group: how many requests are sent, and what each one asks for."""
    w = p.add_argument_group("workload")
    w.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="workers sending back to back (default: enough to ask for about twice what the preset "
        "allows, at least 8: 8 for tier-1, 236 for tier-4)",
    )
    w.add_argument(
        "--arrival-rate",
        type=float,
        default=0.0,
        metavar="PER_MINUTE",
        help="extra open-loop requests per minute, Poisson arrivals (default 0)",
    )
    w.add_argument(
        "--prompt-tokens",
        type=_positive(int),
        default=2000,
        metavar="MEAN",
        help="mean input tokens per request (default 2000)",
    )
    w.add_argument(
        "--prompt-spread",
        type=_fraction(),
        default=0.5,
        metavar="FRACTION",
        help="uncached input varies uniformly by +/- this share of its mean (default 0.5)",
    )
    w.add_argument(
        "--max-tokens", type=_positive(int), default=1024, help="max_tokens per request (default 1024)"
    )
    w.add_argument(
        "--output-ratio",
        type=_fraction(low_open=True),
        default=0.5,
        metavar="FRACTION",
        help="mean actual output as a share of max_tokens (default 0.5)",
    )
    w.add_argument(
        "--cache-hit-ratio",
        type=_fraction(),
        default=0.0,
        metavar="FRACTION",
        help="share of each prompt that is a shared, cached system prefix (default 0)",
    )
    w.add_argument("--stream", action="store_true", help="stream the responses")
    w.add_argument("--seed", type=int, default=0, help="seed of the workload and the emulator (default 0)")


def _output_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``output`` group: which strategies are compared, and how the comparison is shown."""
    o = p.add_argument_group("output")
    o.add_argument(
        "--strategies",
        default="sdk,ratekeeper,rpm-only,fixed-window",
        help="comma-separated, from: sdk, ratekeeper, rpm-only, fixed-window (default: all)",
    )
    o.add_argument("--max-retries", type=int, default=2, help="the SDK's max_retries (default 2, its own)")
    o.add_argument("--json", action="store_true", help="one JSON object per strategy per line")
    o.add_argument(
        "--plot", metavar="FILE.png", help="draw bucket levels and admitted traffic (needs matplotlib)"
    )
    o.add_argument("--no-progress", action="store_true", help="no progress bar (none either when not a TTY)")


class _Progress:
    """A progress bar per strategy on stderr: rich's if installed, else one updating line."""

    def __init__(self, strategies: tuple[str, ...], total: float, stream: IO[str]) -> None:
        self._stream = stream
        self._total = total
        self._rich: Any = None
        self._tasks: dict[str, Any] = {}
        self._last = -1
        try:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:
            return
        self._rich = Progress(
            TextColumn("{task.description:>13}"),
            BarColumn(),
            TextColumn("{task.completed:>5.0f}/{task.total:.0f} simulated s"),
            TimeElapsedColumn(),
            console=Console(file=stream),
            transient=True,
        )
        for name in strategies:
            self._tasks[name] = self._rich.add_task(name, total=total)

    def __enter__(self) -> _Progress:
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self._last >= 0:
            self._stream.write("\n")

    def __call__(self, strategy: str, done: float, total: float) -> None:
        if self._rich is not None:
            self._rich.update(self._tasks[strategy], completed=done)
            return
        percent = int(100 * done / total) if total else 100
        if percent != self._last:
            self._last = percent
            self._stream.write(f"\r{strategy:>13}: {percent:3d}%")
            self._stream.flush()


def _scenario(args: argparse.Namespace, notes: list[str], prog: str) -> Scenario | None:
    """The ``Scenario`` the arguments describe, or None once it has said on stderr why they describe none."""
    import attrs

    from ratekeeper.errors import ConfigurationError
    from ratekeeper.simulate import Scenario, Workload
    from ratekeeper.simulate._run import concurrency_to_reach

    try:
        workload = Workload(
            model=args.model,
            concurrency=8 if args.concurrency is None else args.concurrency,
            arrival_rate=args.arrival_rate,
            prompt_tokens=args.prompt_tokens,
            prompt_spread=args.prompt_spread,
            max_tokens=args.max_tokens,
            output_ratio=args.output_ratio,
            cache_hit_ratio=args.cache_hit_ratio,
            stream=args.stream,
            seed=args.seed,
        )
        if args.concurrency is None:
            # the workload above only sizes the requests; the preset's limits set how many workers
            chosen = concurrency_to_reach(args.preset, workload)
            workload = attrs.evolve(workload, concurrency=chosen)
            notes.append(
                f"{chosen} workers: chosen for {args.preset} to ask for about twice what it allows "
                "(--concurrency sets it)"
            )
        return Scenario(
            preset=args.preset,
            workload=workload,
            minutes=args.minutes,
            enforcement_interval=args.enforcement_interval,
            output_rule=args.output_rule,
            foreign_traffic=args.foreign_traffic,
            report_moment=args.report_moment,
            opening=args.opening,
            limiter_preset=args.limiter_preset,
            uplink=args.uplink,
            strategies=args.strategies,
            max_retries=args.max_retries,
        )
    except (ConfigurationError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None


def run(args: argparse.Namespace) -> int:
    """Run ``ratekeeper simulate``; returns the exit code."""
    from ratekeeper.errors import MissingDependency, RateKeeperError

    prog = "ratekeeper simulate"
    try:
        # the package checks the cli extra as it loads, so this is where a missing one shows
        from ratekeeper.simulate import simulate
    except ImportError as exc:
        # (a MissingDependency already says what to install; another ImportError, not yet)
        hint = f"{exc.name or exc} is missing; install it with: pip install 'ratekeeper[cli]'"
        print(f"{prog}: {exc if isinstance(exc, MissingDependency) else hint}", file=sys.stderr)
        return 2
    notes: list[str] = []
    scenario = _scenario(args, notes, prog)
    if scenario is None:
        return 2
    if args.plot:  # fail before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"{prog}: {MissingDependency('matplotlib', 'plot')}", file=sys.stderr)
            return 2
    show = not args.no_progress and sys.stderr.isatty()
    started = time.perf_counter()
    try:
        if show:
            with _Progress(scenario.strategies, scenario.duration, sys.stderr) as bar:
                result = simulate(scenario, progress=bar)
        else:
            result = simulate(scenario)
    except RateKeeperError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    _report(result, args, notes, time.perf_counter() - started)
    return 0


def _report(result: SimulationResult, args: argparse.Namespace, notes: list[str], wall: float) -> None:
    """Print ``result`` as the arguments ask (JSON lines or a table), then write the plot if one is asked."""
    from ratekeeper.simulate._report import json_lines, render_rich, render_text

    if args.json:
        for line in json_lines(result):
            print(line)
    else:
        try:
            render_rich(result, notes=notes)
        except ImportError:  # rich is optional here: plain text says the same
            print(render_text(result, notes=notes))
        runs = len(result.results)
        print(f"({result.scenario.minutes:g} simulated minutes x {runs} strategies in {wall:.1f}s wall time)")
    if args.plot:
        from ratekeeper.simulate._plot import plot

        path = plot(result, args.plot)
        print(f"plot written to {path}", file=sys.stderr)
