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
    from ratekeeper.core._bucket import TokenBucket
    from ratekeeper.core._snapshot import RateLimitSnapshot
    from ratekeeper.core._stats import LimiterEvent
    from ratekeeper.gate._clock import GateClock
    from ratekeeper.gate._engine import Engine
    from ratekeeper.gate._events import HookLock
    from ratekeeper.gate._state import Permit, PoolRuntime

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
    # changed as the limiter runs
    _wallet: TokenBucket | None
    _warmup: float | None
    _spend_until: float | None

    @property
    def _engine(self) -> Engine: ...

    def _prepare(self, model: str, demand: Demand, now: float) -> tuple[PoolRuntime, dict[str, float], float]:
        """Check a demand and find its pool: (runtime, draws, credits)."""
        ...

    def _emit(self, kind: str, rt: PoolRuntime, now: float, detail: Mapping[str, Any]) -> None:
        """An event of the pool's, to the log and the hook."""
        ...

    def _warm_scale(self, now: float) -> float:
        """The share of the rates a warm-up lets through now (1.0 without one)."""
        ...

    def _apply_warmup(self, now: float) -> None:
        """Bring the pools' rates up to the warm-up's share now."""
        ...

    def _spend_limit(self, snap: RateLimitSnapshot, now: float, message: str) -> None:
        """The monthly spend limit was reached: hold everything until it resets."""
        ...

    def _on_unified(
        self, snap: RateLimitSnapshot, now: float, skew: float, status: int, runtime: PoolRuntime | None
    ) -> None:
        """A subscription (unified) report: hold or warn."""
        ...

    def _on_quota(self, snap: RateLimitSnapshot, permit: Permit | None, now: float) -> None:
        """A wallet proxy's balance report."""
        ...
