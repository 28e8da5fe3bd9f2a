"""What the SDK's middleware path costs by itself: the floor under the wrapped SDK's overhead.

    python benchmarks/sdk_middleware_floor.py [rounds]

Three clients on ``test_bench_sdk_overhead.py``'s mock transport, made as
``sdk_overhead_against.py`` makes them, in one process: the SDK alone, the SDK with a
middleware that only calls ``call_next`` (and ``parse()``, as ``RateLimitMiddleware`` does:
the SDK caches it), and the SDK wrapped by ratekeeper. Rounds of 10 requests alternate
between them (the order reversed every other round); each cell is the median round's CPU
time per request, then the fastest, and its ratio over the SDK alone. Whatever ratekeeper
does, a client with middleware pays at least the pass-through's ratio.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import anthropic
from sdk_overhead_against import _async_client, _sync_client
from test_bench_sdk_overhead import ASYNC_SCENARIOS, _sync_single

import ratekeeper
import ratekeeper.anthropic

PER_ROUND = 10


class PassThrough(anthropic.Middleware):
    """A middleware that does nothing of its own."""

    def handle(self, request: anthropic.APIRequest, call_next: anthropic.CallNext) -> Any:
        response = call_next(request)
        response.parse()
        return response

    async def handle_async(self, request: anthropic.APIRequest, call_next: anthropic.AsyncCallNext) -> Any:
        response = await call_next(request)
        await response.parse()
        return response


def _row(name: str, times: dict[str, list[float]]) -> str:
    plain_median, plain_fastest = statistics.median(times["plain"]), min(times["plain"])
    cells = [f"{plain_median:.0f}; {plain_fastest:.0f}"]
    for side in ("pass-through", "ratekeeper"):
        median, fastest = statistics.median(times[side]), min(times[side])
        cells.append(f"{median / plain_median:.2f}x; {fastest / plain_fastest:.2f}x")
    return f"| {name} | " + " | ".join(cells) + " |"


def _async_clients() -> dict[str, Any]:
    return {
        "plain": _async_client(),
        "pass-through": _async_client().with_middleware(PassThrough()),
        "ratekeeper": ratekeeper.anthropic.wrap(_async_client(), ratekeeper.Limiter("tier-4")),
    }


def _sync_clients() -> dict[str, Any]:
    return {
        "plain": _sync_client(),
        "pass-through": _sync_client().with_middleware(PassThrough()),
        "ratekeeper": ratekeeper.anthropic.wrap(_sync_client(), ratekeeper.Limiter("tier-4")),
    }


async def _measure_async(name: str, call: Callable[[Any], Any], rounds: int) -> str:
    clients = _async_clients()
    for client in clients.values():
        for _ in range(5):
            await call(client)
    times: dict[str, list[float]] = {side: [] for side in clients}
    for r in range(rounds):
        for side in list(clients) if r % 2 == 0 else list(clients)[::-1]:
            start = time.process_time()
            for _ in range(PER_ROUND):
                await call(clients[side])
            times[side].append((time.process_time() - start) / PER_ROUND * 1e6)
    return _row(name, times)


def _measure_sync(rounds: int) -> str:
    clients = _sync_clients()
    for client in clients.values():
        for _ in range(5):
            _sync_single(client)
    times: dict[str, list[float]] = {side: [] for side in clients}
    for r in range(rounds):
        for side in list(clients) if r % 2 == 0 else list(clients)[::-1]:
            start = time.process_time()
            for _ in range(PER_ROUND):
                _sync_single(clients[side])
            times[side].append((time.process_time() - start) / PER_ROUND * 1e6)
    return _row("4 KB single turn (sync)", times)


def main(rounds: int) -> None:
    print("| scenario | SDK alone (us), median; fastest | pass-through middleware | ratekeeper |")
    print("|---|---:|---:|---:|")
    for name, call in ASYNC_SCENARIOS.items():
        print(asyncio.run(_measure_async(name, call, rounds)), flush=True)
    print(_measure_sync(rounds), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
