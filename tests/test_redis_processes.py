"""Several processes share one limit through Redis, against the emulator's real HTTP server.

Four worker processes, each with its own ``Limiter`` and ``RedisBackend``,
send as fast as their limiters let them to ``ratekeeper emulate`` (600 RPM
with a 6-second burst). Together they must meet no 429 and use most of what
the server allows over the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from redis_server import RedisServer

pytestmark = pytest.mark.slow

RPM = 600
BURST_SECONDS = 6.0
DURATION = 6.0
WORKERS = 4

# One worker: its own limiter and backend (another process, to Redis), concurrent tasks
# (4, or argv[6]) making plain httpx2 calls that acquire, observe and settle themselves;
# argv[7] is the backend's prefetch. Prints a JSON summary. (Also run by
# benchmarks/redis_processes_utilization.py.)
WORKER = r"""
import json, sys, time
import anyio, httpx2
from ratekeeper import Limiter, RedisBackend

base_url, redis_url = sys.argv[1], sys.argv[2]
duration, rpm, burst = (float(a) for a in sys.argv[3:6])
tasks = int(sys.argv[6]) if len(sys.argv) > 6 else 4
prefetch = int(sys.argv[7]) if len(sys.argv) > 7 else 16
# (the utilization benchmark's token-bound runs: the output limit and max_tokens)
otpm = float(sys.argv[8]) if len(sys.argv) > 8 else 10_000_000
max_tokens = int(sys.argv[9]) if len(sys.argv) > 9 else 8
MODEL = "claude-sonnet-4-5"
BODY = {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Say hi."}]}
statuses = {}
produced = [0]

async def main():
    backend = RedisBackend(redis_url, org="multi", prefetch=prefetch)
    limiter = Limiter(
        "tier-1",
        limits={"sonnet-4.x": {"requests": rpm, "input_tokens": 10_000_000, "output_tokens": otpm}},
        burst=burst,
        backend=backend,
    )
    deadline = time.time() + duration
    headers = {"x-api-key": "test", "anthropic-version": "2023-06-01", "content-type": "application/json"}
    async with httpx2.AsyncClient(base_url=base_url, timeout=60) as client:
        async def task():
            while True:
                async with limiter.acquire(MODEL, input_tokens=20, max_tokens=max_tokens) as permit:
                    if time.time() >= deadline:
                        return
                    permit.mark_sent()
                    resp = await client.post("/v1/messages", json=BODY, headers=headers)
                    statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                    permit.observe(resp.headers, status=resp.status_code, body=resp.content)
                    if resp.status_code == 200:
                        usage = resp.json()["usage"]
                        produced[0] += usage["output_tokens"]
                        permit.settle(usage)
        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(task)
    backend.close()

anyio.run(main)
print(json.dumps({"output_tokens": produced[0]}))
print(json.dumps({str(k): v for k, v in statuses.items()}))
"""


@pytest.fixture
def emulator() -> Iterator[str]:
    """``ratekeeper emulate`` on a free loopback port with an explicit 600 RPM limit."""
    code = "from ratekeeper.cli._main import main; raise SystemExit(main())"
    args = [
        # answers in 0.3 s, the order of a short real one: with 10-ms answers the shared
        # resync's relative rule uses less of the limit (docs/benchmarks.md)
        *(sys.executable, "-c", code, "emulate", "--port", "0", "--ttft", "0.3"),
        *("--tokens-per-second", "10000", "--rpm", str(RPM), "--itpm", "10000000", "--otpm", "10000000"),
        *("--enforcement-interval", str(BURST_SECONDS)),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:"), (
            line or proc.stderr.read() if proc.stderr else ""
        )
        yield line.removeprefix("listening on ")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_processes_share_one_limit_without_a_429(redis_server: RedisServer, emulator: str) -> None:
    args = [emulator, redis_server.url, str(DURATION), str(RPM), str(BURST_SECONDS / 60)]
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, *args], stdout=subprocess.PIPE, text=True)
        for _ in range(WORKERS)
    ]
    totals: dict[str, int] = {}
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        for status, count in json.loads(out.strip().splitlines()[-1]).items():
            totals[status] = totals.get(status, 0) + count
    print(f"{WORKERS} processes, {DURATION:g} s: {totals}")
    assert totals.get("429", 0) == 0, totals
    # The server allows its burst plus the refill over the run; the run is measured from the
    # first worker's start, so the allowance is a slight overestimate (in the server's favour).
    allowed = RPM * BURST_SECONDS / 60 + RPM / 60 * DURATION
    assert totals.get("200", 0) >= 0.8 * allowed, totals
    assert totals.get("200", 0) <= allowed + 1, totals
