"""ratekeeper: keep programs that call Claude inside their rate limits.

The pure core (buckets, accounting rules, presets, header parsing) takes time
as an argument; the async ``Limiter`` gates requests on top of it.
"""

from __future__ import annotations

from ratekeeper._bucket import TokenBucket
from ratekeeper._errors import (
    AcquireTimeout,
    BackendUnavailable,
    CapacityExceeded,
    ConfigurationError,
    InsufficientCredits,
    MissingDependency,
    RateKeeperError,
    SpendLimitReached,
    UnknownModelError,
    WouldBlock,
)

__version__ = "0.1.0"

__all__ = [
    "AcquireTimeout",
    "BackendUnavailable",
    "CapacityExceeded",
    "ConfigurationError",
    "InsufficientCredits",
    "MissingDependency",
    "RateKeeperError",
    "SpendLimitReached",
    "TokenBucket",
    "UnknownModelError",
    "WouldBlock",
    "__version__",
]
