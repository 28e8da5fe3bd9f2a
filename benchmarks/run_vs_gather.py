"""``run_requests`` against a task group with a semaphore and the SDK's retries, on the same file.

Run: ``python benchmarks/run_vs_gather.py [--requests 500 --preset tier-1 --words 1500
--max-tokens 300 --concurrency 16]`` (a few seconds of wall time per strategy).

Both send the same requests through the official SDK to the in-process emulator
on trio's virtual clock (``MockClock(autojump_threshold=0)``): minutes of
traffic take seconds, and both strategies see exactly the same server. The
plain strategy is what a bulk job usually is: ``concurrency`` tasks behind a
semaphore, ``max_retries=2``. Goodput is the binding dimension's admitted
total over what the server allowed over the run (its burst plus the refill).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

import anthropic
import httpx2
import trio
import trio.testing

from ratekeeper import Limiter, limits_for, run_requests
from ratekeeper.emulator import EmulatedServer, EmulatorConfig, EmulatorTransport, LatencyModel

MODEL = "claude-sonnet-4-5"


def workload(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"r{i}",
            "params": {
                "model": MODEL,
                "max_tokens": args.max_tokens,
                "messages": [{"role": "user", "content": f"{i} " + "hello " * args.words}],
            },
        }
        for i in range(args.requests)
    ]


def client_for(server: EmulatedServer, max_retries: int = 2) -> anthropic.AsyncAnthropic:
    http = httpx2.AsyncClient(transport=EmulatorTransport(server))
    return anthropic.AsyncAnthropic(
        api_key="test", http_client=http, base_url="http://emulator", max_retries=max_retries
    )


async def with_ratekeeper(server: EmulatedServer, args: argparse.Namespace) -> dict[str, int]:
    limiter = Limiter(args.preset)
    counts = {"ok": 0, "failed": 0}
    results = run_requests(client_for(server), workload(args), limiter=limiter)
    async with contextlib.aclosing(results):
        async for result in results:
            counts["ok" if result.succeeded else "failed"] += 1
    return counts


async def with_semaphore(server: EmulatedServer, args: argparse.Namespace) -> dict[str, int]:
    client = client_for(server)
    semaphore = trio.Semaphore(args.concurrency)
    counts = {"ok": 0, "failed": 0}

    async def one(params: dict[str, Any]) -> None:
        async with semaphore:
            try:
                await client.messages.create(**params)
            except anthropic.APIError:
                counts["failed"] += 1
            else:
                counts["ok"] += 1

    async with trio.open_nursery() as nursery:
        for item in workload(args):
            nursery.start_soon(one, item["params"])
    return counts


def measure(strategy: Any, args: argparse.Namespace) -> dict[str, Any]:
    server = EmulatedServer(
        EmulatorConfig(preset=args.preset, latency=LatencyModel(ttft=0.5, tokens_per_second=60.0))
    )

    async def main() -> tuple[dict[str, int], float]:
        counts = await strategy(server, args)
        return counts, trio.current_time()

    counts, seconds = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    limits = limits_for(args.preset, MODEL)
    ok = [r for r in server.log if r.status == 200]
    admitted = {
        "rpm": (len(ok), limits.rpm),
        "itpm": (sum(r.input_tokens for r in ok), limits.itpm),
        "otpm": (sum(r.output_tokens for r in ok), limits.otpm),
    }
    goodput = {k: total / (rate + rate * seconds / 60) for k, (total, rate) in admitted.items()}
    binding = max(goodput, key=goodput.__getitem__)
    return {
        "strategy": strategy.__name__,
        **counts,
        "http_429": sum(1 for r in server.log if r.status == 429),
        "minutes": round(seconds / 60, 2),
        "binding": binding,
        "goodput": round(goodput[binding], 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--preset", default="tier-1")
    p.add_argument("--words", type=int, default=1500, help="prompt words (about as many tokens)")
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=16, help="the semaphore's size")
    args = p.parse_args()
    for strategy in (with_ratekeeper, with_semaphore):
        print(json.dumps(measure(strategy, args)))


if __name__ == "__main__":
    main()
