"""``ratekeeper.meta`` on every kind of SDK response; the missing-SDK error; bodies read lazily."""

from __future__ import annotations

import gzip
import importlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic_support import HELLO, MODEL, Spy, async_client, emulator, in_flight, spy, sync_client

import ratekeeper
from ratekeeper import Limiter, MissingDependency, RateLimitSnapshot, meta
from ratekeeper.anthropic import RateLimitMiddleware

pytestmark = pytest.mark.anyio
__all__ = ["spy"]


async def test_meta_of_every_response_kind() -> None:
    server = emulator(batch_processing_time=0.0)
    client = async_client(server, Limiter("tier-1"), max_retries=0)
    message = await client.messages.create(model=MODEL, max_tokens=10, messages=HELLO)
    snapshot = meta(message)
    assert snapshot.request_id == message._request_id
    assert snapshot.input_token_limit is not None
    assert snapshot.input_token_limit.limit == 30_000
    assert snapshot.received_at is not None  # the middleware's snapshot knows when it arrived

    raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=10, messages=HELLO)
    assert meta(raw).request_id == raw.request_id
    assert meta(raw.http_response) == meta(raw)
    assert meta(dict(raw.headers)).request_id == raw.request_id
    assert meta(snapshot) is snapshot

    stream = await client.messages.create(model=MODEL, max_tokens=10, messages=HELLO, stream=True)
    assert meta(stream).request_limit is not None
    await stream.close()
    async with client.messages.stream(model=MODEL, max_tokens=10, messages=HELLO) as helper:
        assert meta(helper).request_id == helper.request_id

    batch = await client.messages.batches.create(
        requests=[{"custom_id": "a", "params": {"model": MODEL, "max_tokens": 5, "messages": HELLO}}]
    )
    assert meta(batch).request_id == batch._request_id
    results = await client.messages.batches.results(batch.id)
    assert meta(results).request_id is not None

    server = emulator(limits={"sonnet-4.x": _limits(1)})
    client = async_client(server, Limiter("tier-1", learn_limits=False), max_retries=0)
    await client.messages.create(model=MODEL, max_tokens=5, messages=HELLO)
    with pytest.raises(anthropic.RateLimitError) as caught:
        await client.messages.create(model=MODEL, max_tokens=5, messages=HELLO)
    assert meta(caught.value).retry_after is not None


def test_meta_refuses_what_has_no_headers() -> None:
    message = anthropic.types.Message.construct(id="msg_1", content=[], model=MODEL, role="assistant")
    message._request_id = "req_1"
    expected = (
        r"^meta\(\) found no headers on this Message: the SDK keeps none on parsed models; "
        r"send it through ratekeeper.anthropic.RateLimitMiddleware \(which attaches them\) "
        r"or use client.messages.with_raw_response$"
    )
    with pytest.raises(TypeError, match=expected):
        meta(message)
    with pytest.raises(
        TypeError, match=r"^meta\(\) expects an Anthropic SDK response, stream or headers, got int$"
    ):
        meta(42)


def test_meta_is_exported_without_importing_the_sdk() -> None:
    code = "import sys, ratekeeper; ratekeeper.meta; print('anthropic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert ratekeeper.meta is meta


def test_missing_sdk_raises_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [
        n for n in sys.modules if n == "ratekeeper.anthropic" or n.startswith("ratekeeper.anthropic.")
    ]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "anthropic", None)  # what an absent package looks like to import
    expected = r"^anthropic is not installed; install it with: pip install 'ratekeeper\[anthropic\]'$"
    with pytest.raises(MissingDependency, match=expected):
        importlib.import_module("ratekeeper.anthropic")


# ---------------------------------------------------------------------- bodies that really stream


class _Chunks(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    """A body delivered in pieces, as from a socket (the emulator's transport hands bodies whole)."""

    def __init__(self, data: bytes, size: int = 7) -> None:
        self._parts = [data[i : i + size] for i in range(0, len(data), size)]

    def __iter__(self) -> Iterator[bytes]:
        yield from self._parts

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self._parts:
            yield part


USAGE = {
    "input_tokens": 11,
    "output_tokens": 7,
    "cache_read_input_tokens": 0,
    "cache_creation_input_tokens": 0,
}
MESSAGE: dict[str, Any] = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": MODEL,
    "content": [{"type": "text", "text": "hi"}],
    "stop_reason": "end_turn",
    "usage": USAGE,
}


def _sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)


def _stream_body() -> bytes:
    start = {**MESSAGE, "content": [], "usage": {**USAGE, "output_tokens": 1}}
    return _sse(
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 7}},
        ),
        ("message_stop", {"type": "message_stop"}),
    )


def _handler(request: httpx2.Request) -> httpx2.Response:
    headers = {"request-id": "req_mock", "anthropic-ratelimit-requests-limit": "50"}
    if json.loads(request.content).get("stream"):
        body = gzip.compress(_stream_body())
        headers |= {"content-type": "text/event-stream", "content-encoding": "gzip"}
        return httpx2.Response(200, headers=headers, stream=_Chunks(body))
    headers["content-type"] = "application/json"
    return httpx2.Response(200, headers=headers, stream=_Chunks(json.dumps(MESSAGE).encode()))


async def test_lazily_read_bodies_are_metered_gzip_included(spy: Spy) -> None:
    limiter = Limiter("tier-1")
    client = anthropic.AsyncAnthropic(
        api_key="test",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(_handler)),
        base_url="http://mock",
        middleware=[RateLimitMiddleware(limiter)],
    )
    async with client.messages.with_streaming_response.create(
        model=MODEL, max_tokens=50, messages=HELLO
    ) as response:
        assert in_flight(limiter) == 1  # the body is not read yet
        message = await response.parse()
    assert message.usage.output_tokens == 7
    assert spy.settled[-1].usage.output_tokens == 7
    assert in_flight(limiter) == 0

    stream = await client.messages.create(model=MODEL, max_tokens=50, messages=HELLO, stream=True)
    assert [e.type async for e in stream][-1] == "message_stop"
    assert (spy.settled[-1].usage.input_tokens, spy.settled[-1].usage.output_tokens) == (11, 7)
    assert in_flight(limiter) == 0


def test_lazily_read_bodies_sync(spy: Spy) -> None:
    limiter = Limiter("tier-1")
    client = anthropic.Anthropic(
        api_key="test",
        http_client=httpx2.Client(transport=httpx2.MockTransport(_handler)),
        base_url="http://mock",
        middleware=[RateLimitMiddleware(limiter)],
    )
    with client.messages.with_streaming_response.create(
        model=MODEL, max_tokens=50, messages=HELLO
    ) as response:
        lines = list(response.iter_lines())
    assert json.loads("".join(lines))["usage"]["output_tokens"] == 7
    assert spy.settled[-1].usage.output_tokens == 7
    with client.messages.with_streaming_response.create(model=MODEL, max_tokens=50, messages=HELLO):
        pass  # closed unread: released, nothing to settle
    assert in_flight(limiter) == 0


def _limits(rpm: int) -> Any:
    from ratekeeper.emulator import PoolLimits

    return PoolLimits(rpm=rpm, itpm=30_000, otpm=8_000)


def test_snapshot_type() -> None:
    client = sync_client(emulator(), Limiter("tier-1"))
    assert isinstance(
        meta(client.messages.create(model=MODEL, max_tokens=5, messages=HELLO)), RateLimitSnapshot
    )
