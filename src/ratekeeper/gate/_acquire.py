"""``async with limiter.acquire(...)``: the context that admits, yields the permit, releases it."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, final

import anyio
import sniffio

from ratekeeper.core._accounting import Demand
from ratekeeper.errors import ConfigurationError
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

    __slots__ = ("_args", "_limiter", "_permit", "_plain")

    def __init__(self, limiter: AcquireOwner, args: tuple[Any, ...], plain: Plain | None = None) -> None:
        # checked here, before anything is enqueued: a bad priority met in the queue's
        # ordering would raise there and leave its waiter behind, wedging the pool
        if type(args[0]) is not str or type(args[2]) is not int or args[3] is not None:
            _check_args(*args)
        self._limiter = limiter
        self._args = args
        self._plain = plain
        self._permit: Permit | None = None

    async def __aenter__(self) -> Permit:
        limiter = self._limiter
        # uncontended: admitted at once, without a coroutine for the waiting path
        permit = None
        engine = limiter._engine
        if self._plain is not None:  # (no local: a waiter must not keep the tuple alive)
            permit = engine.admit_plain(self._args[0], self._plain)
        else:
            permit = engine.admit_at_once(*self._args)
        if permit is None:
            permit = await engine.acquire(*self._full_args())
        self._permit = permit
        return permit

    def _full_args(self) -> tuple[Any, ...]:
        args = self._args
        plain = self._plain
        if args[1] is None and plain is not None:
            demand = Demand(
                input_tokens=plain[0],
                max_tokens=plain[1],
                cache_read_input_tokens=plain[2],
                cache_creation_input_tokens=plain[3],
                expected_output_tokens=plain[4],
            )
            args = self._args = (args[0], demand, *args[2:])
            self._plain = None  # a waiter holds one form of its demand, not two
        return args

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        permit = self._permit
        if permit is not None and permit._state == _ACTIVE:
            permit._engine.release(permit)

    def __await__(self) -> Any:
        return self._limiter._engine.acquire(*self._full_args()).__await__()

    # The blocking form too, so the special endpoints (count_tokens, batches) can be
    # gated from threads: ``with limiter.acquire_count_tokens() as permit:``.
    def __enter__(self) -> Permit:
        self._permit = _acquire_blocking(self._limiter._engine, *self._full_args())
        return self._permit

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        permit = self._permit
        if permit is not None and permit._state == _ACTIVE:
            permit._engine.release(permit)


def _acquire_blocking(
    engine: Engine, model: str, demand: Demand, priority: int, timeout: float | None
) -> Permit:
    """Wait for a permit from a thread: in the event loop from an anyio worker thread, else on it."""
    try:
        sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        pass
    else:
        raise ConfigurationError("acquire_sync blocks; in async code use `async with limiter.acquire(...)`")
    try:
        return anyio.from_thread.run(engine.acquire, model, demand, priority, timeout)
    except RuntimeError as exc:
        if "not running in a worker thread" not in str(exc).lower() and "event loop" not in str(exc):
            raise
    return engine.acquire_thread(model, demand, priority, timeout)
