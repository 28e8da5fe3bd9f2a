"""Read the rate-limit headers of an Anthropic Messages API response into a typed snapshot.

Pure: no I/O and no clock, except that an HTTP-date ``retry-after`` with neither
a ``date`` header nor ``received_at`` is measured from the current time.

A malformed value never raises: its field is ``None``, the raw value is kept in
``RateLimitSnapshot.unparsed`` and logged at debug level on the
``ratekeeper.headers`` logger, and everything else still parses. Every value is
length-checked before it is converted, so hostile input costs linear time at
most (repeated headers included: their values are joined once, at the end).

Converted values are memoised (bounded, by raw text, only values short enough
to be well-formed): consecutive responses repeat most of their values (limits,
resets, the date within a second), so a response costs a few dict look-ups
per header rather than a regex and a datetime each.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import functools
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Final, TypeAlias, TypeVar, final

import attrs

__all__ = [
    "LimitInfo",
    "QuotaInfo",
    "RateLimitSnapshot",
    "UnifiedInfo",
    "UnifiedWindow",
    "parse_headers",
]

_log = logging.getLogger("ratekeeper.headers")

_T = TypeVar("_T")
_U = TypeVar("_U")

_RawHeaders: TypeAlias = (
    Mapping[str, str | bytes] | Mapping[bytes, str | bytes] | Iterable[tuple[str | bytes, str | bytes]]
)
#: What ``parse_headers`` accepts: a mapping (``httpx.Headers``, a dict), (name, value) pairs,
#: or a snapshot already parsed.
HeadersInput: TypeAlias = "_RawHeaders | RateLimitSnapshot"

# (dimension name, snapshot field, header prefix), in seed 001's ``toArray()`` order.
_DIMENSIONS: Final = (
    ("requests", "request_limit", "anthropic-ratelimit-requests-"),
    ("tokens", "token_limit", "anthropic-ratelimit-tokens-"),
    ("input_tokens", "input_token_limit", "anthropic-ratelimit-input-tokens-"),
    ("output_tokens", "output_token_limit", "anthropic-ratelimit-output-tokens-"),
    ("priority_input_tokens", "priority_input_token_limit", "anthropic-priority-input-tokens-"),
    ("priority_output_tokens", "priority_output_token_limit", "anthropic-priority-output-tokens-"),
    ("fast_input_tokens", "fast_input_token_limit", "anthropic-fast-input-tokens-"),
    ("fast_output_tokens", "fast_output_token_limit", "anthropic-fast-output-tokens-"),
)
_LIMIT_FIELDS: Final = ("limit", "remaining", "reset")
_LIMIT_NAMES: Final = {
    prefix: (prefix + "limit", prefix + "remaining", prefix + "reset") for _, _, prefix in _DIMENSIONS
}

_UNIFIED: Final = "anthropic-ratelimit-unified-"
# Window header suffixes, as ``anthropic-ratelimit-unified-<window><suffix>``.
_WINDOW_SUFFIXES: Final = ("-status", "-reset", "-utilization", "-surpassed-threshold")

_QUOTA: Final = (
    "x-quota-credits-used",
    "x-quota-balance",
    "x-quota-markup",
    "x-quota-credits-reserved",
    "x-quota-balance-reserved",
)

# Bounds on what is looked at: a longer value is malformed without being parsed.
_MAX_RAW = 256  # before stripping surrounding blanks
_MAX_NUMBER = 40
_MAX_DATE = 64
_LOG_CHARS = 120

_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SIGNED_DECIMAL = re.compile("-?" + _DECIMAL.pattern)
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)


# -- the data ------------------------------------------------------------------


@final
@attrs.frozen
class LimitInfo:
    """One rate-limit bucket as the server reports it (``anthropic-ratelimit-requests-*`` etc.).

    ``limit`` is the bucket's size, ``remaining`` what is left (token counts are
    rounded to the nearest thousand by the server), ``reset`` when the bucket is
    full again (aware, UTC, in the server's clock: see
    ``RateLimitSnapshot.clock_skew``). A field is ``None`` when its header is
    absent or malformed.
    """

    limit: int | None = None
    remaining: int | None = None
    reset: _dt.datetime | None = None


@final
@attrs.frozen(kw_only=True)
class UnifiedWindow:
    """One window of a subscription's "unified" limit, e.g. ``5h`` or ``7d``.

    From ``anthropic-ratelimit-unified-<window>-status`` (kept as given:
    ``allowed``, ``allowed_warning``, ``rejected``, ...), ``-reset`` (Unix epoch
    seconds, as an aware UTC datetime), ``-utilization`` (fraction used, 0 to 1)
    and ``-surpassed-threshold`` (the warning threshold crossed, if any).
    """

    status: str | None = None
    reset: _dt.datetime | None = None
    utilization: float | None = None
    surpassed_threshold: float | None = None


@final
@attrs.frozen(kw_only=True)
class UnifiedInfo:
    """The ``anthropic-ratelimit-unified-*`` headers of Claude subscription (OAuth) traffic.

    ``status`` and ``reset`` describe the binding window, named by
    ``representative_claim`` (``five_hour``, ``seven_day``, ...).
    ``windows`` maps each window name found in the headers (``5h``, ``7d``,
    ``overage``, ``7d_opus``, or any other) to its ``UnifiedWindow``.
    ``extra`` keeps every other unified header, by lowercased full name.
    """

    status: str | None = None
    reset: _dt.datetime | None = None
    representative_claim: str | None = None
    fallback_percentage: float | None = None
    overage_disabled_reason: str | None = None
    windows: Mapping[str, UnifiedWindow] = attrs.field(factory=dict, hash=False)
    extra: Mapping[str, str] = attrs.field(factory=dict, hash=False)

    @property
    def five_hour(self) -> UnifiedWindow | None:
        """The ``5h`` window, if reported."""
        return self.windows.get("5h")

    @property
    def seven_day(self) -> UnifiedWindow | None:
        """The ``7d`` window, if reported."""
        return self.windows.get("7d")

    @property
    def overage(self) -> UnifiedWindow | None:
        """The pay-as-you-go ``overage`` window, if reported."""
        return self.windows.get("overage")

    @property
    def overage_status(self) -> str | None:
        """``anthropic-ratelimit-unified-overage-status``, e.g. ``rejected``."""
        return None if self.overage is None else self.overage.status

    @property
    def overage_reset(self) -> _dt.datetime | None:
        """``anthropic-ratelimit-unified-overage-reset`` as an aware UTC datetime."""
        return None if self.overage is None else self.overage.reset


@final
@attrs.frozen(kw_only=True)
class QuotaInfo:
    """A credit-wallet proxy's ``X-Quota-*`` headers (seed 002), in credits.

    ``credits_used``, ``balance`` and ``markup`` come with a finished request;
    ``credits_reserved`` and ``balance_reserved`` up front on a stream. The
    balances may be negative (a wallet overdrawn by a settlement); the others not.
    """

    credits_used: float | None = None
    balance: float | None = None
    markup: float | None = None
    credits_reserved: float | None = None
    balance_reserved: float | None = None


@final
@attrs.frozen(kw_only=True)
class RateLimitSnapshot:
    """Everything rate-related in one response's headers, as returned by ``parse_headers``.

    The ``*_limit`` fields are ``None`` when none of their three headers is
    present. ``retry_after`` is in seconds, never negative. ``server_date`` is
    the ``date`` header and ``received_at`` the caller's clock when the
    response arrived; ``clock_skew`` is their difference. ``custom`` holds
    every header not read into a field (lowercased names) and ``unparsed`` every
    value that was malformed.
    """

    request_id: str | None = None
    request_limit: LimitInfo | None = None
    token_limit: LimitInfo | None = None
    input_token_limit: LimitInfo | None = None
    output_token_limit: LimitInfo | None = None
    priority_input_token_limit: LimitInfo | None = None
    priority_output_token_limit: LimitInfo | None = None
    fast_input_token_limit: LimitInfo | None = None
    fast_output_token_limit: LimitInfo | None = None
    retry_after: float | None = None
    server_date: _dt.datetime | None = None
    received_at: _dt.datetime | None = None
    unified: UnifiedInfo | None = None
    quota: QuotaInfo | None = None
    custom: Mapping[str, str] = attrs.field(factory=dict, hash=False)
    unparsed: Mapping[str, str] = attrs.field(factory=dict, hash=False)

    @property
    def clock_skew(self) -> float | None:
        """Seconds the server's clock is ahead of ours (``server_date - received_at``).

        ``None`` unless both are known. The ``date`` header has a resolution of
        one second. Subtract it from a ``reset`` to get a time in the local clock.
        """
        if self.server_date is None or self.received_at is None:
            return None
        return (self.server_date - self.received_at).total_seconds()

    @property
    def has_rate_limit_headers(self) -> bool:
        """Whether any standard, priority, fast or unified rate-limit header was present."""
        return self.unified is not None or any(info is not None for info in self._limit_infos())

    def limits(self) -> dict[str, LimitInfo]:
        """The buckets present, by dimension: ``"requests"``, ``"tokens"``, ``"input_tokens"``, ...

        The other keys are ``"output_tokens"``, ``"priority_input_tokens"``,
        ``"priority_output_tokens"``, ``"fast_input_tokens"`` and ``"fast_output_tokens"``.
        """
        return {
            dimension: info
            for (dimension, _, _), info in zip(_DIMENSIONS, self._limit_infos(), strict=True)
            if info is not None
        }

    def _limit_infos(self) -> tuple[LimitInfo | None, ...]:
        return (
            self.request_limit,
            self.token_limit,
            self.input_token_limit,
            self.output_token_limit,
            self.priority_input_token_limit,
            self.priority_output_token_limit,
            self.fast_input_token_limit,
            self.fast_output_token_limit,
        )

    def to_dict(self) -> dict[str, int | str]:
        """The parsed values under their header names, like seed 001's ``toArray()``.

        Limits and remainders are ints, everything else strings in a canonical
        form (resets as ``2024-05-01T13:29:17Z``, unified resets as epoch
        seconds). Included: the bucket headers, ``request-id``, the unified and
        quota headers; not ``retry-after``, ``date``, ``custom`` or malformed values.
        """
        out: dict[str, int | str] = {}
        infos = list(zip((prefix for _, _, prefix in _DIMENSIONS), self._limit_infos(), strict=True))
        # Requests and tokens interleave by field, the other buckets follow one by one.
        for field in _LIMIT_FIELDS:
            for prefix, info in infos[:2]:
                _put_limit_field(out, prefix, field, info)
        for prefix, info in infos[2:]:
            for field in _LIMIT_FIELDS:
                _put_limit_field(out, prefix, field, info)
        if self.request_id is not None:
            out["request-id"] = self.request_id
        if self.unified is not None:
            _put_unified(out, self.unified)
        if self.quota is not None:
            for name, number in zip(_QUOTA, _quota_values(self.quota), strict=True):
                if number is not None:
                    out[name] = _format_number(number)
        return out


# -- parsing -----------------------------------------------------------------


def parse_headers(headers: HeadersInput, *, received_at: _dt.datetime | None = None) -> RateLimitSnapshot:
    """Read a response's rate-limit headers into a ``RateLimitSnapshot``.

    ``headers`` is any mapping, matched without regard to case (an
    ``httpx``/``httpx2`` ``Headers``, a dict), or an iterable of (name, value)
    pairs; names and values may be ``str`` or ``bytes`` (decoded as UTF-8).
    A repeated header's values are joined with ``", "``, as HTTP does.
    ``received_at`` (timezone-aware) is when the response arrived. A
    ``RateLimitSnapshot`` is returned as it is, so a snapshot can be passed on
    wherever headers are expected without being parsed again.

    A malformed value never raises (see the module docstring); an argument of
    the wrong type raises ``TypeError`` and a naive ``received_at`` ``ValueError``.

        snapshot = parse_headers(response.headers, received_at=datetime.now(UTC))
        snapshot.request_limit.remaining
    """
    if isinstance(headers, RateLimitSnapshot):
        # already parsed (the middleware parses a response once and passes the result on)
        return headers
    received = _aware_utc(received_at)
    reader = _Reader(*_collect(headers))

    server_date = reader.parse("date", _http_date)
    reference = server_date if server_date is not None else received
    retry_ms = reader.parse("retry-after-ms", _non_negative)
    retry_s = (
        reader.parse("retry-after", lambda value: _retry_after(value, reference))
        if "retry-after" in reader.values
        else None
    )
    infos = {field: _limit_info(reader, prefix) for _, field, prefix in _DIMENSIONS}

    return RateLimitSnapshot(
        request_id=reader.parse("request-id", _text),
        request_limit=infos["request_limit"],
        token_limit=infos["token_limit"],
        input_token_limit=infos["input_token_limit"],
        output_token_limit=infos["output_token_limit"],
        priority_input_token_limit=infos["priority_input_token_limit"],
        priority_output_token_limit=infos["priority_output_token_limit"],
        fast_input_token_limit=infos["fast_input_token_limit"],
        fast_output_token_limit=infos["fast_output_token_limit"],
        retry_after=retry_s if retry_ms is None else retry_ms / 1000.0,
        server_date=server_date,
        received_at=received,
        unified=_unified_info(reader),
        quota=_quota_info(reader),
        custom=MappingProxyType(reader.leftovers()),
        unparsed=MappingProxyType(reader.unparsed),
    )


class _Reader:
    """The headers not yet read, and the malformed values met so far."""

    __slots__ = ("undecodable", "unparsed", "values")

    def __init__(self, values: dict[str, str], undecodable: set[str]) -> None:
        self.values = values
        self.undecodable = undecodable
        self.unparsed: dict[str, str] = {}

    def has_any(self, names: Iterable[str]) -> bool:
        return any(name in self.values for name in names)

    def take(self, name: str) -> str | None:
        """Remove and return one header's text; ``None`` if absent or not UTF-8."""
        value = self.values.pop(name, None)
        if value is not None and name in self.undecodable:
            self.reject(name, value)
            return None
        return value

    def parse(self, name: str, convert: Callable[[str], _T | None]) -> _T | None:
        # ``take`` inlined: this runs once per header read, the bulk of a parse
        value = self.values.pop(name, None)
        if value is None:
            return None
        if self.undecodable and name in self.undecodable:
            self.reject(name, value)
            return None
        result = convert(value)
        if result is None:
            self.reject(name, value)
        return result

    def reject(self, name: str, value: str) -> None:
        self.unparsed[name] = value
        _log.debug("malformed %s header ignored: %r (%d chars)", name, value[:_LOG_CHARS], len(value))

    def leftovers(self) -> dict[str, str]:
        """Take every header still unread; the undecodable ones go to ``unparsed``."""
        rest: dict[str, str] = {}
        for name in list(self.values):
            value = self.take(name)
            if value is not None:
                rest[name] = value
        return rest


def _collect(headers: _RawHeaders) -> tuple[dict[str, str], set[str]]:
    """Lowercased name -> text, and the names whose bytes were not UTF-8."""
    if type(headers) is dict and _str_items(headers):
        # the common case, a dict of str: nothing to check or decode per item
        lowered = {name.lower(): value for name, value in headers.items()}
        if len(lowered) == len(headers):  # no two names differing only in case
            return lowered, set()
        items: Iterable[object] = headers.items()
    elif type(headers).__module__.partition(".")[0] in _HTTPX_MODULES:
        # an httpx/httpx2 ``Headers`` (a response's): its pairs as decoded text, one list built
        # in C, instead of ``items()``, which joins repeats in Python. With no name repeated
        # (even in another case) the two say the same; otherwise ``items()`` as before.
        pairs = headers.multi_items()  # type: ignore[union-attr]
        lowered = {name.lower(): value for name, value in pairs}
        if len(lowered) == len(pairs) and _str_items(lowered):
            return lowered, set()
        items = headers.items()  # type: ignore[union-attr]
    elif isinstance(headers, Mapping):
        items = headers.items()
    elif isinstance(headers, Iterable) and not isinstance(headers, str | bytes | bytearray):
        items = headers
    else:
        raise TypeError(
            f"parse_headers() expects a mapping or an iterable of (name, value) pairs, "
            f"got {type(headers).__name__}"
        )
    values: dict[str, str] = {}
    undecodable: set[str] = set()
    # a repeated name's values, joined once at the end: joining as they come copies
    # the growing text each time, quadratic in the number of repeats
    repeated: dict[str, list[str]] = {}
    for item in items:
        if type(item) is not tuple and (not isinstance(item, tuple | list) or len(item) != 2):
            raise TypeError(f"each header must be a (name, value) pair, got {type(item).__name__}")
        try:
            raw_name, value = item
        except ValueError:
            raise TypeError(f"each header must be a (name, value) pair, got {type(item).__name__}") from None
        name = (raw_name if type(raw_name) is str else _decode(raw_name)[0]).lower()
        if type(value) is not str:  # the common case, str, needs no decoding
            value, ok = _decode(value)
            if not ok:
                undecodable.add(name)
        if name not in values:
            values[name] = value
        elif name in repeated:
            repeated[name].append(value)
        else:
            repeated[name] = [values[name], value]
    for name, parts in repeated.items():
        values[name] = ", ".join(parts)
    return values, undecodable


def _str_items(headers: dict[str, object] | dict[object, object]) -> bool:
    """Whether every name and value is a ``str``."""
    return {*map(type, headers), *map(type, headers.values())} == {str}  # C loops, no generator


# The packages whose ``Headers`` has ``multi_items()`` (see _collect).
_HTTPX_MODULES: Final = frozenset({"httpx", "httpx2"})


def _decode(raw: object) -> tuple[str, bool]:
    """The text of a name or value, and whether it was valid (bytes: UTF-8)."""
    if isinstance(raw, str):
        return raw, True
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8"), True
        except UnicodeDecodeError:
            return raw.decode("utf-8", "backslashreplace"), False
    raise TypeError(f"header names and values must be str or bytes, got {type(raw).__name__}")


def _aware_utc(moment: _dt.datetime | None) -> _dt.datetime | None:
    if moment is None:
        return None
    if not isinstance(moment, _dt.datetime):
        raise TypeError(f"received_at must be a datetime or None, got {type(moment).__name__}")
    if moment.utcoffset() is None:
        raise ValueError("received_at must be timezone-aware, got a naive datetime")
    return moment.astimezone(_dt.UTC)


# (limit, remaining, reset) texts -> their LimitInfo, for buckets whose three values were well-formed
_LIMIT_MEMO: dict[tuple[str | None, str | None, str | None], LimitInfo] = {}


def _limit_info(reader: _Reader, prefix: str) -> LimitInfo | None:
    """One bucket, or ``None`` if none of its names is there (most responses carry four of eight).

    A bucket's three texts repeat from response to response (the reset moves once
    a second at most), so a well-formed triple is remembered whole: three
    look-ups and no conversion on a hit.
    """
    limit, remaining, reset = _LIMIT_NAMES[prefix]
    values = reader.values
    if limit not in values and remaining not in values and reset not in values:
        return None
    key = (values.get(limit), values.get(remaining), values.get(reset))
    known = _LIMIT_MEMO.get(key)
    if known is not None and not reader.undecodable:
        del values[limit], values[remaining], values[reset]  # a hit has all three: misses are not kept
        return known
    rejected = len(reader.unparsed)
    info = LimitInfo(
        limit=reader.parse(limit, _count),
        remaining=reader.parse(remaining, _count),
        reset=reader.parse(reset, _rfc3339),
    )
    complete = None not in key and len(reader.unparsed) == rejected
    if complete and all(len(text) <= _MAX_RAW for text in key if text is not None):
        if len(_LIMIT_MEMO) >= _MEMO_SIZE:
            _LIMIT_MEMO.clear()  # bounded: a burst of new values starts it over
        _LIMIT_MEMO[key] = info
    return info


# The unified headers (name, text pairs, in order) -> their UnifiedInfo, for families read
# without a malformed value; bounded in entries and in what each holds (see _unified_info)
_UNIFIED_MEMO: dict[tuple[tuple[str, str], ...], UnifiedInfo] = {}
_UNIFIED_MEMO_SIZE: Final = 64
_UNIFIED_MEMO_NAMES: Final = 32
_UNIFIED_MEMO_NAME: Final = 128


def _unified_info(reader: _Reader) -> UnifiedInfo | None:
    """The unified family, or ``None`` if none of its names is there (API-key traffic).

    A subscription's unified headers repeat from response to response (a window's
    status, reset and utilization move slowly), so a family read whole without a
    malformed value is remembered by its texts: one look-up and no conversion on a hit.
    """
    values = reader.values
    names = [name for name in values if name.startswith(_UNIFIED)]
    if not names:
        return None
    key = tuple([(name, values[name]) for name in names])
    undecodable = reader.undecodable
    clean = not undecodable or undecodable.isdisjoint(names)
    if clean:
        known = _UNIFIED_MEMO.get(key)
        if known is not None:
            for name in names:
                del values[name]
            return known
    rejected = len(reader.unparsed)
    info = _read_unified(reader, names)
    if (
        clean
        and len(reader.unparsed) == rejected
        and len(names) <= _UNIFIED_MEMO_NAMES
        and all(len(name) <= _UNIFIED_MEMO_NAME and len(text) <= _MAX_RAW for name, text in key)
    ):
        if len(_UNIFIED_MEMO) >= _UNIFIED_MEMO_SIZE:
            _UNIFIED_MEMO.clear()  # bounded: a burst of new values starts it over
        _UNIFIED_MEMO[key] = info
    return info


def _read_unified(reader: _Reader, names: list[str]) -> UnifiedInfo:
    status = reader.parse(_UNIFIED + "status", _text)
    reset = reader.parse(_UNIFIED + "reset", _epoch)
    claim = reader.parse(_UNIFIED + "representative-claim", _text)
    fallback = reader.parse(_UNIFIED + "fallback-percentage", _non_negative)
    disabled_reason = reader.parse(_UNIFIED + "overage-disabled-reason", _text)
    window_names: list[str] = []
    extra: dict[str, str] = {}
    for name in names:
        if name not in reader.values:  # read above
            continue
        window = _window_name(name[len(_UNIFIED) :])
        if window is None:
            value = reader.take(name)
            if value is not None:
                extra[name] = value
        elif window not in window_names:
            window_names.append(window)
    return UnifiedInfo(
        status=status,
        reset=reset,
        representative_claim=claim,
        fallback_percentage=fallback,
        overage_disabled_reason=disabled_reason,
        windows=MappingProxyType({window: _unified_window(reader, window) for window in window_names}),
        extra=MappingProxyType(extra),
    )


def _window_name(rest: str) -> str | None:
    """``"7d_opus-utilization"`` -> ``"7d_opus"``; ``None`` if ``rest`` names no window field."""
    for suffix in _WINDOW_SUFFIXES:
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return rest[: -len(suffix)]
    return None


def _unified_window(reader: _Reader, window: str) -> UnifiedWindow:
    prefix = f"{_UNIFIED}{window}"
    return UnifiedWindow(
        status=reader.parse(prefix + "-status", _text),
        reset=reader.parse(prefix + "-reset", _epoch),
        utilization=reader.parse(prefix + "-utilization", _non_negative),
        surpassed_threshold=reader.parse(prefix + "-surpassed-threshold", _non_negative),
    )


def _quota_info(reader: _Reader) -> QuotaInfo | None:
    used, balance, markup, reserved, balance_reserved = _QUOTA
    values = reader.values
    if not (
        used in values
        or balance in values
        or markup in values
        or reserved in values
        or balance_reserved in values
    ):
        return None
    return QuotaInfo(
        credits_used=reader.parse(used, _non_negative),
        balance=reader.parse(balance, _signed),
        markup=reader.parse(markup, _non_negative),
        credits_reserved=reader.parse(reserved, _non_negative),
        balance_reserved=reader.parse(balance_reserved, _signed),
    )


# -- one value each: ``None`` means malformed --------------------------------------

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


# -- formatting for ``to_dict`` -------------------------------------------------------


def _format_number(number: float) -> str:
    if number.is_integer() and abs(number) < 2**53:
        return str(int(number))
    return repr(number)


def _format_rfc3339(moment: _dt.datetime) -> str:
    utc = moment.astimezone(_dt.UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds" if utc.microsecond else "seconds") + "Z"


def _format_epoch(moment: _dt.datetime) -> str:
    return _format_number(moment.timestamp())


def _put_limit_field(out: dict[str, int | str], prefix: str, field: str, info: LimitInfo | None) -> None:
    if info is None:
        return
    value: int | str | None
    if field == "limit":
        value = info.limit
    elif field == "remaining":
        value = info.remaining
    else:
        value = _maybe(_format_rfc3339, info.reset)
    if value is not None:
        out[prefix + field] = value


def _maybe(format_: Callable[[_U], str], value: _U | None) -> str | None:
    return None if value is None else format_(value)


def _put_unified(out: dict[str, int | str], unified: UnifiedInfo) -> None:
    fields: list[tuple[str, str | None]] = [
        ("status", unified.status),
        ("reset", _maybe(_format_epoch, unified.reset)),
        ("representative-claim", unified.representative_claim),
        ("fallback-percentage", _maybe(_format_number, unified.fallback_percentage)),
        ("overage-disabled-reason", unified.overage_disabled_reason),
    ]
    for window, info in unified.windows.items():
        fields += [
            (f"{window}-status", info.status),
            (f"{window}-reset", _maybe(_format_epoch, info.reset)),
            (f"{window}-utilization", _maybe(_format_number, info.utilization)),
            (f"{window}-surpassed-threshold", _maybe(_format_number, info.surpassed_threshold)),
        ]
    for suffix, text in fields:
        if text is not None:
            out[_UNIFIED + suffix] = text
    out.update(unified.extra)


def _quota_values(quota: QuotaInfo) -> tuple[float | None, ...]:
    return (
        quota.credits_used,
        quota.balance,
        quota.markup,
        quota.credits_reserved,
        quota.balance_reserved,
    )
