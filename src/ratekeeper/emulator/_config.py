"""Every knob of the emulated server, with its default."""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, final

import attrs

from ratekeeper.emulator._models import DEFAULT_PRICES, Price
from ratekeeper.errors import ConfigurationError

__all__ = [
    "DEFAULT_EPOCH",
    "AccelerationLimit",
    "EmulatorConfig",
    "ForeignTraffic",
    "LatencyModel",
    "Mode",
    "OutputTokensFn",
    "OtpmRule",
    "PoolLimits",
    "REPORT_MOMENTS",
    "ReportMoment",
    "UnifiedConfig",
    "WalletConfig",
]

#: Server time 0 is this instant, so headers show realistic dates.
DEFAULT_EPOCH: Final = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)

Mode = Literal["api", "unified", "wallet"]
OtpmRule = Literal["max_tokens", "actual"]
ReportMoment = Literal["admission", "response", "mixed"]
REPORT_MOMENTS: Final = ("admission", "response", "mixed")
#: ``fn(body, rng) -> output tokens`` decides how much a request produces (capped at max_tokens).
OutputTokensFn = Callable[[Mapping[str, Any], random.Random], int]


def _positive(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ConfigurationError(f"{attr.name} must be positive, got {value!r}")


def _non_negative(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ConfigurationError(f"{attr.name} must be non-negative, got {value!r}")


def _seconds(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not 0 <= value < math.inf:
        raise ConfigurationError(f"{attr.name} must be a finite number of seconds >= 0, got {value!r}")


def _probability(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not 0 <= value <= 1:
        raise ConfigurationError(f"{attr.name} must be between 0 and 1, got {value!r}")


@final
@attrs.frozen
class PoolLimits:
    """Explicit per-minute limits for one pool: requests, input tokens, output tokens."""

    rpm: int = attrs.field(validator=_positive)
    itpm: int = attrs.field(validator=_positive)
    otpm: int = attrs.field(validator=_positive)


@final
@attrs.frozen(kw_only=True)
class LatencyModel:
    """How long a request takes: time to first token, then output at a steady rate.

    ``jitter`` is the relative spread (uniform, seeded) applied to both;
    ``error_delay`` is how long a rejection (429, 529, 4xx) takes to come
    back; ``max_delta_events`` caps the content deltas of one stream (tokens
    are grouped into that many events at most). ``uplink`` is the longest time a
    request spends between the client's send and the server's admission: each
    request draws its own, uniformly from 0 to ``uplink`` (seeded, from a stream of
    its own), so requests may reach the server late and out of the order they were
    sent in, as over a real network. It is 0 by default (admission at the send).
    """

    ttft: float = attrs.field(default=0.5, validator=_non_negative)
    tokens_per_second: float = attrs.field(default=60.0, validator=_positive)
    jitter: float = attrs.field(default=0.1, validator=_probability)
    error_delay: float = attrs.field(default=0.05, validator=_non_negative)
    max_delta_events: int = attrs.field(default=40, validator=_positive)
    uplink: float = attrs.field(default=0.0, validator=_seconds)


@final
@attrs.frozen(kw_only=True)
class AccelerationLimit:
    """A sharp increase in traffic gets 429 even under the limits.

    Per pool, a request is refused when admitting it would make the request
    rate of the last ``window`` seconds exceed ``factor`` times the rate of
    the ``baseline`` seconds before that window, plus a floor of
    ``floor_fraction`` of the pool's RPM (so a steady or slowly growing load
    always passes, and a cold start may go up to the floor at once).
    Requests of foreign traffic count too.
    """

    window: float = attrs.field(default=10.0, validator=_positive)
    baseline: float = attrs.field(default=60.0, validator=_positive)
    factor: float = attrs.field(default=2.0, validator=_positive)
    floor_fraction: float = attrs.field(default=0.2, validator=_non_negative)


@final
@attrs.frozen(kw_only=True)
class ForeignTraffic:
    """Other clients of the same organization, drawing from ``pool``'s buckets.

    Rates are per minute, per dimension; they take capacity continuously and
    are only visible to the client through the headers.
    """

    pool: str
    rpm: float = attrs.field(default=0.0, validator=_non_negative)
    itpm: float = attrs.field(default=0.0, validator=_non_negative)
    otpm: float = attrs.field(default=0.0, validator=_non_negative)


@final
@attrs.frozen(kw_only=True)
class UnifiedConfig:
    """Subscription ("unified") mode: a 5-hour and a 7-day window, budgets in USD of list price.

    A window starts with the first request after the previous one ended.
    ``warning_threshold`` turns the status to ``allowed_warning`` and sets the
    ``-surpassed-threshold`` header; at utilization 1 requests are rejected
    until the window resets. ``detailed_headers`` adds the per-window headers
    (seed 000 shows only the summary ones).
    """

    five_hour_budget_usd: float = attrs.field(default=20.0, validator=_positive)
    seven_day_budget_usd: float = attrs.field(default=200.0, validator=_positive)
    warning_threshold: float = attrs.field(default=0.8, validator=_probability)
    fallback_percentage: float = attrs.field(default=0.5, validator=_probability)
    detailed_headers: bool = True


@final
@attrs.frozen(kw_only=True)
class WalletConfig:
    """Credit-wallet proxy mode (seed 002).

    ``balance`` in credits; ``credits_per_usd`` converts list prices;
    ``markup`` multiplies every charge (``X-Quota-Markup`` is sent when it is
    not 1); ``rpm`` is the proxy's own request limit.
    """

    balance: int = attrs.field(default=10_000_000, validator=_non_negative)
    credits_per_usd: float = attrs.field(default=1_000_000.0, validator=_positive)
    markup: float = attrs.field(default=1.0, validator=_positive)
    rpm: int = attrs.field(default=100, validator=_positive)
    wallet: str = "developer"
    billing_mode: str = "developer"


def _default_prices() -> Mapping[str, Price]:
    return dict(DEFAULT_PRICES)


@final
@attrs.frozen(kw_only=True)
class EmulatorConfig:
    """Configuration of an :class:`~ratekeeper.emulator.EmulatedServer`.

    Limits come from ``preset`` (``tier-1`` .. ``tier-4``, ``start``,
    ``build``, ``scale``); ``limits`` overrides them per pool or model class
    name, and ``default_limits`` applies to every pool without an override
    (no preset needed then). See ``docs/emulator.md`` for every knob.
    """

    preset: str | None = "tier-1"
    limits: Mapping[str, PoolLimits] = attrs.field(factory=dict)
    default_limits: PoolLimits | None = None
    mode: Mode = "api"
    #: Seconds of burst a bucket holds: 60 = a full minute, 1 = "60 RPM enforced as 1 per second".
    enforcement_interval: float = attrs.field(default=60.0, validator=_positive)
    #: For the token buckets only; ``None`` = the same as ``enforcement_interval``.
    token_enforcement_interval: float | None = None
    #: ``max_tokens``: reserve max_tokens at start, settle at the end (2025); ``actual``: charge as produced.
    otpm_rule: OtpmRule = "max_tokens"
    #: The moment a non-streamed response's rate-limit headers describe (undocumented for the
    #: real server): ``admission`` (taken when the request was admitted, held until the answer
    #: is sent), ``response`` (taken when it is sent: after the request's own settlement and
    #: everything admitted meanwhile) or ``mixed`` (either, at random per response, seeded).
    #: A stream's headers go out at its first byte, so they always describe its admission.
    report_moment: ReportMoment = "admission"
    #: ``None``: from the preset's scheme (the † classes).
    cache_reads_count: bool | None = None
    #: Cache threshold overrides, by model id (display form, e.g. ``claude-sonnet-4-5``).
    min_cache_tokens: Mapping[str, int] = attrs.field(factory=dict)
    seed: int = 0
    epoch: dt.datetime = DEFAULT_EPOCH
    latency: LatencyModel = attrs.field(factory=LatencyModel)
    #: Default output: a uniform seeded fraction of max_tokens in this range.
    output_fraction: tuple[float, float] = (0.1, 1.0)
    output_tokens: OutputTokensFn | None = None
    acceleration: AccelerationLimit | None = None
    foreign: tuple[ForeignTraffic, ...] = ()
    overload_probability: float = attrs.field(default=0.0, validator=_probability)
    midstream_error_probability: float = attrs.field(default=0.0, validator=_probability)
    prices: Mapping[str, Price] = attrs.field(factory=_default_prices)
    #: USD per calendar month; ``None``: the preset's cap (no cap without a preset); ``math.inf``: none.
    monthly_spend_cap_usd: float | None = None
    #: Spend already accrued this month at t=0.
    initial_spend_usd: float = attrs.field(default=0.0, validator=_non_negative)
    unified: UnifiedConfig = attrs.field(factory=UnifiedConfig)
    wallet: WalletConfig = attrs.field(factory=WalletConfig)
    #: ``None``: the preset's figure, else 1000 where the preset publishes none.
    count_tokens_rpm: int | None = None
    batch_rpm: int | None = None
    batch_queue_cap: int | None = None
    batch_max_requests: int = 100_000
    #: Seconds from creation until a batch ends (its requests then leave the queue).
    batch_processing_time: float = attrs.field(default=300.0, validator=_non_negative)
    batch_cancel_time: float = attrs.field(default=1.0, validator=_non_negative)
    max_request_bytes: int = 32 * 1024 * 1024
    max_batch_bytes: int = 256 * 1024 * 1024

    def __attrs_post_init__(self) -> None:
        if self.mode not in ("api", "unified", "wallet"):
            raise ConfigurationError(f"mode must be 'api', 'unified' or 'wallet', got {self.mode!r}")
        if self.report_moment not in REPORT_MOMENTS:
            raise ConfigurationError(
                f"report_moment must be one of {', '.join(REPORT_MOMENTS)}, got {self.report_moment!r}"
            )
        if self.otpm_rule not in ("max_tokens", "actual"):
            raise ConfigurationError(f"otpm_rule must be 'max_tokens' or 'actual', got {self.otpm_rule!r}")
        lo, hi = self.output_fraction
        if not 0 <= lo <= hi <= 1:
            raise ConfigurationError(
                f"output_fraction must satisfy 0 <= low <= high <= 1, got {self.output_fraction}"
            )
        if self.preset is None and self.default_limits is None and self.mode == "api" and not self.limits:
            raise ConfigurationError("give a preset, limits or default_limits")
        if self.epoch.tzinfo is None:
            raise ConfigurationError("epoch must be timezone-aware (UTC)")
