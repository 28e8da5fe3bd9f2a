"""How long ``parse_headers`` takes on a full response, next to merely lowercasing the names.

Run: ``pytest benchmarks/test_bench_headers.py --benchmark-only``; the tests without
``benchmark`` (pass-through, repeats linear) also run under ``--benchmark-disable``.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable

import httpx2
from pytest_benchmark.fixture import BenchmarkFixture

from ratekeeper import RateLimitSnapshot, parse_headers

RESET = "2026-03-01T13:29:17Z"
UNIFIED = "anthropic-ratelimit-unified-"
RECEIVED = dt.datetime(2026, 3, 1, 13, 29, 0, tzinfo=dt.UTC)


def full_headers() -> dict[str, str]:
    """Every kind of header ratekeeper reads, plus the usual transport headers."""
    headers = {
        "Date": "Sun, 01 Mar 2026 13:29:01 GMT",
        "Content-Type": "application/json",
        "request-id": "req_011CRjWg8gmowrHs23BDytyU",
        "retry-after": "12",
        "Server": "cloudflare",
        "CF-RAY": "969050580df5cf2f-SJC",
        "X-Quota-Credits-Used": "28500",
        "X-Quota-Balance": "8471500",
        "X-Quota-Markup": "1.25",
        "X-Quota-Credits-Reserved": "30000",
        "X-Quota-Balance-Reserved": "8441500",
        UNIFIED + "status": "allowed_warning",
        UNIFIED + "reset": "1772380800",
        UNIFIED + "representative-claim": "seven_day",
        UNIFIED + "fallback-percentage": "0.5",
        UNIFIED + "overage-disabled-reason": "org_level_disabled",
    }
    for bucket, limit in [
        ("ratelimit-requests", 4000),
        ("ratelimit-tokens", 2_400_000),
        ("ratelimit-input-tokens", 2_000_000),
        ("ratelimit-output-tokens", 400_000),
        ("priority-input-tokens", 50_000),
        ("priority-output-tokens", 10_000),
    ]:
        headers[f"anthropic-{bucket}-limit"] = str(limit)
        headers[f"anthropic-{bucket}-remaining"] = str(limit - 1000)
        headers[f"anthropic-{bucket}-reset"] = RESET
    for window, used in [("5h", "0.12"), ("7d", "0.81"), ("overage", "0.0")]:
        headers[f"{UNIFIED}{window}-status"] = "allowed"
        headers[f"{UNIFIED}{window}-reset"] = "1772380800"
        headers[f"{UNIFIED}{window}-utilization"] = used
    headers[UNIFIED + "7d-surpassed-threshold"] = "0.75"
    return headers


HEADERS = full_headers()
HTTPX_HEADERS = httpx2.Headers(HEADERS)


def lowercase_only(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def test_baseline_lowercase_dict(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "parse_headers: full header set"
    result = benchmark(lowercase_only, HEADERS)
    assert len(result) == len(HEADERS)


def test_baseline_lowercase_httpx2(benchmark: BenchmarkFixture) -> None:
    """The baseline for ``test_parse_headers_httpx2``: the same ``Headers``, lowercased into a dict."""
    benchmark.group = "parse_headers: full header set"
    result = benchmark(lambda: {name.lower(): value for name, value in HTTPX_HEADERS.items()})
    assert len(result) == len(HEADERS)


def test_parse_headers_dict(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "parse_headers: full header set"
    snapshot: RateLimitSnapshot = benchmark(parse_headers, HEADERS, received_at=RECEIVED)
    assert (snapshot.unparsed, len(snapshot.limits()), len(snapshot.custom)) == ({}, 6, 3)


def test_parse_headers_httpx2(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "parse_headers: full header set"
    snapshot: RateLimitSnapshot = benchmark(parse_headers, HTTPX_HEADERS, received_at=RECEIVED)
    assert (snapshot.unparsed, len(snapshot.limits()), len(snapshot.custom)) == ({}, 6, 3)


def api_headers() -> dict[str, str]:
    """What a Messages response carries: four buckets, the date, an id, transport headers."""
    headers = {
        "Date": "Sun, 01 Mar 2026 13:29:01 GMT",
        "Content-Type": "application/json",
        "request-id": "req_011CRjWg8gmowrHs23BDytyU",
    }
    for bucket, limit in [("requests", 4000), ("tokens", 2_400_000), ("input-tokens", 2_000_000)]:
        headers[f"anthropic-ratelimit-{bucket}-limit"] = str(limit)
        headers[f"anthropic-ratelimit-{bucket}-remaining"] = str(limit - 1000)
        headers[f"anthropic-ratelimit-{bucket}-reset"] = RESET
    headers["anthropic-ratelimit-output-tokens-limit"] = "400000"
    headers["anthropic-ratelimit-output-tokens-remaining"] = "399000"
    headers["anthropic-ratelimit-output-tokens-reset"] = RESET
    return headers


API_HEADERS = api_headers()
API_HTTPX_HEADERS = httpx2.Headers(API_HEADERS)


def test_baseline_lowercase_api(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "parse_headers: a Messages response (httpx2.Headers)"
    result = benchmark(lambda: {name.lower(): value for name, value in API_HTTPX_HEADERS.items()})
    assert len(result) == len(API_HEADERS)


def test_parse_headers_api(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "parse_headers: a Messages response (httpx2.Headers)"
    snapshot: RateLimitSnapshot = benchmark(parse_headers, API_HTTPX_HEADERS, received_at=RECEIVED)
    assert (snapshot.unparsed, len(snapshot.limits())) == ({}, 4)


def test_a_snapshot_passes_through_unparsed() -> None:
    """The middleware parses once and hands the snapshot on: parsing it again is the identity."""
    snapshot = parse_headers(API_HEADERS, received_at=RECEIVED)
    assert parse_headers(snapshot) is snapshot


def _best_time(call: Callable[[], object], repeat: int = 5) -> float:
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def test_repeated_headers_cost_linear_time() -> None:
    """Ten times the repeats of one header cost about ten times as much, not a hundred.

    Joining each repeat onto the text so far copied it every time (quadratic);
    the values are now joined once. A ratio in one run, not a wall-clock bound.
    """
    value = "x" * 200

    def pairs(n: int) -> list[tuple[str, str]]:
        return [("x-repeated", value)] * n

    small, large = pairs(2_000), pairs(20_000)
    ratio = _best_time(lambda: parse_headers(large)) / _best_time(lambda: parse_headers(small))
    assert ratio < 30, f"10x the repeats cost {ratio:.0f}x the time: superlinear"
    assert len(parse_headers(small).custom["x-repeated"]) == 2_000 * 202 - 2
