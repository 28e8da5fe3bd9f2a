"""What a request costs: cost tables for admission and settlement, Cost arithmetic, Usage parsing."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace
from typing import Any

import anthropic.types
import attrs
import pytest

from ratekeeper import AccountingRules, Cost, Demand, OutputRule, Usage
from ratekeeper.core._accounting import DIMENSIONS

STANDARD = AccountingRules()
DAGGER = AccountingRules(cache_reads_count=True)  # the models marked † in the tables
ACTUAL = AccountingRules(output_rule=OutputRule.ACTUAL)

# 1,000 uncached input, 5,000 read from the cache, 2,000 written (500 of them for 1 hour)
DEMAND = Demand(
    input_tokens=1000,
    max_tokens=4000,
    cache_read_input_tokens=5000,
    cache_creation_input_tokens=2000,
    cache_creation_1h_input_tokens=500,
    expected_output_tokens=1500,
)


def demand(**changes: Any) -> Demand:
    """DEMAND with some fields changed."""
    return attrs.evolve(DEMAND, **changes)


# priority input: uncached 1x + reads 0.1x + 5-minute writes 1.25x + 1-hour writes 2x
PRIORITY_INPUT = 1000 + 5000 * 0.1 + 1500 * 1.25 + 500 * 2  # 4375


@pytest.mark.parametrize(
    ("rules", "demand_", "cost"),
    [
        # ITPM = uncached input + cache writes; reads are free ...
        (STANDARD, DEMAND, Cost(requests=1, input_tokens=3000, output_tokens=4000)),
        # ... except for † models, where they count too
        (DAGGER, DEMAND, Cost(requests=1, input_tokens=8000, output_tokens=4000)),
        # OTPM under MAX_TOKENS: max_tokens is reserved, whatever is expected
        (STANDARD, demand(expected_output_tokens=None), Cost(1, 3000, 4000)),
        # under ACTUAL: the expected output, capped at max_tokens; nothing if unknown
        (ACTUAL, DEMAND, Cost(1, 3000, 1500)),
        (ACTUAL, demand(expected_output_tokens=9000), Cost(1, 3000, 4000)),
        (ACTUAL, demand(expected_output_tokens=None), Cost(1, 3000, 0)),
        (ACTUAL, demand(expected_output_tokens=0), Cost(1, 3000, 0)),
        # no caching at all
        (STANDARD, Demand(input_tokens=10, max_tokens=20), Cost(1, 10, 20)),
        (STANDARD, Demand(), Cost(requests=1)),
        # credits pass through
        (STANDARD, demand(credits=2.5), Cost(1, 3000, 4000, credits=2.5)),
        # Priority Tier: its own draws on top of the standard ones
        (STANDARD, demand(priority=True), Cost(1, 3000, 4000, PRIORITY_INPUT, 4000)),
        (DAGGER, demand(priority=True), Cost(1, 8000, 4000, PRIORITY_INPUT, 4000)),
        (ACTUAL, demand(priority=True), Cost(1, 3000, 1500, PRIORITY_INPUT, 1500)),
        # all writes for 1 hour; a 1-hour count above the total writes is capped at it
        (
            STANDARD,
            demand(priority=True, cache_creation_1h_input_tokens=2000),
            Cost(1, 3000, 4000, 1000 + 500 + 2000 * 2, 4000),
        ),
        (
            STANDARD,
            demand(priority=True, cache_creation_1h_input_tokens=9000),
            Cost(1, 3000, 4000, 1000 + 500 + 2000 * 2, 4000),
        ),
        (
            STANDARD,
            demand(priority=True, cache_creation_1h_input_tokens=0),
            Cost(1, 3000, 4000, 1000 + 500 + 2000 * 1.25, 4000),
        ),
    ],
)
def test_admission_cost(rules: AccountingRules, demand_: Demand, cost: Cost) -> None:
    assert rules.admission_cost(demand_) == cost


USAGE = Usage(
    input_tokens=1000,
    output_tokens=700,
    cache_creation_input_tokens=2000,
    cache_read_input_tokens=5000,
    cache_creation_5m_input_tokens=1500,
    cache_creation_1h_input_tokens=500,
)


@pytest.mark.parametrize(
    ("rules", "priority", "credits", "cost"),
    [
        # OTPM settles to the actual output under both rules
        (STANDARD, False, None, Cost(1, 3000, 700)),
        (ACTUAL, False, None, Cost(1, 3000, 700)),
        (DAGGER, False, None, Cost(1, 8000, 700)),
        (STANDARD, False, 3.25, Cost(1, 3000, 700, credits=3.25)),
        (STANDARD, True, None, Cost(1, 3000, 700, PRIORITY_INPUT, 700)),
        (DAGGER, True, 1.0, Cost(1, 8000, 700, PRIORITY_INPUT, 700, 1.0)),
    ],
)
def test_settled_cost(rules: AccountingRules, priority: bool, credits: float | None, cost: Cost) -> None:
    assert rules.settled_cost(USAGE, priority=priority, credits=credits) == cost


def test_settled_priority_without_the_ttl_split_counts_writes_as_5_minute() -> None:
    usage = Usage(input_tokens=1000, output_tokens=7, cache_creation_input_tokens=2000)
    assert STANDARD.settled_cost(usage, priority=True) == Cost(1, 3000, 7, 1000 + 2000 * 1.25, 7)


def test_custom_priority_factors() -> None:
    rules = AccountingRules(
        priority_cache_read_factor=0.5, priority_cache_write_5m_factor=1, priority_cache_write_1h_factor=3
    )
    expected = 1000 + 5000 * 0.5 + 1500 * 1 + 500 * 3
    assert rules.admission_cost(demand(priority=True)).priority_input_tokens == expected
    assert rules.settled_cost(USAGE, priority=True).priority_input_tokens == expected


def test_settlement_returns_the_unused_max_tokens() -> None:
    reserved = STANDARD.admission_cost(DEMAND)
    settled = STANDARD.settled_cost(USAGE)
    assert settled - reserved == Cost(0, 0, 700 - 4000)
    assert reserved + (settled - reserved) == settled


def test_cost_tokens_is_input_plus_output() -> None:
    cost = Cost(1, 3000, 700, 50, 60, 2)
    assert cost.tokens == 3700
    assert Cost().tokens == 0


def test_cost_arithmetic() -> None:
    a = Cost(1, 2, 3, 4, 5, 6)
    b = Cost(10, 20, 30, 40, 50, 60)
    assert a + b == Cost(11, 22, 33, 44, 55, 66)
    assert b - a == Cost(9, 18, 27, 36, 45, 54)
    assert a - b == Cost(-9, -18, -27, -36, -45, -54)
    assert a + Cost() == a
    assert (a + b).tokens == a.tokens + b.tokens


def test_cost_items_and_get() -> None:
    cost = Cost(
        requests=1,
        input_tokens=2,
        output_tokens=3,
        priority_input_tokens=4,
        priority_output_tokens=5,
        credits=6,
    )
    expected = [
        ("requests", 1),
        ("input_tokens", 2),
        ("output_tokens", 3),
        ("tokens", 5),
        ("priority_input_tokens", 4),
        ("priority_output_tokens", 5),
        ("credits", 6),
    ]
    assert list(cost.items()) == expected
    assert [name for name, _ in expected] == list(DIMENSIONS)
    for name, amount in expected:
        assert cost.get(name) == amount


# -- Usage ----------------------------------------------------------------------


def test_usage_from_a_mapping() -> None:
    usage = Usage.from_any({"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 100})
    assert usage == Usage(input_tokens=10, output_tokens=5, cache_read_input_tokens=100)
    assert usage.cache_creation_5m_input_tokens is None
    assert usage.total_input_tokens == 110


def test_usage_from_a_mapping_with_the_ttl_split() -> None:
    raw = {
        "input_tokens": 3,
        "output_tokens": 4,
        "cache_creation_input_tokens": 30,
        "cache_creation": {"ephemeral_5m_input_tokens": 10, "ephemeral_1h_input_tokens": None},
    }
    usage = Usage.from_any(raw)
    assert (usage.cache_creation_5m_input_tokens, usage.cache_creation_1h_input_tokens) == (10, None)
    assert usage.total_input_tokens == 33


def test_usage_from_none_fields() -> None:
    raw = {
        "input_tokens": None,
        "output_tokens": 1,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": None,
        "cache_creation": None,
    }
    assert Usage.from_any(raw) == Usage(output_tokens=1)
    assert Usage.from_any({}) == Usage()
    assert Usage.from_any(SimpleNamespace(output_tokens=2)) == Usage(output_tokens=2)


def test_usage_from_the_sdk() -> None:
    sdk = anthropic.types.Usage(
        input_tokens=12,
        output_tokens=345,
        cache_creation_input_tokens=2048,
        cache_read_input_tokens=4096,
        cache_creation=anthropic.types.CacheCreation(
            ephemeral_5m_input_tokens=1024, ephemeral_1h_input_tokens=1024
        ),
        service_tier="priority",
    )
    assert Usage.from_any(sdk) == Usage(
        input_tokens=12,
        output_tokens=345,
        cache_creation_input_tokens=2048,
        cache_read_input_tokens=4096,
        cache_creation_5m_input_tokens=1024,
        cache_creation_1h_input_tokens=1024,
    )


def test_usage_from_the_sdk_with_none_fields() -> None:
    sdk = anthropic.types.Usage(input_tokens=12, output_tokens=345)
    assert sdk.cache_read_input_tokens is None
    assert Usage.from_any(sdk) == Usage(input_tokens=12, output_tokens=345)
    # a streamed message_delta's cumulative usage, where input counts may be null
    delta = anthropic.types.MessageDeltaUsage(
        output_tokens=99, input_tokens=None, cache_creation_input_tokens=None, cache_read_input_tokens=7
    )
    assert Usage.from_any(delta) == Usage(output_tokens=99, cache_read_input_tokens=7)


def test_usage_from_a_usage_is_the_same_object() -> None:
    assert Usage.from_any(USAGE) is USAGE


def test_usage_from_none_is_an_error() -> None:
    message = "usage must be a mapping or an object with usage attributes, got None"
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        Usage.from_any(None)


NONNEG = "must be a non-negative finite number, got"


@pytest.mark.parametrize(
    ("cls", "field", "value", "message"),
    [
        (Usage, "input_tokens", -1, f"input_tokens {NONNEG} -1"),
        (Usage, "output_tokens", math.nan, f"output_tokens {NONNEG} nan"),
        (Usage, "cache_read_input_tokens", math.inf, f"cache_read_input_tokens {NONNEG} inf"),
        (Usage, "cache_creation_input_tokens", -5, f"cache_creation_input_tokens {NONNEG} -5"),
        (Usage, "cache_creation_1h_input_tokens", -3, f"cache_creation_1h_input_tokens {NONNEG} -3"),
        (Usage, "cache_creation_5m_input_tokens", math.nan, f"cache_creation_5m_input_tokens {NONNEG} nan"),
        (Demand, "max_tokens", -1, f"max_tokens {NONNEG} -1"),
        (Demand, "input_tokens", math.nan, f"input_tokens {NONNEG} nan"),
        (
            Demand,
            "cache_creation_1h_input_tokens",
            -math.inf,
            f"cache_creation_1h_input_tokens {NONNEG} -inf",
        ),
        (Demand, "expected_output_tokens", -5, f"expected_output_tokens {NONNEG} -5"),
        (Demand, "credits", -0.5, f"credits {NONNEG} -0.5"),
        (Demand, "credits", math.nan, f"credits {NONNEG} nan"),
        (Demand, "credits", math.inf, f"credits {NONNEG} inf"),
    ],
)
def test_validation_errors(cls: type[Usage | Demand], field: str, value: float, message: str) -> None:
    kwargs: dict[str, Any] = {field: value}  # the counts are typed int; a bad caller may pass anything
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"input_tokens": math.nan}, f"input_tokens {NONNEG} nan"),
        ({"output_tokens": -2}, f"output_tokens {NONNEG} -2"),
        (
            {"cache_creation": {"ephemeral_1h_input_tokens": -1}},
            f"cache_creation_1h_input_tokens {NONNEG} -1",
        ),
    ],
)
def test_validation_errors_from_any(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Usage.from_any(raw)


def test_counts_are_converted_to_int() -> None:
    floats: dict[str, Any] = {"input_tokens": 10.0, "cache_creation_1h_input_tokens": 3.0}
    usage = Usage(**floats)
    assert (usage.input_tokens, usage.cache_creation_1h_input_tokens) == (10, 3)
    assert type(usage.input_tokens) is type(usage.cache_creation_1h_input_tokens) is int
    assert type(Usage.from_any({"output_tokens": 5.0}).output_tokens) is int
