"""The emulator behind the official SDK: every call style parses, on asyncio and trio."""

from __future__ import annotations

import anthropic
import anyio
import httpx2
import pytest
from anthropic.types import MessageParam

from ratekeeper.emulator import EmulatedServer, EmulatorConfig, EmulatorTransport, LatencyModel

pytestmark = pytest.mark.anyio

FAST = LatencyModel(ttft=0.01, tokens_per_second=20_000.0, error_delay=0.001)
MODEL = "claude-sonnet-4-6"
HELLO: list[MessageParam] = [{"role": "user", "content": "Hello there"}]


def make(server: EmulatedServer, max_retries: int = 0) -> anthropic.AsyncAnthropic:
    http = httpx2.AsyncClient(transport=EmulatorTransport(server))
    return anthropic.AsyncAnthropic(
        api_key="test", http_client=http, base_url="http://emulator", max_retries=max_retries
    )


async def test_create_returns_a_message_with_usage() -> None:
    server = EmulatedServer(EmulatorConfig(latency=FAST))
    client = make(server)
    msg = await client.messages.create(model=MODEL, max_tokens=50, messages=HELLO)
    assert msg.type == "message"
    assert msg.usage.input_tokens == server.log[0].input_tokens > 0
    assert 1 <= msg.usage.output_tokens <= 50
    assert msg.usage.service_tier == "standard"
    assert msg.content[0].type == "text"


async def test_stream_helper_text_and_final_message() -> None:
    server = EmulatedServer(EmulatorConfig(latency=FAST))
    client = make(server)
    async with client.messages.stream(
        model=MODEL, max_tokens=60, messages=HELLO, extra_headers={"x-emulator-output-tokens": "45"}
    ) as stream:
        assert stream.response.headers["anthropic-ratelimit-requests-remaining"] == "49"
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert final.usage.output_tokens == 45
    assert final.stop_reason == "end_turn"
    assert final.content[0].type == "text"
    assert final.content[0].text == text
    assert len(text.split()) == 45


async def test_create_stream_true_yields_raw_events() -> None:
    server = EmulatedServer(EmulatorConfig(latency=FAST))
    client = make(server)
    stream = await client.messages.create(model=MODEL, max_tokens=20, messages=HELLO, stream=True)
    assert isinstance(stream, anthropic.AsyncStream)
    kinds = [event.type async for event in stream]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "content_block_delta" in kinds


async def test_raw_response_headers() -> None:
    server = EmulatedServer(EmulatorConfig(latency=FAST))
    client = make(server)
    raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=20, messages=HELLO)
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["anthropic-ratelimit-input-tokens-limit"] == "30000"
    msg = await raw.parse()
    assert msg.usage.input_tokens == server.log[0].input_tokens


async def test_count_tokens_and_batches() -> None:
    server = EmulatedServer(EmulatorConfig(latency=FAST, batch_processing_time=0.05))
    client = make(server)
    counted = await client.messages.count_tokens(model=MODEL, messages=HELLO)
    assert counted.input_tokens == 9
    batch = await client.messages.batches.create(
        requests=[{"custom_id": "a", "params": {"model": MODEL, "max_tokens": 10, "messages": HELLO}}]
    )
    status: str = batch.processing_status
    assert status == "in_progress"
    while status != "ended":
        await anyio.sleep(0.05)
        batch = await client.messages.batches.retrieve(batch.id)
        status = batch.processing_status
    results = [r async for r in await client.messages.batches.results(batch.id)]
    assert [r.custom_id for r in results] == ["a"]
    assert results[0].result.type == "succeeded"
    listed = [b.id async for b in client.messages.batches.list()]
    assert listed == [batch.id]


async def test_errors_map_to_sdk_exceptions() -> None:
    server = EmulatedServer(EmulatorConfig(latency=FAST, overload_probability=1.0))
    client = make(server)
    with pytest.raises(anthropic.APIStatusError) as info:
        await client.messages.create(model=MODEL, max_tokens=20, messages=HELLO)
    assert info.value.status_code == 529
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["type"] == "overloaded_error"
    server = EmulatedServer(EmulatorConfig(latency=FAST, midstream_error_probability=1.0))
    client = make(server)
    async with client.messages.stream(model=MODEL, max_tokens=200, messages=HELLO) as stream:
        with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
            await stream.get_final_message()


async def test_wallet_stream_ends_with_quota_usage_the_sdk_tolerates() -> None:
    from ratekeeper.emulator import WalletConfig

    server = EmulatedServer(
        EmulatorConfig(latency=FAST, mode="wallet", wallet=WalletConfig(balance=1_000_000))
    )
    client = make(server)
    async with client.messages.stream(
        model="anthropic/claude-sonnet-4.6", max_tokens=50, messages=HELLO
    ) as stream:
        assert int(stream.response.headers["x-quota-credits-reserved"]) > 0
        kinds: list[str] = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[-1] == "quota_usage"
    assert final.model == "claude-sonnet-4-6"
    assert final.usage.output_tokens == server.log[0].planned_output_tokens


async def test_unified_headers_reach_the_sdk() -> None:
    server = EmulatedServer(EmulatorConfig(latency=FAST, mode="unified"))
    client = make(server)
    raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=20, messages=HELLO)
    assert raw.headers["anthropic-ratelimit-unified-status"] == "allowed"
    assert raw.headers["anthropic-ratelimit-unified-representative-claim"] == "five_hour"
    assert "anthropic-ratelimit-requests-limit" not in raw.headers


@pytest.mark.parametrize("moment", ["admission", "response"])
async def test_report_moment_reaches_the_sdk_through_the_transport(moment: str) -> None:
    """Two overlapping requests: the first one's headers see the second only at the response."""
    slow = LatencyModel(ttft=0.6, tokens_per_second=1000.0, jitter=0.0, error_delay=0.001)
    server = EmulatedServer(EmulatorConfig(latency=slow, report_moment=moment))  # type: ignore[arg-type]
    client = make(server)
    seen: list[str] = []

    async def first() -> None:
        raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=5, messages=HELLO)
        seen.append(raw.headers["anthropic-ratelimit-requests-remaining"])

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        while not server.log:  # the first is admitted (its answer comes 0.6 s later)
            await anyio.sleep(0.001)
        await client.messages.create(model=MODEL, max_tokens=5, messages=HELLO)
    assert seen == (["48"] if moment == "response" else ["49"])
