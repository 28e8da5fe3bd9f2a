"""The estimator's shortcuts give what the general computation gives."""

from __future__ import annotations

import math
from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
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
    from ratekeeper._body_scan import Layout, scan_body, token_counter

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
