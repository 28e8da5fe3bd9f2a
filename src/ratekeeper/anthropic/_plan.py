"""What one attempt asks of the limiter: its route, its ``Demand``, and the acquire it waits in.

``_route`` tells the endpoints apart by URL: Messages, ``count_tokens`` and the
batches are gated, anything else passes untouched. ``_Planner``, the base of
``RateLimitMiddleware``, reads a Messages body into a ``Demand`` (the
estimator's scan, an exact count when asked for, a wallet's credits), keeps the
memos that let the SDK's retries of one body be scanned and counted once, and
picks the limiter's acquire for the route.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import anthropic
import attrs

from ratekeeper.anthropic._wallet import WalletPricing
from ratekeeper.core._accounting import Demand
from ratekeeper.errors import BodyFieldError, ConfigurationError, UnknownModelError
from ratekeeper.estimate._body_scan import Scan, scan_body
from ratekeeper.estimate._estimator import Estimate, TokenEstimator
from ratekeeper.gate._limiter import Limiter

__all__ = ["Counter"]

log = logging.getLogger("ratekeeper.anthropic")

#: An exact input-token counter: the request body in, its input tokens out (sync, or async for async clients).
Counter = Callable[[Mapping[str, Any]], int] | Callable[[Mapping[str, Any]], Awaitable[int]]

_MESSAGES, _COUNT, _BATCH_CREATE, _BATCH = "messages", "count_tokens", "batch_create", "batch"
#: How many bodies the retry memos (exact counts, scans) hold.
_COUNT_CACHE: Final = 64


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


# (url, method) -> what _url_route says of them: the same few again and again; bounded
_routes: dict[tuple[str, str], str | None] = {}


def _route(request: anthropic.APIRequest) -> str | None:
    key = (request.url, request.method)
    try:
        route = _routes[key]
    except KeyError:
        route = _url_route(_path_of(key[0]).rstrip("/"), key[1].lower())
        if len(_routes) >= _MAX_PATHS:
            _routes.clear()  # batch ids and the like make new URLs
        _routes[key] = route
    if route == _MESSAGES:
        body = request.json
        if (type(body) is dict or isinstance(body, Mapping)) and isinstance(body.get("model"), str):
            return _MESSAGES
        return None  # nothing to price: let the API answer it (a 400)
    return route


def _url_route(path: str, method: str) -> str | None:
    """The route of a path and a lowercased method, before the body is looked at."""
    if path.endswith("/messages/batches") and method == "post":
        return _BATCH_CREATE
    if "/messages/batches" in path:
        return _BATCH
    if method != "post":
        return None
    if path.endswith("/messages/count_tokens"):
        return _COUNT
    if path.endswith("/messages"):
        return _MESSAGES
    return None


# ---------------------------------------------------------------------- the plan


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


class _Planner:
    """The request side of ``RateLimitMiddleware``: a request in, its plan and its permit out.

    Holds no state of its own: ``RateLimitMiddleware.__init__`` sets every attribute named here.
    """

    _limiter: Limiter
    _estimator: TokenEstimator
    _counter: Counter | None
    _count_tokens: bool
    _wallet: WalletPricing | None
    _priority: int
    _timeout: float | None
    _lock: threading.Lock
    _counts: collections.OrderedDict[int, tuple[object, int]]
    _scans: collections.OrderedDict[int, tuple[object, Scan]]

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
            # a body the estimator can't read may still be one the API accepts; the log names
            # the field and what kind of value it holds, never the value (it may be a prompt)
            if isinstance(exc, BodyFieldError):
                log.warning(
                    "cannot estimate this request (%s holds %s); reserving by its size", exc.field, exc.found
                )
            else:
                log.warning("cannot estimate this request (%s); reserving by its size", exc)
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

    def _count_target(
        self, request: anthropic.APIRequest, route: str
    ) -> tuple[Mapping[str, Any] | None, int | None]:
        """The body to count exactly (None: don't), and its count if already known."""
        if route != _MESSAGES or (self._counter is None and not self._count_tokens):
            return None, None
        body = request.json
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


def _max_tokens(body: Mapping[str, Any]) -> int:
    value = body.get("max_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


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
