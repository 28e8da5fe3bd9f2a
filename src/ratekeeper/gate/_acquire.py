"""``async with limiter.acquire(...)``: the context that admits, yields the permit, releases it."""

from __future__ import annotations

import threading
from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, final

import anyio

from ratekeeper.core._accounting import Demand
from ratekeeper.errors import ConfigurationError
from ratekeeper.gate._clock import in_async_context
from ratekeeper.gate._demand import Plain, _check_args
from ratekeeper.gate._state import _ACTIVE, Permit

if TYPE_CHECKING:
    from ratekeeper.gate._engine import Engine

__all__ = ["AcquireOwner"]


class AcquireOwner(Protocol):
    """What the context needs of its limiter (``Limiter`` is one)."""

    @property
    def _engine(self) -> Engine: ...


@final
class _Acquire:
    """``async with limiter.acquire(...)``; also usable as ``await`` for the bare permit."""

    __slots__ = ("_demand", "_limiter", "_model", "_permit", "_plain", "_priority", "_timeout")

    def __init__(
        self,
        limiter: AcquireOwner,
        model: str,
        demand: Demand | None,
        priority: int,
        timeout: float | None,
        plain: Plain | None = None,
    ) -> None:
        # checked here, before anything is enqueued: a bad priority met in the queue's
        # ordering would raise there and leave its waiter behind, wedging the pool
        if type(model) is not str or type(priority) is not int or timeout is not None:
            _check_args(model, demand, priority, timeout)
        self._limiter = limiter
        self._model = model
        # ``None`` only with ``plain``: the common request, whose Demand is built if it must wait
        self._demand = demand
        self._priority = priority
        self._timeout = timeout
        self._plain = plain
        self._permit: Permit | None = None

    async def __aenter__(self) -> Permit:
        limiter = self._limiter
        # uncontended: admitted at once, without a coroutine for the waiting path
        permit = None
        engine = limiter._engine
        if self._plain is not None:  # (no local: a waiter must not keep the tuple alive)
            permit = engine.admit_plain(self._model, self._plain)
        else:
            permit = engine.admit_at_once(self._model, self._full_demand(), self._priority, self._timeout)
        if permit is None:
            permit = await engine.acquire(self._model, self._full_demand(), self._priority, self._timeout)
        self._permit = permit
        return permit

    def _full_demand(self) -> Demand:
        demand = self._demand
        if demand is None:
            plain = self._plain
            assert plain is not None
            demand = self._demand = Demand(
                input_tokens=plain[0],
                max_tokens=plain[1],
                cache_read_input_tokens=plain[2],
                cache_creation_input_tokens=plain[3],
                expected_output_tokens=plain[4],
            )
            self._plain = None  # a waiter holds one form of its demand, not two
        return demand

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        permit = self._permit
        if permit is not None and permit._state == _ACTIVE:
            permit._engine.release(permit)

    def __await__(self) -> Any:
        engine = self._limiter._engine
        if self._plain is not None:
            # uncontended: admitted as ``__aenter__`` admits, without a coroutine
            permit = engine.admit_plain(self._model, self._plain)
            if permit is not None:
                return _at_once(permit)
        return engine.acquire(self._model, self._full_demand(), self._priority, self._timeout).__await__()

    # The blocking form too, so the special endpoints (count_tokens, batches) can be
    # gated from threads: ``with limiter.acquire_count_tokens() as permit:``.
    def __enter__(self) -> Permit:
        engine = self._limiter._engine
        plain = self._plain
        demand = self._full_demand()
        self._permit = _acquire_blocking(engine, self._model, demand, self._priority, self._timeout, plain)
        return self._permit

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        permit = self._permit
        if permit is not None and permit._state == _ACTIVE:
            permit._engine.release(permit)


def _at_once(permit: Permit) -> Generator[Any, None, Permit]:
    """What ``await`` takes for a permit already granted: it returns at once, as a coroutine
    that never suspends would."""
    return permit
    yield  # (unreachable: a generator, so ``await`` can take it)


def _acquire_blocking(
    engine: Engine,
    model: str,
    demand: Demand,
    priority: int,
    timeout: float | None,
    plain: Plain | None = None,
) -> Permit:
    """Wait for a permit from a thread: in the event loop from an anyio worker thread, else on it."""
    if in_async_context():
        raise ConfigurationError("acquire_sync blocks; in async code use `async with limiter.acquire(...)`")
    # (an anyio worker thread is never the main thread: there anyio could only raise, ~2 us)
    if threading.current_thread() is not threading.main_thread():
        try:
            return anyio.from_thread.run(engine.acquire, model, demand, priority, timeout)
        except RuntimeError as exc:
            if "not running in a worker thread" not in str(exc).lower() and "event loop" not in str(exc):
                raise
    if plain is not None and (permit := engine.admit_plain(model, plain)) is not None:
        return permit  # uncontended: the fast path a task's acquire takes (see __aenter__)
    return engine.acquire_thread(model, demand, priority, timeout)
