"""What one request costs in each dimension, at admission and after settlement.

The rules are data (``AccountingRules``), not ifs scattered through the
limiter: the server's rules changed during 2026 and differ per model, so they
are configuration.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping
from typing import Any, final

import attrs

__all__ = [
    "DIMENSIONS",
    "AccountingRules",
    "Cost",
    "Demand",
    "OutputRule",
    "Usage",
]

#: Every dimension a cost can have, in a fixed order.
DIMENSIONS: tuple[str, ...] = (
    "requests",
    "input_tokens",
    "output_tokens",
    "tokens",
    "priority_input_tokens",
    "priority_output_tokens",
    "credits",
)


class OutputRule(enum.Enum):
    """How the server counts output tokens against OTPM.

    ``MAX_TOKENS``: the 2025 rule (seed 003): ``max_tokens`` is reserved when a
    request starts and settled to the actual ``output_tokens`` when it ends.
    ``ACTUAL``: the rule from about April 2026: only tokens actually produced
    count, as they are produced.
    """

    MAX_TOKENS = "max_tokens"
    ACTUAL = "actual"


def _nonneg(name: str) -> Any:
    def check(_inst: object, _attr: object, value: float) -> None:
        if not isinstance(value, int | float):  # a str would fail below with no field named
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r:.40}")
        try:
            finite = value >= 0 and math.isfinite(value)  # NaN fails the first test
        except OverflowError:  # an int too large for a float (10**400)
            finite = False
        if not finite:
            raise ValueError(f"{name} must be a non-negative finite number, got {value!r:.40}")

    return check


def _count(name: str) -> Any:
    check = _nonneg(name)

    def convert(value: Any) -> int:
        check(None, None, value)  # before int(), whose NaN/inf errors name no field
        return int(value)

    return convert


def _int_field(name: str) -> Any:
    return attrs.field(default=0, converter=_count(name))


def _optional_int_field(name: str) -> Any:
    return attrs.field(default=None, converter=attrs.converters.optional(_count(name)))


@final
@attrs.frozen
class Usage:
    """The token counts of one response, as the API reports them in ``usage``.

    >>> u = Usage.from_any({"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 100})
    >>> (u.input_tokens, u.cache_read_input_tokens, u.total_input_tokens)
    (10, 100, 110)
    """

    input_tokens: int = _int_field("input_tokens")
    output_tokens: int = _int_field("output_tokens")
    cache_creation_input_tokens: int = _int_field("cache_creation_input_tokens")
    cache_read_input_tokens: int = _int_field("cache_read_input_tokens")
    #: The split of ``cache_creation_input_tokens`` by TTL, when the API gives it.
    cache_creation_5m_input_tokens: int | None = _optional_int_field("cache_creation_5m_input_tokens")
    cache_creation_1h_input_tokens: int | None = _optional_int_field("cache_creation_1h_input_tokens")

    @classmethod
    def from_any(cls, usage: object) -> Usage:
        """Build from an SDK ``Usage`` object, a mapping, or a ``Usage``.

        Missing or null counts are 0; the nested ``cache_creation`` object (or
        mapping) supplies the 5-minute/1-hour split.
        """
        if isinstance(usage, Usage):
            return usage
        if (
            usage is not None
            and not isinstance(usage, Mapping)
            and not (hasattr(usage, "input_tokens") or hasattr(usage, "output_tokens"))
        ):
            # a Message instead of message.usage, a str, an int: not zero usage, a mistake
            raise TypeError(
                "usage must be a Usage, a mapping or an object with input_tokens/output_tokens"
                f" (such as message.usage), got {type(usage).__name__}"
            )
        get = _getter(usage)
        split = get("cache_creation")
        split_get = _getter(split) if split is not None else None

        def count(name: str) -> Any:  # the fields' converters check and convert
            value = get(name)
            return 0 if value is None else value

        def split_count(name: str) -> Any:
            return None if split_get is None else split_get(name)

        return cls(
            input_tokens=count("input_tokens"),
            output_tokens=count("output_tokens"),
            cache_creation_input_tokens=count("cache_creation_input_tokens"),
            cache_read_input_tokens=count("cache_read_input_tokens"),
            cache_creation_5m_input_tokens=split_count("ephemeral_5m_input_tokens"),
            cache_creation_1h_input_tokens=split_count("ephemeral_1h_input_tokens"),
        )

    @property
    def total_input_tokens(self) -> int:
        """Every input token: cache reads, cache writes and uncached input."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens


def _getter(obj: object) -> Any:
    if isinstance(obj, Mapping):
        return obj.get
    if obj is None:
        raise TypeError("usage must be a mapping or an object with usage attributes, got None")
    return lambda name: getattr(obj, name, None)


@final
@attrs.frozen
class Cost:
    """Amounts drawn from each dimension by one request.

    ``tokens`` is the combined limit's share (input plus output); it is
    derived, never stored, so the two can't disagree.
    """

    requests: float = 0.0
    input_tokens: float = 0.0
    output_tokens: float = 0.0
    priority_input_tokens: float = 0.0
    priority_output_tokens: float = 0.0
    credits: float = 0.0

    @property
    def tokens(self) -> float:
        """The draw on the combined ``tokens`` limit: input plus output."""
        return self.input_tokens + self.output_tokens

    def get(self, dimension: str) -> float:
        """The amount for ``dimension`` (one of ``DIMENSIONS``)."""
        if dimension == "tokens":
            return self.tokens
        value: float = getattr(self, dimension)
        return value

    def items(self) -> Iterator[tuple[str, float]]:
        """``(dimension, amount)`` for every dimension, in ``DIMENSIONS`` order."""
        for name in DIMENSIONS:
            yield name, self.get(name)

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.requests + other.requests,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.priority_input_tokens + other.priority_input_tokens,
            self.priority_output_tokens + other.priority_output_tokens,
            self.credits + other.credits,
        )

    def __sub__(self, other: Cost) -> Cost:
        return Cost(
            self.requests - other.requests,
            self.input_tokens - other.input_tokens,
            self.output_tokens - other.output_tokens,
            self.priority_input_tokens - other.priority_input_tokens,
            self.priority_output_tokens - other.priority_output_tokens,
            self.credits - other.credits,
        )


ZERO = Cost()

# The slots of the frozen class, written directly: attrs' __init__ goes through
# object.__setattr__ per field, which costs the limiter's fast path ~200 ns a request.
_new_cost = object.__new__
_set_cost_fields = tuple(
    getattr(Cost, name).__set__
    for name in (
        "requests",
        "input_tokens",
        "output_tokens",
        "priority_input_tokens",
        "priority_output_tokens",
        "credits",
    )
)


def request_cost(input_tokens: float, output_tokens: float) -> Cost:
    """``Cost(1.0, input_tokens, output_tokens)``, built faster (the limiter's settle path).

    >>> request_cost(1000.0, 20.0) == Cost(1.0, 1000.0, 20.0)
    True
    """
    cost = _new_cost(Cost)
    s_requests, s_input, s_output, s_p_input, s_p_output, s_credits = _set_cost_fields
    s_requests(cost, 1.0)
    s_input(cost, input_tokens)
    s_output(cost, output_tokens)
    s_p_input(cost, 0.0)
    s_p_output(cost, 0.0)
    s_credits(cost, 0.0)
    return cost


@final
@attrs.frozen
class Demand:
    """What a request is expected to need, known before it is sent.

    ``input_tokens`` is the uncached part (after the last cache breakpoint
    that will hit); ``cache_read_input_tokens`` the part predicted to be read
    from the cache; ``cache_creation_input_tokens`` the part predicted to be
    written. ``expected_output_tokens`` is what the caller expects the model to
    produce (used under ``OutputRule.ACTUAL``; defaults to nothing reserved).
    """

    input_tokens: int = _int_field("input_tokens")
    max_tokens: int = _int_field("max_tokens")
    cache_read_input_tokens: int = _int_field("cache_read_input_tokens")
    cache_creation_input_tokens: int = _int_field("cache_creation_input_tokens")
    cache_creation_1h_input_tokens: int = _int_field("cache_creation_1h_input_tokens")
    expected_output_tokens: int | None = _optional_int_field("expected_output_tokens")
    priority: bool = False
    credits: float = attrs.field(default=0.0, converter=float, validator=_nonneg("credits"))


@final
@attrs.frozen
class AccountingRules:
    """How a request is charged: the server's counting rules as data.

    >>> rules = AccountingRules()
    >>> c = rules.admission_cost(Demand(input_tokens=1000, max_tokens=4000, cache_read_input_tokens=5000))
    >>> (c.requests, c.input_tokens, c.output_tokens)
    (1.0, 1000.0, 4000.0)
    >>> AccountingRules(cache_reads_count=True).admission_cost(
    ...     Demand(input_tokens=1000, max_tokens=10, cache_read_input_tokens=5000)).input_tokens
    6000.0
    """

    output_rule: OutputRule = OutputRule.MAX_TOKENS
    #: True for the models marked † in the tables: cache reads count toward ITPM.
    cache_reads_count: bool = False
    #: Priority Tier draws: cache reads at 0.1x, 5-minute writes 1.25x, 1-hour writes 2x.
    priority_cache_read_factor: float = 0.1
    priority_cache_write_5m_factor: float = 1.25
    priority_cache_write_1h_factor: float = 2.0

    def _input(self, uncached: float, cache_read: float, cache_write: float) -> float:
        return float(uncached + cache_write + (cache_read if self.cache_reads_count else 0))

    def _priority_input(self, uncached: float, cache_read: float, write_5m: float, write_1h: float) -> float:
        return (
            uncached
            + cache_read * self.priority_cache_read_factor
            + write_5m * self.priority_cache_write_5m_factor
            + write_1h * self.priority_cache_write_1h_factor
        )

    def admission_cost(self, demand: Demand) -> Cost:
        """What is reserved when the request is admitted."""
        if self.output_rule is OutputRule.MAX_TOKENS:
            output = float(demand.max_tokens)
        else:
            expected = demand.expected_output_tokens or 0
            output = float(min(expected, demand.max_tokens))
        input_ = self._input(
            demand.input_tokens, demand.cache_read_input_tokens, demand.cache_creation_input_tokens
        )
        if not demand.priority:
            return Cost(1.0, input_, output, 0.0, 0.0, demand.credits)
        write_1h = min(demand.cache_creation_1h_input_tokens, demand.cache_creation_input_tokens)
        p_input = self._priority_input(
            demand.input_tokens,
            demand.cache_read_input_tokens,
            demand.cache_creation_input_tokens - write_1h,
            write_1h,
        )
        return Cost(1.0, input_, output, p_input, output, demand.credits)

    def settled_cost(self, usage: Usage, *, priority: bool = False, credits: float | None = None) -> Cost:
        """What the request really cost, from the response's ``usage``.

        ``credits`` is the wallet's actual charge when known; otherwise the
        credits dimension settles to 0 and the caller keeps its own estimate.
        """
        input_ = self._input(
            usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens
        )
        output = float(usage.output_tokens)
        paid = 0.0 if credits is None else float(credits)
        if not priority:
            return Cost(1.0, input_, output, 0.0, 0.0, paid)
        write_1h = usage.cache_creation_1h_input_tokens
        if write_1h is None:
            write_1h = 0
        write_5m = usage.cache_creation_input_tokens - write_1h
        p_input = self._priority_input(usage.input_tokens, usage.cache_read_input_tokens, write_5m, write_1h)
        return Cost(1.0, input_, output, p_input, output, paid)
