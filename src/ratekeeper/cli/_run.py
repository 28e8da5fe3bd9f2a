"""``ratekeeper run``: its arguments, and the thin shell over ``run_requests`` that runs a file.

Only argparse is imported at module level, so ``ratekeeper --help`` works
without the ``anthropic`` extra; the SDK loads when a run starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import anthropic
    import anyio

    from ratekeeper.gate._limiter import Limiter
    from ratekeeper.run import BatchRequest, RequestResult

__all__ = ["configure", "run"]

PROG = "ratekeeper run"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def configure(p: argparse.ArgumentParser) -> None:
    """Add ``run``'s arguments to ``p``."""
    p.description = (
        "Send every request of a JSONL file in the Message Batches request format "
        '({"custom_id": ..., "params": {...}}) through the official SDK, as fast as the rate limits '
        "allow, and append each result in the Batches result format to --out as it finishes. "
        "Re-running with the same --out skips what already succeeded."
    )
    p.add_argument("requests", metavar="REQUESTS.jsonl", type=Path, help="one request per line")
    p.add_argument("--out", metavar="RESULTS.jsonl", type=Path, help="results file (appended to; resumed)")
    p.add_argument("--preset", default="tier-1", help="tier-1..tier-4, start, build, scale (default: tier-1)")
    p.add_argument("--redis", metavar="URL", help="share the limits with other processes through Redis")
    p.add_argument(
        "--org", default="default", help="with --redis: the organization's name (default: default)"
    )
    p.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=256,
        metavar="N",
        help="at most this many requests on their way at once, waiting for capacity or in flight; "
        "workers are added while the limiter admits all they send (default 256)",
    )
    p.add_argument("--base-url", help="API base URL (default: $ANTHROPIC_BASE_URL or the SDK's)")
    p.add_argument("--max-retries", type=int, default=2, help="the SDK's max_retries (default 2, its own)")
    p.add_argument("--strict", action="store_true", help="stop at a bad input line instead of skipping it")
    p.add_argument("--retry-errors", action="store_true", help="resend requests that errored before")
    p.add_argument(
        "--dry-run", action="store_true", help="estimate tokens and time at the preset's limits; send nothing"
    )
    p.add_argument(
        "--count-tokens",
        action="store_true",
        help="with --dry-run: count input tokens exactly with the API's count_tokens (free, own RPM limit)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout at the end")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress display (none either when not a TTY)"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``ratekeeper run``; returns the exit code."""
    from ratekeeper.errors import ConfigurationError
    from ratekeeper.run import BadLine, read_requests

    try:
        with args.requests.open(encoding="utf-8") as f:
            items = list(read_requests(f))
    except (OSError, UnicodeDecodeError) as exc:
        print(f"{PROG}: {args.requests}: {exc}", file=sys.stderr)
        return 2
    bad = [item for item in items if isinstance(item, BadLine)]
    requests = [item for item in items if not isinstance(item, BadLine)]
    for line in bad:
        print(f"{PROG}: {args.requests}: {line}", file=sys.stderr)
    if any(line.duplicate for line in bad):
        print(f"{PROG}: results are keyed by custom_id: make them unique", file=sys.stderr)
        return 2
    if bad and args.strict:
        print(f"{PROG}: {len(bad)} bad line(s); nothing sent (--strict)", file=sys.stderr)
        return 2
    if bad:
        print(f"{PROG}: skipping {len(bad)} bad line(s)", file=sys.stderr)
    if args.dry_run:
        return _dry_run(args, requests)
    if args.out is None:
        print(f"{PROG}: --out RESULTS.jsonl is required (or --dry-run)", file=sys.stderr)
        return 2
    try:
        return _run(args, requests, len(bad))
    except ConfigurationError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- dry run


def _dry_run(args: argparse.Namespace, requests: list[BatchRequest]) -> int:
    from ratekeeper.errors import ConfigurationError
    from ratekeeper.run._plan import plan

    counted: dict[str, int] | None = None
    if args.count_tokens:
        client = _client(args)
        if client is None:
            print(f"{PROG}: no API key: set ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN)", file=sys.stderr)
            return 2
        import anyio

        limiter, close_backend = _limiter(args)
        try:
            counted, failed = anyio.run(_count_all, client, limiter, requests, args.max_concurrency)
        finally:
            close_backend()
        if failed:
            custom_id, why = next(iter(failed.items()))
            print(
                f"{PROG}: count_tokens failed for {len(failed):,} request(s); {custom_id}: {why}",
                file=sys.stderr,
            )
            return 1
    try:
        plans = plan(requests, args.preset, counted=counted)
    except ConfigurationError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    minutes = max((max(p.minutes.values()) for p in plans), default=0.0)
    how = "counted" if counted is not None else "estimated"
    if args.json:
        print(json.dumps({"dry_run": True, "input_tokens": how, "requests": len(requests),
                          "minutes": round(minutes, 3), "pools": [p.to_json() for p in plans]}))  # fmt: skip
        return 0
    print(f"{len(requests):,} requests at {args.preset} (input {how}; output counted at max_tokens)")
    for p in plans:
        m = p.minutes
        print(
            f"{p.pool}: {p.requests:,} requests / {p.rpm:,} RPM = {m['requests']:.1f} min · "
            f"{p.input_tokens:,} input tokens / {p.itpm:,} ITPM = {m['input_tokens']:.1f} min · "
            f"{p.output_tokens:,} output tokens / {p.otpm:,} OTPM = {m['output_tokens']:.1f} min"
        )
        print(f"  binding: {_DIMENSION[p.binding]}")
    print(f"time at the limit: at most {_duration(minutes * 60)} (the pools run side by side)")
    return 0


_DIMENSION = {"requests": "RPM", "input_tokens": "ITPM", "output_tokens": "OTPM"}


async def _count_all(
    client: anthropic.AsyncAnthropic, limiter: Limiter, requests: list[BatchRequest], concurrency: int
) -> tuple[dict[str, int], dict[str, str]]:
    """Each request's exact input tokens from ``count_tokens``, within its own RPM limit; and the failures."""
    import anthropic
    import anyio

    from ratekeeper.anthropic import wrap

    # wrapped: count_tokens has a rate limit of its own, which the middleware keeps to
    wrapped = wrap(client, limiter)
    fields = ("model", "messages", "system", "tools", "tool_choice", "thinking")
    counted: dict[str, int] = {}
    failed: dict[str, str] = {}
    slots = anyio.CapacityLimiter(concurrency)

    async def one(request: BatchRequest) -> None:
        async with slots:
            body = {k: v for k, v in request.params.items() if k in fields}
            try:
                counted[request.custom_id] = (await wrapped.messages.count_tokens(**body)).input_tokens
            except anthropic.APIError as exc:
                failed.setdefault(request.custom_id, str(exc))

    try:
        async with anyio.create_task_group() as tg:
            for request in requests:
                tg.start_soon(one, request)
    finally:
        await wrapped.close()
    return counted, failed


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


# --------------------------------------------------------------------------- the run


class _Tally:
    """What the run has done so far, for the progress display and the summary."""

    def __init__(self, total: int, skipped: int, bad: int) -> None:
        self.total = total
        self.skipped = skipped
        self.bad = bad
        self.ok = 0
        self.errored = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.rate_limited = 0
        self.started = time.monotonic()
        self.interrupted = 0
        self.binding = ""

    @property
    def done(self) -> int:
        return self.ok + self.errored

    def add(self, result: RequestResult) -> None:
        if result.succeeded:
            self.ok += 1
        else:
            self.errored += 1
        usage = result.usage
        self.input_tokens += sum(
            int(usage.get(k) or 0)
            for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        self.output_tokens += int(usage.get("output_tokens") or 0)

    def per_minute(self, tokens: int) -> float:
        elapsed = time.monotonic() - self.started
        return tokens * 60.0 / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        elapsed = time.monotonic() - self.started
        if not self.done or elapsed <= 0:
            return None
        return (self.total - self.done) * elapsed / self.done

    def line(self) -> str:
        """One short progress line: it has to fit a terminal beside the bar."""
        eta = self.eta()
        return (
            f"{self.done:,}/{self.total:,} · {self.errored:,} errored · {self.rate_limited:,} 429s · "
            f"in {_short(self.per_minute(self.input_tokens))}/min · "
            f"out {_short(self.per_minute(self.output_tokens))}/min"
            + (f" · {self.binding}" if self.binding else "")
            + (f" · ETA {_duration(eta)}" if eta is not None else "")
        )

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.total + self.skipped,
            "already_done": self.skipped,
            "done": self.done,
            "succeeded": self.ok,
            "errored": self.errored,
            "remaining": self.total - self.done,
            "bad_lines": self.bad,
            "rate_limited": self.rate_limited,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "input_tokens_per_minute": round(self.per_minute(self.input_tokens)),
            "output_tokens_per_minute": round(self.per_minute(self.output_tokens)),
            "seconds": round(time.monotonic() - self.started, 3),
            "interrupted": bool(self.interrupted),
        }


class _Progress:
    """rich's progress bar on a TTY, if rich is installed; else one plain line at most once a second."""

    def __init__(self, tally: _Tally, stream: IO[str]) -> None:
        self._tally = tally
        self._stream = stream
        self._rich: Any = None
        self._task: Any = None
        self._last = 0.0
        try:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn
        except ImportError:
            return
        self._rich = Progress(
            BarColumn(bar_width=16),
            TextColumn("{task.description}"),
            console=Console(file=stream),
            transient=True,
        )
        self._task = self._rich.add_task(tally.line(), total=tally.total)

    def __enter__(self) -> _Progress:
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self._last:
            self._stream.write("\n")

    def update(self, *, force: bool = False) -> None:
        if self._rich is not None:
            self._rich.update(self._task, completed=self._tally.done, description=self._tally.line())
            return
        now = time.monotonic()
        if force or now - self._last >= 1.0:
            self._last = now
            self._stream.write("\r" + self._tally.line())
            self._stream.flush()


def _run(args: argparse.Namespace, requests: list[BatchRequest], bad: int) -> int:
    from ratekeeper.run import Previous, ResultsFile

    previous = Previous.read(args.out)
    if previous.torn_bytes:
        print(f"{PROG}: {args.out}: cut off a torn last line ({previous.torn_bytes} bytes)", file=sys.stderr)
    retry = previous.errored if args.retry_errors else frozenset()
    skip = previous.types.keys() - retry
    todo = [r for r in requests if r.custom_id not in skip]
    skipped = len(requests) - len(todo)
    if skipped:
        errored_kept = skip - previous.succeeded
        errored_skipped = sum(1 for r in requests if r.custom_id in errored_kept)
        note = f" ({errored_skipped:,} errored; --retry-errors resends them)" if errored_skipped else ""
        print(f"{PROG}: {skipped:,} request(s) already in {args.out}{note}", file=sys.stderr)
    client = _client(args)
    if client is None:
        print(f"{PROG}: no API key: set ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN)", file=sys.stderr)
        return 2
    limiter, close_backend = _limiter(args)
    tally = _Tally(len(todo), skipped, bad)
    try:
        with ResultsFile(args.out, drop=retry & {r.custom_id for r in todo}) as out:
            import anyio

            code = anyio.run(_main, args, client, limiter, todo, out, tally)
    finally:
        close_backend()  # its last settlements reach Redis, what it prefetched goes back
    if args.json:
        print(json.dumps(tally.summary()))
    _print_summary(tally, args.out)
    return code


def _limiter(args: argparse.Namespace) -> tuple[Limiter, Callable[[], None]]:
    """The limiter, and what closes its backend (a no-op without one)."""
    from ratekeeper.gate._limiter import Limiter

    if args.redis is None:
        return Limiter(args.preset), lambda: None
    from ratekeeper.redis._backend import RedisBackend

    backend = RedisBackend(args.redis, org=args.org)
    return Limiter(args.preset, backend=backend), backend.close


def _client(args: argparse.Namespace) -> anthropic.AsyncAnthropic | None:
    """The SDK's client as its users configure it; None without any credentials."""
    try:
        import anthropic
    except ImportError:
        from ratekeeper.errors import MissingDependency

        raise MissingDependency("anthropic", "anthropic") from None

    # the SDK reads ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL itself, as its users expect
    client = anthropic.AsyncAnthropic(base_url=args.base_url, max_retries=args.max_retries)
    if all(getattr(client, name, None) is None for name in ("api_key", "auth_token", "credentials")):
        return None  # every request would fail alike, deep in the SDK
    return client


async def _main(
    args: argparse.Namespace,
    client: anthropic.AsyncAnthropic,
    limiter: Limiter,
    todo: list[BatchRequest],
    out: Any,
    tally: _Tally,
) -> int:
    import anyio

    from ratekeeper.run import run_requests

    stop = anyio.Event()
    show = not args.no_progress and sys.stderr.isatty()
    progress = _Progress(tally, sys.stderr) if show else None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_interrupts, stop, tg.cancel_scope, tally)
            if progress is not None:
                tg.start_soon(_tick, progress, limiter, tally)
            with progress if progress is not None else contextlib.nullcontext():
                results = run_requests(
                    client, todo, limiter=limiter, max_concurrency=args.max_concurrency, stop=stop
                )
                async with contextlib.aclosing(results):
                    async for result in results:
                        out.write(result)  # before anything else: an answer is never lost
                        tally.add(result)
                        if progress is not None:
                            progress.update()
            tg.cancel_scope.cancel()
    finally:
        tally.rate_limited = _rate_limited(limiter)
        await client.close()
    if tally.interrupted:
        return 130
    return 0 if tally.errored == 0 and tally.done == tally.total else 1


async def _interrupts(stop: anyio.Event, scope: anyio.CancelScope, tally: _Tally) -> None:
    import anyio

    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            tally.interrupted += 1
            if tally.interrupted == 1:
                print(
                    f"\n{PROG}: stopping: no new requests; waiting for those sent "
                    "(Ctrl-C again cancels them)",
                    file=sys.stderr,
                )
                stop.set()
            else:
                print(f"\n{PROG}: cancelling the requests in flight", file=sys.stderr)
                scope.cancel()
                return


async def _tick(progress: _Progress, limiter: Limiter, tally: _Tally) -> None:
    import anyio

    while True:
        tally.rate_limited = _rate_limited(limiter)
        tally.binding = _binding(limiter)
        progress.update()
        await anyio.sleep(1.0)


def _short(n: float) -> str:
    return f"{n / 1000:,.1f}k" if n >= 10_000 else f"{n:,.0f}"


def _binding(limiter: Limiter) -> str:
    """The dimension nearest its limit over the last minute, over every pool: 'ITPM 98%'."""
    best, name = 0.0, ""
    for pool in limiter.statistics().pools.values():
        for dimension, used in pool.utilization.items():
            if used > best and dimension in _DIMENSION:
                best, name = used, _DIMENSION[dimension]
    return f"{name} {best:.0%}" if name else ""


def _rate_limited(limiter: Limiter) -> int:
    return sum(p.rate_limited for p in limiter.statistics().pools.values())


def _print_summary(tally: _Tally, out: Path) -> None:
    s = tally.summary()
    remaining = f" · {s['remaining']:,} remaining (run again to resume)" if s["remaining"] else ""
    print(
        f"{PROG}: {s['done']:,} done · {s['succeeded']:,} ok · {s['errored']:,} errored{remaining} · "
        f"{s['rate_limited']:,} 429s · {s['input_tokens_per_minute']:,} input and "
        f"{s['output_tokens_per_minute']:,} output tokens/min · {_duration(s['seconds'])} → {out}",
        file=sys.stderr,
    )
