"""``ratekeeper run`` against ``ratekeeper emulate`` over real HTTP, in wall-clock time; and the plain way.

Run: ``python benchmarks/run_over_http.py --preset tier-1 --requests 500`` (about 10 minutes:
Tier 1's 50 RPM allow 500 requests in no less than 9) and ``--preset tier-2 --requests 5000``
(about 5). ``--strategy run`` or ``--strategy gather`` runs one of the two; by default both run
side by side, each against its own emulator process, so they take no longer than one.

``run``: the command itself, ``ratekeeper run REQUESTS --out RESULTS --json``, in a process of
its own. ``gather``: what a bulk job usually is, ``asyncio.gather`` over every request behind an
``asyncio.Semaphore(--concurrency)`` with the SDK's own retries (``max_retries=2``, which honour
``retry-after``). Each strategy gets a fresh ``ratekeeper emulate --port 0`` process with the
preset's limits and its default latency (0.5 s to the first token, 60 tokens a second).

Goodput, per dimension, is what the server admitted (the requests answered, their usage's input
and output tokens) over what it allowed during the run: a full bucket at the start (one minute's
worth) plus the refill over the run, from the first request's start to the last answer. The
binding dimension is the one nearest its allowance. 429s are counted on the wire: by the
limiter's statistics (``rate_limited`` in ``run``'s summary, every attempt the middleware saw)
and by an httpx response hook for ``gather``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anthropic

from ratekeeper import limits_for

MODEL = "claude-sonnet-4-5"
SRC = Path(__file__).resolve().parents[1] / "src"


def workload(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--requests`` requests of ``--words`` words each, in the Batches request format."""
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


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONUNBUFFERED": "1", "ANTHROPIC_API_KEY": "test"}
    env.pop("ANTHROPIC_BASE_URL", None)
    return env


@contextmanager
def emulator(preset: str, uplink: float = 0.0) -> Iterator[str]:
    """``ratekeeper emulate --preset PRESET --port 0`` in its own process; yields its URL.

    ``uplink``: each request reaches the emulator up to that many seconds after it was sent.
    """
    args = [sys.executable, "-m", "ratekeeper", "emulate", "--preset", preset, "--port", "0"]
    args += ["--uplink", repr(uplink)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("listening on http://127.0.0.1:"):
            raise RuntimeError(
                f"ratekeeper emulate did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
            )
        yield line.removeprefix("listening on ")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def with_run(url: str, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """The command, in its own process, on a file of the workload."""
    src = directory / "requests.jsonl"
    out = directory / "results.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in workload(args)))
    command = [sys.executable, "-m", "ratekeeper", "run", str(src), "--out", str(out),
               "--preset", args.preset, "--base-url", url, "--json", "--no-progress"]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, env=_env())
    wall = time.monotonic() - started
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"ratekeeper run exited {proc.returncode}: {proc.stderr}")
    summary = json.loads(proc.stdout)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    answers = [
        (_unix(r["timing"]["started_at"]), r["timing"]["seconds"], r["result"], r["attempts"]) for r in rows
    ]
    return {
        "wall_seconds": round(wall, 1),
        "http_429": summary["rate_limited"],
        "retried": sum(1 for *_, attempts in answers if attempts > 1),
        "summary_line": proc.stderr.strip().splitlines()[-1],
        **_admitted(answers, args),
    }


def with_gather(url: str, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """``asyncio.gather`` behind a semaphore, the SDK's retries, nothing else."""
    del directory
    rate_limited = 0

    async def count(response: Any) -> None:
        nonlocal rate_limited
        rate_limited += response.status_code == 429

    async def main() -> tuple[list[tuple[float, float, dict[str, Any], int]], float]:
        http = anthropic.DefaultAsyncHttpxClient(event_hooks={"response": [count]})
        client = anthropic.AsyncAnthropic(api_key="test", base_url=url, max_retries=2, http_client=http)
        semaphore = asyncio.Semaphore(args.concurrency)

        async def one(params: dict[str, Any]) -> tuple[float, float, dict[str, Any], int]:
            async with semaphore:
                started, clock = time.time(), time.monotonic()
                try:
                    message = await client.messages.create(**params)
                except anthropic.APIError as exc:
                    return started, time.monotonic() - clock, {"type": "errored", "error": str(exc)}, 0
                result = {"type": "succeeded", "message": message.to_dict(mode="json")}
                return started, time.monotonic() - clock, result, 0

        started = time.monotonic()
        answers = await asyncio.gather(*(one(r["params"]) for r in workload(args)))
        wall = time.monotonic() - started
        await client.close()
        return list(answers), wall

    answers, wall = asyncio.run(main())
    return {"wall_seconds": round(wall, 1), "http_429": rate_limited, **_admitted(answers, args)}


def _unix(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _admitted(answers: list[tuple[float, float, Any, int]], args: argparse.Namespace) -> dict[str, Any]:
    """Succeeded and errored, and each dimension's admitted total over what the server allowed."""
    ok = [result["message"] for _, _, result, _ in answers if result["type"] == "succeeded"]
    first = min(started for started, *_ in answers)
    last = max(started + seconds for started, seconds, *_ in answers)
    minutes = (last - first) / 60
    limits = limits_for(args.preset, MODEL)
    usage = [m["usage"] for m in ok]
    totals = {
        "rpm": (len(ok), limits.rpm),
        "itpm": (
            sum(
                u["input_tokens"]
                + (u.get("cache_creation_input_tokens") or 0)
                + (u.get("cache_read_input_tokens") or 0)
                for u in usage
            ),
            limits.itpm,
        ),
        "otpm": (sum(u["output_tokens"] for u in usage), limits.otpm),
    }
    goodput = {k: total / (rate * (1 + minutes)) for k, (total, rate) in totals.items()}
    binding = max(goodput, key=goodput.__getitem__)
    return {
        "succeeded": len(ok),
        "errored": len(answers) - len(ok),
        "run_seconds": round(minutes * 60, 1),
        "binding": binding,
        "goodput": round(goodput[binding], 4),
        "goodput_all": {k: round(v, 4) for k, v in goodput.items()},
        "admitted": {k: total for k, (total, _) in totals.items()},
    }


STRATEGIES = {"run": with_run, "gather": with_gather}


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One strategy against a fresh emulator process."""
    with emulator(args.preset, args.uplink) as url, tempfile.TemporaryDirectory() as directory:
        keep = Path(args.keep) / f"{args.preset}-{name}" if args.keep else Path(directory)
        keep.mkdir(parents=True, exist_ok=True)
        row = STRATEGIES[name](url, args, keep)
    return {"strategy": name, "preset": args.preset, "requests": args.requests, **row}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--preset", default="tier-1")
    p.add_argument("--words", type=int, default=300, help="prompt words (about as many tokens)")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=16, help="gather's semaphore")
    p.add_argument("--strategy", choices=["run", "gather", "both"], default="both")
    p.add_argument(
        "--uplink", type=float, default=0.0, help="seconds a request may take to reach the server (0..S)"
    )
    p.add_argument("--keep", metavar="DIR", help="keep run's requests and results files under DIR")
    args = p.parse_args()
    if args.strategy != "both":
        print(json.dumps(measure(args.strategy, args)), flush=True)
        return
    # side by side, each in a process of its own, so neither slows the other's event loop
    procs = [
        subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--strategy", name], env=_env())
        for name in STRATEGIES
    ]
    codes = [proc.wait() for proc in procs]
    raise SystemExit(max(codes))


if __name__ == "__main__":
    main()
