"""What a caller asks for, checked and put in the forms the engines take."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Final

from ratekeeper.core._accounting import Cost, Demand, Usage
from ratekeeper.errors import CapacityExceeded, ConfigurationError

#: The largest token count ``record_output`` takes: one a float holds exactly.
_MAX_COUNT: Final = 2**53
_FLOAT_MAX: Final = sys.float_info.max

#: An ordinary request's demand, checked: input, max_tokens, cache reads, cache writes,
#: expected output (no priority tier, no credits). ``LocalEngine.admit_plain`` takes it.
Plain = tuple[int, int, int, int, "int | None"]
_ONE_REQUEST: Final = {"requests": 1.0}


def _draws(cost: Cost) -> dict[str, float]:
    out = {"requests": cost.requests, "input_tokens": cost.input_tokens, "output_tokens": cost.output_tokens}
    tokens = cost.input_tokens + cost.output_tokens
    if tokens:
        out["tokens"] = tokens
    if cost.priority_input_tokens or cost.priority_output_tokens:
        out["priority_input_tokens"] = cost.priority_input_tokens
        out["priority_output_tokens"] = cost.priority_output_tokens
    return out


def _diff(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    """``a - b`` dimension by dimension (a missing one counts as 0), without the zeros."""
    out = {}
    for k, v in a.items():
        d = v - b.get(k, 0.0)
        if d:
            out[k] = d
    for k, v in b.items():
        if v and k not in a:
            out[k] = -v
    return out


def _check_status(status: object) -> None:
    """Raise unless ``status`` is an HTTP status code (an int: "429" would fail deep, naming nothing)."""
    if not isinstance(status, int) or isinstance(status, bool):
        raise TypeError(f"status must be an int HTTP status code, got {type(status).__name__} {status!r:.20}")


def _check_args(model: object, demand: object, priority: object, timeout: object) -> None:
    """Raise for an ``acquire`` argument of the wrong type (or a NaN timeout), naming it."""
    if not isinstance(model, str):
        raise TypeError(f"model must be a str, got {type(model).__name__}")
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise TypeError(f"priority must be an int, got {type(priority).__name__}")
    if timeout is not None:
        if not isinstance(timeout, int | float) or isinstance(timeout, bool):
            raise TypeError(f"timeout must be a number of seconds or None, got {type(timeout).__name__}")
        if timeout != timeout:  # NaN: no deadline ever passes, the wait would spin
            raise ValueError("timeout must be a number of seconds or None, got nan")
        if isinstance(timeout, int) and not -_FLOAT_MAX <= timeout <= _FLOAT_MAX:
            # the deadline is a float: past this, ``now + timeout`` raises OverflowError
            raise ValueError("timeout must be a number of seconds or None, got an int too large for a float")


def _demand(
    input_tokens: int,
    max_tokens: int,
    cache_read_input_tokens: int,
    cache_creation_input_tokens: int,
    expected_output_tokens: int | None,
    service_tier: str | None,
    credits: float,
) -> Demand:
    """The ``Demand`` behind ``acquire``'s and ``acquire_nowait``'s keyword arguments."""
    return Demand(
        input_tokens=input_tokens,
        max_tokens=max_tokens,
        cache_read_input_tokens=cache_read_input_tokens,
        cache_creation_input_tokens=cache_creation_input_tokens,
        expected_output_tokens=expected_output_tokens,
        priority=service_tier == "priority",
        credits=credits,
    )


class _BatchDemand:
    """Marker demand for batch creation: 1 request and ``requests`` queue slots."""

    __slots__ = ("requests",)

    def __init__(self, requests: int) -> None:
        # 0: the other batch endpoints (retrieve, list, results, cancel), gated by the RPM only
        if requests < 0 or requests > 100_000:
            raise ConfigurationError(f"a batch holds 1 to 100,000 requests, got {requests!r}")
        self.requests = requests


def _plain(
    input_tokens: object, max_tokens: object, cache_read: object, cache_write: object, expected: object
) -> Plain | None:
    """The fast path's demand if the counts are plain non-negative ints (else ``Demand`` checks them)."""
    if (
        type(input_tokens) is int
        and type(max_tokens) is int
        and type(cache_read) is int
        and type(cache_write) is int
        # 0 iff all are non-negative and below 2**53 (a float holds them; 10**400 would not)
        and (input_tokens | max_tokens | cache_read | cache_write) >> 53 == 0
        and (expected is None or (type(expected) is int and 0 <= expected <= _MAX_COUNT))
    ):
        return (input_tokens, max_tokens, cache_read, cache_write, expected)
    return None


def _usage_counts(usage: object) -> tuple[int, int, int, int] | None:
    """Uncached input, output, cache reads, cache writes: for ``Usage``, the SDK's or a mapping.

    None for anything ``Usage.from_any`` should look at (it says what is wrong).
    """
    if type(usage) is Usage:
        return (
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_input_tokens,
            usage.cache_creation_input_tokens,
        )
    if isinstance(usage, Mapping):
        get = usage.get
        counts = (
            get("input_tokens"),
            get("output_tokens"),
            get("cache_read_input_tokens") or 0,
            get("cache_creation_input_tokens") or 0,
        )
    else:
        counts = (
            getattr(usage, "input_tokens", None),
            getattr(usage, "output_tokens", None),
            getattr(usage, "cache_read_input_tokens", None) or 0,
            getattr(usage, "cache_creation_input_tokens", None) or 0,
        )
    for n in counts:
        if type(n) is not int or not 0 <= n <= _MAX_COUNT:  # 10**400 would overflow a float
            return None
    return counts  # type: ignore[return-value]


def _for_model(model: str, exc: CapacityExceeded) -> CapacityExceeded:
    """The same error, naming the model the caller asked for as well as its pool."""
    error = CapacityExceeded(f"{model} ({exc.pool} pool)", exc.dimension, exc.cost, exc.capacity)
    error.pool = exc.pool
    return error
