"""Redis CPU per acquire+settle with ``prefetch=0``: what the scripts cost inside Redis.

Run: ``PYTHONPATH=src python benchmarks/redis_script_cost.py [--cycles 2000 --rounds 5]``.

One process, one asyncio loop, a fresh local ``redis-server``: after a warm-up,
``INFO commandstats`` is reset and ``rounds`` x ``cycles`` acquire+settle cycles
run; the result is ``EVALSHA``'s total microseconds over the cycles (Redis's own
measure, steadier than wall time on a shared machine) and the median wall time
per cycle. To compare two versions, run it with each one's ``src`` on the path,
alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_server import RedisServer

from ratekeeper import Limiter, RedisBackend

HUGE = {"sonnet-4.x": {"requests": 1e9, "input_tokens": 1e12, "output_tokens": 1e12}}


def main() -> None:
    """Print Redis CPU and wall time per cycle."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ratekeeper-script-cost-") as directory:
        server = RedisServer(Path(directory))
        server.start()
        try:
            backend = RedisBackend(server.url, org="cost", prefetch=0)
            limiter = Limiter("tier-1", opening=60.0, limits=HUGE, backend=backend)

            async def cycles(n: int) -> None:
                for _ in range(n):
                    async with limiter.acquire("claude-sonnet-4-5", input_tokens=100, max_tokens=100) as p:
                        p.settle({"input_tokens": 100, "output_tokens": 50})

            with asyncio.Runner() as runner:
                runner.run(cycles(200))  # connect, load the scripts, create the pool
                admin = redis.Redis.from_url(server.url)
                admin.config_resetstat()
                walls = []
                for _ in range(args.rounds):
                    start = time.perf_counter()
                    runner.run(cycles(args.cycles))
                    walls.append((time.perf_counter() - start) / args.cycles)
                backend.flush()
            backend.close()
            stats = admin.info("commandstats")["cmdstat_evalsha"]
            n = args.cycles * args.rounds
            print(
                f"Redis EVALSHA {stats['usec'] / n:.1f} us per cycle ({stats['calls'] / n:.2f} calls, "
                f"{stats['usec_per_call']:.1f} us each); "
                f"wall {statistics.median(walls) * 1e6:.1f} us per cycle"
            )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
