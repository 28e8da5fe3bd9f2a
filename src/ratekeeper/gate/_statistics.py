"""One pool's ``statistics()`` snapshot, from its runtime: counts, levels, waits, what it used."""

from __future__ import annotations

import datetime as _dt

from ratekeeper.core._stats import EventSummary, PoolStatistics
from ratekeeper.gate._state import PoolRuntime

__all__ = ["pool_statistics"]


def pool_statistics(name: str, runtime: PoolRuntime, now: float, taken_at: _dt.datetime) -> PoolStatistics:
    """``runtime`` as a frozen snapshot at ``now`` (gate time), ``taken_at`` on the wall clock.

    Under the lock."""
    pool = runtime.pool
    admitted = runtime.admitted.totals(now)
    levels = pool.levels(now)
    used = {d: max(0.0, admitted.get(d, 0.0)) for d, lim in pool.limits.items() if lim > 0}
    paused_for = max(0.0, pool.paused_until - now)
    return PoolStatistics(
        name=name,
        limits=dict(pool.limits),
        levels=levels,
        capacity={d: b.capacity for d, b in pool.buckets.items()},
        burst=pool.burst,
        in_flight=sum(1 for p in runtime.in_flight.values() if p.active),
        queue_depth=runtime.queued,
        granted=runtime.granted,
        wait_p50=runtime.waits.quantile(0.5),
        wait_p99=runtime.waits.quantile(0.99),
        rate_limited=runtime.rate_limited,
        rate_limited_predicted=runtime.rate_limited_predicted,
        overloaded=runtime.overloaded,
        resyncs=runtime.resyncs,
        paused_for=paused_for,
        pause_reason=pool.pause_reason if pool.paused_until > now else "",
        utilization={d: _offered_share(u, levels.get(d, 0.0)) for d, u in used.items()},
        share=runtime.share,
        used=used,
        paused_until=_wall(taken_at, paused_for) if paused_for > 0.0 else None,
        events={
            kind: EventSummary(kind, count, now - t, _wall(taken_at, t - now), detail)
            for kind, (t, count, detail) in runtime.events.items()
        },
        raised=runtime.raised,
        report_moment=runtime.moment.belief,
        reported=dict(runtime.reported),
    )


def _offered_share(used: float, level: float) -> float:
    """Of what a bucket offered over the window (what it admitted plus what it holds), the share used."""
    offered = used + max(level, 0.0)
    return min(1.0, used / offered) if offered > 0.0 else 0.0


def _wall(at: _dt.datetime, seconds: float) -> _dt.datetime:
    """``at`` moved by ``seconds`` (to the calendar's end or start if it falls beyond)."""
    try:
        return at + _dt.timedelta(seconds=seconds)
    except OverflowError:
        return (_dt.datetime.max if seconds > 0 else _dt.datetime.min).replace(tzinfo=_dt.UTC)
