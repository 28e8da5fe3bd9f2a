"""How long ``parse_headers`` takes on a full response, next to merely lowercasing the names.

Run: ``pytest benchmarks/test_bench_headers.py --benchmark-only``.
"""

from __future__ import annotations

import datetime as dt

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


def test_parse_headers_dict(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "parse_headers: full header set"
    snapshot: RateLimitSnapshot = benchmark(parse_headers, HEADERS, received_at=RECEIVED)
    assert (snapshot.unparsed, len(snapshot.limits()), len(snapshot.custom)) == ({}, 6, 3)


def test_parse_headers_httpx2(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "parse_headers: full header set"
    snapshot: RateLimitSnapshot = benchmark(parse_headers, HTTPX_HEADERS, received_at=RECEIVED)
    assert (snapshot.unparsed, len(snapshot.limits()), len(snapshot.custom)) == ({}, 6, 3)
