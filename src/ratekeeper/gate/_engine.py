"""The one seam between the gate and whatever keeps the limits: the ``Engine`` protocol.

``Limiter`` holds the configuration, the pools and the statistics, and hands every
admission, settlement and report to its engine: the ``LocalEngine`` (this process's
own buckets) or one a backend gives it (``RedisBackend``'s remote engine, which keeps
the buckets in Redis). Nothing in ``ratekeeper.gate`` imports a backend; a backend
implements this protocol and is handed the limiter through ``_bind_limiter``.

Every method is called with the limiter's lock *not* held unless it says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ratekeeper.core._accounting import Cost, Demand, Usage
    from ratekeeper.core._snapshot import RateLimitSnapshot
    from ratekeeper.gate._demand import Plain
    from ratekeeper.gate._state import Permit, PoolRuntime

__all__ = ["Engine"]


class Engine(Protocol):
    """What a limiter asks of whatever admits its requests (see the module docstring)."""

    def admit_plain(self, model: str, plain: Plain) -> Permit | None:
        """The fast path: a permit for an ordinary request if it fits at once, else None
        (the caller then takes the general path; an engine without a fast path returns None)."""
        ...

    def admit_at_once(
        self, model: str, demand: Demand, priority: int, timeout: float | None
    ) -> Permit | None:
        """A permit if nobody waits and the buckets take ``demand`` now, else None."""
        ...

    def acquire_nowait(self, model: str, demand: Demand) -> Permit:
        """A permit now, or ``WouldBlock`` (no place in line is kept)."""
        ...

    async def acquire(self, model: str, demand: Demand, priority: int, timeout: float | None) -> Permit:
        """A permit, waiting in line (in a task) as long as it takes or until ``timeout``."""
        ...

    def acquire_thread(self, model: str, demand: Demand, priority: int, timeout: float | None) -> Permit:
        """``acquire`` from a thread with no event loop: the same line, waited on by the thread."""
        ...

    def settle(self, permit: Permit, usage: Usage, credits: float | None, *, wake: bool = True) -> Cost:
        """Apply a request's actual usage (refund or charge the difference); the settled cost."""
        ...

    def settle_plain(
        self, permit: Permit, uncached: int, output: int, read: int, write: int, *, wake: bool = True
    ) -> Cost:
        """``settle`` for a permit of requests and tokens only, from the four counts."""
        ...

    def settle_observing(self, permit: Permit, usage: object, credits: float | None, headers: object) -> Cost:
        """``settle`` with a complete answer's headers, read in the same step."""
        ...

    def progress(self, permit: Permit, output: float) -> None:
        """Output produced so far (cumulative) by a running stream."""
        ...

    def release(self, permit: Permit) -> None:
        """Give back what an unsettled permit holds, by the release rules."""
        ...

    def observe(
        self,
        headers: object,
        *,
        status: int,
        body: object,
        permit: Permit | None,
        runtime: PoolRuntime | None,
    ) -> RateLimitSnapshot:
        """Read a response's report: resync, pauses, limits learned."""
        ...

    def wake(self, runtime: PoolRuntime, now: float) -> None:
        """Under the lock: the pool's state changed (paused, limits, refunds): re-plan its line."""
        ...

    def set_limits(self, runtime: PoolRuntime, limits: Mapping[str, float]) -> None:
        """Under the lock, after ``Limiter.set_limits`` changed the pool's limits."""
        ...

    def give_back(self, runtime: PoolRuntime, amounts: Mapping[str, float]) -> None:
        """Under the lock, after ``amounts`` went back to the pool by hand (a batch ended)."""
        ...
