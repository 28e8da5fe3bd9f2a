"""OpenTelemetry metrics of a limiter: counters of its events, a histogram of waits, gauges of its state.

    from ratekeeper.otel import Metrics

    metrics = Metrics()  # the global MeterProvider, or Metrics(meter_provider=...)
    limiter = metrics.watch(ratekeeper.Limiter("tier-1", on_event=metrics))

``Metrics`` is an ``on_event`` hook (it counts what the limiter does) and, once
it ``watch``es a limiter, reads its ``statistics()`` whenever a reader collects
(the gauges). Instruments, each with a ``pool`` attribute:

- ``ratekeeper.grants`` (counter): permits granted, fast path included;
- ``ratekeeper.rate_limited`` (counter): 429s, with ``predicted`` (did the model expect it);
- ``ratekeeper.pauses`` (counter): pauses, with ``reason`` (``429``, ``529``, ``unified rejected``);
- ``ratekeeper.overloaded`` (counter): 529s;
- ``ratekeeper.wait`` (histogram, s): how long each granted request queued;
- ``ratekeeper.bucket.level`` (gauge, with ``dimension``): what each bucket holds now;
- ``ratekeeper.bucket.reported`` (gauge, with ``dimension``): the ``remaining`` the server's
  last response reported (``PoolStatistics.reported``), to read against the level;
- ``ratekeeper.queue.depth``, ``ratekeeper.in_flight`` (gauges): requests waiting, permits held.

Needs the ``otel`` extra (``opentelemetry-api``, which the OpenTelemetry SDK
installs too): ``pip install 'ratekeeper[otel]'``. See ``docs/observability.md``.
"""

from __future__ import annotations

try:
    from opentelemetry import metrics as _metrics
except ImportError as _exc:
    from ratekeeper.errors import MissingDependency

    raise MissingDependency("opentelemetry", "otel") from _exc

import weakref
from collections.abc import Iterable
from typing import Any, final

from ratekeeper.core._stats import LimiterEvent, LimiterStatistics
from ratekeeper.gate._limiter import Limiter

__all__ = ["Metrics"]


@final
class Metrics:
    """OpenTelemetry instruments fed by limiters: pass it as ``on_event``, then ``watch`` the limiter."""

    def __init__(self, meter_provider: Any = None) -> None:
        meter = _metrics.get_meter("ratekeeper", meter_provider=meter_provider)
        self._grants = meter.create_counter(
            "ratekeeper.grants", unit="{request}", description="Permits granted"
        )
        self._rate_limited = meter.create_counter(
            "ratekeeper.rate_limited", unit="{response}", description="429 responses"
        )
        self._pauses = meter.create_counter("ratekeeper.pauses", unit="{pause}", description="Pool pauses")
        self._overloaded = meter.create_counter(
            "ratekeeper.overloaded", unit="{response}", description="529 responses"
        )
        self._wait = meter.create_histogram(
            "ratekeeper.wait", unit="s", description="Time a granted request waited in the queue"
        )
        self._watched: weakref.WeakSet[Limiter] = weakref.WeakSet()
        meter.create_observable_gauge(
            "ratekeeper.bucket.level", [self._levels], unit="{token}", description="What each bucket holds"
        )
        meter.create_observable_gauge(
            "ratekeeper.bucket.reported",
            [self._reported],
            unit="{token}",
            description="What the server's last response reported remaining",
        )
        meter.create_observable_gauge(
            "ratekeeper.queue.depth", [self._queue_depth], unit="{request}", description="Requests waiting"
        )
        meter.create_observable_gauge(
            "ratekeeper.in_flight", [self._in_flight], unit="{request}", description="Permits held"
        )

    def watch(self, limiter: Limiter) -> Limiter:
        """Report ``limiter``'s state in the gauges (held weakly); returns it."""
        self._watched.add(limiter)
        return limiter

    def __call__(self, event: LimiterEvent) -> None:
        pool = {"pool": event.pool}
        kind, detail = event.kind, event.detail
        if kind == "grant":
            self._grants.add(1, pool)
            self._wait.record(float(detail.get("waited", 0.0)), pool)
        elif kind == "rate_limited":
            self._rate_limited.add(1, {**pool, "predicted": bool(detail.get("predicted"))})
        elif kind == "pause":
            self._pauses.add(1, {**pool, "reason": str(detail.get("reason", ""))})
        elif kind == "overloaded":
            self._overloaded.add(1, pool)

    def _snapshots(self) -> list[LimiterStatistics]:
        return [limiter.statistics() for limiter in list(self._watched)]

    def _levels(self, options: Any) -> Iterable[Any]:
        return [
            _metrics.Observation(level, {"pool": name, "dimension": dim})
            for stats in self._snapshots()
            for name, pool in stats.pools.items()
            for dim, level in pool.levels.items()
        ]

    def _reported(self, options: Any) -> Iterable[Any]:
        return [
            _metrics.Observation(remaining, {"pool": name, "dimension": dim})
            for stats in self._snapshots()
            for name, pool in stats.pools.items()
            for dim, remaining in pool.reported.items()
        ]

    def _queue_depth(self, options: Any) -> Iterable[Any]:
        return [
            _metrics.Observation(pool.queue_depth, {"pool": name})
            for stats in self._snapshots()
            for name, pool in stats.pools.items()
        ]

    def _in_flight(self, options: Any) -> Iterable[Any]:
        return [
            _metrics.Observation(pool.in_flight, {"pool": name})
            for stats in self._snapshots()
            for name, pool in stats.pools.items()
        ]
