"""What one response's rate-limit headers say, as typed values: the snapshot ``parse_headers`` returns.

``RateLimitSnapshot`` holds the buckets (``LimitInfo``), the subscription's
unified windows (``UnifiedInfo``, ``UnifiedWindow``) and a credit wallet's
figures (``QuotaInfo``); ``to_dict`` writes them back under their header names.
The header names live here, where ``to_dict`` writes them; ``_headers`` reads by them.
"""

from __future__ import annotations

import datetime as _dt
import operator
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, Protocol, TypeVar, final

import attrs

__all__ = [
    "LimitInfo",
    "QuotaInfo",
    "RateLimitSnapshot",
    "UnifiedInfo",
    "UnifiedWindow",
]

_U = TypeVar("_U")

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

_UNIFIED: Final = "anthropic-ratelimit-unified-"

_QUOTA: Final = (
    "x-quota-credits-used",
    "x-quota-balance",
    "x-quota-markup",
    "x-quota-credits-reserved",
    "x-quota-balance-reserved",
)


# -- the data ------------------------------------------------------------------


class _Owed(Protocol):
    """What a snapshot still owes from its headers (``_headers._Pending``)."""

    def resolve(self, snapshot: RateLimitSnapshot, name: str) -> object: ...

    def read_buckets(self, snapshot: RateLimitSnapshot) -> None: ...


class _Deferred:
    """The slot for a parse still owed.

    A plain base, not an attrs field: equality, repr, hashing and pickling see only
    the fields, and ask for each, so a lazy snapshot is observed through its values.
    """

    __slots__ = ("_pending",)

    _pending: _Owed | None


_PENDING: Final = _Deferred.__dict__["_pending"]


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
class RateLimitSnapshot(_Deferred):
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

    if not TYPE_CHECKING:  # (mypy would otherwise take any attribute name for a field)

        def __getattr__(self, name: str) -> object:
            # only reached for a slot not yet set: a field ``parse_headers`` left to first use
            try:
                pending = _PENDING.__get__(self)
            except AttributeError:
                pending = None
            if pending is None or name not in _LAZY_FIELDS:
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
            return pending.resolve(self, name)

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
        try:
            pending = _PENDING.__get__(self)
        except AttributeError:  # (a snapshot made by its constructor: every field is set)
            pending = None
        if pending is not None:
            # the eight bucket families read in one call, not one ``__getattr__`` each
            pending.read_buckets(self)
        return {
            dimension: info
            for dimension, info in zip(_DIMENSION_NAMES, _limit_infos(self), strict=True)
            if info is not None
        }

    def _limit_infos(self) -> tuple[LimitInfo | None, ...]:
        return _limit_infos(self)

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


#: The dimension names of ``_DIMENSIONS``, in order, and a snapshot's eight buckets in that order.
_DIMENSION_NAMES: Final = tuple(dimension for dimension, _, _ in _DIMENSIONS)
_limit_infos: Final[Callable[[RateLimitSnapshot], tuple[LimitInfo | None, ...]]] = operator.attrgetter(
    *(field for _, field, _ in _DIMENSIONS)
)

#: The fields ``parse_headers`` may leave to first use (all but ``received_at``).
_LAZY_FIELDS: Final = frozenset(
    field.name for field in attrs.fields(RateLimitSnapshot) if field.name != "received_at"
)


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
