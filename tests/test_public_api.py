"""The package's public surface: what ``__all__`` lists, and that each name is documented."""

from __future__ import annotations

import inspect

import ratekeeper

EXPECTED = {
    "AccountingRules",
    "AcquireTimeout",
    "BackendUnavailable",
    "BatchLimits",
    "BatchRequest",
    "CachePrediction",
    "Calibration",
    "CapacityExceeded",
    "BodyFieldError",
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
    "__version__",
    "batch_limits",
    "cache_reads_count",
    "count_tokens_rpm",
    "limits_for",
    "long_context_limits",
    "meta",
    "model_classes",
    "parse_headers",
    "pool_for",
    "preset_names",
    "register_model",
    "resolve_model",
    "run_requests",
    "spend_cap",
}


def test_all_is_exactly_the_public_api() -> None:
    assert set(ratekeeper.__all__) == EXPECTED
    assert len(ratekeeper.__all__) == len(set(ratekeeper.__all__)), "duplicates in __all__"


def test_every_public_name_resolves_and_is_documented() -> None:
    for name in ratekeeper.__all__:
        obj = getattr(ratekeeper, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"


def test_errors_share_one_base() -> None:
    errors = [getattr(ratekeeper, n) for n in ratekeeper.__all__]
    for cls in errors:
        if inspect.isclass(cls) and issubclass(cls, Exception):
            assert issubclass(cls, ratekeeper.RateKeeperError), cls
            assert cls.__module__ == "ratekeeper.errors", cls
