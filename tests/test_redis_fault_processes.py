"""Several processes share one pool through a redis-server that is slowed and paused at random.

Four worker processes, each with its own ``Limiter`` and ``RedisBackend``
(``timeout=0.2``), take requests from one pool as fast as it lets them; each
request is then sent (and settled, or released as a server error) or released
unsent, at random. Meanwhile this process holds Redis past the workers' timeout
with ``DEBUG SLEEP`` (Redis runs what it had read when it wakes: changes whose
sender saw a timeout) and with ``CLIENT PAUSE``, and a second pool's key has the
wrong type, so every acquire on it gets an error reply. Two things must hold:

- nothing is minted: the requests sent over the run are at most what the pool
  allows, its capacity plus the refill over the run (measured from before the
  first worker starts to after the last one ends, a slight overestimate);
- nothing is orphaned: when every worker is done, Redis holds no reservation.
"""

from __future__ import annotations

import functools
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_server import RedisServer

pytestmark = pytest.mark.slow

WORKERS = 4
RPM = 300.0
BURST = 0.1  # capacity 30 requests, 5 a second
DURATION = 6.0  # the workers' run; faults stop QUIET seconds before its end
QUIET = 1.0
ORG = "faults"
TAG = "{ratekeeper:" + ORG + "}"

# One worker: argv = redis url, duration, seed. Prints {"sent": n, "unsent": n, "down": n}.
WORKER = r"""
import json, random, sys, time
import anyio
from ratekeeper import AcquireTimeout, BackendUnavailable, Limiter, RedisBackend, WouldBlock

url, duration, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
counts = {"sent": 0, "unsent": 0, "down": 0, "bad": 0, "first": 0.0, "last": 0.0}
LIMITS = {
    "sonnet-4.x": {"requests": 300.0, "input_tokens": 1e9, "output_tokens": 1e9},
    "haiku-4.5": {"requests": 600.0, "input_tokens": 1e9, "output_tokens": 1e9},
}

async def main():
    backend = RedisBackend(
        url, org="faults", timeout=0.2, retry_interval=0.05, prefetch=rng.choice([0, 16]), flush_delay=0.002
    )
    limiter = Limiter("tier-1", opening=60.0, limits=LIMITS, burst=0.1, backend=backend)
    end = time.time() + duration

    async def task():
        while time.time() < end:
            try:
                if rng.random() < 0.05:  # the pool whose key has the wrong type
                    counts["bad"] += 1
                    limiter.acquire_nowait("claude-haiku-4-5", input_tokens=1, max_tokens=1).release()
                    continue
                acquire = limiter.acquire("claude-sonnet-4-5", input_tokens=10, max_tokens=10, timeout=1.0)
                async with acquire as p:
                    counts["first"] = counts["first"] or time.time()
                    counts["last"] = time.time()
                    await anyio.sleep(rng.random() * 0.01)
                    r = rng.random()
                    if r < 0.4:
                        p.release()  # never sent: its request comes back
                        counts["unsent"] += 1
                    elif r < 0.6:
                        p.mark_sent()
                        p.observe({}, status=500)
                        p.release()  # a server error: it keeps its request
                        counts["sent"] += 1
                    else:
                        p.mark_sent()
                        p.settle({"input_tokens": rng.randint(0, 10), "output_tokens": rng.randint(0, 10)})
                        counts["sent"] += 1
            except (BackendUnavailable, AcquireTimeout, WouldBlock):
                counts["down"] += 1
                await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        for _ in range(8):  # eight tasks: requests in flight at once
            tg.start_soon(task)
    deadline = time.time() + 10
    while not backend.flush():  # every change delivered before the process ends
        assert time.time() < deadline, "Redis did not come back"
        time.sleep(0.02)
    backend.close()

anyio.run(main)
print(json.dumps(counts))
"""


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A fresh ``redis-server`` that accepts ``DEBUG SLEEP``."""
    with tempfile.TemporaryDirectory(prefix="ratekeeper-redis-faults-") as directory:
        srv = RedisServer(Path(directory), options=("--enable-debug-command", "yes"))
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


#: Requests one worker's prefetch holds at most (5% of the 30-request capacity, rounded up).
PREFETCHED = 2


@pytest.mark.parametrize("restart", [False, True], ids=["no-restart", "restart"])
def test_faults_mint_nothing_and_orphan_nothing(server: RedisServer, restart: bool) -> None:
    """With ``restart``, Redis also restarts once, empty, mid-run.

    A restart forgets the pool: it is recreated full, so the allowance gains one
    capacity; and what a worker had prefetched from the old pool (at most 5% of the
    capacity, so one request) it may still hand out. Both are added to the bound. The
    requests in flight then give back nothing to the new pool, which never charged them
    (its 'born' seq is above theirs); before, each could mint a request.
    """
    rng = random.Random(14)
    admin = redis.Redis.from_url(server.url, decode_responses=True)
    admin.set(f"{TAG}:pool:haiku-4.5", "not a hash")
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, server.url, str(DURATION), str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(WORKERS)
    ]
    faults = {"sleep": 0, "pause": 0, "restart": 0}
    debug_sleep: Any = functools.partial(redis.Redis.from_url(server.url).execute_command, "DEBUG", "SLEEP")
    while time.monotonic() < start + DURATION - QUIET:
        time.sleep(rng.uniform(0.1, 0.5))
        if restart and not faults["restart"] and time.monotonic() > start + DURATION / 2:
            server.restart()
            admin.set(f"{TAG}:pool:haiku-4.5", "not a hash")
            faults["restart"] += 1
        elif rng.random() < 0.5:
            debug_sleep(rng.uniform(0.25, 0.5))  # past the 0.2 s timeout
            faults["sleep"] += 1
        else:
            admin.client_pause(rng.randint(250, 500), all=True)
            faults["pause"] += 1
    totals: dict[str, int] = {}
    first, last = float("inf"), 0.0
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        counts = json.loads(out.strip().splitlines()[-1])
        first, last = min(first, counts.pop("first") or first), max(last, counts.pop("last"))
        for key, count in counts.items():
            totals[key] = totals.get(key, 0) + count
    # from the first grant to the last, by any process (time.time: one clock for all)
    span = last - first
    steady = RPM * BURST + RPM / 60 * span + 1  # (+1: grant times are read after the reply)
    allowed = steady + faults["restart"] * (RPM * BURST + WORKERS * PREFETCHED)
    print(f"{WORKERS} processes, {span:.1f} s of grants, faults {faults}: {totals}; allowed {allowed:.0f}")
    assert faults["sleep"] >= 2, faults
    assert faults["pause"] >= 2, faults
    assert faults["restart"] == restart, faults
    assert totals["bad"] > 0, totals
    # the run did run (against what the limit allows, not the bound a restart may add to)
    assert totals["sent"] >= 0.5 * steady, (totals, steady)
    assert totals["sent"] <= allowed, (totals, allowed)
    assert admin.hlen(f"{TAG}:res:sonnet-4.x") == 0
    assert admin.zcard(f"{TAG}:lease:sonnet-4.x") == 0
