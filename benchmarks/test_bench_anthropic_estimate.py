"""Estimation accuracy through the SDK middleware: the estimate of each request against the emulator's count.

A seeded mix of request bodies (English prose, source code, numbers and JSON,
with and without a system prompt and tools) goes through a wrapped sync
client to the emulator; the middleware estimates every request before
sending and calibrates on every response. The error is the estimate of total
input tokens against the server's count, per request, in arrival order.

Run ``python benchmarks/test_bench_anthropic_estimate.py`` for the table in
``docs/benchmarks.md``; as a test it checks that calibration converges.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Mapping
from typing import Any

import anthropic
import attrs
import httpx2
import pytest

from ratekeeper import Demand, Estimate, Limiter, TokenEstimator
from ratekeeper.anthropic import wrap
from ratekeeper.emulator import EmulatedServer, EmulatorConfig, EmulatorTransport, LatencyModel, VirtualClock

_WORDS = [
    "the",
    "limiter",
    "keeps",
    "every",
    "request",
    "inside",
    "the",
    "organization's",
    "budget",
    "while",
    "a",
    "server",
    "refills",
    "its",
    "buckets",
    "continuously",
    "so",
    "that",
    "short",
    "bursts",
    "are",
    "refused",
    "even",
    "when",
    "the",
    "minute",
    "is",
    "not",
    "yet",
    "spent",
    "clients",
    "estimate",
    "what",
    "a",
    "prompt",
    "costs",
    "before",
    "sending",
    "it",
    "and",
    "learn",
    "from",
    "the",
    "usage",
    "that",
    "comes",
    "back",
]
_CODE = [
    "def settle(self, usage: Usage) -> Cost:",
    "    refund = {k: v for k, v in self.charged.items() if k != 'requests'}",
    "    for dim, amount in refund.items():",
    "        self.pool.give_back(dim, amount, now=self._clock())",
    "    return Cost(**{d: float(usage.get(d, 0)) for d in DIMENSIONS})",
    "class Bucket:  # capacity, rate, level; time is an argument",
]


def _prose(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."


def _code(rng: random.Random, lines: int) -> str:
    return "\n".join(rng.choice(_CODE) for _ in range(lines))


def _numbers(rng: random.Random, items: int) -> str:
    rows = [{"id": rng.randrange(10**6), "price": round(rng.uniform(0, 1e4), 2), "qty": rng.randrange(99)}]
    rows += [{"id": rng.randrange(10**6), "price": round(rng.uniform(0, 1e4), 2)} for _ in range(items)]
    return str(rows)


_KINDS: dict[str, Callable[[random.Random, int], str]] = {"prose": _prose, "code": _code, "numbers": _numbers}
_TOOL = {
    "name": "lookup",
    "description": "Look a record up by id and return its fields.",
    "input_schema": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]},
}


def _body(rng: random.Random, model: str, kinds: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    kind = rng.choice(kinds)
    size = rng.randint(20, 600)
    text = _KINDS[kind](rng, size if kind == "prose" else max(1, size // 10))
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": text}],
    }
    if rng.random() < 0.5:
        body["system"] = _prose(rng, rng.randint(10, 80))
    if rng.random() < 0.3:
        body["tools"] = [_TOOL]
    return kind, body


@attrs.frozen
class Sample:
    """One request: its content kind, the estimate and the server's count of total input tokens."""

    kind: str
    estimated: int
    actual: int

    @property
    def error(self) -> float:
        """Relative error of the estimate (positive: over-estimated)."""
        return (self.estimated - self.actual) / self.actual


def measure(
    requests: int = 200,
    *,
    model: str = "claude-sonnet-4-6",
    kinds: tuple[str, ...] = tuple(_KINDS),
    count_tokens: bool = False,
    seed: int = 0,
) -> list[Sample]:
    """Send ``requests`` seeded bodies through the middleware; each one's estimate and true count."""
    server = EmulatedServer(EmulatorConfig(preset="tier-4", latency=LatencyModel(ttft=0.0, jitter=0.0)))
    http = httpx2.Client(transport=EmulatorTransport(server, clock=VirtualClock()))
    limiter = Limiter("tier-4")
    demands: list[Demand] = []

    estimator = TokenEstimator()
    from_scan = estimator._from_scan  # what the middleware calls (it scans a body once per request)

    def spy(scan: Any, body: Mapping[str, Any], now: float) -> Estimate:
        # the estimate itself, not the reservation (which adds a safety margin on top)
        e = from_scan(scan, body, now)
        demands.append(e.demand)
        return e

    estimator._from_scan = spy  # type: ignore[method-assign]
    counted: list[Demand] = []
    acquire = limiter.acquire_sync

    def spy_acquire(model: str, demand: Demand, **kwargs: Any) -> Any:
        counted.append(demand)  # with count_tokens=True: the exact count the limiter got
        return acquire(model, demand, **kwargs)

    limiter.acquire_sync = spy_acquire  # type: ignore[method-assign,assignment]
    plain = anthropic.Anthropic(api_key="test", http_client=http, base_url="http://emulator")
    client = wrap(plain, limiter, count_tokens=count_tokens, estimator=estimator)
    rng = random.Random(seed)
    samples = []
    for _ in range(requests):
        kind, body = _body(rng, model, kinds)
        client.messages.create(**body)
        record = server.log[-1]
        actual = record.input_tokens + record.cache_creation_input_tokens + record.cache_read_input_tokens
        d = counted[-1] if count_tokens else demands[-1]
        estimated = d.input_tokens + d.cache_creation_input_tokens + d.cache_read_input_tokens
        samples.append(Sample(kind, estimated, actual))
    return samples


def summary(samples: list[Sample]) -> list[tuple[str, float, float]]:
    """(slice, mean |error|, p90 |error|) over request ranges and content kinds."""
    rows = []
    ranges = [
        ("request 1", 0, 1),
        ("requests 2-10", 1, 10),
        ("requests 11-50", 10, 50),
        ("requests 51+", 50, None),
    ]
    for name, lo, hi in ranges:
        errors = sorted(abs(s.error) for s in samples[lo:hi])
        if errors:
            rows.append((name, statistics.fmean(errors), errors[int(0.9 * (len(errors) - 1))]))
    for kind in _KINDS:
        errors = sorted(abs(s.error) for s in samples[50:] if s.kind == kind)
        if errors:
            rows.append((f"  {kind} (51+)", statistics.fmean(errors), errors[int(0.9 * (len(errors) - 1))]))
    return rows


def converged_after(samples: list[Sample], within: float = 0.15, window: int = 10) -> int:
    """Requests until the mean |error| of a sliding window first drops under ``within``."""
    for i in range(window, len(samples) + 1):
        if statistics.fmean(abs(s.error) for s in samples[i - window : i]) < within:
            return i
    return len(samples)


@pytest.mark.parametrize("model", ["claude-sonnet-4-6", "claude-opus-4-7"])
@pytest.mark.parametrize("kind", list(_KINDS))
def test_calibration_converges_on_one_kind_of_content(model: str, kind: str) -> None:
    samples = measure(60, model=model, kinds=(kind,))
    # numbers (JSON of floats) vary the most: the text ratio depends on the digits
    assert statistics.fmean(abs(s.error) for s in samples[30:]) < 0.15
    assert converged_after(samples) <= 25


def test_a_mix_of_content_stays_within_its_spread() -> None:
    samples = measure(120)
    assert statistics.fmean(abs(s.error) for s in samples[50:]) < 0.3


def test_exact_counting_has_no_error() -> None:
    samples = measure(20, count_tokens=True)
    assert all(s.estimated == s.actual for s in samples)


def _table(title: str, samples: list[Sample]) -> None:
    within_15, within_10 = converged_after(samples), converged_after(samples, within=0.1)
    print(f"\n{title}: the 10-request mean |error| is first < 15% after {within_15}, < 10% after {within_10}")
    print("| requests | mean abs error | p90 abs error |")
    print("|---|---|---|")
    for name, mean, p90 in summary(samples):
        print(f"| {name} | {mean:.1%} | {p90:.1%} |")


def main() -> None:
    """Print the tables of ``docs/benchmarks.md``."""
    for model in ("claude-sonnet-4-6", "claude-opus-4-7"):
        _table(f"{model}, mixed content", measure(300, model=model))
        for kind in _KINDS:
            _table(f"{model}, {kind} only", measure(100, model=model, kinds=(kind,)))
    exact = measure(50, count_tokens=True)
    print(f"\ncount_tokens=True: {sum(s.estimated == s.actual for s in exact)} of {len(exact)} exact")


if __name__ == "__main__":
    main()
