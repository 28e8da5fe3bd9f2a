"""``RateLimitMiddleware``: the limiter inside the official SDK's retry loop.

The SDK runs client middleware once per HTTP attempt, inside its retry loop,
and hands it every response (4xx and 5xx included) before deciding whether to
retry. So each attempt here:

1. estimates the request (``TokenEstimator`` on ``request.json``, optionally
   an exact count), and waits for a permit: the SDK's own retries wait in the
   same queue as everything else;
2. sends it (``call_next``);
3. feeds the response's headers back (``permit.observe``): a 429 pauses the
   whole pool for its ``retry-after``, so the program's other requests wait
   with it instead of each meeting its own 429;
4. settles: at once from a JSON body's ``usage``, or, for a stream, when the
   body ends (see ``_stream``).

Every permit is settled or released on every path: an exception before or
during sending releases it, an error response releases it, a body settles it
when it ends however it ends.

This module holds the middleware itself (its two entry points, one per kind of
client) and ``wrap``; ``_plan`` reads a request into what it asks of the
limiter, ``_exchange`` settles the attempt from its response.
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import logging
import threading
import weakref
from collections.abc import Mapping
from typing import Any, Final, TypeVar, final

import anthropic

from ratekeeper.anthropic._exchange import _Exchange, _Learner
from ratekeeper.anthropic._plan import Counter, _route
from ratekeeper.anthropic._stream import MeteredAsyncStream, MeteredSyncStream, run_deferred
from ratekeeper.anthropic._wallet import CreditPrice, WalletPricing
from ratekeeper.core._meta import attach_meta
from ratekeeper.core._snapshot import RateLimitSnapshot
from ratekeeper.errors import ConfigurationError, InsufficientCredits
from ratekeeper.estimate._body_scan import Scan
from ratekeeper.estimate._estimator import TokenEstimator
from ratekeeper.gate._clock import in_async_context
from ratekeeper.gate._limiter import Limiter

__all__ = ["RateLimitMiddleware", "wrap"]

log = logging.getLogger("ratekeeper.anthropic")

#: The fields of a Messages body that ``count_tokens`` accepts.
_COUNT_FIELDS: Final = ("model", "messages", "system", "tools", "tool_choice", "thinking")

_C = TypeVar("_C", anthropic.Anthropic, anthropic.AsyncAnthropic)


@final
class RateLimitMiddleware(_Learner, anthropic.Middleware):
    """Keeps an ``Anthropic`` / ``AsyncAnthropic`` client inside its rate limits.

    ``Anthropic(middleware=[RateLimitMiddleware(limiter)])``, or
    ``client.with_middleware(...)``, or :func:`wrap`. One middleware can serve
    sync and async clients at once; share it (or its ``limiter``) between every
    client of one organization.

    - ``limiter``: the :class:`~ratekeeper.Limiter` to draw on (default: a new
      one, which learns the limits from the first responses).
    - ``estimator``: the :class:`~ratekeeper.TokenEstimator` that turns a
      body into a ``Demand`` (default: a new one); it learns from every usage.
    - ``counter``: an exact input-token counter, ``body -> int`` (async allowed
      for async clients); ``count_tokens=True`` counts with the API's
      ``count_tokens`` endpoint through the client given to :meth:`bind` (which
      :func:`wrap` does), gated by its own RPM. Either way the estimator still
      splits the count between cache reads, writes and fresh input.
    - ``wallet``: for a credit-wallet proxy: ``True`` (learn credits per token
      from responses), a number of credits per token, or a :class:`CreditPrice`.
      The estimated credits are reserved before sending; a request the known
      balance can't cover raises ``InsufficientCredits`` before it is sent, and
      so does the proxy's 402.
    - ``priority``: the queue priority of this middleware's requests (higher
      first); an SDK retry goes one level up, ahead of first attempts.
    - ``timeout``: the longest an attempt waits for a permit (``AcquireTimeout``).
    """

    def __init__(
        self,
        limiter: Limiter | None = None,
        *,
        estimator: TokenEstimator | None = None,
        counter: Counter | None = None,
        count_tokens: bool = False,
        wallet: bool | float | CreditPrice | None = None,
        priority: int = 0,
        timeout: float | None = None,
    ) -> None:
        if counter is not None and count_tokens:
            raise ConfigurationError("give either counter or count_tokens=True, not both")
        self._limiter = limiter if limiter is not None else Limiter()
        self._estimator = estimator if estimator is not None else TokenEstimator()
        self._counter = counter
        self._count_tokens = count_tokens
        self._wallet = WalletPricing.of(wallet)
        self._priority = priority
        self._timeout = timeout
        self._sync_client: anthropic.Anthropic | None = None
        self._async_client: anthropic.AsyncAnthropic | None = None
        self._lock = threading.Lock()
        self._open_batches: dict[str, int] = {}
        # exact counts by body identity, so the SDK's retries of one call count once
        self._counts: collections.OrderedDict[int, tuple[object, int]] = collections.OrderedDict()
        # the scans of bodies whose attempt failed, by identity, for the SDK's retries
        self._scans: collections.OrderedDict[int, tuple[object, Scan]] = collections.OrderedDict()
        # characters per output token by model family, learned from finished streams
        self._output_cpt: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<RateLimitMiddleware {self._limiter!r} open_batches={len(self._open_batches)}>"

    @property
    def limiter(self) -> Limiter:
        """The limiter every request draws on."""
        return self._limiter

    @property
    def estimator(self) -> TokenEstimator:
        """The estimator that prices requests and learns from their usage."""
        return self._estimator

    @property
    def open_batches(self) -> Mapping[str, int]:
        """Batches created through this middleware and not yet seen ended: id -> requests queued."""
        with self._lock:
            return dict(self._open_batches)

    def bind(self, client: anthropic.Anthropic | anthropic.AsyncAnthropic) -> None:
        """The client ``count_tokens=True`` counts through (one sync and one async at most)."""
        if isinstance(client, anthropic.AsyncAnthropic):
            self._async_client = client
        else:
            self._sync_client = client

    # ------------------------------------------------------------------ sync

    def handle(
        self, request: anthropic.APIRequest, call_next: anthropic.CallNext
    ) -> anthropic.APIResponse[Any]:
        """One attempt of a sync client: wait in ``limiter.acquire_sync``, send, observe, settle."""
        route = _route(request)
        if route is None:
            return call_next(request)
        if in_async_context():
            # the user called the sync client, not acquire_sync: name the fix in their terms
            raise ConfigurationError(
                "a sync Anthropic client would block the running event loop while it waits for "
                "capacity; in async code use anthropic.AsyncAnthropic (wrap(anthropic.AsyncAnthropic()))"
            )
        run_deferred()
        body, counted = self._count_target(request, route)
        if body is not None and counted is None:
            counted = self._counted(body, lambda: self._count_sync(body))
        plan = self._plan(request, route, counted)
        permit = self._gate(request, plan, blocking=True).__enter__()
        exchange = _Exchange(self, plan, permit, request.url)
        try:
            permit.mark_sent()
            response = call_next(request)
        except BaseException as exc:
            exchange.failed(exc)
            raise
        try:
            if response.status_code >= 400:
                response.read()  # a stream's error body is not read yet; the SDK reads it anyway
            try:
                snapshot = exchange.respond(response.http_response, MeteredSyncStream)
            except InsufficientCredits:
                response.close()
                raise
            if snapshot is not None:
                try:
                    parsed = response.parse()  # cached: the SDK hands this same object to the caller
                except Exception:  # the SDK raises it again where the caller expects it
                    parsed = None
                _attach(parsed, snapshot)
        except BaseException:
            permit.release()
            raise
        return response

    def _count_sync(self, body: Mapping[str, Any]) -> object:
        if self._counter is not None:
            counted = self._counter(body)
            if inspect.isawaitable(counted):
                if inspect.iscoroutine(counted):
                    counted.close()  # never awaited: no "coroutine was never awaited" warning
                raise ConfigurationError("an async counter needs an async client")
            return counted
        if self._sync_client is None:
            raise _unbound()
        return self._sync_client.messages.count_tokens(**_count_args(body)).input_tokens

    # ------------------------------------------------------------------ async

    async def handle_async(
        self, request: anthropic.APIRequest, call_next: anthropic.AsyncCallNext
    ) -> anthropic.AsyncAPIResponse[Any]:
        """One attempt of an async client: wait in ``limiter.acquire``, send, observe, settle."""
        route = _route(request)
        if route is None:
            return await call_next(request)
        run_deferred()
        body, counted = self._count_target(request, route)
        if body is not None and counted is None:
            try:
                result = await self._count_async(body)
            except ConfigurationError:
                raise
            except Exception:
                log.warning("exact token count failed; using the estimate", exc_info=True)
            else:
                counted = self._counted(body, lambda: result)
        plan = self._plan(request, route, counted)
        permit = await self._gate(request, plan, blocking=False)
        exchange = _Exchange(self, plan, permit, request.url)
        try:
            permit.mark_sent()
            response = await call_next(request)
        except BaseException as exc:
            exchange.failed(exc)
            raise
        try:
            if response.status_code >= 400:
                await response.read()
            try:
                snapshot = exchange.respond(response.http_response, MeteredAsyncStream)
            except InsufficientCredits:
                await response.close()
                raise
            if snapshot is not None:
                try:
                    parsed = await response.parse()
                except Exception:
                    parsed = None
                _attach(parsed, snapshot)
        except BaseException:
            permit.release()
            raise
        return response

    async def _count_async(self, body: Mapping[str, Any]) -> object:
        if self._counter is not None:
            result = self._counter(body)
            return await result if inspect.isawaitable(result) else result
        if self._async_client is None:
            raise _unbound()
        return (await self._async_client.messages.count_tokens(**_count_args(body))).input_tokens


def _attach(parsed: object, snapshot: RateLimitSnapshot) -> None:
    if isinstance(parsed, anthropic.BaseModel):
        attach_meta(parsed, snapshot)


def _unbound() -> ConfigurationError:
    return ConfigurationError(
        "count_tokens=True needs the client: use ratekeeper.anthropic.wrap(client, count_tokens=True) "
        "or middleware.bind(client)"
    )


def _count_args(body: Mapping[str, Any]) -> dict[str, Any]:
    return {key: body[key] for key in _COUNT_FIELDS if key in body}


# wrap()'s default limiters, one per (credential digest, base URL): limits belong to the
# organization behind a key, so two clients of one key must draw on one budget. Weak values:
# a limiter lives as long as some wrapped client's middleware holds it.
_shared: weakref.WeakValueDictionary[tuple[str, str], Limiter] = weakref.WeakValueDictionary()
_shared_lock = threading.Lock()


def _shared_limiter(client: anthropic.Anthropic | anthropic.AsyncAnthropic) -> Limiter:
    credential = client.api_key or client.auth_token or ""
    # a digest, so this module-level table never holds the key itself
    key = (hashlib.sha256(credential.encode()).hexdigest(), str(client.base_url))
    with _shared_lock:
        limiter = _shared.get(key)
        if limiter is None:
            limiter = _shared[key] = Limiter()
        return limiter


def wrap(client: _C, limiter: Limiter | None = None, **options: Any) -> _C:
    """``client`` with a :class:`RateLimitMiddleware` added (a copy, as ``with_middleware`` makes).

    Works for ``Anthropic`` and ``AsyncAnthropic``; ``options`` go to the
    middleware (``estimator``, ``count_tokens``, ``wallet``...). The
    middleware is bound to the new client, so ``count_tokens=True`` works.
    Without ``limiter``, every client wrapped with the same API key (or auth
    token) and base URL shares one ``Limiter()``, for as long as one of them
    lives: the limits are the organization's, not the client's.
    """
    if any(isinstance(m, RateLimitMiddleware) for m in client.middleware):
        # two middlewares would each take a permit per attempt: every request paid twice
        raise ConfigurationError("this client already has a RateLimitMiddleware")
    middleware = RateLimitMiddleware(limiter if limiter is not None else _shared_limiter(client), **options)
    wrapped = client.with_middleware(middleware)
    middleware.bind(wrapped)
    return wrapped
