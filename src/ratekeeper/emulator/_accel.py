"""The acceleration limit: a sharp traffic increase is refused even under the limits.

Model: per pool, admitting a request must keep the request rate of the last
``window`` seconds at most ``factor`` x the rate of the ``baseline`` seconds
before it, plus a floor of ``floor_fraction`` x RPM. Foreign traffic counts
at its steady rate in both windows.
"""

from __future__ import annotations

import bisect
import math

from ratekeeper.emulator._config import AccelerationLimit
from ratekeeper.emulator._pools import Pool

__all__ = ["acceleration_wait", "note_admission"]


def _passes(times: list[float], t: float, acc: AccelerationLimit, rpm: int, foreign_rps: float) -> bool:
    start_recent = t - acc.window
    start_base = start_recent - acc.baseline
    i_base = bisect.bisect_right(times, start_base)  # the windows are (start, end]
    i_recent = bisect.bisect_right(times, start_recent)
    recent = len(times) - i_recent + foreign_rps * acc.window
    base = i_recent - i_base + foreign_rps * acc.baseline
    allowed = acc.factor * base / acc.baseline + acc.floor_fraction * rpm / 60.0
    return (recent + 1) / acc.window <= allowed + 1e-12


def acceleration_wait(pool: Pool, acc: AccelerationLimit, now: float) -> float | None:
    """None if a request may be admitted at ``now``; else seconds until it could (no new traffic)."""
    horizon = now - acc.window - acc.baseline
    while pool.admissions and pool.admissions[0] < horizon:
        pool.admissions.popleft()
    times = list(pool.admissions)
    rpm = pool.limits["requests"]
    foreign = pool.foreign_rpm / 60.0
    if _passes(times, now, acc, rpm, foreign):
        return None
    for a in times:
        t = a + acc.window
        if t > now and _passes(times, t, acc, rpm, foreign):
            return t - now
    return math.inf


def note_admission(pool: Pool, now: float) -> None:
    """Count an admitted request."""
    pool.admissions.append(now)
