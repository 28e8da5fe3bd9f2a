"""``on_unavailable="local"``: while Redis cannot be reached, a private in-process limiter admits.

It holds ``fallback_fraction`` of every limit (e.g. ``1 / number_of_processes``), its
buckets full when a pool first falls back; with ``"fail"`` there is none and the engine
raises ``BackendUnavailable``.
"""

from __future__ import annotations

from typing import final

from ratekeeper.core._accounting import Demand
from ratekeeper.core._bucket import TokenBucket
from ratekeeper.core._pool import Pool
from ratekeeper.gate._limiter import Limiter
from ratekeeper.gate._state import Permit, PoolRuntime
from ratekeeper.redis._ops import Backend
from ratekeeper.redis._pools import SPECIAL

__all__ = ["LocalFallback"]


@final
class LocalFallback:
    """The fallback of one engine's limiter, made on first use."""

    def __init__(self, limiter: Limiter, backend: Backend) -> None:
        self._limiter = limiter
        self._backend = backend
        self._fallback: Limiter | None = None

    def for_model(self, model: str) -> Limiter | None:
        """The local fallback limiter with ``model``'s pool at a fraction of the limits (or None)."""
        backend = self._backend
        if backend.on_unavailable != "local":
            return None
        limiter = self._limiter
        with limiter._lock:
            now = limiter._now()
            if self._fallback is None:
                self._fallback = Limiter(
                    limiter._preset,
                    rules=limiter._rules,
                    burst=limiter._burst,
                    adaptive_burst=limiter._adaptive,
                    learn_limits=False,  # the headers carry the whole organization's limits
                    backfill_window=limiter._window,
                    clock=limiter._clock,
                    on_event=limiter._on_event,
                )
            fallback = self._fallback
            if model in limiter._pools or model in SPECIAL:
                runtime = limiter._pools[model]
            else:
                runtime = limiter._table.runtime_for(model, now)
        with fallback._lock:
            if runtime.pool.name not in fallback._pools:
                fallback._pools[runtime.pool.name] = _scaled(runtime, backend.fallback_fraction, now)
            if model not in SPECIAL:
                fallback._model_pool[model] = runtime.pool.name
        return fallback

    def acquire_nowait(self, model: str, demand: Demand) -> Permit:
        """``acquire_nowait`` from the fallback, or ``BackendUnavailable`` if there is none."""
        fallback = self.for_model(model)
        if fallback is None:
            raise self._backend.unavailable_error()
        return fallback._engine.acquire_nowait(model, demand)

    async def acquire(self, model: str, demand: Demand, priority: int, timeout: float | None) -> Permit:
        """``acquire`` from the fallback, or ``BackendUnavailable`` if there is none."""
        fallback = self.for_model(model)
        if fallback is None:
            raise self._backend.unavailable_error()
        return await fallback._engine.acquire(model, demand, priority, timeout)

    def acquire_thread(self, model: str, demand: Demand, priority: int, timeout: float | None) -> Permit:
        """``acquire_thread`` from the fallback, or ``BackendUnavailable`` if there is none."""
        fallback = self.for_model(model)
        if fallback is None:
            raise self._backend.unavailable_error()
        return fallback._engine.acquire_thread(model, demand, priority, timeout)


def _scaled(runtime: PoolRuntime, fraction: float, now: float) -> PoolRuntime:
    """A copy of a pool's configuration at ``fraction`` of every limit, buckets full."""
    source = runtime.pool
    pool = Pool(source.name, {}, now=now, burst=source.burst)
    for dim, bucket in source.buckets.items():
        pool.limits[dim] = source.limits[dim] * fraction
        pool.buckets[dim] = TokenBucket(
            bucket.capacity * fraction,
            bucket.rate * fraction,
            now=now,
            debt_limit=bucket.debt_limit * fraction,
        )
    return PoolRuntime(pool, runtime.rules)
