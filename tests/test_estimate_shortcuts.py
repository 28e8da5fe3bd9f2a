"""The estimator's shortcuts give what the general computation gives."""

from __future__ import annotations

import math
from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_estimate import structured_bodies

from ratekeeper import ConfigurationError, TokenEstimator


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(structured_bodies)
def test_the_reservation_made_with_the_estimate_is_the_margin_applied(body: dict[str, Any]) -> None:
    est = TokenEstimator()
    for usage in (None, {"input_tokens": 5000, "output_tokens": 10}, {"input_tokens": 1, "output_tokens": 1}):
        if usage is not None:
            try:
                est.observe(est.estimate(body, now=0.0), usage)
            except ConfigurationError:
                return
        try:
            e = est.estimate(body, now=0.0)
        except ConfigurationError:
            return
        d = e.demand
        expected = (
            d
            if e.margin <= 1.0 or not d.input_tokens
            else attrs.evolve(d, input_tokens=math.ceil(d.input_tokens * e.margin))
        )
        assert e.reserved == expected
        assert attrs.evolve(e, _reserved=None).reserved == expected


def test_a_body_without_breakpoints_gets_the_predictors_empty_prediction() -> None:
    from ratekeeper.estimate._body_scan import Layout, scan_body, token_counter

    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "x" * 9000}],
    }
    est = TokenEstimator()
    scan = scan_body(body)
    general = est.predictor._predict(Layout.of(scan, token_counter(1 / 3.5)), 0.0)
    cache = est.estimate(body, now=0.0).cache
    assert cache == general
    assert cache._touch == general._touch == ()


def _json_len_reference(value: object, depth: int = 0) -> int:
    """json_len as it was written before its fast paths (the general rules, one type at a time)."""
    from collections.abc import Mapping

    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass")) + 2
    if value is None or value is True:
        return 4
    if value is False:
        return 5
    if isinstance(value, int):
        return len(str(value))
    if isinstance(value, float):
        return len(repr(value))
    if depth >= 200:
        raise ConfigurationError("v is nested more than 200 levels deep")
    if isinstance(value, Mapping):
        n = 2 * len(value) + 1 if value else 2
        for k, v in value.items():
            n += _json_len_reference(k if isinstance(k, str) else str(k), depth + 1)
            n += _json_len_reference(v, depth + 1)
        return n
    assert isinstance(value, list | tuple)
    return max(len(value) + 1, 2) + sum(_json_len_reference(v, depth + 1) for v in value)


any_text = st.text(max_size=12) | st.sampled_from(["é", "日本", "\ud800", "\x00"])
any_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats() | any_text,
    lambda c: (
        st.lists(c, max_size=4)
        | st.tuples(c, c)
        | st.dictionaries(any_text | st.integers(0, 99) | st.booleans(), c, max_size=4)
    ),
    max_leaves=24,
)


@given(any_json)
def test_json_len_fast_paths_follow_the_general_rules(value: object) -> None:
    from ratekeeper.estimate._body_fields import json_len

    assert json_len(value, "v") == _json_len_reference(value)


def test_json_len_still_refuses_deep_nesting() -> None:
    import pytest

    from ratekeeper.estimate._body_fields import json_len

    deep: Any = "x"
    for _ in range(250):
        deep = {"k": [deep]}
    with pytest.raises(ConfigurationError, match=r"^v is nested more than 200 levels deep$"):
        json_len(deep, "v")
    with pytest.raises(ConfigurationError, match=r"^v is nested more than 200 levels deep$"):
        _json_len_reference(deep)
