"""One header value each, from its text: counts, decimals, resets and HTTP dates; ``None`` if malformed.

Every value is length-checked before it is converted, so hostile input costs
linear time at most. The converters remember their answers (bounded, by raw
text, only for values short enough to be well-formed), since consecutive
responses repeat most of their values.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import functools
import math
import re
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")

# Bounds on what is looked at: a longer value is malformed without being parsed.
_MAX_RAW = 256  # before stripping surrounding blanks
_MAX_NUMBER = 40
_MAX_DATE = 64

_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SIGNED_DECIMAL = re.compile("-?" + _DECIMAL.pattern)
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)

_MEMO_SIZE = 1024  # distinct values remembered per converter: a few KB at most


def _memoised(convert: Callable[[str], _T | None]) -> Callable[[str], _T | None]:
    """``convert`` remembering its results; only for values short enough to be well-formed.

    A longer value is malformed for every converter here (``_strip``), so it is
    refused without being hashed or kept: a hostile header costs no memory.
    The results (ints, floats, aware datetimes) are immutable, so sharing is safe.
    """
    cached = functools.lru_cache(maxsize=_MEMO_SIZE)(convert)

    @functools.wraps(convert)
    def memo(value: str) -> _T | None:
        return cached(value) if len(value) <= _MAX_RAW else None

    return memo


def _strip(value: str, max_len: int) -> str | None:
    """The value without surrounding blanks, or ``None`` if empty or longer than ``max_len``."""
    if len(value) > _MAX_RAW:
        return None
    text = value.strip(" \t")
    return text if 0 < len(text) <= max_len else None


def _text(value: str) -> str | None:
    text = value.strip(" \t")
    return text or None


@_memoised
def _count(value: str) -> int | None:
    """A non-negative integer in ASCII digits: not ``-5``, ``12.5``, ``1e3`` or fullwidth digits."""
    text = _strip(value, _MAX_NUMBER)
    if text is None or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


@_memoised
def _non_negative(value: str) -> float | None:
    """A finite decimal number >= 0 (``0.5``, ``3``, ``1e3``); not NaN, inf, ``+1`` or ``1_000``."""
    return _decimal(value, _DECIMAL)


@_memoised
def _signed(value: str) -> float | None:
    """Like ``_non_negative``, but may start with ``-``."""
    return _decimal(value, _SIGNED_DECIMAL)


def _decimal(value: str, grammar: re.Pattern[str]) -> float | None:
    text = _strip(value, _MAX_NUMBER)
    if text is None or grammar.fullmatch(text) is None:
        return None
    number = float(text)
    return number if math.isfinite(number) else None


@_memoised
def _epoch(value: str) -> _dt.datetime | None:
    seconds = _non_negative(value)
    if seconds is None:
        return None
    try:
        return _dt.datetime.fromtimestamp(seconds, _dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None


@_memoised
def _rfc3339(value: str) -> _dt.datetime | None:
    """``2024-05-01T13:29:17Z``, with fractions (to microseconds) or an offset; as UTC."""
    text = _strip(value, _MAX_DATE)
    match = None if text is None else _RFC3339.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(part) for part in match.group(1, 2, 3, 4, 5, 6))
    fraction, sign, offset_hours, offset_minutes = match.group(7, 8, 9, 10)
    leap = second == 60  # a leap second: the instant just before the next minute
    if int(offset_minutes or 0) >= 60:
        return None
    offset = _dt.timedelta(hours=int(offset_hours or 0), minutes=int(offset_minutes or 0))
    try:
        moment = _dt.datetime(
            year,
            month,
            day,
            hour,
            minute,
            59 if leap else second,
            int((fraction or "")[:6].ljust(6, "0")),
            tzinfo=_dt.timezone(-offset if sign == "-" else offset),
        )
        if leap:
            moment += _dt.timedelta(seconds=1)
        return moment.astimezone(_dt.UTC)
    except (OverflowError, ValueError):
        return None


@_memoised
def _http_date(value: str) -> _dt.datetime | None:
    """An HTTP date (``Sat, 02 Aug 2025 20:27:04 GMT`` and the two obsolete forms), as UTC."""
    text = _strip(value, _MAX_DATE)
    if text is None or not text.isascii():
        return None
    try:
        moment = email.utils.parsedate_to_datetime(text)
        if moment.tzinfo is None:  # "-0000" or no zone: HTTP dates are GMT
            return moment.replace(tzinfo=_dt.UTC)
        return moment.astimezone(_dt.UTC)
    except (IndexError, OverflowError, TypeError, ValueError):
        return None


def _retry_after(value: str, reference: _dt.datetime | None) -> float | None:
    """Seconds, or an HTTP date measured from ``reference`` (else now); never negative."""
    seconds = _non_negative(value)
    if seconds is not None:
        return seconds
    moment = _http_date(value)
    if moment is None:
        return None
    start = reference if reference is not None else _dt.datetime.now(_dt.UTC)
    return max(0.0, (moment - start).total_seconds())
