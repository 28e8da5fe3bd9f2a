"""A dry run: what a file of requests would cost and how long it takes at a preset's limits.

Pure: the estimator and the preset tables, no clock and no I/O. Output is
counted at ``max_tokens``, which is what the server reserves under the
``max_tokens`` OTPM rule and an upper bound of what it produces, so the time
given is at most what the run takes at the limit (and the first minute's
burst can shorten it by up to a minute).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import final

import attrs

from ratekeeper.core._presets import limits_for
from ratekeeper.estimate._estimator import TokenEstimator
from ratekeeper.run._requests import BatchRequest

__all__ = ["PoolPlan", "plan"]


@final
@attrs.frozen
class PoolPlan:
    """The requests of one pool: their totals, the pool's per-minute limits and the minutes each takes."""

    pool: str
    models: tuple[str, ...]
    requests: int
    input_tokens: int
    output_tokens: int
    rpm: int
    itpm: int
    otpm: int

    @property
    def minutes(self) -> dict[str, float]:
        """Minutes at the limit per dimension: the total over the per-minute limit."""
        return {
            "requests": self.requests / self.rpm,
            "input_tokens": self.input_tokens / self.itpm,
            "output_tokens": self.output_tokens / self.otpm,
        }

    @property
    def binding(self) -> str:
        """The dimension that takes longest: the one the run waits on."""
        minutes = self.minutes
        return max(minutes, key=minutes.__getitem__)

    def to_json(self) -> dict[str, object]:
        """The plan as JSON."""
        return {
            "pool": self.pool,
            "models": list(self.models),
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens_max": self.output_tokens,
            "limits": {"rpm": self.rpm, "itpm": self.itpm, "otpm": self.otpm},
            "minutes": {k: round(v, 3) for k, v in self.minutes.items()},
            "binding": self.binding,
        }


def plan(
    requests: Iterable[BatchRequest],
    preset: str,
    estimator: TokenEstimator | None = None,
    counted: Mapping[str, int] | None = None,
) -> list[PoolPlan]:
    """Per pool, the estimated totals of ``requests`` against ``preset``'s limits, longest first.

    Input tokens are the estimator's (every input token, cache reads
    included: a dry run knows nothing of the cache), or the exact count in
    ``counted`` (``custom_id`` -> input tokens) where it has one. Raises
    ``UnknownModelError`` for a model the preset has no limits for.

    >>> r = BatchRequest("a", {"model": "claude-sonnet-4-5", "max_tokens": 1000,
    ...                        "messages": [{"role": "user", "content": "x" * 3500}]})
    >>> [p] = plan([r] * 100, "tier-1")
    >>> p.pool, p.requests, p.output_tokens, p.binding, round(p.minutes["output_tokens"], 1)
    ('sonnet-4.x', 100, 100000, 'output_tokens', 12.5)
    """
    estimator = estimator if estimator is not None else TokenEstimator()
    totals: dict[str, list[int]] = {}
    models: dict[str, dict[str, None]] = {}
    limits: dict[str, tuple[int, int, int]] = {}
    for request in requests:
        model = request.params["model"]
        lim = limits_for(preset, model)
        estimate = estimator.estimate(request.params, now=0.0)
        exact = counted.get(request.custom_id) if counted is not None else None
        row = totals.setdefault(lim.pool, [0, 0, 0])
        row[0] += 1
        row[1] += estimate.input_tokens if exact is None else exact
        row[2] += estimate.demand.max_tokens
        models.setdefault(lim.pool, {})[model] = None
        limits[lim.pool] = (lim.rpm, lim.itpm, lim.otpm)
    plans = [
        PoolPlan(pool, tuple(models[pool]), n, i, o, *limits[pool]) for pool, (n, i, o) in totals.items()
    ]
    return sorted(plans, key=lambda p: -max(p.minutes.values()))
