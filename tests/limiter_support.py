"""Helpers shared by the limiter tests: a fake clock, response headers, error bodies."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from ratekeeper import Limiter, LimiterEvent, Permit, WouldBlock

SONNET = "claude-sonnet-4-5"
OPUS = "claude-opus-4-1"
HAIKU = "claude-haiku-4-5"
POOL = "sonnet-4.x"
HAIKU_POOL = "haiku-4.5"

#: Seed 000 (a real subscription capture): its date and unified reset, 12,776 s apart.
SEED_DATE = "Sat, 02 Aug 2025 20:27:04 GMT"
SEED_UNIFIED_RESET = "1754179200"
SEED_WAIT = 12_776.0

RATE_LIMIT_BODY = {"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limited"}}
OVERLOADED_BODY = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
SPEND_BODY = {
    "type": "error",
    "error": {
        "type": "rate_limit_error",
        "message": "You have reached your specified API usage limits.",
        "details": {"error_code": "enforced_spend_limit_reached"},
    },
}


class FakeClock:
    """A clock the test moves by hand: ``clock()`` reads it, ``clock.advance(dt)`` moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Events:
    """An ``on_event`` hook that records what it is given."""

    def __init__(self) -> None:
        self.seen: list[LimiterEvent] = []

    def __call__(self, event: LimiterEvent) -> None:
        self.seen.append(event)

    def kinds(self, *, skip_grants: bool = True) -> list[str]:
        return [e.kind for e in self.seen if not (skip_grants and e.kind == "grant")]

    def of(self, kind: str) -> list[LimiterEvent]:
        return [e for e in self.seen if e.kind == kind]


def headers(
    *,
    requests: tuple[int, int] | None = None,
    input_tokens: tuple[int, int] | None = None,
    output_tokens: tuple[int, int] | None = None,
    tokens: tuple[int, int] | None = None,
    retry_after: float | None = None,
    date: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """Standard rate-limit headers; each dimension is ``(limit, remaining)``."""
    out: dict[str, str] = {}
    for name, pair in (
        ("requests", requests),
        ("input-tokens", input_tokens),
        ("output-tokens", output_tokens),
        ("tokens", tokens),
    ):
        if pair is not None:
            out[f"anthropic-ratelimit-{name}-limit"] = str(pair[0])
            out[f"anthropic-ratelimit-{name}-remaining"] = str(pair[1])
    if retry_after is not None:
        out["retry-after"] = f"{retry_after:g}"
    if date is not None:
        out["date"] = date
    out.update({k.replace("_", "-"): v for k, v in extra.items()})
    return out


def unified_headers(status: str, *, reset: str = SEED_UNIFIED_RESET) -> dict[str, str]:
    """Seed 000's subscription headers, with ``status`` in place of the captured ``allowed``."""
    return {
        "date": SEED_DATE,
        "anthropic-ratelimit-unified-status": status,
        "anthropic-ratelimit-unified-representative-claim": "five_hour",
        "anthropic-ratelimit-unified-fallback-percentage": "0.5",
        "anthropic-ratelimit-unified-reset": reset,
        "request-id": "req_011CRjWg8gmowrHs23BDytyU",
    }


def levels(limiter: Limiter, pool: str = POOL) -> dict[str, float]:
    return dict(limiter.statistics()[pool].levels)


def drain_requests(limiter: Limiter, model: str = SONNET, *, max_tokens: int = 1) -> list[Permit]:
    """Take requests of ``max_tokens`` until one would wait (every request token, with the
    default tiny ones); return the permits."""
    # (until one would wait, not while statistics() shows a token: on a pool that refills
    # faster than a statistics() call takes on a loaded machine, that never ends)
    permits: list[Permit] = []
    while True:
        try:
            permits.append(limiter.acquire_nowait(model, input_tokens=1, max_tokens=max_tokens))
        except WouldBlock:
            return permits


def queued(limiter: Limiter, n: int, pool: str = POOL) -> Callable[[], bool]:
    """A condition for ``settle_soon``: ``n`` waiters are in the pool's queue."""
    return lambda: limiter.statistics()[pool].queue_depth == n


async def settle_soon(predicate: Callable[[], bool], *, rounds: int = 200) -> None:
    """Let other tasks run (without moving any clock) until ``predicate()`` holds."""
    for _ in range(rounds):
        if predicate():
            return
        await anyio.sleep(0)
    assert predicate(), "condition not reached"
