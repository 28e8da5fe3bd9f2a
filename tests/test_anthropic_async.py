"""RateLimitMiddleware on ``AsyncAnthropic`` against the emulator, on asyncio and trio."""

from __future__ import annotations

import gc
from typing import Any

import anthropic
import anyio
import httpx2
import pytest
from anthropic_support import (
    HELLO,
    MODEL,
    POOL,
    Spy,
    async_client,
    emulator,
    in_flight,
    middleware_of,
    spy,
)

from ratekeeper import CapacityExceeded, Limiter, meta
from ratekeeper.anthropic import RateLimitMiddleware

pytestmark = pytest.mark.anyio
__all__ = ["spy"]  # the fixture, imported for pytest


def _settled_matches(spy: Spy, record: Any) -> None:
    usage = spy.settled[-1].usage
    assert (usage.input_tokens, usage.output_tokens) == (record.input_tokens, record.planned_output_tokens)
    assert usage.cache_read_input_tokens == record.cache_read_input_tokens


async def test_create_settles_to_the_servers_usage(spy: Spy) -> None:
    server = emulator()
    limiter = Limiter("tier-1")
    client = async_client(server, limiter)
    message = await client.messages.create(model=MODEL, max_tokens=200, messages=HELLO)
    record = server.log[0]
    assert message.usage.output_tokens == record.planned_output_tokens
    assert len(spy.settled) == 1
    assert not spy.released
    _settled_matches(spy, record)
    assert meta(message).request_id == record.request_id == message._request_id
    assert meta(message).request_limit is not None
    assert in_flight(limiter) == 0
    # the estimator learned from the usage
    estimator = middleware_of(client).estimator
    assert estimator.calibration(estimator.family_of(MODEL)).observations == 1


async def test_stream_settles_on_the_last_message_delta_and_charges_output_as_it_comes(spy: Spy) -> None:
    server = emulator()
    limiter = Limiter("tier-1", output_rule="actual")
    client = async_client(server, limiter)
    stream = await client.messages.create(
        model=MODEL,
        max_tokens=1000,
        messages=HELLO,
        stream=True,
        extra_headers={"x-emulator-output-tokens": "600"},
    )
    assert in_flight(limiter) == 1  # held while the body comes
    kinds = [event.type async for event in stream]
    assert kinds[-1] == "message_stop"
    record = server.log[0]
    assert record.planned_output_tokens == 600
    _settled_matches(spy, record)
    # output was charged progressively, in steps, before the final count came
    assert len(spy.outputs) > 3
    assert spy.outputs == sorted(spy.outputs)
    assert in_flight(limiter) == 0
    assert meta(stream).request_id == record.request_id
    # the first stream taught the middleware this family's characters per output token
    spy.outputs.clear()
    stream = await client.messages.create(
        model=MODEL,
        max_tokens=1000,
        messages=HELLO,
        stream=True,
        extra_headers={"x-emulator-output-tokens": "600"},
    )
    async with stream:
        async for _ in stream:
            pass
    assert 540 <= max(spy.outputs) <= 660


async def test_stream_helper_settles(spy: Spy) -> None:
    server = emulator()
    limiter = Limiter("tier-1")
    client = async_client(server, limiter)
    async with client.messages.stream(model=MODEL, max_tokens=300, messages=HELLO) as stream:
        final = await stream.get_final_message()
    assert final.usage.output_tokens == server.log[0].planned_output_tokens
    _settled_matches(spy, server.log[0])
    assert meta(stream).request_id == server.log[0].request_id
    assert in_flight(limiter) == 0


async def test_stream_closed_early_settles_what_was_seen(spy: Spy) -> None:
    server = emulator()
    limiter = Limiter("tier-1")
    client = async_client(server, limiter)
    headers = {"x-emulator-output-tokens": "2000"}
    stream = await client.messages.create(
        model=MODEL, max_tokens=4000, messages=HELLO, stream=True, extra_headers=headers
    )
    seen = 0
    async for _event in stream:
        seen += 1
        if seen == 10:
            break
    await stream.close()
    assert server.log[0].abandoned
    assert len(spy.settled) == 1
    usage = spy.settled[0].usage
    assert usage.input_tokens == server.log[0].input_tokens
    # what the deltas showed, not the 4000 reserved and not the 2000 the server planned
    assert 1 <= usage.output_tokens < 2000
    assert in_flight(limiter) == 0


async def test_stream_left_to_the_garbage_collector_is_settled(spy: Spy) -> None:
    server = emulator()
    limiter = Limiter("tier-1")
    client = async_client(server, limiter)
    stream = await client.messages.create(model=MODEL, max_tokens=500, messages=HELLO, stream=True)
    async for _ in stream:
        break
    never_read = await client.messages.create(model=MODEL, max_tokens=500, messages=HELLO, stream=True)
    assert in_flight(limiter) == 2
    del stream, never_read
    gc.collect()
    await anyio.sleep(0.01)  # the event loop finalizes the dropped async generator
    await client.messages.create(model=MODEL, max_tokens=5, messages=HELLO)  # drains deferred settlements
    assert in_flight(limiter) == 0
    assert len(spy.settled) + len(spy.released) == 3


async def test_stream_cut_by_an_error_event(spy: Spy) -> None:
    server = emulator(midstream_error_probability=1.0)
    limiter = Limiter("tier-1")
    client = async_client(server, limiter)
    stream = await client.messages.create(model=MODEL, max_tokens=500, messages=HELLO, stream=True)
    with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
        async for _ in stream:
            pass
    assert in_flight(limiter) == 0
    assert len(spy.settled) == 1
    assert spy.settled[0].usage.input_tokens == server.log[0].input_tokens
    assert limiter.statistics().pools[POOL].overloaded == 1


async def test_a_request_larger_than_the_bucket_fails_before_sending() -> None:
    server = emulator()
    limiter = Limiter("tier-1")  # Sonnet 4.x: 8,000 OTPM
    client = async_client(server, limiter)
    message = (
        rf"^{MODEL} \({POOL} pool\): a request needing 20,000 output_tokens can never be admitted: "
        r"the output_tokens bucket holds at most 8,000$"
    )
    with pytest.raises(CapacityExceeded, match=message):
        await client.messages.create(model=MODEL, max_tokens=20_000, messages=HELLO)
    assert list(server.log) == []
    assert in_flight(limiter) == 0


@pytest.mark.parametrize("anyio_backend", ["trio"], indirect=True)
async def test_sdk_retries_wait_in_the_pool(anyio_backend: Any) -> None:
    # the server allows 3 requests a minute; the limiter believes 50 and is not allowed to learn
    server = emulator(limits={POOL: _limits(rpm=3)})
    limiter = Limiter("tier-1", learn_limits=False)
    client = async_client(server, limiter, max_retries=5)
    start = anyio.current_time()
    for _ in range(5):
        await client.messages.create(model=MODEL, max_tokens=10, messages=HELLO)
    statuses = [r.status for r in server.log]
    assert statuses.count(200) == 5
    assert 429 in statuses
    stats = limiter.statistics().pools[POOL]
    # every HTTP attempt was a grant, and every 429 paused the pool
    assert stats.granted == len(statuses)
    assert stats.rate_limited == statuses.count(429)
    assert in_flight(limiter) == 0
    assert anyio.current_time() - start >= 20  # the 4th and 5th waited for refills


@pytest.mark.parametrize("anyio_backend", ["trio"], indirect=True)
async def test_a_429_storm_is_met_once_then_waited_out(anyio_backend: Any) -> None:
    # 20 tasks at once on a server enforcing 10 RPM as 1 per 6 s; the limiter starts wrong (50 RPM)
    async def run(client: anthropic.AsyncAnthropic) -> list[int]:
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(lambda: client.messages.create(model=MODEL, max_tokens=10, messages=HELLO))
        return [r.status for r in server.log]

    server = emulator(limits={POOL: _limits(rpm=10)}, enforcement_interval=6.0)
    plain = anthropic.AsyncAnthropic(
        api_key="test",
        http_client=httpx2.AsyncClient(transport=_transport(server)),
        base_url="http://emulator",
        max_retries=50,
    )
    baseline = (await run(plain)).count(429)

    server = emulator(limits={POOL: _limits(rpm=10)}, enforcement_interval=6.0)
    limiter = Limiter("tier-1")
    statuses = await run(async_client(server, limiter, max_retries=50))
    assert statuses.count(200) == 20
    # Without the limiter every request meets its own 429s, retries included (47 to 190 in
    # twelve runs: the SDK's retry jitter is random, so that count is no yardstick); with it,
    # at most the first wave does (19 of 20, the limiter starting at 50 RPM) and the pool,
    # paused, then resynced and learned, holds the rest (0 to 12 in the same runs).
    assert statuses.count(429) < 20 <= baseline
    assert in_flight(limiter) == 0


@pytest.mark.parametrize("anyio_backend", ["trio"], indirect=True)
async def test_a_long_retry_after_holds_every_request_of_the_pool(anyio_backend: Any) -> None:
    server = emulator(limits={POOL: _limits(rpm=1)})
    limiter = Limiter("tier-1", learn_limits=False)
    client = async_client(server, limiter, max_retries=1)
    await client.messages.create(model=MODEL, max_tokens=10, messages=HELLO)
    with pytest.raises(anthropic.RateLimitError):
        await client.with_options(max_retries=0).messages.create(model=MODEL, max_tokens=10, messages=HELLO)
    refused = server.log[-1]
    assert refused.status == 429
    assert refused.retry_after is not None
    assert refused.retry_after >= 50
    paused = limiter.statistics().pools[POOL].paused_for
    assert paused >= 50

    async def one() -> None:
        await client.with_options(max_retries=10).messages.create(model=MODEL, max_tokens=10, messages=HELLO)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(one)
    later = server.log[2:]
    # nobody reached the server while the pool was held
    assert all(r.arrival >= refused.arrival + refused.retry_after - 1 for r in later)
    assert in_flight(limiter) == 0


async def test_cancelled_requests_release_their_permits() -> None:
    server = emulator()
    limiter = Limiter("tier-1")
    client = async_client(server, limiter)
    with anyio.move_on_after(0.005):
        await client.messages.create(
            model=MODEL, max_tokens=2000, messages=HELLO, extra_headers={"x-emulator-output-tokens": "1500"}
        )
    assert in_flight(limiter) == 0


async def test_connection_errors_give_everything_back(spy: Spy) -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused", request=request)

    # a frozen clock: levels show every draw exactly
    limiter = Limiter("tier-1", opening=60, clock=lambda: 0.0)
    client = anthropic.AsyncAnthropic(
        api_key="test",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(refuse)),
        base_url="http://emulator",
        max_retries=2,
        middleware=[RateLimitMiddleware(limiter)],
    )
    with pytest.raises(anthropic.APIConnectionError):
        await client.messages.create(model=MODEL, max_tokens=100, messages=HELLO)
    stats = limiter.statistics().pools[POOL]
    assert stats.granted == 3
    assert len(spy.released) == 3
    assert stats.levels["requests"] == 50
    assert stats.levels["output_tokens"] == 8000
    assert in_flight(limiter) == 0


async def test_raw_and_streaming_responses() -> None:
    server = emulator()
    limiter = Limiter("tier-1")
    client = async_client(server, limiter)
    raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=20, messages=HELLO)
    assert meta(raw).request_id == raw.headers["request-id"]
    assert meta(await raw.parse()).request_id == raw.headers["request-id"]
    async with client.messages.with_streaming_response.create(
        model=MODEL, max_tokens=20, messages=HELLO
    ) as response:
        message = await response.parse()
    assert message.usage.output_tokens == server.log[-1].planned_output_tokens
    assert in_flight(limiter) == 0


def _limits(*, rpm: int) -> Any:
    from ratekeeper.emulator import PoolLimits

    return PoolLimits(rpm=rpm, itpm=30_000, otpm=8_000)


def _transport(server: Any) -> Any:
    from ratekeeper.emulator import EmulatorTransport

    return EmulatorTransport(server)


def _refuse_then_answer(failures: list[str]) -> Any:
    """A transport handler: each attempt takes the next failure ("429" or "connect"), then answers."""
    message = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "Fine, thanks."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 4},
    }
    refused = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}

    def handle(request: httpx2.Request) -> httpx2.Response:
        if failures:
            if failures.pop(0) == "connect":
                raise httpx2.ConnectError("connection refused", request=request)
            return httpx2.Response(429, headers={"retry-after-ms": "1"}, json=refused)
        return httpx2.Response(200, json=message)

    return handle


def _count_scans(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The bodies the middleware scans, in order (the real scan still runs)."""
    import ratekeeper.anthropic._plan
    import ratekeeper.estimate._body_scan
    import ratekeeper.estimate._estimator

    scanned: list[object] = []
    real = ratekeeper.estimate._body_scan.scan_body

    def scan(body: object) -> Any:
        scanned.append(body)
        return real(body)

    # wherever a scan can start from
    for module in (ratekeeper.estimate._estimator, ratekeeper.anthropic._plan):
        monkeypatch.setattr(module, "scan_body", scan, raising=False)
    return scanned


async def test_a_retried_request_is_scanned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    scanned = _count_scans(monkeypatch)
    demands: list[Any] = []
    limiter = Limiter("tier-1")
    acquire = limiter.acquire_demand

    def spy_acquire(model: str, demand: Any, **options: Any) -> Any:
        demands.append(demand)
        return acquire(model, demand, **options)

    monkeypatch.setattr(limiter, "acquire_demand", spy_acquire)
    failures = ["429", "connect"]
    client = anthropic.AsyncAnthropic(
        api_key="test",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(_refuse_then_answer(failures))),
        base_url="http://mock",
        max_retries=2,
        middleware=[RateLimitMiddleware(limiter)],
    )
    await client.messages.create(model=MODEL, max_tokens=100, messages=HELLO)
    assert failures == []  # three attempts: a 429, a refused connection, an answer
    assert len(demands) == 3
    assert len(scanned) == 1
    assert demands[0] == demands[1] == demands[2]  # the retries reserve what a fresh estimate would
    # another call is another body: scanned anew, even with the same content
    await client.messages.create(model=MODEL, max_tokens=100, messages=HELLO)
    assert len(scanned) == 2
    assert scanned[0] is not scanned[1]
    assert in_flight(limiter) == 0
