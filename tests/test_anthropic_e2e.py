"""End to end: the wrapped SDK against ``ratekeeper emulate``, a real HTTP server on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator

import anthropic
import pytest
from anthropic_support import HELLO, MODEL, in_flight

from ratekeeper import Limiter, meta
from ratekeeper.anthropic import wrap


@pytest.fixture(scope="module")
def emulate_url() -> Iterator[str]:
    """Start ``ratekeeper emulate --port 0`` and yield the URL it prints; stop it afterwards."""
    script = shutil.which("ratekeeper", path=os.path.dirname(sys.executable))
    command = (
        [script]
        if script
        else [sys.executable, "-c", "from ratekeeper.cli._main import main; raise SystemExit(main())"]
    )
    args = [*command, "emulate", "--port", "0", "--ttft", "0.01", "--tokens-per-second", "4000"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:"), line
        yield line.removeprefix("listening on ")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_sync_client_over_http(emulate_url: str) -> None:
    limiter = Limiter("tier-1")
    client = wrap(anthropic.Anthropic(api_key="test", base_url=emulate_url), limiter)
    message = client.messages.create(model=MODEL, max_tokens=50, messages=HELLO)
    assert meta(message).request_limit is not None
    with client.messages.stream(model=MODEL, max_tokens=200, messages=HELLO) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens > 0
    with client.messages.stream(
        model=MODEL, max_tokens=2000, messages=HELLO, extra_headers={"x-emulator-output-tokens": "1500"}
    ) as stream:
        for i, _ in enumerate(stream):
            if i == 3:
                break  # leaves a real socket mid-stream
    with client.messages.with_streaming_response.create(model=MODEL, max_tokens=20, messages=HELLO) as raw:
        assert in_flight(limiter) == 1  # over a socket the body is still to come
        raw.parse()
    assert in_flight(limiter) == 0
    stats = limiter.statistics().pools["sonnet-4.x"]
    assert stats.granted == 4
    assert stats.rate_limited == 0


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)  # real sockets: no mock clock
async def test_async_client_over_http(emulate_url: str, anyio_backend: object) -> None:
    limiter = Limiter("tier-1")
    client = wrap(anthropic.AsyncAnthropic(api_key="test", base_url=emulate_url), limiter)
    stream = await client.messages.create(model=MODEL, max_tokens=300, messages=HELLO, stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[-1] == "message_stop"
    counted = await client.messages.count_tokens(model=MODEL, messages=HELLO)
    assert meta(counted).request_limit is not None
    assert in_flight(limiter) == 0
    await client.close()
