"""What a response's report says about the server's buckets: pure functions of headers and bodies.

The limiter (``_limiter``) and its Redis mode (``_remote``) read responses the
same way through these: how big the server's bucket can be (``burst_bound``,
``fitted_burst``), the latest moment a report older than its answer can
describe (``taken_by``), whether a 429 is explained by what the report shows left
(``explained_by_remaining``), how long a subscription rejection holds
(``unified_wait``), when a monthly spend cap resets, and the fields of an
error body.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Mapping
from typing import Final

from ratekeeper.core._pool import MIN_BURST, Pool
from ratekeeper.core._snapshot import LimitInfo, RateLimitSnapshot

__all__ = [
    "MAX_PAUSE",
    "RESET_ROUNDING",
    "ROUNDING_MARGIN",
    "burst_bound",
    "capped_pause",
    "error_fields",
    "explained_by_remaining",
    "first_of_next_month",
    "fitted_burst",
    "reset_before_date",
    "taken_by",
    "unified_wait",
]

#: Token ``-remaining`` headers are rounded to the nearest thousand.
ROUNDING_MARGIN: Final = 500.0
#: ``date`` and ``-reset`` are given to the second: a reset this far before the date is real.
RESET_ROUNDING: Final = 1.5

#: The longest pause a response can impose, in seconds: 7 days, the longest window the
#: server has (the subscription's weekly limits). A ``retry-after`` of 10**9 s or a reset in
#: year 9999 is a broken report, not a reason to stop for decades.
MAX_PAUSE: Final = 7 * 24 * 3600.0

_log = logging.getLogger("ratekeeper")


def reset_before_date(limits: Mapping[str, LimitInfo], date: _dt.datetime, pool: Pool) -> bool:
    """Whether a bucket of ``pool`` the report shows was full again before the answer's ``date``.

    Beyond the second's rounding of both, such a report was not taken as the answer left (at
    the request's admission, say). Only buckets that refill and that the report gives both
    ``-remaining`` and ``-reset`` for can show it.
    """
    buckets = pool.buckets
    for dim, info in limits.items():
        if info.reset is None or info.remaining is None or dim not in buckets:
            continue
        if buckets[dim].rate > 0.0 and (date - info.reset).total_seconds() > RESET_ROUNDING:
            return True
    return False


def capped_pause(seconds: float, what: str) -> float:
    """``seconds`` of pause, at most ``MAX_PAUSE`` (with a warning when it was more, or NaN)."""
    if seconds <= MAX_PAUSE:
        return seconds
    _log.warning(
        "%s asks for a pause of %.0f s; pausing for the cap, %.0f s (7 days)", what, seconds, MAX_PAUSE
    )
    return MAX_PAUSE


def unified_wait(snap: RateLimitSnapshot, skew: float) -> float:
    """Seconds a rejected subscription pool is held: until the unified reset, at least 1 s.

    The reset is read against the server's own ``date`` when there is one (no
    clock skew to correct), else against our clock corrected by ``skew``; a
    longer ``retry-after`` wins.
    """
    unified = snap.unified
    assert unified is not None
    wait = 0.0
    if unified.reset is not None and snap.server_date is not None:
        wait = (unified.reset - snap.server_date).total_seconds()
    elif unified.reset is not None:
        wait = (unified.reset - _dt.datetime.now(_dt.UTC)).total_seconds() + skew
    if snap.retry_after is not None:
        wait = max(wait, snap.retry_after)
    return capped_pause(max(wait, 1.0), "a subscription rejection")


def explained_by_remaining(snap: RateLimitSnapshot, reserved: Mapping[str, float]) -> bool:
    """Whether a 429's own report shows a dimension the refused request (``reserved``) did not fit in."""
    for dim, info in snap.limits().items():
        need = reserved.get(dim, 0.0)
        if info.remaining is not None and need > 0 and info.remaining < need:
            return True
    return False


def burst_bound(
    remaining: int, reset: _dt.datetime, date: _dt.datetime, dim: str, pool: Pool, age: float = 0.0
) -> float:
    """An upper bound on the server's bucket size for ``dim``, as a fraction of its limit.

    ``remaining + rate * (reset - t)`` is the server's capacity, where ``t`` is
    when the server read its bucket: no earlier than the request was admitted,
    ``age`` seconds before the response. The ``date`` header is the response's
    time truncated to the second, so ``t >= date - age`` and the bound uses
    ``reset - date + age``, plus the rounding of ``remaining`` (nearest
    thousand for tokens, the floor for requests). This matters: a non-streamed
    response's buckets are read when the request arrived, and ``reset - date``
    alone then understates a full-minute bucket by the request's duration. A
    server in debt reports a later reset, which only raises the bound: it can
    make the bound miss a small bucket, never invent one.
    """
    limit = pool.limits[dim]
    until_full = (reset - date).total_seconds()
    if until_full < 0.0:
        return math.inf  # inconsistent or stale: no evidence either way
    slack = 1.0 if dim == "requests" else ROUNDING_MARGIN
    return (remaining + slack + limit / 60.0 * (until_full + age)) / limit


def fitted_burst(upper: float, lower: float) -> float:
    """The burst to assume when the headers bound the server's bucket between ``lower`` and ``upper``.

    ``upper`` as a rule. But the headers' precision (token counts rounded to the
    thousand, times to the second) cannot tell one second's bucket from
    slightly more, and for a request larger than the bucket an overestimate
    is as harmful as an underestimate: the client would wait for refill the
    server throws away, then count it as held. When the bound is two seconds
    or less and nothing showed more than one, the bucket is taken to be the
    one second the documentation names ("60 RPM may be enforced as 1 per second").

    >>> fitted_burst(1.5 / 60, 0.8 / 60) == MIN_BURST
    True
    >>> fitted_burst(1.5 / 60, 1.2 / 60) == 1.5 / 60
    True
    """
    if upper <= 2.0 * MIN_BURST * (1.0 + 1e-9) and lower <= MIN_BURST * (1.0 + 1e-9):
        return MIN_BURST
    return upper


def taken_by(limits: Mapping[str, LimitInfo], date: _dt.datetime | None, now: float) -> float | None:
    """The latest instant (our clock) a report can describe, if it is shown older than its answer.

    Each ``-reset`` is when its bucket is full again, seen from the moment the report
    describes: that moment is no later than the earliest of them. A reset well before the
    ``date`` (the answer's sending, to the second) shows the report is not of the answer's
    moment; None when none does.
    """
    resets = [info.reset for info in limits.values() if info.reset is not None]
    if date is None or not resets:
        return None
    before = (date - min(resets)).total_seconds()
    return now - before + RESET_ROUNDING if before > RESET_ROUNDING else None


def first_of_next_month(moment: _dt.datetime) -> _dt.datetime:
    moment = moment.astimezone(_dt.UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return _dt.datetime(year, month, 1, tzinfo=_dt.UTC)


def error_fields(body: object) -> tuple[str | None, str | None, str]:
    """``(error.type, error.details.error_code, error.message)`` of an error body, tolerantly."""
    if isinstance(body, bytes | bytearray):
        import json

        try:
            body = json.loads(body[:65536])
        except ValueError:
            return None, None, ""
    if not isinstance(body, Mapping):
        return None, None, ""
    error = body.get("error")
    if not isinstance(error, Mapping):
        return None, None, ""
    etype = error.get("type")
    message = error.get("message")
    details = error.get("details")
    code = details.get("error_code") if isinstance(details, Mapping) else None
    return (
        etype if isinstance(etype, str) else None,
        code if isinstance(code, str) else None,
        message if isinstance(message, str) else "",
    )
