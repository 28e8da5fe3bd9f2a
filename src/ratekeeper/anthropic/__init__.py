"""The official Anthropic SDK, kept inside its rate limits: ``RateLimitMiddleware`` and ``wrap``.

    import anthropic
    from ratekeeper.anthropic import wrap

    client = wrap(anthropic.AsyncAnthropic())  # every attempt now waits for capacity

Needs the ``anthropic`` extra: ``pip install 'ratekeeper[anthropic]'``. See
``docs/anthropic.md``.
"""

from __future__ import annotations

try:
    import anthropic as _sdk  # noqa: F401 - fail here, with the install hint, not deep inside
except ImportError as _exc:
    from ratekeeper.errors import MissingDependency

    raise MissingDependency("anthropic", "anthropic") from _exc

from ratekeeper.anthropic._middleware import RateLimitMiddleware, wrap
from ratekeeper.anthropic._plan import Counter
from ratekeeper.anthropic._wallet import CreditPrice
from ratekeeper.core._meta import meta

__all__ = ["CreditPrice", "Counter", "RateLimitMiddleware", "meta", "wrap"]
