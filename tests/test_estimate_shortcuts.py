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
