"""The limiter's pools: one ``PoolRuntime`` per shared limit, and which one each model draws on.

``PoolTable`` makes a pool the first time a model (or the batch or count_tokens
endpoint) needs it: the preset's limits for its class, the user's overrides on
top, the burst and the opening, a warm-up's share of the rates, and any
subscription hold already in force. Model lookups are remembered (bounded: model
ids are caller input).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Final, final

import attrs

from ratekeeper.core._accounting import AccountingRules
from ratekeeper.core._bucket import TokenBucket
from ratekeeper.core._pool import MIN_BURST, Pool
from ratekeeper.core._presets import batch_limits, count_tokens_rpm, limits_for
from ratekeeper.errors import UnknownModelError
from ratekeeper.gate._account import MAX_REMEMBERED, unified_targets
from ratekeeper.gate._state import _FAILED, PoolRuntime

__all__ = ["DEFAULT_PRESET", "PoolTable"]

DEFAULT_PRESET: Final = "tier-1"
_FALLBACK_PRESET: Final = "start"


@final
@attrs.define(kw_only=True, eq=False)
class PoolTable:
    """Pools by name (``pools``), model ids to their pool's name and runtime (``by_model``).

    ``warm_scale(now)`` is the share of the rates a warm-up lets through;
    ``holds`` the subscription holds by claim (the account's, read when a pool is made).
    """

    _preset: str | None
    _overrides: Mapping[str, Mapping[str, float]]
    _rules: AccountingRules
    _burst: float
    _opening: float | None
    _warm_scale: Callable[[float], float]
    _holds: Mapping[str | None, float]
    pools: dict[str, PoolRuntime] = attrs.field(factory=dict, init=False)
    model_pool: dict[str, str] = attrs.field(factory=dict, init=False)
    #: the same, straight to the runtime, for the uncontended path (filled by runtime_for)
    by_model: dict[str, PoolRuntime] = attrs.field(factory=dict, init=False)

    def runtime_for(self, model: str, now: float) -> PoolRuntime:
        """The pool ``model`` draws on, made now if it is the first request of its class."""
        if len(self.by_model) >= MAX_REMEMBERED:
            # 100k distinct model ids held 15.8 MB: forget the lookups (pools stay; a model
            # is looked up again in the presets at its next request)
            self.by_model.clear()
            self.model_pool.clear()
        runtime = self._lookup(model, now)
        self.by_model[model] = runtime
        return runtime

    def _lookup(self, model: str, now: float) -> PoolRuntime:
        name = self.model_pool.get(model)
        if name is not None:
            return self.pools[name]
        if model in self._overrides and model not in self.pools:
            runtime = self._new_pool(model, self._overrides[model], AccountingRules(), now)
            self.model_pool[model] = model
            return runtime
        try:
            ml = limits_for(self._preset or DEFAULT_PRESET, model)
        except UnknownModelError:
            if self._preset is not None:
                raise
            # no preset: start from the newer scheme for classes Tier 1 doesn't list
            ml = limits_for(_FALLBACK_PRESET, model)
        existing = self.pools.get(ml.pool)
        if existing is None:
            base = {
                "requests": float(ml.rpm),
                "input_tokens": float(ml.itpm),
                "output_tokens": float(ml.otpm),
            }
            base.update(self._overrides.get(ml.pool, {}))
            rules = self._rules
            if rules.cache_reads_count != ml.cache_reads_count:
                rules = attrs.evolve(rules, cache_reads_count=ml.cache_reads_count)
            existing = self._new_pool(ml.pool, base, rules, now)
        self.model_pool[model] = ml.pool
        return existing

    def _new_pool(
        self, name: str, limits: Mapping[str, float], rules: AccountingRules, now: float
    ) -> PoolRuntime:
        scale = self._warm_scale(now)
        burst = self._burst
        if self._opening is not None:
            # How much the server's bucket holds is not known before its first report, and a
            # minute's limit may be enforced over as little as one second: until a report shows
            # more (``widen_burst``), the buckets hold ``opening`` seconds of the limit, so the
            # first wave is paced at the refill rate (a request larger than that goes alone,
            # into a full bucket, as the server's own would take it) instead of sent at once.
            burst = min(burst, max(MIN_BURST, self._opening / 60.0))
        pool = Pool(name, limits, now=now, burst=burst, rate_scale=scale)
        if scale < 1.0:
            for bucket in pool.buckets.values():
                bucket.set_level(bucket.capacity * scale, now)
        runtime = PoolRuntime(pool, rules, now)
        self.pools[name] = runtime
        for claim, until in self._holds.items():
            if until > now and unified_targets(claim, {name: runtime}, None):
                pool.pause(until, f"subscription limit ({claim})")
        return runtime

    def count_tokens(self, rpm: float | None, now: float) -> PoolRuntime:
        """The ``count_tokens`` endpoint's pool: its own RPM (the preset's, or ``rpm``)."""
        runtime = self.pools.get("count_tokens")
        if runtime is None:
            limit = rpm or count_tokens_rpm(self._preset or DEFAULT_PRESET) or 100
            runtime = self._special("count_tokens", {"requests": float(limit)}, now)
        return runtime

    def batches(self, now: float) -> PoolRuntime:
        """The Message Batches pool: the batch RPM, and the queued-requests cap (no refill)."""
        runtime = self.pools.get("batches")
        if runtime is None:
            bl = batch_limits(self._preset or DEFAULT_PRESET)
            runtime = self._special("batches", {"requests": float(bl.rpm)}, now)
            queued = float(bl.max_queued_requests)
            runtime.pool.buckets["queued_requests"] = TokenBucket(queued, 0.0, now=now, debt_limit=0.0)
            runtime.pool.limits["queued_requests"] = queued
        return runtime

    def fail_waiters(self, error_for: Callable[[], BaseException]) -> None:
        """Fail every waiter of every pool with a fresh ``error_for()`` (the spend limit, say)."""
        for runtime in self.pools.values():
            for w in runtime.queue.waiting():
                w.state = _FAILED
                w.error = error_for()
                runtime.queued -= 1
                w.wake()
            runtime.queue.clear()
            runtime.next_wake = math.inf

    def _special(self, name: str, limits: Mapping[str, float], now: float) -> PoolRuntime:
        runtime = PoolRuntime(Pool(name, limits, now=now), self._rules)
        self.pools[name] = runtime
        return runtime
