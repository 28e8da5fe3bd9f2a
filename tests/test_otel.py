"""ratekeeper.otel: a limiter's events and state read through the OpenTelemetry SDK's in-memory reader."""

from __future__ import annotations

from typing import Any

import attrs
from limiter_support import POOL, RATE_LIMIT_BODY, SONNET, FakeClock, headers
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint

from ratekeeper import Limiter, LimiterStatistics
from ratekeeper.otel import Metrics


def collect(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    """Metric name -> (attributes, value) per point; a histogram's value is (count, sum)."""
    out: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points = [
                    (
                        dict(p.attributes or {}),
                        (p.count, p.sum) if isinstance(p, HistogramDataPoint) else p.value,
                    )
                    for p in metric.data.data_points
                    if isinstance(p, HistogramDataPoint | NumberDataPoint)
                ]
                out[metric.name] = sorted(points, key=repr)
    return out


def test_counters_histogram_and_gauges_of_a_limiter() -> None:
    reader = InMemoryMetricReader()
    metrics = Metrics(meter_provider=MeterProvider(metric_readers=[reader]))
    limiter = metrics.watch(Limiter("tier-1", opening=60, clock=FakeClock(), on_event=metrics))
    permits = [limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=10) for _ in range(3)]
    permits[0].observe(headers(retry_after=5), status=429, body=RATE_LIMIT_BODY)
    got = collect(reader)
    pool = {"pool": POOL}
    assert got["ratekeeper.grants"] == [(pool, 3)]  # the fast path's two included
    assert got["ratekeeper.wait"] == [(pool, (3, 0.0))]
    assert got["ratekeeper.rate_limited"] == [({**pool, "predicted": False}, 1)]
    assert got["ratekeeper.pauses"] == [({**pool, "reason": "429"}, 1)]
    assert got["ratekeeper.in_flight"] == [(pool, 3)]
    assert got["ratekeeper.queue.depth"] == [(pool, 0)]
    levels = {attrs["dimension"]: value for attrs, value in got["ratekeeper.bucket.level"]}
    assert levels == limiter.statistics()[POOL].levels
    assert "ratekeeper.overloaded" not in got  # nothing counted, nothing reported


class _Reporting:
    """A limiter's ``statistics()`` with a report in it: what the gauge reads (weak-referenceable)."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    def statistics(self) -> LimiterStatistics:
        stats = self.limiter.statistics()
        pool = attrs.evolve(stats[POOL], reported={"requests": 41.0, "output_tokens": 7_200.0})
        return attrs.evolve(stats, pools={POOL: pool})


def test_the_last_reported_remaining_is_a_gauge_per_dimension() -> None:
    reader = InMemoryMetricReader()
    metrics = Metrics(meter_provider=MeterProvider(metric_readers=[reader]))
    limiter = Limiter("tier-1", clock=FakeClock(), on_event=metrics)
    limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=10)
    watched = _Reporting(limiter)
    metrics.watch(watched)  # type: ignore[arg-type]  # duck-typed: the gauges read statistics() only
    got = collect(reader)["ratekeeper.bucket.reported"]
    assert got == [
        ({"pool": POOL, "dimension": "output_tokens"}, 7_200.0),
        ({"pool": POOL, "dimension": "requests"}, 41.0),
    ]


def test_a_limiter_reports_the_remaining_its_last_response_gave() -> None:
    limiter = Limiter("tier-1", clock=FakeClock())
    permit = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=10)
    permit.observe(headers(requests=(50, 41), output_tokens=(8_000, 7_200)))
    assert dict(limiter.statistics()[POOL].reported) == {"requests": 41.0, "output_tokens": 7_200.0}
