"""ratekeeper: keep programs that call Claude inside their rate limits.

The pure core (buckets, accounting rules, presets, header parsing) takes time
as an argument; the async ``Limiter`` gates requests on top of it.
"""

from __future__ import annotations

from importlib import metadata as _metadata
from typing import TYPE_CHECKING

from ratekeeper.core._accounting import AccountingRules, Cost, Demand, OutputRule, Usage
from ratekeeper.core._bucket import TokenBucket
from ratekeeper.core._headers import parse_headers
from ratekeeper.core._meta import meta
from ratekeeper.core._model_ids import model_classes, register_model, resolve_model
from ratekeeper.core._presets import (
    LONG_CONTEXT_BETA,
    LONG_CONTEXT_MIN_INPUT_TOKENS,
    BatchLimits,
    ModelLimits,
    SpendCap,
    batch_limits,
    cache_reads_count,
    count_tokens_rpm,
    limits_for,
    long_context_limits,
    pool_for,
    preset_names,
    spend_cap,
)
from ratekeeper.core._snapshot import LimitInfo, QuotaInfo, RateLimitSnapshot, UnifiedInfo, UnifiedWindow
from ratekeeper.core._stats import EventSummary, LimiterEvent, LimiterStatistics, PoolStatistics
from ratekeeper.errors import (
    AcquireTimeout,
    BackendUnavailable,
    BodyFieldError,
    CapacityExceeded,
    ConfigurationError,
    InsufficientCredits,
    MissingDependency,
    RateKeeperError,
    SpendLimitReached,
    UnknownModelError,
    UnknownPoolError,
    WouldBlock,
)
from ratekeeper.estimate._cache_predict import CachePrediction, PromptCachePredictor
from ratekeeper.estimate._estimator import Calibration, Estimate, TokenEstimator
from ratekeeper.gate._limiter import Limiter, Permit
from ratekeeper.run import BatchRequest, RequestResult, run_requests

if TYPE_CHECKING:
    from ratekeeper.redis._backend import RedisBackend

try:
    # one source of truth, pyproject.toml, read from the installed metadata
    __version__: str = _metadata.version("ratekeeper")
except _metadata.PackageNotFoundError:  # a bare source tree on sys.path, never installed
    __version__ = "0+unknown"

__all__ = [
    "AccountingRules",
    "AcquireTimeout",
    "BackendUnavailable",
    "BatchLimits",
    "BatchRequest",
    "BodyFieldError",
    "CachePrediction",
    "Calibration",
    "CapacityExceeded",
    "ConfigurationError",
    "Cost",
    "Demand",
    "Estimate",
    "EventSummary",
    "InsufficientCredits",
    "LONG_CONTEXT_BETA",
    "LONG_CONTEXT_MIN_INPUT_TOKENS",
    "LimitInfo",
    "Limiter",
    "LimiterEvent",
    "LimiterStatistics",
    "MissingDependency",
    "ModelLimits",
    "OutputRule",
    "Permit",
    "PoolStatistics",
    "PromptCachePredictor",
    "QuotaInfo",
    "RateKeeperError",
    "RateLimitSnapshot",
    "RedisBackend",
    "RequestResult",
    "SpendCap",
    "SpendLimitReached",
    "TokenBucket",
    "TokenEstimator",
    "UnifiedInfo",
    "UnifiedWindow",
    "UnknownModelError",
    "UnknownPoolError",
    "Usage",
    "WouldBlock",
    "batch_limits",
    "cache_reads_count",
    "count_tokens_rpm",
    "limits_for",
    "meta",
    "long_context_limits",
    "model_classes",
    "parse_headers",
    "pool_for",
    "preset_names",
    "register_model",
    "resolve_model",
    "run_requests",
    "spend_cap",
    "__version__",
]


def __getattr__(name: str) -> object:
    # RedisBackend is loaded on first use, so ``import ratekeeper`` never imports redis
    if name == "RedisBackend":
        from ratekeeper.redis._backend import RedisBackend

        return RedisBackend
    raise AttributeError(f"module 'ratekeeper' has no attribute {name!r}")
