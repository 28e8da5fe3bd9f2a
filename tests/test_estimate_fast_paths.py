"""The estimator's shortcuts give what the checked constructors give, for any input."""

from __future__ import annotations

import re
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratekeeper import Demand, TokenEstimator
from ratekeeper.core._accounting import Usage
from ratekeeper.errors import ConfigurationError
from ratekeeper.estimate._estimator import _demand, _plain_usage

counts = st.one_of(
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=-3, max_value=10**400),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
)


@given(st.tuples(*[counts] * 6), st.booleans())
def test_demand_shortcut_is_the_constructor(values: tuple[Any, ...], priority: bool) -> None:
    fresh, max_tokens, read, write, write_1h, expected_output = values
    args = (fresh, max_tokens, read, write, write_1h, expected_output, priority)
    try:
        expected = Demand(*args)
    except (TypeError, ValueError) as exc:
        with pytest.raises(type(exc), match=f"^{re.escape(str(exc))}$"):
            _demand(*args)
        return
    built = _demand(*args)
    assert built == expected
    assert hash(built) == hash(expected)
    assert repr(built) == repr(expected)
    for field in attrs.fields(Demand):
        assert type(getattr(built, field.name)) is type(getattr(expected, field.name))
    assert attrs.evolve(built, input_tokens=1) == attrs.evolve(expected, input_tokens=1)


usage_values = st.one_of(st.none(), counts, st.text(max_size=3))
usages = st.dictionaries(
    st.sampled_from(
        ["input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "x"]
    ),
    usage_values,
) | st.builds(
    lambda base, split: {**base, "cache_creation": split},
    st.dictionaries(st.sampled_from(["input_tokens", "output_tokens"]), usage_values),
    st.one_of(
        st.none(),
        counts,
        st.dictionaries(
            st.sampled_from(["ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"]), usage_values
        ),
    ),
)


@given(usages)
def test_plain_usage_reads_what_from_any_reads(usage: dict[str, Any]) -> None:
    counts = _plain_usage(usage)
    if counts is None:
        return  # observe() then takes Usage.from_any itself
    actual = Usage.from_any(usage)
    assert counts == (actual.total_input_tokens, actual.output_tokens)


@given(usages)
def test_observe_learns_or_refuses_as_from_any_says(usage: dict[str, Any]) -> None:
    estimator = TokenEstimator()
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "x" * 700}],
    }
    estimate = estimator.estimate(body, now=0.0)
    try:
        actual = Usage.from_any(usage)
    except (TypeError, ValueError):
        with pytest.raises(ConfigurationError, match=r"^usage is not a usage object or mapping: "):
            estimator.observe(estimate, usage)
        return
    estimator.observe(estimate, usage)
    reference = TokenEstimator()
    reference.observe(reference.estimate(body, now=0.0), actual)
    assert estimator.calibration(estimate.family) == reference.calibration(estimate.family)
