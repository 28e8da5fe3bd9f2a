"""``Limiter``: the facade a program holds; requests wait in ``acquire()`` until they fit.

The limiter holds the configuration, one ``PoolRuntime`` per shared limit (model
class, batches, count_tokens), the account-wide limits (spend, wallet,
subscription), the statistics and one engine (``gate._engine.Engine``) that admits,
settles and reads reports: the ``LocalEngine`` by default, or the one a backend
hands it. All state is guarded by one ``threading.Lock`` so async tasks and worker
threads can share a limiter; nothing awaits while holding it.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import logging
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any, Final, cast, final

from ratekeeper.core._accounting import AccountingRules, Demand, OutputRule
from ratekeeper.core._pool import Pool
from ratekeeper.core._presets import limit_overrides, spend_cap
from ratekeeper.core._snapshot import RateLimitSnapshot
from ratekeeper.core._stats import LimiterEvent, LimiterStatistics
from ratekeeper.errors import (
    CapacityExceeded,
    ConfigurationError,
)
from ratekeeper.gate._account import Account
from ratekeeper.gate._acquire import _Acquire
from ratekeeper.gate._clock import GateClock
from ratekeeper.gate._demand import (
    _BatchDemand,
    _check_args,
    _check_status,
    _demand,
    _draws,
    _for_model,
    _plain,
)
from ratekeeper.gate._engine import Engine
from ratekeeper.gate._events import EventLog, HookLock
from ratekeeper.gate._local import LocalEngine
from ratekeeper.gate._pool_table import PoolTable
from ratekeeper.gate._state import Permit, PoolRuntime
from ratekeeper.gate._statistics import pool_statistics

__all__ = ["DEFAULT_OPENING", "Limiter", "Permit"]

log = logging.getLogger("ratekeeper")

#: Seconds of the limit a new pool holds until a report shows the server's bucket: "60 RPM
#: may be enforced as 1 request per second" is the shortest interval the documentation names.
DEFAULT_OPENING: Final = 1.0


@final
class Limiter:
    """Gates requests to the Messages API so they stay inside the organization's limits.

    ``preset`` (``"tier-1"`` .. ``"tier-4"``, ``"start"``, ``"build"``,
    ``"scale"``) gives the starting limits; without one the limiter starts at
    Tier 1 and learns the real limits from the first responses' ``-limit``
    headers. ``limits`` overrides per pool, e.g. ``{"sonnet-4.x": {"requests":
    50, "input_tokens": 30000, "output_tokens": 8000, "tokens": 20000}}`` (a
    ``tokens`` entry adds a combined limit, such as a workspace's); a key may
    also be a model class or id (``"sonnet-4"``, ``"claude-sonnet-4-5"``) and a
    dimension ``rpm``, ``itpm`` or ``otpm``. Anything else is a ``ConfigurationError``.

    Under asyncio and trio alike::

        limiter = Limiter("tier-2")
        async with limiter.acquire("claude-sonnet-4-5", input_tokens=1200, max_tokens=1024) as permit:
            response = await send()
            permit.observe(response.headers)
            permit.settle(response.usage)

    Options: ``output_rule`` (how OTPM counts), ``burst`` (fraction of a
    minute a bucket holds; ``adaptive_burst`` shrinks it after a 429 the model
    did not predict and grows it back after ``burst_recovery`` clean seconds),
    ``warmup`` (seconds of slow start from ``warmup_floor`` of the rate),
    ``wallet_balance`` (credits of a prepaid wallet), ``opening`` (seconds
    of the limit a new pool's buckets hold until a response's headers show
    the server's: a minute's limit may be enforced over a second, where a
    minute's burst at once meets a wave of 429s; the report widens the
    buckets and lifts the levels to what the server holds; default 1, the
    shortest interval documented; 60: a full bucket from the start; with a
    ``backend``, the first process sets the shared pool's), ``clock`` (a
    zero-argument function returning seconds; default: the event loop's clock
    in async code, ``time.monotonic`` in threads), ``on_event`` (called with a
    ``LimiterEvent`` for grants, pauses, resyncs, 429s..., once the limiter's
    lock is let go, so it may call back in), ``backfill_window``. What a user
    should hear of (429s, pauses, limits learned) is also logged at INFO on the
    ``ratekeeper`` logger (``_events.EventLog``).
    """

    def __init__(
        self,
        preset: str | None = None,
        *,
        rules: AccountingRules | None = None,
        output_rule: OutputRule | str | None = None,
        limits: Mapping[str, Mapping[str, float]] | None = None,
        batch: bool = True,
        burst: float = 1.0,
        adaptive_burst: bool = True,
        burst_recovery: float = 60.0,
        warmup: float | None = None,
        warmup_floor: float = 0.1,
        wallet_balance: float | None = None,
        learn_limits: bool = True,
        backfill_window: int = 16,
        opening: float | None = None,
        clock: Callable[[], float] | None = None,
        on_event: Callable[[LimiterEvent], None] | None = None,
        backend: object = None,
    ) -> None:
        bind = _binder(backend)
        self._rules = _rules_of(rules, output_rule)
        _check_options(preset, warmup, warmup_floor, backfill_window, opening, burst, limits)
        opening = DEFAULT_OPENING if opening is None else opening
        self._preset = preset
        self._burst = burst
        self._adaptive = adaptive_burst
        self._burst_recovery = burst_recovery
        self._warmup = warmup
        self._warmup_floor = warmup_floor
        self._warm_start: float | None = None
        self._learn = learn_limits
        self._window = backfill_window
        self._clock = clock
        self._time = GateClock(clock)
        self._now: Callable[[], float] = self._time.now
        self._on_event = on_event
        self._events_log = EventLog(log)
        # with a hook, a lock that runs it once let go (a hook may call back in; see HookLock)
        self._hook_lock = HookLock(self._call_hook) if on_event is not None else None
        self._lock: threading.Lock | HookLock = self._hook_lock or threading.Lock()
        self._seq = itertools.count()
        self._account = Account(self, wallet_balance)
        self._table = PoolTable(
            preset=preset,
            overrides=limit_overrides(limits or {}),
            rules=self._rules,
            burst=burst,
            opening=opening,
            warm_scale=self._warm_scale,
            holds=self._account.unified_holds,
        )
        self._pools = self._table.pools  # (the table's maps, under the names the engines use)
        self._model_pool = self._table.model_pool
        self._model_runtime = self._table.by_model
        # the one engine every admission, settlement and report goes to: this process's own,
        # or the one a backend hands over (RedisBackend's, keeping the buckets in Redis)
        self._engine: Engine = bind(self) if bind is not None else LocalEngine(self)

    def _warm_scale(self, now: float) -> float:
        if self._warmup is None:
            return 1.0
        if self._warm_start is None:
            self._warm_start = now
        progress = (now - self._warm_start) / self._warmup
        if progress >= 1.0:
            return 1.0
        return self._warmup_floor + (1.0 - self._warmup_floor) * max(0.0, progress)

    def _apply_warmup(self, now: float) -> None:
        if self._warmup is None:
            return
        scale = self._warm_scale(now)
        for runtime in self._pools.values():
            runtime.pool.scale_rates(scale * runtime.share, now)
        if scale >= 1.0:
            self._warmup = None

    def pool_of(self, model: str) -> str:
        """The name of the shared pool ``model`` draws from (e.g. ``"sonnet-4"``)."""
        with self._lock:
            return self._table.runtime_for(model, self._now()).pool.name

    def set_limits(self, pool_or_model: str, **limits: float) -> None:
        """Change a pool's per-minute limits by hand: ``set_limits("sonnet-4", requests=100)``.

        State is brought up to date first, then the change applies, then the
        waiters that can now go are woken.
        """
        for dim, value in limits.items():
            _check_limit(f"set_limits({dim}=...)", value)
        with self._lock:
            now = self._now()
            runtime = self._pools.get(pool_or_model) or self._table.runtime_for(pool_or_model, now)
            scale = self._warm_scale(now) * runtime.share  # a warm-up or a cut share goes on applying
            for dim, value in limits.items():
                runtime.pool.set_limit(dim, float(value), now, rate_scale=scale)
            self._emit("limit_change", runtime, now, dict(limits))
            self._engine.set_limits(runtime, limits)

    def acquire(
        self,
        model: str,
        *,
        input_tokens: int = 0,
        max_tokens: int = 0,
        cache_read_input_tokens: int = 0,
        cache_creation_input_tokens: int = 0,
        expected_output_tokens: int | None = None,
        service_tier: str | None = None,
        credits: float = 0.0,
        priority: int = 0,
        timeout: float | None = None,
    ) -> _Acquire:
        """Wait until the model's pool can admit the request, then hold a ``Permit``.

        ``input_tokens`` is the uncached input, ``cache_read_input_tokens`` and
        ``cache_creation_input_tokens`` the predicted cache split. ``priority``
        orders the queue (higher first; FIFO within a level). ``service_tier``
        ``"priority"`` draws on Priority Tier limits too. Raises
        ``CapacityExceeded`` at once for a cost no bucket could ever admit,
        ``AcquireTimeout`` after ``timeout`` seconds, ``SpendLimitReached`` and
        ``InsufficientCredits`` when waiting cannot help.
        """
        plain = _plain(
            input_tokens,
            max_tokens,
            cache_read_input_tokens,
            cache_creation_input_tokens,
            expected_output_tokens,
        )
        if plain is not None and service_tier != "priority" and credits == 0.0:
            # the common request: its checks are done, the Demand is built only if it must wait
            return _Acquire(self, model, None, priority, timeout, plain)
        demand = _demand(
            input_tokens,
            max_tokens,
            cache_read_input_tokens,
            cache_creation_input_tokens,
            expected_output_tokens,
            service_tier,
            credits,
        )
        return _Acquire(self, model, demand, priority, timeout)

    def acquire_demand(
        self, model: str, demand: Demand, *, priority: int = 0, timeout: float | None = None
    ) -> _Acquire:
        """Like ``acquire`` with a ready ``Demand`` (for example from ``TokenEstimator``)."""
        plain = None
        if not demand.priority and not demand.credits:
            plain = (
                demand.input_tokens,
                demand.max_tokens,
                demand.cache_read_input_tokens,
                demand.cache_creation_input_tokens,
                demand.expected_output_tokens,
            )
        return _Acquire(self, model, demand, priority, timeout, plain)

    def acquire_sync(
        self,
        model: str,
        demand: Demand | None = None,
        *,
        input_tokens: int = 0,
        max_tokens: int = 0,
        cache_read_input_tokens: int = 0,
        cache_creation_input_tokens: int = 0,
        expected_output_tokens: int | None = None,
        service_tier: str | None = None,
        credits: float = 0.0,
        priority: int = 0,
        timeout: float | None = None,
    ) -> _Acquire:
        """The blocking form, for synchronous code in threads: ``with limiter.acquire_sync(...) as p:``.

        It takes the same keywords as ``acquire`` and ``acquire_nowait``
        (``acquire_sync(model, input_tokens=1200, max_tokens=1024)``), or a
        ready ``Demand`` in their place.

        In a worker thread started by anyio it waits in the event loop; in any
        other thread it waits on the thread itself, with ``time.monotonic``
        (which is asyncio's clock too) moved onto the clock the event loop last
        showed (trio's is offset from it), so threads and tasks can share a
        limiter.
        """
        if demand is None:
            return self.acquire(
                model,
                input_tokens=input_tokens,
                max_tokens=max_tokens,
                cache_read_input_tokens=cache_read_input_tokens,
                cache_creation_input_tokens=cache_creation_input_tokens,
                expected_output_tokens=expected_output_tokens,
                service_tier=service_tier,
                credits=credits,
                priority=priority,
                timeout=timeout,
            )
        given = (input_tokens, max_tokens, cache_read_input_tokens, cache_creation_input_tokens, credits)
        if any(given) or expected_output_tokens is not None or service_tier is not None:
            raise ConfigurationError("acquire_sync: give either a Demand or the token keywords, not both")
        return self.acquire_demand(model, demand, priority=priority, timeout=timeout)

    def acquire_nowait(
        self,
        model: str,
        *,
        input_tokens: int = 0,
        max_tokens: int = 0,
        cache_read_input_tokens: int = 0,
        cache_creation_input_tokens: int = 0,
        expected_output_tokens: int | None = None,
        service_tier: str | None = None,
        credits: float = 0.0,
    ) -> Permit:
        """Admit the request now or raise ``WouldBlock`` (with the earliest retry time)."""
        if type(model) is not str:  # (no _Acquire here to check it; the rest are constants)
            _check_args(model, None, 0, None)
        if service_tier != "priority" and credits == 0.0:
            plain = _plain(
                input_tokens,
                max_tokens,
                cache_read_input_tokens,
                cache_creation_input_tokens,
                expected_output_tokens,
            )
            if plain is not None and (permit := self._engine.admit_plain(model, plain)) is not None:
                return permit
        demand = _demand(
            input_tokens,
            max_tokens,
            cache_read_input_tokens,
            cache_creation_input_tokens,
            expected_output_tokens,
            service_tier,
            credits,
        )
        return self._engine.acquire_nowait(model, demand)

    def _prepare(self, model: str, demand: Demand, now: float) -> tuple[PoolRuntime, dict[str, float], float]:
        if type(model) is not str:  # else it fails deep in the presets, naming nothing
            raise TypeError(f"model must be a str, got {type(model).__name__}")
        if self._account.spend_until is not None:
            self._account.check_spend(now)
        if self._warmup is not None:
            self._apply_warmup(now)
        if isinstance(demand, _BatchDemand) or model == "count_tokens":
            runtime = self._pools[model]
            draws = {"requests": 1.0}
            if isinstance(demand, _BatchDemand):
                draws["queued_requests"] = float(demand.requests)
            runtime.pool.check(draws)
            return runtime, draws, 0.0
        runtime = self._table.runtime_for(model, now)
        cost = runtime.rules.admission_cost(demand)
        draws = _draws(cost)
        if demand.max_tokens > runtime.most_output and not runtime.reserves_max_tokens:
            runtime.most_output = float(demand.max_tokens)
        try:
            runtime.pool.check(draws)
        except CapacityExceeded as exc:
            raise _for_model(model, exc) from None
        credit = cost.credits
        if credit:
            self._account.check_wallet(credit, now)
        return runtime, draws, credit

    def observe(
        self, headers: object, *, model: str | None = None, status: int = 200, body: object = None
    ) -> RateLimitSnapshot:
        """Feed a response that no permit covers (another client's, a probe...).

        Without ``model`` the headers can only pause or fail (429, spend limit,
        subscription status); with it they also resync that model's pool,
        counting all of this limiter's in-flight requests as unseen by the server.
        """
        if type(status) is not int:
            _check_status(status)
        runtime = None
        if model is not None:
            with self._lock:
                runtime = self._table.runtime_for(model, self._now())
        return self._engine.observe(headers, status=status, body=body, permit=None, runtime=runtime)

    def _emit(self, kind: str, runtime: PoolRuntime, now: float, detail: Mapping[str, Any]) -> None:
        """Every event of both engines passes here: to the log (``_events.EventLog``) and the hook."""
        self._events_log.record(kind, runtime.pool.name, now, detail)
        if kind != "grant" and kind != "resync":  # those two are counted already
            seen = runtime.events.get(kind)
            runtime.events[kind] = (now, 1 if seen is None else seen[1] + 1, dict(detail))
        if self._on_event is not None:
            self._hook(LimiterEvent(kind, runtime.pool.name, now, dict(detail)))

    def _hook(self, event: LimiterEvent) -> None:
        if self._hook_lock is not None:
            self._hook_lock.post(event)  # run once the lock is let go

    def _call_hook(self, event: LimiterEvent) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a broken hook must not break admission
                log.exception("on_event hook raised")

    def acquire_count_tokens(self, rpm: float | None = None, *, timeout: float | None = None) -> _Acquire:
        """Gate a ``count_tokens`` call by its own RPM (the preset's, or ``rpm``)."""
        with self._lock:
            self._table.count_tokens(rpm, self._now())
        return _Acquire(self, "count_tokens", Demand(), 0, timeout)

    def acquire_batch(self, requests: int, *, timeout: float | None = None) -> _Acquire:
        """Gate a Message Batches create call: the batch RPM and the queued-requests cap.

        The permit's ``queued_requests`` stay taken after the block until
        ``batch_finished(requests)`` is called for the batch's end.
        ``acquire_batch(0)`` gates the other batch endpoints by the RPM alone.
        """
        with self._lock:
            self._table.batches(self._now())
        # (a marker, not a Demand: _prepare tells it apart before any accounting reads it)
        return _Acquire(self, "batches", cast("Demand", _BatchDemand(requests)), 0, timeout)

    def batch_finished(self, requests: int) -> None:
        """A batch ended (or was cancelled): its requests leave the processing queue."""
        with self._lock:
            runtime = self._pools.get("batches")
            if runtime is None:
                return
            now = self._now()
            runtime.pool.give_back({"queued_requests": float(requests)}, now)
            self._engine.give_back(runtime, {"queued_requests": float(requests)})

    def statistics(self) -> LimiterStatistics:
        """A frozen snapshot of every pool: limits, levels, queue, waits, 429s, utilization."""
        with self._lock:
            now = self._now()
            taken_at = _dt.datetime.now(_dt.UTC)
            pools = {
                name: pool_statistics(name, runtime, now, taken_at) for name, runtime in self._pools.items()
            }
            account = self._account
            wallet = account.wallet.level_at(now) if account.wallet is not None else None
            return LimiterStatistics(
                time=now,
                pools=pools,
                wallet_balance=wallet,
                spend_limited=account.spend_until is not None and now < account.spend_until,
                taken_at=taken_at,
            )

    def __repr__(self) -> str:
        with self._lock:
            pools = ", ".join(
                f"{name}: {runtime.queued} waiting, {len(runtime.in_flight)} in flight"
                for name, runtime in self._pools.items()
            )
        return f"<Limiter preset={self._preset!r} {pools or 'no pools yet'}>"


def _rules_of(rules: AccountingRules | None, output_rule: OutputRule | str | None) -> AccountingRules:
    """The accounting rules ``Limiter(rules=..., output_rule=...)`` ask for."""
    if rules is not None and output_rule is not None:
        raise ConfigurationError("give either rules or output_rule, not both")
    if isinstance(output_rule, str):
        try:
            output_rule = OutputRule(output_rule)
        except ValueError:
            choices = ", ".join(r.value for r in OutputRule)
            raise ConfigurationError(
                f"unknown output_rule {output_rule!r}; choose one of: {choices}"
            ) from None
    return rules or AccountingRules(output_rule=output_rule or OutputRule.MAX_TOKENS)


def _check_options(
    preset: str | None,
    warmup: float | None,
    warmup_floor: float,
    backfill_window: int,
    opening: float | None,
    burst: float,
    limits: Mapping[str, Mapping[str, float]] | None,
) -> None:
    """Raise ``ConfigurationError`` naming the first of ``Limiter``'s options that is out of range."""
    if preset is not None:
        spend_cap(preset)  # an unknown preset raises the presets module's error, listing the names
    if warmup is not None and not warmup > 0:
        raise ConfigurationError(f"warmup must be a positive number of seconds, got {warmup!r}")
    if not 0 < warmup_floor <= 1:
        raise ConfigurationError(f"warmup_floor must be in (0, 1], got {warmup_floor!r}")
    if backfill_window < 0:
        raise ConfigurationError(f"backfill_window must be >= 0, got {backfill_window!r}")
    if opening is not None and not 0 < opening <= 60:
        raise ConfigurationError(f"opening must be a number of seconds in (0, 60], got {opening!r}")
    Pool("check", {}, now=0.0, burst=burst)  # validates burst with the pool's own message
    for pool_name, dims in (limits or {}).items():
        if not isinstance(dims, Mapping):  # limits={"requests": 50}: the pool level is missing
            raise ConfigurationError(
                f"limits[{pool_name!r}] must map dimensions to per-minute limits"
                f" (limits={{'sonnet-4': {{'requests': 50}}}}), got {dims!r:.40}"
            )
        for dim, value in dims.items():  # under the names the user wrote; not at first acquire
            _check_limit(f"limits[{pool_name!r}][{dim!r}]", value)


def _check_limit(where: str, value: object) -> None:
    """A per-minute limit is a positive finite number (a float: 10**400 is none)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        try:
            ok = 0 < float(value) < math.inf  # type: ignore[arg-type]
        except OverflowError:
            ok = False
    if not ok:
        raise ConfigurationError(f"{where} must be a positive finite number, got {value!r:.40}")


def _binder(backend: object) -> Callable[[Limiter], Engine] | None:
    """``backend``'s hook that hands a limiter its engine (``None``: no backend, the local engine)."""
    bind: Callable[[Limiter], Engine] | None = getattr(backend, "_bind_limiter", None)
    if backend is not None and bind is None:
        raise ConfigurationError(
            f"backend must be a ratekeeper backend such as RedisBackend, got {backend!r}"
        )
    return bind
