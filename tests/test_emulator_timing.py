"""The emulator in virtual time: the SDK's retry loop, pacing and abandoned streams (trio MockClock)."""

from __future__ import annotations

import anthropic
import anyio
import httpx2
import pytest
from anthropic.types import MessageParam
from trio.testing import MockClock

from ratekeeper.emulator import (
    EmulatedServer,
    EmulatorConfig,
    EmulatorTransport,
    LatencyModel,
    PoolLimits,
    VirtualClock,
)
from ratekeeper.errors import ConfigurationError

pytestmark = pytest.mark.anyio

LAT = LatencyModel(ttft=0.5, tokens_per_second=100.0, jitter=0.0, error_delay=0.05)
MODEL = "claude-sonnet-4-6"
POOL = "sonnet-4.x"
HELLO: list[MessageParam] = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def anyio_backend() -> object:
    """Trio only: these tests run minutes of traffic in virtual time."""
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


def make(server: EmulatedServer, max_retries: int = 0) -> anthropic.AsyncAnthropic:
    http = httpx2.AsyncClient(transport=EmulatorTransport(server, origin=0.0))
    return anthropic.AsyncAnthropic(
        api_key="test", http_client=http, base_url="http://emulator", max_retries=max_retries
    )


async def warm(client: anthropic.AsyncAnthropic) -> float:
    """One call first: the SDK looks up platform details in a worker thread on its first request, and
    MockClock jumps to the next deadline while a thread runs. Returns the time after it."""
    await client.messages.count_tokens(model=MODEL, messages=HELLO)
    return anyio.current_time()


async def test_sdk_retry_loop_obeys_retry_after() -> None:
    server = EmulatedServer(
        EmulatorConfig(latency=LAT, default_limits=PoolLimits(60, 60_000, 6_000), enforcement_interval=1.0)
    )
    client = make(server, max_retries=3)
    t0 = await warm(client)
    done: list[float] = []

    async def one() -> None:
        await client.messages.create(
            model=MODEL, max_tokens=10, messages=HELLO, extra_headers={"x-emulator-output-tokens": "10"}
        )
        done.append(anyio.current_time() - t0)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(one)
    msgs = [r for r in server.log if r.endpoint == "messages"]
    admitted = [r.arrival - t0 for r in msgs if r.status == 200]
    refused = [(r.arrival - t0, r.retry_after) for r in msgs if r.status == 429]
    assert admitted == pytest.approx([0.0, 1.05, 2.1])
    assert refused == [(0.0, 1), (0.0, 1), (pytest.approx(1.05), 1)]
    assert sorted(done) == pytest.approx([0.6, 1.65, 2.7])


async def test_sdk_gives_up_after_max_retries() -> None:
    server = EmulatedServer(EmulatorConfig(latency=LAT, default_limits=PoolLimits(60, 60_000, 6_000)))
    client = make(server, max_retries=1)
    with pytest.raises(anthropic.RateLimitError, match="6,000 output tokens per minute"):
        await client.messages.create(model=MODEL, max_tokens=7000, messages=HELLO)  # can never fit
    assert [(r.status, r.retry_after) for r in server.log] == [(429, 60), (429, 60)]
    assert server.log[1].arrival - server.log[0].arrival == pytest.approx(60.05)


async def test_stream_is_paced_in_virtual_time() -> None:
    server = EmulatedServer(EmulatorConfig(latency=LAT))
    client = make(server)
    t0 = await warm(client)
    seen: list[float] = []
    async with client.messages.stream(
        model=MODEL, max_tokens=500, messages=HELLO, extra_headers={"x-emulator-output-tokens": "300"}
    ) as stream:
        async for _ in stream.text_stream:
            seen.append(anyio.current_time() - t0)
    assert seen[0] == pytest.approx(0.5 + 7 / 100)  # 40 deltas of 7 or 8 tokens
    assert seen[-1] == pytest.approx(3.5)
    server.advance(anyio.current_time())
    assert server.log[1].settled_at == pytest.approx(t0 + 3.5)


async def test_abandoned_stream_settles_what_was_produced() -> None:
    server = EmulatedServer(EmulatorConfig(latency=LAT))
    client = make(server)
    t0 = await warm(client)
    async with client.messages.stream(
        model=MODEL, max_tokens=1000, messages=HELLO, extra_headers={"x-emulator-output-tokens": "1000"}
    ) as stream:
        async for _ in stream.text_stream:
            if anyio.current_time() - t0 >= 1.999:
                break
    rec = server.log[1]
    assert rec.abandoned
    assert rec.settled_at == pytest.approx(t0 + 2.0)
    assert rec.output_tokens == 150  # 6 of 40 deltas of 25 tokens by 0.5 + 1.5 s
    assert server.admitted_in_window(POOL, "output_tokens", 0.0, 60.0) == 150
    await anyio.sleep(30)
    server.advance(anyio.current_time())
    assert rec.output_tokens == 150


async def test_cancelled_request_is_abandoned() -> None:
    server = EmulatedServer(EmulatorConfig(latency=LAT))
    client = make(server)
    start = await warm(client)
    with anyio.move_on_after(1.0):
        await client.messages.create(
            model=MODEL, max_tokens=500, messages=HELLO, extra_headers={"x-emulator-output-tokens": "500"}
        )
    rec = server.log[1]
    assert rec.arrival == start
    assert rec.abandoned
    assert rec.output_tokens == 50


async def test_a_burst_never_gets_more_than_the_server_allows() -> None:
    server = EmulatedServer(EmulatorConfig(latency=LAT, default_limits=PoolLimits(60, 20_000, 6_000)))
    client = make(server, max_retries=1000)

    async def one(i: int) -> None:
        await anyio.sleep(i * 0.1)
        await client.messages.create(model=MODEL, max_tokens=100, messages=HELLO)

    async with anyio.create_task_group() as tg:
        for i in range(120):
            tg.start_soon(one, i)
    server.advance(anyio.current_time() + 60)
    assert sum(r.status == 200 for r in server.log) == 120
    for t0 in (0.0, 30.0, 60.0):
        for dim in ("requests", "input_tokens", "output_tokens"):
            got = server.admitted_in_window(POOL, dim, t0, t0 + 60.0)
            assert got <= server.allowed_in_window(POOL, dim, t0, t0 + 60.0)


def test_sync_transport_with_a_virtual_clock() -> None:
    clock = VirtualClock()
    server = EmulatedServer(EmulatorConfig(latency=LAT))
    http = httpx2.Client(transport=EmulatorTransport(server, clock=clock))
    client = anthropic.Anthropic(api_key="test", http_client=http, base_url="http://emulator", max_retries=0)
    msg = client.messages.create(
        model=MODEL, max_tokens=100, messages=HELLO, extra_headers={"x-emulator-output-tokens": "100"}
    )
    assert msg.usage.output_tokens == 100
    assert clock.now() == pytest.approx(1.5)
    with client.messages.stream(
        model=MODEL, max_tokens=100, messages=HELLO, extra_headers={"x-emulator-output-tokens": "100"}
    ) as stream:
        for _ in stream.text_stream:
            if clock.now() >= 2.5:
                break
    assert clock.now() == pytest.approx(2.5)
    rec = server.log[1]
    assert rec.abandoned
    assert rec.output_tokens == 50


async def test_uplink_holds_each_request_before_the_server_sees_it() -> None:
    """Each request reaches the server a seeded 0..uplink seconds after it was sent."""
    server = EmulatedServer(EmulatorConfig(latency=LatencyModel(ttft=0.5, jitter=0.0, uplink=2.0)))
    client = make(server)
    t0 = await warm(client)
    sent: list[float] = []
    for _ in range(5):
        sent.append(anyio.current_time())
        await client.messages.create(
            model=MODEL, max_tokens=10, messages=HELLO, extra_headers={"x-emulator-output-tokens": "1"}
        )
    msgs = [r for r in server.log if r.endpoint == "messages"]
    late = [r.arrival - s for r, s in zip(msgs, sent, strict=True)]
    assert all(0.0 <= d <= 2.0 for d in late)
    assert len(set(late)) == 5  # drawn per request, not one fixed delay
    assert t0 <= sent[0]


def test_sync_transport_waits_the_uplink_on_its_clock() -> None:
    clock = VirtualClock()
    server = EmulatedServer(EmulatorConfig(latency=LatencyModel(ttft=0.5, jitter=0.0, uplink=1.0)))
    http = httpx2.Client(transport=EmulatorTransport(server, clock=clock, origin=0.0))
    client = anthropic.Anthropic(api_key="test", http_client=http, base_url="http://emulator", max_retries=0)
    client.messages.create(
        model=MODEL, max_tokens=10, messages=HELLO, extra_headers={"x-emulator-output-tokens": "1"}
    )
    (rec,) = server.log
    assert 0.0 < rec.arrival <= 1.0


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_uplink_must_be_finite_and_not_negative(bad: float) -> None:
    with pytest.raises(ConfigurationError, match="uplink"):
        LatencyModel(uplink=bad)
