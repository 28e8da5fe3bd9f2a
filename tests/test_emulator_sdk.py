"""The emulator behind the official SDK: every call style parses, on asyncio and trio."""

from __future__ import annotations

import anthropic
import httpx2
import pytest

from ratekeeper.emulator import EmulatedServer, EmulatorConfig, EmulatorTransport, LatencyModel

pytestmark = pytest.mark.anyio

FAST = LatencyModel(ttft=0.01, tokens_per_second=20_000.0, error_delay=0.001)
MODEL = "claude-sonnet-4-6"
HELLO = [{"role": "user", "content": "Hello there"}]


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
