"""Simulate a workload against the emulator on virtual time and compare rate-limiting strategies.

``simulate(Scenario(...))`` runs each strategy (the SDK alone, ratekeeper, a
requests-only limiter, a fixed-window token counter) against a fresh
in-process emulator with the same seeded workload, under trio's
``MockClock``, and measures from the emulator's request log how much of the
limit each used and how many 429s it met. The ``ratekeeper simulate`` command
prints the comparison. Needs the ``cli`` extra (trio, the SDK, rich); see
``docs/simulate.md``.
"""

from __future__ import annotations

try:  # fail here, with the install hint, not deep inside the emulator or a strategy
    import anthropic as _sdk  # noqa: F401
    import rich as _rich  # noqa: F401
    import trio as _trio  # noqa: F401
except ImportError as _exc:
    from ratekeeper.errors import MissingDependency

    raise MissingDependency(_exc.name or "trio", "cli") from _exc

from ratekeeper.simulate._metrics import Series, StrategyResult
from ratekeeper.simulate._plot import plot
from ratekeeper.simulate._report import json_lines, render_text
from ratekeeper.simulate._run import DEFAULT_STRATEGIES, Scenario, SimulationResult, simulate
from ratekeeper.simulate._strategies import STRATEGIES
from ratekeeper.simulate._workload import RequestPlan, Workload, WorkloadGenerator

__all__ = [
    "DEFAULT_STRATEGIES",
    "STRATEGIES",
    "RequestPlan",
    "Scenario",
    "Series",
    "SimulationResult",
    "StrategyResult",
    "Workload",
    "WorkloadGenerator",
    "json_lines",
    "plot",
    "render_text",
    "simulate",
]
