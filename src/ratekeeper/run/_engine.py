"""``run_requests``: many requests through one wrapped ``AsyncAnthropic``, as fast as the limits allow.

Workers each take the next request and send it through the client; the
client's ``RateLimitMiddleware`` makes each attempt wait for capacity, so the
limiter, not a semaphore, sets the pace. The workers only keep it supplied: a
few start, and one more joins whenever every worker is busy and none is
waiting in the limiter's queue (the limiter would admit more than they send),
up to ``max_concurrency``. An attempt counter sits inside the middleware (it
runs once a permit is granted), so each result says how many HTTP attempts it
took and a stop can tell a request still waiting for capacity (withdrawn)
from one already sent (left to finish).
"""

from __future__ import annotations

import contextvars
import inspect
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

import anyio
import attrs
from anyio.streams.memory import MemoryObjectSendStream

from ratekeeper.errors import CapacityExceeded, ConfigurationError, RateKeeperError, UnknownModelError
from ratekeeper.gate._limiter import Limiter
from ratekeeper.run._requests import BatchRequest, parse_request
from ratekeeper.run._results import RequestResult

if TYPE_CHECKING:
    import anthropic

__all__ = ["DEFAULT_MAX_CONCURRENCY", "STREAM_ABOVE", "run_requests"]

DEFAULT_MAX_CONCURRENCY: Final = 256
#: Workers at the start; more join while the limiter admits everything they send.
_FIRST_WORKERS: Final = 4
#: From this ``max_tokens`` on a request is streamed: its output tokens settle as they come
#: (and the SDK refuses long non-streaming requests anyway).
STREAM_ABOVE: Final = 8192
#: Body fields never passed as keyword arguments (they are the SDK's request options).
_NOT_FIELDS: Final = frozenset({"extra_headers", "extra_query", "extra_body", "timeout", "stream"})


@attrs.define(eq=False)
class _Flight:
    """One request on its way: the attempts sent so far and the scope that withdraws it."""

    scope: anyio.CancelScope
    attempts: int = 0


_FLIGHT: contextvars.ContextVar[_Flight | None] = contextvars.ContextVar("ratekeeper_run", default=None)


async def _count_attempt(request: Any, call_next: Any) -> Any:
    # client middleware, inside RateLimitMiddleware: runs once per attempt with its permit granted
    flight = _FLIGHT.get()
    if flight is not None:
        if flight.attempts == 0 and flight.scope.cancel_called:
            # a stop withdrew it between its grant and here: the cancel must land now, before
            # the transport's first checkpoint, where the server may already have it
            await anyio.lowlevel.checkpoint()
        flight.attempts += 1
    return await call_next(request)


async def run_requests(
    client: anthropic.AsyncAnthropic,
    requests: Iterable[BatchRequest | Mapping[str, Any]] | AsyncIterable[BatchRequest | Mapping[str, Any]],
    *,
    limiter: Limiter | None = None,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    stop: anyio.Event | None = None,
    stream_above: int = STREAM_ABOVE,
) -> AsyncGenerator[RequestResult, None]:
    """Send ``requests`` through ``client`` within the rate limits; yield each result as it finishes.

    ``requests`` are in the Message Batches API's request format
    (``{"custom_id": ..., "params": {...}}`` or :class:`BatchRequest`), from
    a plain or an async iterable, read only as fast as they are sent. Results
    come in the order they finish, in the Batches API's result format (see
    :class:`RequestResult`): an API error (after the SDK's retries) is an
    ``errored`` result, not an exception. A malformed request or a repeated
    ``custom_id`` raises ``ConfigurationError``; so do errors that end every
    request alike (``SpendLimitReached``, ``InsufficientCredits``,
    ``BackendUnavailable``).

    ``client`` is wrapped with ``ratekeeper.anthropic.wrap(client, limiter)``
    unless it already is (then ``limiter`` must not be given). The limiter
    decides when each request is sent; workers are added while it admits
    everything they send, up to ``max_concurrency`` requests on their way at
    once (waiting for capacity or in flight). Once
    ``stop`` is set no request starts; those still waiting for capacity are
    withdrawn (no result: they were never sent) and those sent finish.
    Cancelling the iteration cancels those too; every permit is settled or
    released by the middleware. Requests with ``max_tokens >= stream_above``
    are streamed.

    Close the iterator where it is used (``contextlib.aclosing``), as any
    async generator that runs tasks::

        async with contextlib.aclosing(run_requests(client, requests)) as results:
            async for result in results:
                ...
    """
    if not isinstance(max_concurrency, int) or isinstance(max_concurrency, bool) or max_concurrency < 1:
        raise ConfigurationError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
    client = _prepared(client, limiter)
    fields = _field_names(client)
    results_send, results_receive = anyio.create_memory_object_stream[RequestResult](max_concurrency)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                _run_all, client, fields, requests, max_concurrency, stop, stream_above, results_send
            )
            async with results_receive:
                async for result in results_receive:
                    try:
                        yield result
                    except GeneratorExit:
                        # closed early (the caller left its loop): cancel the rest here, where the
                        # task group lives, instead of letting GeneratorExit pass through it
                        tg.cancel_scope.cancel()
                        break
    except BaseExceptionGroup as group:
        raise _single(group) from None


async def _run_all(
    client: anthropic.AsyncAnthropic,
    fields: frozenset[str],
    requests: Iterable[BatchRequest | Mapping[str, Any]] | AsyncIterable[BatchRequest | Mapping[str, Any]],
    limit: int,
    stop: anyio.Event | None,
    stream_above: int,
    results: MemoryObjectSendStream[RequestResult],
) -> None:
    limiter = limiter_of(client)
    jobs_send, jobs = anyio.create_memory_object_stream[BatchRequest]()
    flights: set[_Flight] = set()
    feeding = anyio.CancelScope()
    crew = _Crew()

    async def feed() -> None:
        with feeding:
            async with jobs_send:
                async for request in _checked(requests):
                    await jobs_send.send(request)

    async def work(out: MemoryObjectSendStream[RequestResult]) -> None:
        async with out:
            async for request in jobs:
                if stop is not None and stop.is_set():
                    return  # taken just as the stop came: never started, so it stays to do
                crew.busy += 1
                if crew.busy == crew.size < limit and not _queued(limiter):
                    # every worker busy and none waiting for capacity: the limiter would admit
                    # more than the workers send, so one more (the limiter, not a guess, decides)
                    crew.size += 1
                    tg.start_soon(work, results.clone())
                result = await _one(client, fields, request, stream_above, flights)
                crew.busy -= 1
                if result is not None:
                    await out.send(result)

    async def withdraw_on_stop(event: anyio.Event) -> None:
        await event.wait()
        feeding.cancel()
        for flight in list(flights):
            if flight.attempts == 0:  # still waiting for capacity: nothing sent, nothing to wait for
                flight.scope.cancel()

    try:
        async with results, jobs, anyio.create_task_group() as watch:
            if stop is not None:
                watch.start_soon(withdraw_on_stop, stop)
            async with anyio.create_task_group() as tg:
                tg.start_soon(feed)
                crew.size = min(_FIRST_WORKERS, limit)
                for _ in range(crew.size):
                    tg.start_soon(work, results.clone())
            watch.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _single(group) from None


@attrs.define
class _Crew:
    """How many workers there are and how many are sending (or waiting for capacity)."""

    size: int = 0
    busy: int = 0


def _queued(limiter: Limiter | None) -> int:
    if limiter is None:
        return 0
    return sum(pool.queue_depth for pool in limiter.statistics().pools.values())


async def _checked(
    requests: Iterable[BatchRequest | Mapping[str, Any]] | AsyncIterable[BatchRequest | Mapping[str, Any]],
) -> AsyncIterator[BatchRequest]:
    seen: set[str] = set()
    index = 0
    async for item in _aiter(requests):
        request = item if isinstance(item, BatchRequest) else _parse(item, index)
        if request.custom_id in seen:
            where = f"line {request.line}" if request.line is not None else f"request {index}"
            raise ConfigurationError(f"{where}: custom_id {request.custom_id!r} is repeated")
        seen.add(request.custom_id)
        index += 1
        yield request


def _parse(item: object, index: int) -> BatchRequest:
    try:
        return parse_request(item)
    except ConfigurationError as exc:
        raise ConfigurationError(f"request {index}: {exc}") from None


async def _aiter(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
            await anyio.lowlevel.checkpoint()


async def _one(
    client: anthropic.AsyncAnthropic,
    fields: frozenset[str],
    request: BatchRequest,
    stream_above: int,
    flights: set[_Flight],
) -> RequestResult | None:
    """Send one request; its result, or None if a stop withdrew it before it was sent."""
    flight = _Flight(anyio.CancelScope())
    flights.add(flight)
    token = _FLIGHT.set(flight)
    started, clock = time.time(), anyio.current_time()
    try:
        with flight.scope:
            result = await _send(client, fields, request.params, stream_above)
    finally:
        _FLIGHT.reset(token)
        flights.discard(flight)
    if flight.scope.cancelled_caught:
        return None
    return RequestResult(
        request.custom_id, result, flight.attempts, started, anyio.current_time() - clock, request.line
    )


async def _send(
    client: anthropic.AsyncAnthropic, fields: frozenset[str], params: Mapping[str, Any], stream_above: int
) -> dict[str, Any]:
    import anthropic

    kwargs = {k: v for k, v in params.items() if k in fields}
    extra = {k: v for k, v in params.items() if k not in fields}
    if extra:
        kwargs["extra_body"] = extra
    try:
        if params["max_tokens"] >= stream_above:
            async with client.messages.stream(**kwargs) as stream:
                message = await stream.get_final_message()
        else:
            message = await client.messages.create(**kwargs)
    except anthropic.APIStatusError as exc:
        return _errored(exc.body, exc.status_code, str(exc))
    except anthropic.APITimeoutError as exc:
        return _errored(None, "timeout_error", str(exc))
    except anthropic.APIConnectionError as exc:
        return _errored(None, "api_connection_error", str(exc))
    except anthropic.APIError as exc:  # e.g. an error event in the middle of a stream
        return _errored(exc.body, "api_error", str(exc))
    except (CapacityExceeded, UnknownModelError) as exc:
        # never sendable under these limits: this request's fault, not the run's
        return _errored(None, "invalid_request_error", f"ratekeeper: {exc}")
    return {"type": "succeeded", "message": message.to_dict(mode="json", exclude_unset=False)}


def _errored(body: object, kind: int | str, message: str) -> dict[str, Any]:
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        error = dict(body)
    else:
        detail = {"type": _status_type(kind), "message": message}
        error = {"type": "error", "error": detail}
    return {"type": "errored", "error": error}


_STATUS_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _status_type(kind: int | str) -> str:
    return kind if isinstance(kind, str) else _STATUS_TYPES.get(kind, "api_error")


def _prepared(client: anthropic.AsyncAnthropic, limiter: Limiter | None) -> anthropic.AsyncAnthropic:
    # the import raises MissingDependency with the install hint when the SDK is absent
    import anthropic

    from ratekeeper.anthropic import RateLimitMiddleware, wrap

    if not isinstance(client, anthropic.AsyncAnthropic):
        raise ConfigurationError(f"client must be an anthropic.AsyncAnthropic, got {type(client).__name__}")
    if not any(isinstance(m, RateLimitMiddleware) for m in client.middleware):
        client = wrap(client, limiter)
    elif limiter is not None:
        raise ConfigurationError("the client is already wrapped with a limiter; do not give another one")
    return client.with_middleware(_count_attempt)


def _field_names(client: anthropic.AsyncAnthropic) -> frozenset[str]:
    return frozenset(inspect.signature(client.messages.create).parameters) - _NOT_FIELDS


def _single(group: BaseExceptionGroup[Any]) -> BaseException:
    """The one ratekeeper error a task group failed with, else the group itself."""
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    errors = [e for e in leaves if not isinstance(e, anyio.get_cancelled_exc_class())]
    if len(errors) == 1 and isinstance(errors[0], RateKeeperError | ValueError | TypeError):
        return errors[0]
    return group


def limiter_of(client: anthropic.AsyncAnthropic) -> Limiter | None:
    """The limiter of ``client``'s ``RateLimitMiddleware``, if it has one."""
    from ratekeeper.anthropic import RateLimitMiddleware

    for m in client.middleware:
        if isinstance(m, RateLimitMiddleware):
            return m.limiter
    return None
