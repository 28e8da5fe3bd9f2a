"""What estimating a typical request costs, next to ``json.dumps`` of the same body in the same run.

The SDK serializes every body with ``json.dumps`` before sending it, so that is
the natural yardstick: an estimate within a small multiple of it is noise next
to the request itself.

Run: pytest benchmarks/test_bench_estimate.py --benchmark-only --benchmark-columns=min,median,mean,ops
"""

from __future__ import annotations

import json
from typing import Any

from pytest_benchmark.fixture import BenchmarkFixture

from ratekeeper import TokenEstimator


def typical_body() -> dict[str, Any]:
    """A 20-message agent conversation: system prompt, 3 tools, tool calls and results, 2 breakpoints.

    About 27 KB of JSON.
    """
    tools = [
        {
            "name": f"tool_{i}",
            "description": "Looks something up. " * 10,
            "input_schema": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                "required": ["query"],
            },
        }
        for i in range(3)
    ]
    messages: list[dict[str, Any]] = []
    for turn in range(10):
        if turn % 2:
            messages.append({"role": "user", "content": "Please look into the next item. " * 20})
            messages.append(
                {"role": "assistant", "content": [{"type": "text", "text": "Here it is. " * 100}]}
            )
        else:
            messages.append(
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": f"toolu_{turn}",
                            "content": "result line\n" * 150,
                        }
                    ],
                }
            )
            messages.append(
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Let me check."},
                        {
                            "type": "tool_use",
                            "id": f"toolu_{turn + 1}",
                            "name": "tool_0",
                            "input": {"query": "q" * 40, "limit": 10},
                        },
                    ],
                }
            )
    messages[-1]["content"] = [{"type": "text", "text": "Done.", "cache_control": {"type": "ephemeral"}}]
    system = [
        {
            "type": "text",
            "text": "You are a careful assistant. " * 200,
            "cache_control": {"type": "ephemeral"},
        }
    ]
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 4096,
        "system": system,
        "tools": tools,
        "messages": messages,
    }


BODY = typical_body()


def test_estimate_typical_body(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "20-message body"
    est = TokenEstimator()
    result = benchmark(est.estimate, BODY, 0.0)
    assert result.demand.cache_creation_input_tokens > 0


def test_json_dumps_baseline(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "20-message body"
    result = benchmark(json.dumps, BODY)
    assert len(result) > 20_000


def test_estimate_without_breakpoints(benchmark: BenchmarkFixture) -> None:
    # No cache_control: no prefix hashing, only the count.
    benchmark.group = "20-message body"
    body = json.loads(json.dumps(BODY).replace('"cache_control"', '"no_cache_control"'))
    est = TokenEstimator()
    result = benchmark(est.estimate, body, 0.0)
    assert result.demand.cache_creation_input_tokens == 0
