"""Read the rate-limit headers of an Anthropic Messages API response into a typed snapshot.

Pure: no I/O and no clock, except that an HTTP-date ``retry-after`` with neither
a ``date`` header nor ``received_at`` is measured from the current time.

A malformed value never raises: its field is ``None``, the raw value is kept in
``RateLimitSnapshot.unparsed`` and logged at debug level on the
``ratekeeper.headers`` logger, and everything else still parses. Every value is
length-checked before it is converted, so hostile input costs linear time at
most (repeated headers included: their values are joined once, at the end).

Converted values are memoised (bounded, by raw text, only values short enough
to be well-formed: each converter's answers, and here a bucket's three values
and the unified family whole): consecutive responses repeat most of their
values (limits, resets, the date within a second), so a response costs a few
dict look-ups per header rather than a regex and a datetime each.

The snapshot's types are in ``_snapshot``, the converters of single values in
``_header_values``; this module finds the headers and hands each to its converter.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Final, TypeAlias, TypeVar

from ratekeeper.core._header_values import (
    _MAX_RAW,
    _MEMO_SIZE,
    _count,
    _epoch,
    _http_date,
    _non_negative,
    _retry_after,
    _rfc3339,
    _signed,
    _text,
)
from ratekeeper.core._snapshot import (
    _DIMENSIONS,
    _QUOTA,
    _UNIFIED,
    LimitInfo,
    QuotaInfo,
    RateLimitSnapshot,
    UnifiedInfo,
    UnifiedWindow,
)

# the type parse_headers returns, importable beside it
__all__ = ["parse_headers"]

_log = logging.getLogger("ratekeeper.headers")

_T = TypeVar("_T")

_RawHeaders: TypeAlias = (
    Mapping[str, str | bytes] | Mapping[bytes, str | bytes] | Iterable[tuple[str | bytes, str | bytes]]
)
#: What ``parse_headers`` accepts: a mapping (``httpx.Headers``, a dict), (name, value) pairs,
#: or a snapshot already parsed.
HeadersInput: TypeAlias = "_RawHeaders | RateLimitSnapshot"

_LIMIT_NAMES: Final = {
    prefix: (prefix + "limit", prefix + "remaining", prefix + "reset") for _, _, prefix in _DIMENSIONS
}

# Window header suffixes, as ``anthropic-ratelimit-unified-<window><suffix>``.
_WINDOW_SUFFIXES: Final = ("-status", "-reset", "-utilization", "-surpassed-threshold")

# A malformed value is logged cut to this: a hostile one can be megabytes long.
_LOG_CHARS = 120


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
    # One pass here (names lowered, bytes decoded); each family is converted when first
    # read, so a caller that reads three buckets pays for three.
    snapshot: RateLimitSnapshot = object.__new__(RateLimitSnapshot)
    _set(snapshot, "received_at", received)
    _set(snapshot, "_pending", _Pending(_Reader(*_collect(headers))))
    if _log.isEnabledFor(logging.DEBUG):
        # a malformed value is logged while parse_headers runs, in the same order as ever
        snapshot.unparsed  # noqa: B018  (reading it converts every family)
    return snapshot


_set = object.__setattr__  # (the snapshot is frozen: its slots are filled around that)

_BUCKET_FIELDS: Final = tuple(field for _, field, _ in _DIMENSIONS)


class _Pending:
    """What a lazy snapshot still has to read, and the malformed values of each family read."""

    __slots__ = ("reader", "rejected")

    def __init__(self, reader: _Reader) -> None:
        self.reader = reader
        # family -> its malformed values; merged in ``_FAMILIES`` order for ``unparsed``
        self.rejected: dict[str, dict[str, str]] = {}

    def resolve(self, snapshot: RateLimitSnapshot, name: str) -> object:
        family = _FAMILY_OF[name]
        if family not in self.rejected:
            self._read(snapshot, family)
        return getattr(snapshot, name)

    def read_buckets(self, snapshot: RateLimitSnapshot) -> None:
        """Every bucket family not read yet (``limits()`` reads all eight), as ``_read`` would."""
        reader, done = self.reader, self.rejected
        for index, family in enumerate(_BUCKET_FIELDS):
            if family not in done:
                rejected: dict[str, str] = {}
                reader.unparsed = rejected
                _set(snapshot, family, _limit_info(reader, index))
                done[family] = rejected

    def _read(self, snapshot: RateLimitSnapshot, family: str) -> None:
        reader = self.reader
        # a family's dependencies are read before its own rejected values are collected
        if family == "leftovers":
            for other in _FAMILIES[:-1]:
                if other not in self.rejected:
                    self._read(snapshot, other)
        elif family == "retry_after" and "server_date" not in self.rejected:
            self._read(snapshot, "server_date")  # a date in retry-after is measured from it
        rejected: dict[str, str] = {}
        reader.unparsed = rejected
        if family == "server_date":
            _set(snapshot, "server_date", reader.parse("date", _http_date))
        elif family == "retry_after":
            server_date = snapshot.server_date
            reference = server_date if server_date is not None else snapshot.received_at
            retry_ms = reader.parse("retry-after-ms", _non_negative)
            retry_s = (
                reader.parse("retry-after", lambda value: _retry_after(value, reference))
                if "retry-after" in reader.values
                else None
            )
            _set(snapshot, "retry_after", retry_s if retry_ms is None else retry_ms / 1000.0)
        elif family in _BUCKET_INDEX:
            _set(snapshot, family, _limit_info(reader, _BUCKET_INDEX[family]))
        elif family == "request_id":
            _set(snapshot, "request_id", reader.parse("request-id", _text))
        elif family == "quota":
            _set(snapshot, "quota", _quota_info(reader))
        elif family == "unified":
            _set(snapshot, "unified", _unified_info(reader))
        else:
            _set(snapshot, "custom", MappingProxyType(reader.leftovers()))
            merged: dict[str, str] = {}
            for other in _FAMILIES[:-1]:
                merged.update(self.rejected[other])
            merged.update(rejected)
            _set(snapshot, "unparsed", MappingProxyType(merged))
            _set(snapshot, "_pending", None)  # every field set: the headers can go
        self.rejected[family] = rejected


#: The families in the order they have always been read: ``unparsed`` keeps this order,
#: whatever order they are first read in. A family is named by the field it sets.
_FAMILIES: Final = (
    "server_date",
    "retry_after",
    *_BUCKET_FIELDS,
    "request_id",
    "quota",  # (before the unified family: fewer names left to look through)
    "unified",
    "leftovers",
)
_BUCKET_INDEX: Final = {field: index for index, field in enumerate(_BUCKET_FIELDS)}
_FAMILY_OF: Final = {
    **{family: family for family in _FAMILIES[:-1]},
    "custom": "leftovers",
    "unparsed": "leftovers",
}


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
        # an httpx/httpx2 ``Headers`` (a response's): its raw pairs decoded as ``items()``
        # decodes them (``encoding``, read once: ``multi_items()`` reads it twice a header),
        # instead of ``items()``, which joins repeats in Python. With no name repeated (even
        # in another case) the two say the same; otherwise ``items()`` as before.
        encoding = headers.encoding  # type: ignore[union-attr]
        raw = headers.raw  # type: ignore[union-attr]
        lowered = {name.decode(encoding).lower(): value.decode(encoding) for name, value in raw}
        if len(lowered) == len(raw) and _str_items(lowered):
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
#: each dimension's three names, in ``_DIMENSIONS`` order
_LIMIT_TRIPLES: Final = tuple(_LIMIT_NAMES[prefix] for _, _, prefix in _DIMENSIONS)


def _limit_info(reader: _Reader, index: int) -> LimitInfo | None:
    """One bucket of ``_DIMENSIONS``, ``None`` where none of its names is there (most
    responses carry four of eight).

    A bucket's three texts repeat from response to response (the reset moves once
    a second at most), so a well-formed triple is remembered whole: three
    look-ups and no conversion on a hit.
    """
    values = reader.values
    names = _LIMIT_TRIPLES[index]
    limit, remaining, reset = names
    if limit not in values and remaining not in values and reset not in values:
        return None
    key = (values.get(limit), values.get(remaining), values.get(reset))
    known = _LIMIT_MEMO.get(key)
    if known is not None and not reader.undecodable:
        del values[limit], values[remaining], values[reset]  # a hit has all three: misses are not kept
        return known
    return _read_limit(reader, names, key)


def _read_limit(
    reader: _Reader, names: tuple[str, str, str], key: tuple[str | None, str | None, str | None]
) -> LimitInfo:
    limit, remaining, reset = names
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
_UNIFIED_LEN: Final = len(_UNIFIED)


def _unified_info(reader: _Reader) -> UnifiedInfo | None:
    """The unified family, or ``None`` if none of its names is there (API-key traffic).

    A subscription's unified headers repeat from response to response (a window's
    status, reset and utilization move slowly), so a family read whole without a
    malformed value is remembered by its texts: one look-up and no conversion on a hit.
    """
    values = reader.values
    names = [name for name in values if name[:_UNIFIED_LEN] == _UNIFIED]  # (a slice: no method call)
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


# The five quota texts -> their QuotaInfo, for families read without a malformed value (a
# proxy's balance moves with every request, but its markup and the rest repeat)
_QUOTA_MEMO: dict[tuple[str | None, ...], QuotaInfo] = {}


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
    get = values.get
    key = (get(used), get(balance), get(markup), get(reserved), get(balance_reserved))
    known = _QUOTA_MEMO.get(key)
    if known is not None and not reader.undecodable:
        for name in _QUOTA:
            values.pop(name, None)
        return known
    rejected = len(reader.unparsed)
    info = QuotaInfo(
        credits_used=reader.parse(used, _non_negative),
        balance=reader.parse(balance, _signed),
        markup=reader.parse(markup, _non_negative),
        credits_reserved=reader.parse(reserved, _non_negative),
        balance_reserved=reader.parse(balance_reserved, _signed),
    )
    if len(reader.unparsed) == rejected and all(text is None or len(text) <= _MAX_RAW for text in key):
        if len(_QUOTA_MEMO) >= _MEMO_SIZE:
            _QUOTA_MEMO.clear()  # bounded: a burst of new values starts it over
        _QUOTA_MEMO[key] = info
    return info
