"""The SDK overhead of this checkout against another tree's, in one process.

    git archive main src | tar -x -C /tmp/base
    python benchmarks/sdk_overhead_against.py /tmp/base/src [rounds]

The other tree's ``ratekeeper`` package is copied into a temporary directory as
``ratekeeper_other`` (its imports renamed), so both versions wrap the same SDK in
the same process, on the same mock transport as ``test_bench_sdk_overhead.py``.
Rounds of 10 requests run the SDK alone, the other tree's wrapper and this one's,
in turn (the order reversed every other round); each side's figure is the median
and the fastest round, and each ratio is over the SDK alone of the same
statistic. Separate runs of the benchmark on a shared machine differ by more
than one pass of changes saves; in one process, other load weighs on all three
alike.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import anthropic
import httpx2
from test_bench_sdk_overhead import ASYNC_SCENARIOS, _sync_single, handler

import ratekeeper
import ratekeeper.anthropic

PER_ROUND = 10


def _other(src: Path, into: Path) -> tuple[Any, Any]:
    """The other tree's package as ``ratekeeper_other``: (its top module, its ``anthropic`` module)."""
    target = into / "ratekeeper_other"
    shutil.copytree(src / "ratekeeper", target)
    for path in target.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        path.write_text(re.sub(r"\bratekeeper\b", "ratekeeper_other", text), encoding="utf-8")
    sys.path.insert(0, str(into))
    return importlib.import_module("ratekeeper_other"), importlib.import_module("ratekeeper_other.anthropic")


def _async_client() -> anthropic.AsyncAnthropic:
    http = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    return anthropic.AsyncAnthropic(api_key="test", http_client=http, base_url="http://mock", max_retries=0)


def _sync_client() -> anthropic.Anthropic:
    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    return anthropic.Anthropic(api_key="test", http_client=http, base_url="http://mock", max_retries=0)


def _row(name: str, times: dict[str, list[float]]) -> str:
    plain_median, plain_fastest = statistics.median(times["plain"]), min(times["plain"])
    cells = [f"{plain_median:.0f}"]
    cells += [f"{statistics.median(times[side]) / plain_median:.2f}x" for side in ("other", "this")]
    cells.append(f"{plain_fastest:.0f}")
    cells += [f"{min(times[side]) / plain_fastest:.2f}x" for side in ("other", "this")]
    return f"| {name} | " + " | ".join(cells) + " |"


async def _measure_async(
    name: str, call: Callable[[anthropic.AsyncAnthropic], Any], clients: dict[str, Any], rounds: int
) -> str:
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


def _measure_sync(clients: dict[str, Any], rounds: int) -> str:
    call = _sync_single
    for client in clients.values():
        for _ in range(5):
            call(client)
    times: dict[str, list[float]] = {side: [] for side in clients}
    for r in range(rounds):
        for side in list(clients) if r % 2 == 0 else list(clients)[::-1]:
            start = time.process_time()
            for _ in range(PER_ROUND):
                call(clients[side])
            times[side].append((time.process_time() - start) / PER_ROUND * 1e6)
    return _row("4 KB single turn (sync)", times)


def main(src: Path, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as into:
        other, other_anthropic = _other(src, Path(into))
        print("| scenario | SDK alone, median (us) | other | this | SDK alone, fastest (us) | other | this |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, call in ASYNC_SCENARIOS.items():

            def clients_async() -> dict[str, Any]:
                return {
                    "plain": _async_client(),
                    "other": other_anthropic.wrap(_async_client(), other.Limiter("tier-4")),
                    "this": ratekeeper.anthropic.wrap(_async_client(), ratekeeper.Limiter("tier-4")),
                }

            async def measure(name: str = name, call: Any = call) -> str:
                return await _measure_async(name, call, clients_async(), rounds)

            print(asyncio.run(measure()), flush=True)
        clients = {
            "plain": _sync_client(),
            "other": other_anthropic.wrap(_sync_client(), other.Limiter("tier-4")),
            "this": ratekeeper.anthropic.wrap(_sync_client(), ratekeeper.Limiter("tier-4")),
        }
        print(_measure_sync(clients, rounds), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 50)
