"""How much of a shared limit several processes use through Redis, against the real HTTP emulator.

Run: ``python benchmarks/redis_processes_utilization.py [--workers 2 --tasks 24 --ttft 3
--rpm 120 --interval 60 --seconds 30 --prefetch 16 0 --runs 3
--report-moment admission]`` (about 35 s per run).

Each worker process has its own ``Limiter`` and ``RedisBackend`` and runs ``tasks``
concurrent loops of acquire, POST to ``ratekeeper emulate``, observe, settle. Requests
take ``ttft`` seconds (a long, non-streamed answer), so every report the limiter reads
is that old. The result is the successful requests over what the server allowed
(its burst plus the refill over the run), and the 429s. With ``--otpm`` (and
``--max-tokens``) the output bucket binds instead (the emulator's default output: a
seeded 10-100% of max_tokens; ``--otpm-rule`` how it counts it): the result is then the
output tokens of the successful requests over what the output bucket allowed. A local ``redis-server`` is
started on a free loopback port, as in the tests. Results vary by a few percent from
run to run (processes share the machine's cores): compare several runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_server import RedisServer
from test_redis_processes import WORKER


def run_once(args: argparse.Namespace, prefetch: int) -> dict[str, int]:
    """One run with a fresh Redis and emulator: status code -> count over every worker."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="ratekeeper-utilization-") as directory:
        redis = RedisServer(Path(directory))
        redis.start()
        code = "from ratekeeper.cli._main import main; raise SystemExit(main())"
        emulate = [
            *(sys.executable, "-c", code, "emulate", "--port", "0", "--ttft", str(args.ttft)),
            *("--tokens-per-second", "10000", "--rpm", str(args.rpm), "--itpm", "10000000"),
            *("--otpm", str(args.otpm or 10_000_000), "--enforcement-interval", str(args.interval)),
            *("--report-moment", args.report_moment, "--otpm-rule", args.otpm_rule),
        ]
        server = subprocess.Popen(emulate, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert server.stdout is not None
            url = server.stdout.readline().strip().removeprefix("listening on ")
            worker_args = [url, redis.url, str(args.seconds), str(args.rpm), str(args.interval / 60)]
            workers = [
                subprocess.Popen(
                    [
                        *(sys.executable, "-c", WORKER, *worker_args, str(args.tasks), str(prefetch)),
                        *(str(args.otpm or 10_000_000), str(args.max_tokens)),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                )
                for _ in range(args.workers)
            ]
            totals: dict[str, int] = {}
            for worker in workers:
                out, _ = worker.communicate(timeout=args.seconds + 120)
                if worker.returncode != 0:
                    raise SystemExit(f"a worker failed (exit {worker.returncode})")
                lines = out.strip().splitlines()
                for status, count in json.loads(lines[-1]).items():
                    totals[status] = totals.get(status, 0) + count
                tokens = json.loads(lines[-2])["output_tokens"]
                totals["output_tokens"] = totals.get("output_tokens", 0) + tokens
            return totals
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:  # (still closing connections: the run is measured)
                server.kill()
                server.wait()
            redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=24, help="concurrent requests per worker")
    parser.add_argument("--ttft", type=float, default=3.0, help="seconds before the answer")
    parser.add_argument("--rpm", type=int, default=120)
    parser.add_argument("--interval", type=float, default=60.0, help="the server's burst, seconds")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--prefetch", type=int, nargs="+", default=[16, 0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--otpm", type=int, default=0, help="an output limit that binds (0: none)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--otpm-rule", choices=("max_tokens", "actual"), default="max_tokens")
    parser.add_argument(
        "--report-moment",
        choices=("admission", "response", "mixed"),
        default="admission",
        help="the moment the emulator's non-streamed headers describe",
    )
    args = parser.parse_args()
    limit = args.otpm or args.rpm
    allowed = limit * args.interval / 60 + limit / 60 * args.seconds
    unit = "output tokens" if args.otpm else "requests"
    print(
        f"{args.workers} workers x {args.tasks} tasks, {args.ttft:g}-s requests, {args.rpm} RPM, "
        f"{args.otpm or 'no'} OTPM ({args.otpm_rule}, max_tokens {args.max_tokens}), "
        f"{args.interval:g}-s burst, {args.seconds:g} s, reports at {args.report_moment}: "
        f"the server allows about {allowed:.0f} {unit}"
    )
    for prefetch in args.prefetch:
        for _ in range(args.runs):
            totals = run_once(args, prefetch)
            ok = totals.get("200", 0)
            used = totals["output_tokens"] if args.otpm else ok
            print(
                f"prefetch={prefetch}: {ok} ok, {used} {unit} ({used / allowed:.3f}), "
                f"{totals.get('429', 0)} 429s",
                flush=True,
            )


if __name__ == "__main__":
    main()
