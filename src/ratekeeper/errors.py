"""The exception tree of ratekeeper. Every error the library raises on purpose is here.

RateKeeperError
├── ConfigurationError (also ValueError): bad arguments, unknown preset
│   ├── UnknownModelError (also LookupError): a model id no preset knows
│   └── BodyFieldError: a request body's field that cannot be read
├── UnknownPoolError (also KeyError): ``statistics()[name]`` of a pool not made yet
├── CapacityExceeded (also ValueError): a cost no bucket could ever admit
├── WouldBlock: ``acquire_nowait`` could not be granted at once
├── AcquireTimeout (also TimeoutError): ``acquire(timeout=...)`` ran out
├── SpendLimitReached: the organization's monthly spend cap was hit
├── InsufficientCredits: a prepaid wallet cannot cover the request
├── BackendUnavailable: a shared backend (Redis) cannot be reached
└── MissingDependency (also ImportError): an optional extra is not installed
"""

from __future__ import annotations

import datetime as _dt
from typing import final

__all__ = [
    "AcquireTimeout",
    "BackendUnavailable",
    "BodyFieldError",
    "CapacityExceeded",
    "ConfigurationError",
    "InsufficientCredits",
    "MissingDependency",
    "RateKeeperError",
    "SpendLimitReached",
    "UnknownModelError",
    "UnknownPoolError",
    "WouldBlock",
]


class RateKeeperError(Exception):
    """Base class of every error ratekeeper raises on purpose."""


class ConfigurationError(RateKeeperError, ValueError):
    """An argument or configuration value is invalid."""


@final
class BodyFieldError(ConfigurationError):
    """A request body's field cannot be read.

    ``field`` is its path (``messages[2].content[0].text``) and ``found`` says what it
    holds by kind only (a type's name, or "nested too deep"), never by value: a log line
    built from these two cannot quote a prompt. The message itself may show the start of
    the value, for the caller who made the body.

    >>> from ratekeeper import TokenEstimator
    >>> body = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": 7}]}
    >>> try:
    ...     TokenEstimator().estimate(body, now=0.0)
    ... except BodyFieldError as exc:
    ...     print(exc.field, exc.found)
    messages[0].content int
    """

    def __init__(self, field: str, found: str, message: str) -> None:
        self.field = field
        self.found = found
        super().__init__(message)


@final
class UnknownModelError(ConfigurationError, LookupError):
    """A model id that no preset table knows.

    ``known`` lists the model classes that are known, so the message can say
    what would have worked.
    """

    def __init__(self, model: str, known: tuple[str, ...], detail: str = "") -> None:
        self.model = model
        self.known = known
        extra = f" ({detail})" if detail else ""
        super().__init__(f"unknown model {model!r}{extra}; known model classes: {', '.join(known)}")


@final
class UnknownPoolError(RateKeeperError, KeyError):
    """``statistics()[name]`` for a pool the limiter has not made (pools are made at first use).

    ``pools`` lists the ones it has.
    """

    def __init__(self, pool: str, pools: tuple[str, ...]) -> None:
        self.pool = pool
        self.pools = pools
        have = ", ".join(pools) if pools else "none yet"
        super().__init__(
            f"no pool {pool!r} in these statistics: a pool is made at its first request "
            f"(a model's pool is limiter.pool_of(model)); pools now: {have}"
        )

    def __str__(self) -> str:  # KeyError's own would show the message in quotes
        return str(self.args[0])


@final
class CapacityExceeded(RateKeeperError, ValueError):
    """A request costs more in one dimension than the bucket can ever hold.

    Waiting would never help, so it is said at once.
    """

    def __init__(self, pool: str, dimension: str, cost: float, capacity: float) -> None:
        self.pool = pool
        self.dimension = dimension
        self.cost = cost
        self.capacity = capacity
        super().__init__(
            f"{pool}: a request needing {_num(cost)} {dimension} can never be admitted: "
            f"the {dimension} bucket holds at most {_num(capacity)}"
        )


@final
class WouldBlock(RateKeeperError):
    """``acquire_nowait`` found that the request cannot be admitted right now.

    ``retry_after`` is the earliest time in seconds at which it could be, if
    nothing else changes (``math.inf`` if unknown, e.g. while paused).
    """

    def __init__(self, pool: str, retry_after: float, reason: str = "") -> None:
        self.pool = pool
        self.retry_after = retry_after
        why = f": {reason}" if reason else ""
        super().__init__(f"{pool}: cannot admit the request now (earliest in {retry_after:.3f}s){why}")


@final
class AcquireTimeout(RateKeeperError, TimeoutError):
    """``acquire(timeout=...)`` waited the whole timeout without a grant."""

    def __init__(self, pool: str, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout
        super().__init__(f"{pool}: no capacity within the {timeout:g}s timeout")


@final
class SpendLimitReached(RateKeeperError):
    """The organization reached its monthly spend cap.

    The server answers every request with 429 until ``resets_at`` (00:00 UTC on
    the first of the next month), so waiting is pointless.
    """

    def __init__(self, resets_at: _dt.datetime, message: str = "") -> None:
        self.resets_at = resets_at
        detail = f" ({message})" if message else ""
        super().__init__(
            f"the organization's monthly spend limit is reached; usage resumes at "
            f"{resets_at.strftime('%Y-%m-%dT%H:%M:%SZ')}{detail}"
        )


@final
class InsufficientCredits(RateKeeperError):
    """A prepaid wallet's balance cannot cover the request's reservation."""

    def __init__(self, needed: float | None, balance: float | None, message: str = "") -> None:
        self.needed = needed
        self.balance = balance
        if needed is not None and balance is not None:
            text = f"the wallet holds {_num(balance)} credits but the request reserves {_num(needed)}"
        else:
            text = "the wallet cannot cover the request"
        if message:
            text += f" ({message})"
        super().__init__(text)


@final
class BackendUnavailable(RateKeeperError):
    """The shared backend could not be reached and the policy is to fail closed."""


@final
class MissingDependency(RateKeeperError, ImportError):
    """An optional dependency is missing; the message says how to install it."""

    def __init__(self, package: str, extra: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(f"{package} is not installed; install it with: pip install 'ratekeeper[{extra}]'")


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,.3f}"
