"""What ratekeeper adds to a request's CPU time: the wrapped SDK over the SDK alone.

Both clients talk to the same in-memory ``httpx2.MockTransport`` that answers a
canned Messages response with the usual rate-limit headers (date and resets
computed per response, as a server sends them), so the difference is the
middleware: the estimate, the permit, the header parsing and the settlement.
Rounds interleave plain and wrapped batches; each side's time is the median
over rounds of ``time.process_time()`` per request, and the ratio is wrapped
over plain.

Scenarios: a 4 KB single-turn prompt; a 20-message conversation with tools
and two ``cache_control`` breakpoints; a streamed answer of 500 tokens in 50
deltas (an SSE body); the 4 KB prompt on a sync ``Anthropic`` client.

Run ``python benchmarks/test_bench_sdk_overhead.py`` for the table in
``docs/benchmarks.md``; as a test (also under ``--benchmark-disable``) it runs
each scenario a few times and checks that both sides answered.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import anthropic
import attrs
import httpx2

from ratekeeper import Limiter
from ratekeeper.anthropic import wrap

MODEL = "claude-sonnet-4-6"
PROMPT = ("The limiter keeps every request inside the organization's budget. " * 64)[:4096]
TOOLS: list[Any] = [
    {
        "name": f"tool_{i}",
        "description": "Looks a value up in the inventory and returns it as JSON.",
        "input_schema": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]},
    }
    for i in range(3)
]


def _conversation() -> list[Any]:
    messages: list[Any] = []
    for i in range(20):
        role = "user" if i % 2 == 0 else "assistant"
        block: dict[str, Any] = {"type": "text", "text": f"Turn {i}: " + PROMPT[:400]}
        if i in (9, 17):  # two cache breakpoints, as a long chat places them
            block["cache_control"] = {"type": "ephemeral"}
        messages.append({"role": role, "content": [block]})
    return messages


CONVERSATION = _conversation()


def _headers() -> dict[str, str]:
    now = dt.datetime.now(dt.UTC)
    reset = (now + dt.timedelta(seconds=1)).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
    headers = {
        "content-type": "application/json",
        "date": email.utils.formatdate(now.timestamp(), usegmt=True),
        "request-id": "req_011CRjWg8gmowrHs23BDytyU",
    }
    for bucket, limit in [
        ("requests", 4000),
        ("tokens", 2_400_000),
        ("input-tokens", 2_000_000),
        ("output-tokens", 400_000),
    ]:
        headers[f"anthropic-ratelimit-{bucket}-limit"] = str(limit)
        headers[f"anthropic-ratelimit-{bucket}-remaining"] = str(limit - 1000)
        headers[f"anthropic-ratelimit-{bucket}-reset"] = reset
    return headers


USAGE = {"input_tokens": 1100, "output_tokens": 500, "cache_read_input_tokens": 0}
MESSAGE = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": MODEL,
    "content": [{"type": "text", "text": "word " * 500}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": USAGE,
}


def _sse() -> bytes:
    def event(name: str, data: dict[str, Any]) -> str:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n"

    start = {**MESSAGE, "content": [], "stop_reason": None, "usage": {**USAGE, "output_tokens": 1}}
    parts = [event("message_start", {"type": "message_start", "message": start})]
    parts.append(
        event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
    )
    for _ in range(50):  # 500 tokens in 50 deltas
        delta = {"type": "text_delta", "text": "word " * 10}
        parts.append(
            event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
        )
    parts.append(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    parts.append(
        event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 500},
            },
        )
    )
    parts.append(event("message_stop", {"type": "message_stop"}))
    return "".join(parts).encode()


JSON_BODY = json.dumps(MESSAGE).encode()
SSE_BODY = _sse()


def handler(request: httpx2.Request) -> httpx2.Response:
    """The canned answer: JSON, or SSE when the request asked to stream."""
    headers = _headers()
    if b'"stream":true' in request.content.replace(b" ", b""):
        headers["content-type"] = "text/event-stream"
        # a stream, as a real transport gives it: a body in memory would never reach the
        # wrapper's stream meter (it reads a body already read as JSON)
        return httpx2.Response(200, headers=headers, stream=httpx2.ByteStream(SSE_BODY))
    return httpx2.Response(200, headers=headers, content=JSON_BODY)


def _limiter() -> Limiter:
    return Limiter("tier-4")


def async_pair() -> tuple[anthropic.AsyncAnthropic, anthropic.AsyncAnthropic]:
    """The SDK alone and the same SDK wrapped, each on its own mock transport."""

    def make() -> anthropic.AsyncAnthropic:
        http = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
        return anthropic.AsyncAnthropic(
            api_key="test", http_client=http, base_url="http://mock", max_retries=0
        )

    return make(), wrap(make(), _limiter())


def sync_pair() -> tuple[anthropic.Anthropic, anthropic.Anthropic]:
    """Like ``async_pair``, for the sync client."""

    def make() -> anthropic.Anthropic:
        http = httpx2.Client(transport=httpx2.MockTransport(handler))
        return anthropic.Anthropic(api_key="test", http_client=http, base_url="http://mock", max_retries=0)

    return make(), wrap(make(), _limiter())


@attrs.frozen
class Result:
    """Median CPU microseconds per request, plain and wrapped, and their ratio."""

    name: str
    plain_us: float
    wrapped_us: float

    @property
    def ratio(self) -> float:
        return self.wrapped_us / self.plain_us


async def _single(client: anthropic.AsyncAnthropic) -> None:
    await client.messages.create(model=MODEL, max_tokens=1024, messages=[{"role": "user", "content": PROMPT}])


async def _chat(client: anthropic.AsyncAnthropic) -> None:
    await client.messages.create(model=MODEL, max_tokens=1024, messages=CONVERSATION, tools=TOOLS)


async def _stream(client: anthropic.AsyncAnthropic) -> None:
    stream = await client.messages.create(
        model=MODEL, max_tokens=1024, messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    async for _ in stream:
        pass


def _sync_single(client: anthropic.Anthropic) -> None:
    client.messages.create(model=MODEL, max_tokens=1024, messages=[{"role": "user", "content": PROMPT}])


ASYNC_SCENARIOS: dict[str, Callable[[anthropic.AsyncAnthropic], Any]] = {
    "4 KB single turn (async)": _single,
    "20 messages, tools, 2 cache breakpoints (async)": _chat,
    "stream, 500 tokens in 50 deltas (async)": _stream,
}


def _result(name: str, plain: list[float], wrapped: list[float], per_round: int) -> Result:
    return Result(
        name, statistics.median(plain) / per_round * 1e6, statistics.median(wrapped) / per_round * 1e6
    )


async def _measure_async(
    name: str, call: Callable[[anthropic.AsyncAnthropic], Any], rounds: int, per_round: int
) -> Result:
    plain_client, wrapped_client = async_pair()
    for client in (plain_client, wrapped_client):  # warm up: imports, caches, calibration
        for _ in range(3):
            await call(client)
    plain: list[float] = []
    wrapped: list[float] = []
    for _ in range(rounds):
        for client, times in ((plain_client, plain), (wrapped_client, wrapped)):
            start = time.process_time()
            for _ in range(per_round):
                await call(client)
            times.append(time.process_time() - start)
    return _result(name, plain, wrapped, per_round)


def _measure_sync(rounds: int, per_round: int) -> Result:
    plain_client, wrapped_client = sync_pair()
    for client in (plain_client, wrapped_client):
        for _ in range(3):
            _sync_single(client)
    plain: list[float] = []
    wrapped: list[float] = []
    for _ in range(rounds):
        for client, times in ((plain_client, plain), (wrapped_client, wrapped)):
            start = time.process_time()
            for _ in range(per_round):
                _sync_single(client)
            times.append(time.process_time() - start)
    return _result("4 KB single turn (sync)", plain, wrapped, per_round)


def measure(rounds: int = 15, per_round: int = 40) -> list[Result]:
    """Every scenario, ``rounds`` interleaved rounds of ``per_round`` requests per side."""
    results = [
        asyncio.run(_measure_async(name, call, rounds, per_round)) for name, call in ASYNC_SCENARIOS.items()
    ]
    results.append(_measure_sync(rounds, per_round))
    return results


def test_the_streamed_answer_is_metered() -> None:
    """The stream scenario settles on the usage its events carry, not on a failed JSON read.

    The pool's use over the last minute counts the 500 tokens the answer produced; a permit
    released with its reservation kept would count its ``max_tokens`` (1,024).
    """
    import anyio

    limiter = Limiter("tier-4", clock=lambda: 0.0)
    http = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    client = anthropic.AsyncAnthropic(api_key="test", http_client=http, base_url="http://mock", max_retries=0)
    anyio.run(_stream, wrap(client, limiter))
    pool = next(iter(limiter.statistics().pools.values()))
    assert pool.in_flight == 0
    assert pool.used["output_tokens"] == 500


def test_sdk_overhead_runs() -> None:
    """Tiny: every scenario goes through both clients and yields a ratio."""
    results = measure(rounds=2, per_round=2)
    assert [r.name for r in results] == [*ASYNC_SCENARIOS, "4 KB single turn (sync)"]
    assert all(r.plain_us > 0 and r.wrapped_us > 0 for r in results)


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    print("| scenario | SDK alone (us) | wrapped (us) | ratio |")
    print("|---|---:|---:|---:|")
    for r in measure(rounds=rounds):
        print(f"| {r.name} | {r.plain_us:.0f} | {r.wrapped_us:.0f} | {r.ratio:.2f}x |")
