"""``meta(response)``: the rate-limit view of any Anthropic SDK response (seed 001).

Duck-typed on purpose, so ``import ratekeeper`` never imports the SDK: what is
read is the ``headers`` of the ``httpx2.Response`` behind the object, wherever
the SDK keeps it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from ratekeeper.core._headers import parse_headers
from ratekeeper.core._snapshot import RateLimitSnapshot

__all__ = ["META_ATTRIBUTE", "attach_meta", "meta"]

#: Where the middleware leaves the snapshot on a parsed model (like the SDK's own ``_request_id``).
META_ATTRIBUTE: Final = "_ratekeeper_meta"


def meta(response: object) -> RateLimitSnapshot:
    """The ``RateLimitSnapshot`` of an Anthropic SDK response: rate limits, request id, quota.

    Takes any of:

    - a parsed model (``Message``, ``MessageBatch``, ``MessageTokensCount``)
      returned through ``ratekeeper.anthropic.RateLimitMiddleware`` (the SDK
      keeps no headers on parsed models, so the middleware attaches the snapshot);
    - a raw response (``client.messages.with_raw_response.create(...)``,
      ``with_streaming_response``) or an ``httpx2.Response``;
    - a stream (``create(stream=True)``, ``client.messages.stream(...)``):
      the headers are sent before the first event;
    - the decoder of ``client.messages.batches.results(...)``;
    - an ``anthropic.APIStatusError`` (429, 529, ...);
    - a mapping of headers.

    Raises ``TypeError`` for anything else, including a parsed model that
    did not come through the middleware.
    """
    if isinstance(response, RateLimitSnapshot):
        return response
    attached = getattr(response, META_ATTRIBUTE, None)
    if isinstance(attached, RateLimitSnapshot):
        return attached
    headers = _headers_of(response)
    if headers is None:
        kind = type(response).__name__
        if hasattr(response, "_request_id"):
            raise TypeError(
                f"meta() found no headers on this {kind}: the SDK keeps none on parsed models; "
                "send it through ratekeeper.anthropic.RateLimitMiddleware (which attaches them) "
                "or use client.messages.with_raw_response"
            )
        raise TypeError(f"meta() expects an Anthropic SDK response, stream or headers, got {kind}")
    return parse_headers(headers)


def attach_meta(parsed: object, snapshot: RateLimitSnapshot) -> bool:
    """Leave ``snapshot`` on a parsed model for ``meta``; False if the object refuses attributes."""
    try:
        # a plain setattr, as the SDK does for ``_request_id``: pydantic keeps an
        # underscore name out of the model's fields and its serialization
        setattr(parsed, META_ATTRIBUTE, snapshot)
    except (AttributeError, TypeError, ValueError):
        return False
    return True


def _headers_of(obj: object) -> Any:
    # APIResponse, AsyncAPIResponse, JSONLDecoder: ``http_response``; Stream,
    # MessageStream, APIStatusError: ``response``; httpx2.Response: ``headers``.
    for attribute in ("http_response", "response"):
        inner = getattr(obj, attribute, None)
        headers = getattr(inner, "headers", None)
        if _is_headers(headers):
            return headers
    headers = getattr(obj, "headers", None)
    if _is_headers(headers):
        return headers
    if isinstance(obj, Mapping):
        return obj
    return None


def _is_headers(value: object) -> bool:
    return isinstance(value, Mapping) or (hasattr(value, "items") and hasattr(value, "get"))
