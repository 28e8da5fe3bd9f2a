"""RateLimitMiddleware on the sync ``Anthropic`` client against the emulator."""

from __future__ import annotations

import gc

import anthropic
import httpx2
import pytest
from anthropic_support import HELLO, MODEL, POOL, Spy, emulator, in_flight, middleware_of, spy, sync_client

from ratekeeper import CapacityExceeded, Limiter, meta
from ratekeeper.anthropic import RateLimitMiddleware

__all__ = ["spy"]  # the fixture, imported for pytest


def test_create_settles_and_attaches_meta(spy: Spy) -> None:
    server = emulator()
    limiter = Limiter("tier-1")
    client = sync_client(server, limiter)
    message = client.messages.create(model=MODEL, max_tokens=100, messages=HELLO)
    record = server.log[0]
    assert spy.settled[0].usage.output_tokens == record.planned_output_tokens == message.usage.output_tokens
    assert spy.settled[0].usage.input_tokens == record.input_tokens
    assert meta(message).request_id == record.request_id
    assert in_flight(limiter) == 0


def test_stream_read_closed_early_and_dropped(spy: Spy) -> None:
    server = emulator()
    limiter = Limiter("tier-1")
    client = sync_client(server, limiter)
    with client.messages.stream(model=MODEL, max_tokens=300, messages=HELLO) as stream:
        final = stream.get_final_message()
    assert spy.settled[-1].usage.output_tokens == final.usage.output_tokens

    with client.messages.stream(
        model=MODEL, max_tokens=3000, messages=HELLO, extra_headers={"x-emulator-output-tokens": "2000"}
    ) as stream:
        for i, _ in enumerate(stream):
            if i == 5:
                break
    assert server.log[1].abandoned
    assert 1 <= spy.settled[-1].usage.output_tokens < 2000

    raw_stream = client.messages.create(model=MODEL, max_tokens=300, messages=HELLO, stream=True)
    next(iter(raw_stream))
    never_read = client.messages.create(model=MODEL, max_tokens=300, messages=HELLO, stream=True)
    assert in_flight(limiter) == 2
    del raw_stream, never_read
    gc.collect()
    client.messages.create(model=MODEL, max_tokens=5, messages=HELLO)  # drains deferred settlements
    assert in_flight(limiter) == 0


def test_stream_cut_by_an_error_event(spy: Spy) -> None:
    server = emulator(midstream_error_probability=1.0)
    limiter = Limiter("tier-1")
    client = sync_client(server, limiter)
    with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
        for _ in client.messages.create(model=MODEL, max_tokens=100, messages=HELLO, stream=True):
            pass
    assert in_flight(limiter) == 0
    assert limiter.statistics().pools[POOL].overloaded == 1


def test_a_request_larger_than_the_bucket_fails_before_sending() -> None:
    server = emulator()
    client = sync_client(server, Limiter("tier-1"))
    with pytest.raises(
        CapacityExceeded, match=r"can never be admitted: the output_tokens bucket holds at most 8,000$"
    ):
        client.messages.create(model=MODEL, max_tokens=9000, messages=HELLO)
    assert list(server.log) == []


def test_a_retry_acquires_again() -> None:
    # 529s pause the pool for a short backoff; the SDK's retries each wait for a permit
    server = emulator(overload_probability=0.5, seed=3)
    limiter = Limiter("tier-1")
    client = sync_client(server, limiter, max_retries=4)
    for _ in range(3):
        client.messages.create(model=MODEL, max_tokens=5, messages=HELLO)
    statuses = [r.status for r in server.log]
    assert 529 in statuses
    stats = limiter.statistics().pools[POOL]
    assert stats.granted == len(statuses)
    assert stats.overloaded == statuses.count(529)
    assert in_flight(limiter) == 0


def test_connection_errors_give_everything_back() -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused", request=request)

    limiter = Limiter("tier-1", opening=60, clock=lambda: 0.0)
    client = anthropic.Anthropic(
        api_key="test",
        http_client=httpx2.Client(transport=httpx2.MockTransport(refuse)),
        base_url="http://emulator",
        max_retries=0,
        middleware=[RateLimitMiddleware(limiter)],
    )
    with pytest.raises(anthropic.APIConnectionError):
        client.messages.create(model=MODEL, max_tokens=100, messages=HELLO)
    levels = limiter.statistics().pools[POOL].levels
    assert (levels["requests"], levels["output_tokens"]) == (50, 8000)


def test_one_middleware_serves_sync_and_async_clients() -> None:
    server = emulator()
    client = sync_client(server, Limiter("tier-1"))
    middleware = middleware_of(client)
    async_client = anthropic.AsyncAnthropic(api_key="test", middleware=[middleware])
    assert middleware in async_client.middleware


def test_wrapping_twice_is_refused() -> None:
    from ratekeeper import ConfigurationError
    from ratekeeper.anthropic import wrap

    client = sync_client(emulator(), Limiter("tier-1"))
    with pytest.raises(ConfigurationError, match=r"^this client already has a RateLimitMiddleware$"):
        wrap(client)


def test_a_retried_request_is_scanned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_anthropic_async import _count_scans, _refuse_then_answer

    scanned = _count_scans(monkeypatch)
    limiter = Limiter("tier-1")
    failures = ["429", "429"]
    client = anthropic.Anthropic(
        api_key="test",
        http_client=httpx2.Client(transport=httpx2.MockTransport(_refuse_then_answer(failures))),
        base_url="http://mock",
        max_retries=2,
        middleware=[RateLimitMiddleware(limiter)],
    )
    client.messages.create(model=MODEL, max_tokens=100, messages=HELLO)
    assert failures == []
    assert limiter.statistics().pools[POOL].granted == 3
    assert len(scanned) == 1
    assert in_flight(limiter) == 0


def test_remembered_url_paths_are_bounded() -> None:
    from ratekeeper.anthropic import _plan

    for i in range(3000):
        assert _plan._path_of(f"http://x/v1/messages/batches/b{i}?q=1") == f"/v1/messages/batches/b{i}"
    assert len(_plan._paths) <= _plan._MAX_PATHS


def test_remembered_routes_are_bounded_and_read_the_body_each_time() -> None:
    from types import SimpleNamespace

    from ratekeeper.anthropic import _plan

    for i in range(3000):
        batch = SimpleNamespace(url=f"http://x/v1/messages/batches/b{i}", method="GET", json=None)
        assert _plan._route(batch) == _plan._BATCH  # type: ignore[arg-type]
    assert len(_plan._routes) <= _plan._MAX_PATHS
    url = "http://x/v1/messages"
    priced = SimpleNamespace(url=url, method="POST", json={"model": MODEL})
    unpriced = SimpleNamespace(url=url, method="POST", json={"messages": []})
    for _ in range(2):  # a remembered URL still has its body looked at
        assert _plan._route(priced) == _plan._MESSAGES  # type: ignore[arg-type]
        assert _plan._route(unpriced) is None  # type: ignore[arg-type]
    assert _plan._route(SimpleNamespace(url=url, method="GET", json=None)) is None  # type: ignore[arg-type]
