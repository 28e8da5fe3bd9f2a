"""What an engine may use of its limiter: the ``GateHost`` protocol.

An engine works on state the limiter holds (its lock, its pools, the account-wide
limits, the event hook); this protocol names every piece of it an engine touches,
so that is written down in one place and the engines never import the facade.
``Limiter`` meets it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import threading

    from ratekeeper.core._accounting import Demand
    from ratekeeper.core._stats import LimiterEvent
    from ratekeeper.gate._account import Account
    from ratekeeper.gate._clock import GateClock
    from ratekeeper.gate._engine import Engine
    from ratekeeper.gate._events import EventLog, HookLock
    from ratekeeper.gate._pool_table import PoolTable
    from ratekeeper.gate._state import PoolRuntime

__all__ = ["GateHost"]


class GateHost(Protocol):
    """The limiter's state and services, as its engines see them (all used under ``_lock``)."""

    # fixed at construction
    _lock: threading.Lock | HookLock
    _seq: itertools.count[int]
    _model_runtime: dict[str, PoolRuntime]
    _pools: dict[str, PoolRuntime]
    _now: Callable[[], float]
    _clock: Callable[[], float] | None
    _time: GateClock
    _window: int
    _adaptive: bool
    _learn: bool
    _burst_recovery: float
    _on_event: Callable[[LimiterEvent], None] | None
    _events_log: EventLog
    # changed as the limiter runs
    _account: Account
    _table: PoolTable
    _warmup: float | None

    @property
    def _engine(self) -> Engine: ...

    def _prepare(self, model: str, demand: Demand, now: float) -> tuple[PoolRuntime, dict[str, float], float]:
        """Check a demand and find its pool: (runtime, draws, credits)."""
        ...

    def _emit(self, kind: str, runtime: PoolRuntime, now: float, detail: Mapping[str, Any]) -> None:
        """An event of the pool's, to the log and the hook."""
        ...

    def _warm_scale(self, now: float) -> float:
        """The share of the rates a warm-up lets through now (1.0 without one)."""
        ...

    def _apply_warmup(self, now: float) -> None:
        """Bring the pools' rates up to the warm-up's share now."""
        ...

    def _hook(self, event: LimiterEvent) -> None:
        """An event that is not a pool's (the spend limit, a subscription warning), to the hook."""
        ...
