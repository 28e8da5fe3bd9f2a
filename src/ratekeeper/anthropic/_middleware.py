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
"""

from __future__ import annotations

import collections
import datetime as _dt
import hashlib
import inspect
import json
import logging
import threading
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar, final

import anthropic
import attrs
import httpx2
import sniffio

from ratekeeper.anthropic._stream import (
    BodyOutcome,
    JsonMeter,
    Meter,
    MeteredAsyncStream,
    MeteredSyncStream,
    SseMeter,
    run_deferred,
)
from ratekeeper.anthropic._wallet import CreditPrice, WalletPricing
from ratekeeper.core._accounting import Demand, Usage
from ratekeeper.core._headers import RateLimitSnapshot, parse_headers
from ratekeeper.core._meta import attach_meta
from ratekeeper.errors import ConfigurationError, InsufficientCredits, UnknownModelError
from ratekeeper.estimate._body_scan import Scan, scan_body
from ratekeeper.estimate._estimator import Estimate, TokenEstimator
from ratekeeper.gate._limiter import Limiter, Permit

__all__ = ["Counter", "RateLimitMiddleware", "wrap"]

log = logging.getLogger("ratekeeper.anthropic")

#: An exact input-token counter: the request body in, its input tokens out (sync, or async for async clients).
Counter = Callable[[Mapping[str, Any]], int] | Callable[[Mapping[str, Any]], Awaitable[int]]

_MESSAGES, _COUNT, _BATCH_CREATE, _BATCH = "messages", "count_tokens", "batch_create", "batch"
#: What a mid-stream ``error`` event would have been as a status, for ``permit.observe``.
_ERROR_STATUS: Final = {"overloaded_error": 529, "rate_limit_error": 429, "api_error": 500}
#: The fields of a Messages body that ``count_tokens`` accepts.
_COUNT_FIELDS: Final = ("model", "messages", "system", "tools", "tool_choice", "thinking")
#: How many bodies the retry memos (exact counts, scans) hold.
_COUNT_CACHE: Final = 64
#: Characters per output token before a stream of the family has finished: the docs' rule of
#: thumb, which counts more tokens than English prose has (charging early errs on the safe side).
_OUTPUT_CPT: Final = 3.5

_C = TypeVar("_C", anthropic.Anthropic, anthropic.AsyncAnthropic)
#: Wraps a response body for a meter: ``MeteredSyncStream`` or ``MeteredAsyncStream``.
_Metered = Callable[[Any, Meter], httpx2.SyncByteStream | httpx2.AsyncByteStream]


# ---------------------------------------------------------------------- routing


# url -> its path: the SDK sends a few URLs again and again (urlsplit: ~3 us); bounded
_paths: dict[str, str] = {}
_MAX_PATHS: Final = 1024


def _path_of(url: str) -> str:
    path = _paths.get(url)
    if path is None:
        path = urllib.parse.urlsplit(url).path
        if len(_paths) >= _MAX_PATHS:
            _paths.clear()  # batch ids and the like make new URLs
        _paths[url] = path
    return path


def _route(request: anthropic.APIRequest) -> str | None:
    path = _path_of(request.url).rstrip("/")
    method = request.method.lower()
    if path.endswith("/messages/batches") and method == "post":
        return _BATCH_CREATE
    if "/messages/batches" in path:
        return _BATCH
    if method != "post":
        return None
    if path.endswith("/messages/count_tokens"):
        return _COUNT
    if path.endswith("/messages"):
        body = request.json
        if isinstance(body, Mapping) and isinstance(body.get("model"), str):
            return _MESSAGES
        return None  # nothing to price: let the API answer it (a 400)
    return None


def _batch_id_from_path(path: str) -> str | None:
    parts = path.rstrip("/").split("/")
    try:
        i = parts.index("batches")
    except ValueError:
        return None
    return parts[i + 1] if i + 1 < len(parts) else None


def _never_sent(exc: BaseException) -> bool:
    """True if the request certainly did not reach the server (the connection was never made)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, httpx2.ConnectError | httpx2.ConnectTimeout):
            return True
        current = current.__cause__ or current.__context__
    return False


def _json_of(response: httpx2.Response) -> object:
    try:
        return json.loads(response.content)
    except (ValueError, httpx2.ResponseNotRead):
        return None


def _is_read(response: httpx2.Response) -> bool:
    try:
        response.content  # noqa: B018 - raises if the body was not read yet
    except httpx2.ResponseNotRead:
        return False
    return True


def _is_sse(response: httpx2.Response) -> bool:
    return response.headers.get("content-type", "").split(";")[0].strip().lower() == "text/event-stream"


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


# ---------------------------------------------------------------------- one attempt


@attrs.define
class _Plan:
    """What one attempt needs from the limiter."""

    route: str
    model: str = ""
    demand: Demand | None = None
    estimate: Estimate | None = None
    batch_requests: int = 0
    #: the Messages body and its scan, kept for the SDK's retry of this request if this attempt fails
    body: object = None
    scan: Scan | None = None


@final
class _Exchange:
    """One attempt from the permit to its settlement; also the observer of a metered body."""

    def __init__(self, middleware: RateLimitMiddleware, plan: _Plan, permit: Permit, url: str) -> None:
        self._mw = middleware
        self._plan = plan
        self.permit = permit
        self._path = _path_of(url)
        self._snapshot: RateLimitSnapshot | None = None

    # -- failures before a response

    def failed(self, exc: BaseException) -> None:
        if _never_sent(exc):
            self.permit.sent = False  # it never left: give everything back
        self.permit.release()
        self._mw._remember_scan(self._plan)  # the SDK may send it again

    # -- the response

    def respond(self, response: httpx2.Response, metered: _Metered) -> RateLimitSnapshot | None:
        """Observe, settle what can be settled now, and meter the body if it is still to come.

        Returns the snapshot to attach to the parsed body (``None``: nothing to
        attach, e.g. an error or a body read later). Raises
        ``InsufficientCredits`` for a wallet proxy's 402.
        """
        permit, plan = self.permit, self._plan
        status = response.status_code
        # parsed once here; the limiter and the settlement take the snapshot as it is
        self._snapshot = headers = parse_headers(response.headers, received_at=_dt.datetime.now(_dt.UTC))
        if status >= 400:
            self._mw._remember_scan(plan)  # the SDK may send it again
            error_body = _json_of(response)
            snapshot = permit.observe(headers, status=status, body=error_body)
            permit.release()
            if status == 402:
                raise _insufficient(permit, snapshot, error_body)
            return None
        if plan.route == _MESSAGES:
            return self._messages(response, metered)
        snapshot = permit.observe(headers, status=status)
        body = _json_of(response)
        if plan.route == _BATCH_CREATE:
            self._mw._batch_created(body, plan.batch_requests)
        elif plan.route == _BATCH:
            self._mw._batches_seen(body, response.request.method, self._path)
        permit.release()  # the RPM token stays spent; a new batch's queue slots stay taken
        return snapshot if _is_read(response) else None

    def _messages(self, response: httpx2.Response, metered: _Metered) -> RateLimitSnapshot | None:
        plan = self._plan
        self._mw._response_started(plan.estimate)
        if _is_read(response):
            return self._settle_message(_json_of(response), complete=True, observed=False)
        # the body is still to come: observe the headers now, settle when the body ends
        self.permit.observe(self._snapshot)
        encoding = response.headers.get("content-encoding", "")
        meter: Meter
        if _is_sse(response):
            max_tokens = plan.demand.max_tokens if plan.demand is not None else 0
            cpt = self._mw._output_chars_per_token(plan.estimate)
            meter = SseMeter(self, content_encoding=encoding, max_tokens=max_tokens, chars_per_token=cpt)
        else:  # with_streaming_response: the caller reads the JSON body later
            meter = JsonMeter(self, content_encoding=encoding)
        response.stream = metered(response.stream, meter)
        return None

    def _settle_message(
        self, body: object, *, complete: bool, observed: bool, output: int = 0
    ) -> RateLimitSnapshot:
        """Settle from ``body``'s usage, observe the headers (unless ``observed`` already), learn.

        A complete answer's rate-limit headers may describe the server after this
        request's own settlement (the moment is undocumented): the limiter reads
        them best with the settlement already applied, so it settles first (when
        the usage cannot be read, it observes, then releases). A stream was observed at its
        first byte, before any settlement could be in its headers. A wallet's
        balance is fed last: the proxy reports it after the charge, so fed
        before settling the limiter would give this request's reservation back
        a second time.
        """
        permit, snapshot = self.permit, self._snapshot
        assert snapshot is not None
        usage = body.get("usage") if isinstance(body, dict) else None
        quota = body.get("quota") if isinstance(body, dict) else None
        quota = quota if isinstance(quota, dict) else {}
        settled = False
        if isinstance(usage, dict):
            try:
                if output > (_number(usage.get("output_tokens")) or 0.0):
                    usage = {**usage, "output_tokens": output}  # a cut stream: what its deltas showed
                credits = _number(quota.get("credits_used"))
                if credits is None and snapshot.quota is not None:
                    credits = snapshot.quota.credits_used
                if permit.active:
                    if observed:
                        permit.settle(usage, credits=credits)
                    else:  # the balance is fed below
                        permit.settle(usage, credits=credits, headers=_without_quota(snapshot))
                        observed = True
                settled = True
            except (TypeError, ValueError, OverflowError) as exc:
                # a malformed report must not lose the response nor leak the permit: keep the
                # reservation as charged (the safe side), and say what was wrong
                log.warning("cannot settle on this response's usage (%s); keeping its reservation", exc)
        if not observed:
            permit.observe(_without_quota(snapshot))  # the balance is fed below
        if not settled:
            permit.release()  # after the observation: a successful answer's reservation stands
            return snapshot
        assert isinstance(usage, dict)
        balance = _number(quota.get("balance_after"))
        if balance is None and snapshot.quota is not None:
            balance = snapshot.quota.balance
        if balance is not None:
            permit.observe({"x-quota-balance": repr(balance)})
        self._mw._learn(self._plan.estimate, usage, credits, complete=complete)
        return snapshot

    # -- BodyObserver

    def progress(self, output_tokens: int) -> None:
        self.permit.record_output(output_tokens)

    def finish(self, outcome: BodyOutcome) -> None:
        permit = self.permit
        if not permit.active:
            return
        if outcome.error is not None:
            error = outcome.error.get("error")
            kind = error.get("type") if isinstance(error, dict) else None
            permit.observe({}, status=_ERROR_STATUS.get(str(kind), 500), body=outcome.error)
        if outcome.json_body is not None:
            self._settle_message(outcome.json_body, complete=outcome.completed, observed=True)
        elif outcome.started:
            body: dict[str, Any] = {"usage": outcome.usage}
            if outcome.quota is not None:
                body["quota"] = outcome.quota
            complete = outcome.completed and outcome.error is None
            # a stream cut before its final usage: count the output its deltas showed
            output = 0 if outcome.final_usage else outcome.output_estimate
            self._settle_message(body, complete=complete, observed=True, output=output)
            if complete and outcome.final_usage:
                self._mw._learn_output(self._plan.estimate, outcome)
        else:
            # nothing seen: keep the reservation (the server charged it), give back what it didn't
            permit.release()


def _without_quota(snapshot: RateLimitSnapshot) -> RateLimitSnapshot:
    """``snapshot`` without its wallet balance (fed after the settlement); itself if it has none."""
    # (attrs.evolve copies all sixteen fields, ~8 us, for the common answer without a wallet)
    return snapshot if snapshot.quota is None else attrs.evolve(snapshot, quota=None)


def _insufficient(permit: Permit, snapshot: RateLimitSnapshot, body: object) -> InsufficientCredits:
    message = ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = str(body["error"].get("message") or "")
    balance = snapshot.quota.balance if snapshot.quota is not None else None
    return InsufficientCredits(permit.credits or None, balance, message)


# ---------------------------------------------------------------------- the middleware


@final
class RateLimitMiddleware(anthropic.Middleware):
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
        if _in_event_loop():
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

    # ------------------------------------------------------------------ shared

    def _plan(self, request: anthropic.APIRequest, route: str, counted: int | None) -> _Plan:
        body = request.json
        if route == _BATCH_CREATE:
            requests = body.get("requests") if isinstance(body, Mapping) else None
            return _Plan(route, batch_requests=len(requests) if isinstance(requests, list) else 1)
        if route != _MESSAGES:
            return _Plan(route)
        assert isinstance(body, Mapping)  # checked by _route
        model = body["model"]
        estimate: Estimate | None = None
        scan: Scan | None = None
        try:
            scan = self._scan(request, body)
            estimate = self._estimator._from_scan(scan, body, self._now())
            demand = estimate.reserved
        except UnknownModelError:
            raise
        except ConfigurationError as exc:
            # a body the estimator can't read may still be one the API accepts
            # the field path only: the value after ", got" may be a prompt's text
            log.warning(
                "cannot estimate this request (%s); reserving by its size", str(exc).split(", got ", 1)[0]
            )
            demand = Demand(
                input_tokens=len(json.dumps(body, default=str)) // 3, max_tokens=_max_tokens(body)
            )
        if counted is not None:  # exact: no margin for estimation errors
            demand = _with_count(estimate.demand if estimate is not None else demand, counted)
        if self._wallet is not None:
            demand = attrs.evolve(demand, credits=self._wallet.reservation(demand))
        return _Plan(route, model, demand, estimate, body=body, scan=scan)

    def _scan(self, request: anthropic.APIRequest, body: Mapping[str, Any]) -> Scan:
        """The body's scan: made once per request, since the SDK retries with the same body object."""
        if request.retries_taken:
            with self._lock:
                hit = self._scans.get(id(body))
            if hit is not None and hit[0] is body:
                return hit[1]
        return scan_body(body)

    def _remember_scan(self, plan: _Plan) -> None:
        """Keep a failed attempt's scan for its retry (a successful attempt has none)."""
        if plan.scan is None:
            return
        with self._lock:
            # the body is kept with it, so its id is not reused by another body meanwhile
            self._scans[id(plan.body)] = (plan.body, plan.scan)
            self._scans.move_to_end(id(plan.body))
            while len(self._scans) > _COUNT_CACHE:
                self._scans.popitem(last=False)

    def _gate(self, request: anthropic.APIRequest, plan: _Plan, *, blocking: bool) -> Any:
        """The limiter's acquire for this attempt: entered with ``with`` (blocking) or awaited."""
        limiter, timeout = self._limiter, self._timeout
        if plan.route == _COUNT:
            return limiter.acquire_count_tokens(timeout=timeout)
        if plan.route == _BATCH_CREATE:
            return limiter.acquire_batch(plan.batch_requests, timeout=timeout)
        if plan.route == _BATCH:
            return limiter.acquire_batch(0, timeout=timeout)
        assert plan.demand is not None
        priority = self._priority + (1 if request.retries_taken else 0)
        if blocking:
            return limiter.acquire_sync(plan.model, plan.demand, priority=priority, timeout=timeout)
        return limiter.acquire_demand(plan.model, plan.demand, priority=priority, timeout=timeout)

    def _now(self) -> float:
        return self._limiter._now()  # the limiter's clock, so cache TTLs and buckets agree

    def _response_started(self, estimate: Estimate | None) -> None:
        if estimate is not None and estimate.cache._touch:  # (else nothing to record: no clock read)
            # the prefixes this request writes are cached from the start of its response
            self._estimator.predictor.record(estimate, self._now())

    def _output_chars_per_token(self, estimate: Estimate | None) -> float:
        with self._lock:
            return self._output_cpt.get(estimate.family if estimate is not None else "", _OUTPUT_CPT)

    def _learn_output(self, estimate: Estimate | None, outcome: BodyOutcome) -> None:
        """Learn characters per output token from a finished stream, for the next running estimates."""
        output = _number(outcome.usage.get("output_tokens")) or 0.0
        if estimate is None or output < 20 or outcome.output_chars <= 0:
            return  # too little text to say anything
        sample = outcome.output_chars / output
        with self._lock:
            old = self._output_cpt.get(estimate.family)
            self._output_cpt[estimate.family] = sample if old is None else old + 0.2 * (sample - old)

    def _learn(
        self, estimate: Estimate | None, usage: Mapping[str, Any], credits: float | None, *, complete: bool
    ) -> None:
        if not complete:
            return  # a cut stream's output says nothing about how much the model writes
        if estimate is not None:
            self._estimator.observe(estimate, usage)
        if credits is not None and self._wallet is not None:
            self._wallet.learn(Usage.from_any(usage), credits)

    def _count_target(
        self, request: anthropic.APIRequest, route: str
    ) -> tuple[Mapping[str, Any] | None, int | None]:
        """The body to count exactly (None: don't), and its count if already known."""
        body = request.json
        if route != _MESSAGES or (self._counter is None and not self._count_tokens):
            return None, None
        if not isinstance(body, Mapping):
            return None, None
        with self._lock:
            hit = self._counts.get(id(body))
        return body, hit[1] if hit is not None and hit[0] is body else None

    def _counted(self, body: Mapping[str, Any], count: Callable[[], object]) -> int | None:
        """Run ``count`` and remember its answer for the SDK's retries of the same body."""
        try:
            counted = count()
        except ConfigurationError:
            raise
        except Exception:
            log.warning("exact token count failed; using the estimate", exc_info=True)
            return None
        if not isinstance(counted, int) or isinstance(counted, bool) or counted < 0:
            raise ConfigurationError(f"the token counter must return a non-negative int, got {counted!r}")
        with self._lock:
            self._counts[id(body)] = (body, counted)  # the body is kept, so its id is not reused meanwhile
            while len(self._counts) > _COUNT_CACHE:
                self._counts.popitem(last=False)
        return counted

    # -- batches

    def _batch_created(self, body: object, requests: int) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            return
        with self._lock:
            self._open_batches[body["id"]] = requests
        if body.get("processing_status") == "ended":
            self._batch_ended(body["id"])

    def _batches_seen(self, body: object, method: str, path: str) -> None:
        batch_id = _batch_id_from_path(path)
        if batch_id is not None and (method.upper() == "DELETE" or path.rstrip("/").endswith("/results")):
            self._batch_ended(batch_id)  # only an ended batch can be deleted or have results
        batches: list[object] = []
        if isinstance(body, dict):
            data = body.get("data")
            batches = data if isinstance(data, list) else [body]
        for batch in batches:
            if isinstance(batch, dict) and batch.get("processing_status") == "ended":
                batch_id = batch.get("id")
                if isinstance(batch_id, str):
                    self._batch_ended(batch_id)

    def _batch_ended(self, batch_id: str) -> None:
        with self._lock:
            requests = self._open_batches.pop(batch_id, 0)
        if requests:
            self._limiter.batch_finished(requests)


def _attach(parsed: object, snapshot: RateLimitSnapshot) -> None:
    if isinstance(parsed, anthropic.BaseModel):
        attach_meta(parsed, snapshot)


def _unbound() -> ConfigurationError:
    return ConfigurationError(
        "count_tokens=True needs the client: use ratekeeper.anthropic.wrap(client, count_tokens=True) "
        "or middleware.bind(client)"
    )


def _max_tokens(body: Mapping[str, Any]) -> int:
    value = body.get("max_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _count_args(body: Mapping[str, Any]) -> dict[str, Any]:
    return {key: body[key] for key in _COUNT_FIELDS if key in body}


def _with_count(demand: Demand, counted: int) -> Demand:
    """``demand`` with its input scaled to an exact count, keeping the estimated cache split."""
    total = demand.input_tokens + demand.cache_read_input_tokens + demand.cache_creation_input_tokens
    if total <= 0:
        return attrs.evolve(demand, input_tokens=counted)
    read = demand.cache_read_input_tokens * counted // total
    write = demand.cache_creation_input_tokens * counted // total
    return attrs.evolve(
        demand,
        input_tokens=counted - read - write,
        cache_read_input_tokens=read,
        cache_creation_input_tokens=write,
        cache_creation_1h_input_tokens=min(demand.cache_creation_1h_input_tokens * counted // total, write),
    )


def _in_event_loop() -> bool:
    try:
        sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return False
    return True


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
