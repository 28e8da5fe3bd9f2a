"""Tests for ``ratekeeper.parse_headers``: the seeds, exact values, malformed input, fuzzing."""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable
from pathlib import Path

import attrs
import httpx2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratekeeper import (
    LimitInfo,
    QuotaInfo,
    RateLimitSnapshot,
    UnifiedInfo,
    UnifiedWindow,
    parse_headers,
)

UTC = dt.UTC
SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"
RECEIVED = dt.datetime(2025, 8, 2, 20, 27, 0, tzinfo=UTC)
MAY_1 = dt.datetime(2024, 5, 1, 13, 29, 17, tzinfo=UTC)

# The snapshot field and header prefix of each bucket, written out independently of the module.
BUCKETS = {
    "request_limit": "anthropic-ratelimit-requests-",
    "token_limit": "anthropic-ratelimit-tokens-",
    "input_token_limit": "anthropic-ratelimit-input-tokens-",
    "output_token_limit": "anthropic-ratelimit-output-tokens-",
    "priority_input_token_limit": "anthropic-priority-input-tokens-",
    "priority_output_token_limit": "anthropic-priority-output-tokens-",
    "fast_input_token_limit": "anthropic-fast-input-tokens-",
    "fast_output_token_limit": "anthropic-fast-output-tokens-",
}
U = "anthropic-ratelimit-unified-"


def seed(prefix: str) -> str:
    if not SEEDS.is_dir():
        pytest.skip(f"seed directory {SEEDS} is absent (shared/ must sit beside the repository)")
    matches = sorted(SEEDS.glob(f"{prefix}_*.txt"))
    if not matches:
        pytest.skip(f"seed {prefix}_*.txt is absent from {SEEDS}")
    return matches[0].read_text(encoding="utf-8")


def unified(snapshot: RateLimitSnapshot) -> UnifiedInfo:
    assert snapshot.unified is not None
    return snapshot.unified


def window(snapshot: RateLimitSnapshot, name: str) -> UnifiedWindow:
    return unified(snapshot).windows[name]


def quota(snapshot: RateLimitSnapshot) -> QuotaInfo:
    assert snapshot.quota is not None
    return snapshot.quota


def parse_one(name: str, value: str) -> RateLimitSnapshot:
    return parse_headers({name: value}, received_at=RECEIVED)


# -- seed 000: a real subscription response ------------------------------------------


def response_headers_000() -> list[tuple[str, str]]:
    response = seed("000").split("## Response", 1)[1]
    block = response.split("```http\n", 1)[1]
    status_line, rest = block.split("\n", 1)
    assert status_line == "HTTP/1.1 200 OK"
    head = rest.split("\n\n", 1)[0]
    return [(name, value) for name, value in (line.split(": ", 1) for line in head.splitlines())]


def test_seed_000_unified_capture() -> None:
    snapshot = parse_headers(response_headers_000(), received_at=RECEIVED)

    assert snapshot.unified == UnifiedInfo(
        status="allowed",
        reset=dt.datetime(2025, 8, 3, 0, 0, 0, tzinfo=UTC),  # 1754179200
        representative_claim="five_hour",
        fallback_percentage=0.5,
        overage_disabled_reason=None,
        windows={},
        extra={},
    )
    info = unified(snapshot)
    assert (info.five_hour, info.seven_day, info.overage) == (None, None, None)
    assert (info.overage_status, info.overage_reset) == (None, None)
    assert snapshot.request_id == "req_011CRjWg8gmowrHs23BDytyU"
    assert snapshot.server_date == dt.datetime(2025, 8, 2, 20, 27, 4, tzinfo=UTC)
    assert snapshot.clock_skew == 4.0
    assert snapshot.has_rate_limit_headers is True
    assert snapshot.limits() == {}
    assert (snapshot.retry_after, snapshot.quota) == (None, None)
    assert snapshot.unparsed == {}
    assert snapshot.custom == {
        "content-type": "application/json",
        "transfer-encoding": "chunked",
        "connection": "keep-alive",
        "strict-transport-security": "max-age=31536000; includeSubDomains; preload",
        "anthropic-organization-id": "411f8cc6-c7b8-4a23-b579-da0dbdd68d9b",
        "via": "1.1 google",
        "cf-cache-status": "DYNAMIC",
        "x-robots-tag": "none",
        "server": "cloudflare",
        "cf-ray": "969050580df5cf2f-SJC",
    }
    assert snapshot.to_dict() == {
        "request-id": "req_011CRjWg8gmowrHs23BDytyU",
        "anthropic-ratelimit-unified-status": "allowed",
        "anthropic-ratelimit-unified-reset": "1754179200",
        "anthropic-ratelimit-unified-representative-claim": "five_hour",
        "anthropic-ratelimit-unified-fallback-percentage": "0.5",
    }


# -- seed 001: the PHP SDK's meta() view ---------------------------------------------


def to_array_001() -> dict[str, int | str]:
    entries = re.findall(r"^//\s+'([a-z-]+)' => (?:'([^']*)'|(\d+)),$", seed("001"), re.MULTILINE)
    assert len(entries) == 13, entries
    return {name: text if number == "" else int(number) for name, text, number in entries}


def test_seed_001_to_array_typed_fields() -> None:
    array = to_array_001()
    snapshot = parse_headers({name: str(value) for name, value in array.items()})

    assert snapshot.request_id == "req_012nTzj6kLoP8vZ1SGANvcgR"
    assert snapshot.request_limit == LimitInfo(3000, 2999, MAY_1)
    assert snapshot.token_limit == LimitInfo(250000, 249983, MAY_1)
    assert snapshot.input_token_limit == LimitInfo(20000, 19500, MAY_1)
    assert snapshot.output_token_limit == LimitInfo(5000, 4900, MAY_1)
    assert snapshot.priority_input_token_limit is None
    assert snapshot.priority_output_token_limit is None
    assert snapshot.fast_input_token_limit is None
    assert snapshot.fast_output_token_limit is None
    assert list(snapshot.limits()) == ["requests", "tokens", "input_tokens", "output_tokens"]
    assert (snapshot.unified, snapshot.quota, snapshot.retry_after, snapshot.server_date) == (None,) * 4
    assert (snapshot.custom, snapshot.unparsed) == ({}, {})
    assert list(snapshot.to_dict().items()) == list(array.items())  # same entries, same order


META_FIELDS = {
    "requestLimit": "request_limit",
    "tokenLimit": "token_limit",
    "inputTokenLimit": "input_token_limit",
    "outputTokenLimit": "output_token_limit",
    "priorityInputTokenLimit": "priority_input_token_limit",
    "priorityOutputTokenLimit": "priority_output_token_limit",
}


def test_seed_001_meta_examples_including_priority_tier() -> None:
    lines = re.findall(r"^\$meta->(\w+)\??->(limit|remaining|reset);[ \t]*// '?([^'\s]+)", seed("001"), re.M)
    assert len(lines) == 18, lines
    headers = {BUCKETS[META_FIELDS[prop]] + field: value for prop, field, value in lines}
    snapshot = parse_headers(headers)

    expected: dict[str, dict[str, object]] = {}
    for prop, field, value in lines:
        expected.setdefault(META_FIELDS[prop], {})[field] = MAY_1 if field == "reset" else int(value)
    assert len(expected) == 6
    for attribute, fields in expected.items():
        assert getattr(snapshot, attribute) == LimitInfo(**fields), attribute  # type: ignore[arg-type]
    assert snapshot.priority_input_token_limit == LimitInfo(50000, 48000, MAY_1)
    assert snapshot.priority_output_token_limit == LimitInfo(10000, 9500, MAY_1)
    assert {name: str(value) for name, value in snapshot.to_dict().items()} == headers


# -- exact values, one header at a time ------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("3000", 3000),
        (" 42\t", 42),
        ("0", 0),
        ("007", 7),
        ("9" * 40, int("9" * 40)),
    ],
)
def test_count_values(raw: str, expected: int) -> None:
    snapshot = parse_one("anthropic-ratelimit-requests-limit", raw)
    assert snapshot.request_limit == LimitInfo(limit=expected)
    assert snapshot.unparsed == {}


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "-5",
        "+5",
        "12.5",
        "12.0",
        "1e3",
        "1e309",
        "nan",
        "inf",
        "1_000",
        "\uff13\uff10\uff10\uff10",  # fullwidth digits
        "0x10",
        "9" * 41,
    ],
)
def test_malformed_counts(raw: str) -> None:
    snapshot = parse_one("anthropic-ratelimit-tokens-remaining", raw)
    assert snapshot.token_limit == LimitInfo(None, None, None)  # present, but nothing usable
    assert snapshot.unparsed == {"anthropic-ratelimit-tokens-remaining": raw}
    assert snapshot.custom == {}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2024-05-01T13:29:17Z", MAY_1),
        ("2024-05-01t13:29:17z", MAY_1),
        ("2024-05-01 13:29:17Z", MAY_1),
        ("2024-05-01T15:29:17+02:00", MAY_1),
        ("2024-05-01T08:59:17-04:30", MAY_1),
        ("2024-05-01T13:29:17.5Z", MAY_1.replace(microsecond=500000)),
        ("2024-05-01T13:29:17.123456789Z", MAY_1.replace(microsecond=123456)),
        ("2016-12-31T23:59:60Z", dt.datetime(2017, 1, 1, tzinfo=UTC)),  # leap second
    ],
)
def test_reset_values(raw: str, expected: dt.datetime) -> None:
    reset = parse_one("anthropic-ratelimit-input-tokens-reset", raw).input_token_limit
    assert reset == LimitInfo(reset=expected)
    assert reset.reset is not None
    assert reset.reset.tzinfo is UTC


@pytest.mark.parametrize(
    "raw",
    [
        "2024-05-01T13:29:17",  # no zone
        "2024-05-01",
        "1714570157",
        "2024-13-01T00:00:00Z",
        "2024-02-30T00:00:00Z",
        "2024-05-01T13:29:17+24:00",
        "2024-05-01T13:29:17+01:60",
        "0000-01-01T00:00:00Z",
        "9999-12-31T23:59:59-01:00",  # beyond datetime.max in UTC
        "\uff12\uff10\uff12\uff14-05-01T13:29:17Z",
        "2024-05-01T13:29:17Z" + " " * 300,
        "Wed, 01 May 2024 13:29:17 GMT",
    ],
)
def test_malformed_resets(raw: str) -> None:
    snapshot = parse_one("anthropic-ratelimit-output-tokens-reset", raw)
    assert snapshot.output_token_limit == LimitInfo()
    assert snapshot.unparsed == {"anthropic-ratelimit-output-tokens-reset": raw}


@pytest.mark.parametrize(
    "raw",
    ["Sat, 02 Aug 2025 20:27:04 GMT", "Saturday, 02-Aug-25 20:27:04 GMT", "Sat Aug  2 20:27:04 2025"],
)
def test_date_in_all_three_http_forms(raw: str) -> None:
    snapshot = parse_one("date", raw)
    assert snapshot.server_date == dt.datetime(2025, 8, 2, 20, 27, 4, tzinfo=UTC)
    assert snapshot.clock_skew == 4.0


@pytest.mark.parametrize("raw", ["yesterday", "2025-08-02T20:27:04Z", "Sat, 02 Aug 2025 25:27:04 GMT", ""])
def test_malformed_date(raw: str) -> None:
    snapshot = parse_one("date", raw)
    assert (snapshot.server_date, snapshot.clock_skew) == (None, None)
    assert snapshot.unparsed == {"date": raw}


def test_clock_skew_needs_both_times() -> None:
    date = {"date": "Sat, 02 Aug 2025 20:26:58 GMT"}
    assert parse_headers(date, received_at=RECEIVED).clock_skew == -2.0
    assert parse_headers(date).clock_skew is None
    assert parse_headers({}, received_at=RECEIVED).clock_skew is None


def test_received_at_is_stored_in_utc() -> None:
    tokyo = dt.timezone(dt.timedelta(hours=9))
    snapshot = parse_headers({}, received_at=RECEIVED.astimezone(tokyo))
    assert snapshot.received_at == RECEIVED
    assert snapshot.received_at is not None
    assert snapshot.received_at.tzinfo is UTC


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "30"}, 30.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "7999"}, 7999.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "30"}, 0.25),
        # an HTTP date counts from the date header when there is one ...
        ({"retry-after": "Sat, 02 Aug 2025 20:28:04 GMT", "date": "Sat, 02 Aug 2025 20:27:04 GMT"}, 60.0),
        # ... else from received_at (20:27:00)
        ({"retry-after": "Sat, 02 Aug 2025 20:28:04 GMT"}, 64.0),
        ({"retry-after": "Sat, 02 Aug 2025 20:00:00 GMT"}, 0.0),  # in the past: never negative
    ],
)
def test_retry_after(headers: dict[str, str], expected: float) -> None:
    snapshot = parse_headers(headers, received_at=RECEIVED)
    assert snapshot.retry_after == expected
    assert snapshot.unparsed == {}


def test_retry_after_http_date_without_any_reference_counts_from_now() -> None:
    far = parse_headers({"retry-after": "Fri, 01 Jan 9999 00:00:00 GMT"}).retry_after
    assert far is not None
    assert far > 200 * 365 * 86400
    assert parse_headers({"retry-after": "Sat, 01 Jan 2000 00:00:00 GMT"}).retry_after == 0.0


@pytest.mark.parametrize("raw", ["-1", "nan", "inf", "1e309", "soon", "", "30s"])
def test_malformed_retry_after(raw: str) -> None:
    snapshot = parse_one("retry-after", raw)
    assert snapshot.retry_after is None
    assert snapshot.unparsed == {"retry-after": raw}


def test_malformed_retry_after_ms_falls_back_to_retry_after() -> None:
    snapshot = parse_headers({"retry-after-ms": "-100", "retry-after": "30"})
    assert snapshot.retry_after == 30.0
    assert snapshot.unparsed == {"retry-after-ms": "-100"}


# -- unified, quota --------------------------------------------------------------------------------

FULL_UNIFIED = {
    U + "status": "rejected",
    U + "reset": "1785736800",
    U + "representative-claim": "seven_day",
    U + "fallback-percentage": "0.5",
    U + "5h-status": "allowed",
    U + "5h-reset": "1785182400",
    U + "5h-utilization": "0.01",
    U + "7d-status": "allowed_warning",
    U + "7d-reset": "1785736800",
    U + "7d-utilization": "0.94",
    U + "7d-surpassed-threshold": "0.75",
    U + "7d_opus-status": "throttled",  # an unknown status is kept
    U + "7d_opus-utilization": "1.0",
    U + "overage-status": "rejected",
    U + "overage-reset": "1785736800.5",
    U + "overage-disabled-reason": "org_level_disabled",
    U + "fallback": "available",
    U + "upgrade-paths": "max_20x,team",
}


def test_full_unified_headers() -> None:
    info = unified(parse_headers(FULL_UNIFIED))
    t0 = dt.datetime(2026, 8, 3, 6, 0, tzinfo=UTC)  # 1785736800
    assert (info.status, info.reset, info.representative_claim) == ("rejected", t0, "seven_day")
    assert (info.fallback_percentage, info.overage_disabled_reason) == (0.5, "org_level_disabled")
    assert list(info.windows) == ["5h", "7d", "7d_opus", "overage"]
    assert info.five_hour == UnifiedWindow(
        status="allowed", reset=dt.datetime(2026, 7, 27, 20, 0, tzinfo=UTC), utilization=0.01
    )
    assert info.seven_day == UnifiedWindow(
        status="allowed_warning", reset=t0, utilization=0.94, surpassed_threshold=0.75
    )
    assert info.windows["7d_opus"] == UnifiedWindow(status="throttled", utilization=1.0)
    assert info.overage == UnifiedWindow(status="rejected", reset=t0 + dt.timedelta(seconds=0.5))
    assert (info.overage_status, info.overage_reset) == ("rejected", t0 + dt.timedelta(seconds=0.5))
    assert info.extra == {U + "fallback": "available", U + "upgrade-paths": "max_20x,team"}


def test_unified_to_dict_gives_every_header_back() -> None:
    snapshot = parse_headers(FULL_UNIFIED)
    assert snapshot.unparsed == {}
    assert snapshot.to_dict() == FULL_UNIFIED | {U + "7d_opus-utilization": "1"}  # canonical number


def test_unified_malformed_values_and_odd_names() -> None:
    headers = {
        U + "status": " ",
        U + "reset": "tomorrow",
        U + "5h-utilization": "high",
        U + "7d-utilization": "-0.1",
        U + "7d-surpassed-threshold": "nan",
        U + "-status": "allowed",  # no window name: an unknown header
        U + "reset-at": "1",
    }
    snapshot = parse_headers(headers)
    info = unified(snapshot)
    assert (info.status, info.reset) == (None, None)
    assert info.windows == {"5h": UnifiedWindow(), "7d": UnifiedWindow()}
    assert info.extra == {U + "-status": "allowed", U + "reset-at": "1"}
    assert snapshot.unparsed == {
        U + "status": " ",
        U + "reset": "tomorrow",
        U + "5h-utilization": "high",
        U + "7d-utilization": "-0.1",
        U + "7d-surpassed-threshold": "nan",
    }


def test_quota_headers() -> None:
    headers = {
        "X-Quota-Credits-Used": "28500",
        "X-Quota-Balance": "8471500",
        "X-Quota-Markup": "1.25",
        "X-Quota-Credits-Reserved": "30000",
        "X-Quota-Balance-Reserved": "-120.5",  # a balance may be overdrawn
        "X-Quota-Ledger": "led_1",
    }
    snapshot = parse_headers(headers)
    assert snapshot.quota == QuotaInfo(
        credits_used=28500.0,
        balance=8471500.0,
        markup=1.25,
        credits_reserved=30000.0,
        balance_reserved=-120.5,
    )
    assert snapshot.custom == {"x-quota-ledger": "led_1"}
    assert snapshot.has_rate_limit_headers is False
    assert snapshot.to_dict() == {
        "x-quota-credits-used": "28500",
        "x-quota-balance": "8471500",
        "x-quota-markup": "1.25",
        "x-quota-credits-reserved": "30000",
        "x-quota-balance-reserved": "-120.5",
    }


def test_malformed_quota_values() -> None:
    headers = {"x-quota-credits-used": "-1", "x-quota-markup": "1.2x", "x-quota-balance": "--3"}
    snapshot = parse_headers(headers)
    assert snapshot.quota == QuotaInfo()
    assert snapshot.unparsed == headers


# -- input forms ------------------------------------------------------------------------------------


def test_every_input_form_gives_the_same_snapshot() -> None:
    pairs = [
        ("Anthropic-RateLimit-Requests-Limit", "50"),
        ("ANTHROPIC-RATELIMIT-REQUESTS-REMAINING", "49"),
        ("X-Custom", "yes"),
    ]
    expected = parse_headers(pairs)
    assert expected.request_limit == LimitInfo(50, 49)
    assert expected.custom == {"x-custom": "yes"}
    assert parse_headers(dict(pairs)) == expected
    assert parse_headers(httpx2.Headers(pairs)) == expected
    assert parse_headers([(n.encode(), v.encode()) for n, v in pairs]) == expected
    assert parse_headers({n.encode(): v for n, v in pairs}) == expected
    assert parse_headers(iter(pairs)) == expected


def test_repeated_headers_are_joined_as_http_does() -> None:
    pairs = [("anthropic-ratelimit-requests-limit", "50"), ("Anthropic-Ratelimit-Requests-Limit", "60")]
    pairs += [("x-a", "1"), ("X-A", "2")]
    snapshot = parse_headers(pairs)
    assert snapshot.request_limit == LimitInfo()
    assert snapshot.unparsed == {"anthropic-ratelimit-requests-limit": "50, 60"}
    assert snapshot.custom == {"x-a": "1, 2"}
    assert parse_headers(httpx2.Headers(pairs)) == snapshot


def test_bytes_that_are_not_utf8() -> None:
    pairs = [
        (b"anthropic-ratelimit-requests-limit", b"\xff50"),
        (b"request-id", b"req_\xc3"),
        (b"x-binary", b"\x80"),
        (b"anthropic-ratelimit-requests-remaining", b"49"),
        (b"x-text", "caf\u00e9".encode()),
    ]
    snapshot = parse_headers(pairs)
    assert snapshot.request_limit == LimitInfo(remaining=49)
    assert snapshot.request_id is None
    assert snapshot.custom == {"x-text": "caf\u00e9"}
    assert snapshot.unparsed == {
        "anthropic-ratelimit-requests-limit": "\\xff50",
        "request-id": "req_\\xc3",
        "x-binary": "\\x80",
    }


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (42, "parse_headers() expects a mapping or an iterable of (name, value) pairs, got int"),
        (None, "parse_headers() expects a mapping or an iterable of (name, value) pairs, got NoneType"),
        (
            "retry-after: 1",
            "parse_headers() expects a mapping or an iterable of (name, value) pairs, got str",
        ),
        (
            b"retry-after: 1",
            "parse_headers() expects a mapping or an iterable of (name, value) pairs, got bytes",
        ),
        (["ab"], "each header must be a (name, value) pair, got str"),
        ([("a", "b", "c")], "each header must be a (name, value) pair, got tuple"),
        ([("retry-after",)], "each header must be a (name, value) pair, got tuple"),
        ({"retry-after": 1}, "header names and values must be str or bytes, got int"),
        ([(1, "x")], "header names and values must be str or bytes, got int"),
        ([("x", None)], "header names and values must be str or bytes, got NoneType"),
    ],
)
def test_wrong_argument_types(headers: object, message: str) -> None:
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        parse_headers(headers)  # type: ignore[arg-type]


def test_received_at_must_be_aware() -> None:
    with pytest.raises(ValueError, match=r"^received_at must be timezone-aware, got a naive datetime$"):
        parse_headers({}, received_at=dt.datetime(2025, 1, 1))
    with pytest.raises(TypeError, match=r"^received_at must be a datetime or None, got float$"):
        parse_headers({}, received_at=1.5)  # type: ignore[arg-type]


# -- the snapshot itself --------------------------------------------------------------------------


def test_empty_headers() -> None:
    snapshot = parse_headers({})
    assert snapshot == RateLimitSnapshot()
    assert snapshot.has_rate_limit_headers is False
    assert (snapshot.limits(), snapshot.to_dict()) == ({}, {})


def test_limits_keys_follow_dimension_names() -> None:
    headers = {prefix + "limit": "1" for prefix in BUCKETS.values()}
    snapshot = parse_headers(headers)
    assert snapshot.limits() == dict.fromkeys(
        [
            "requests",
            "tokens",
            "input_tokens",
            "output_tokens",
            "priority_input_tokens",
            "priority_output_tokens",
            "fast_input_tokens",
            "fast_output_tokens",
        ],
        LimitInfo(limit=1),
    )
    assert snapshot.has_rate_limit_headers is True
    assert snapshot.to_dict() == {name: 1 for name in headers}


def test_to_dict_resets_are_canonical_utc() -> None:
    headers = {"anthropic-fast-input-tokens-reset": "2024-05-01T15:29:17.25+02:00"}
    assert parse_headers(headers).to_dict() == {
        "anthropic-fast-input-tokens-reset": "2024-05-01T13:29:17.250000Z"
    }


def test_snapshot_is_immutable_and_hashable() -> None:
    snapshot = parse_headers({"x-a": "1", "retry-after": "x", **FULL_UNIFIED})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        snapshot.retry_after = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        snapshot.custom["x-b"] = "2"  # type: ignore[index]
    with pytest.raises(TypeError):
        unified(snapshot).windows["5h"] = UnifiedWindow()  # type: ignore[index]
    assert hash(snapshot) == hash(parse_headers({"x-a": "1", "retry-after": "x", **FULL_UNIFIED}))


def test_malformed_values_are_logged_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ratekeeper.headers")
    parse_headers({"anthropic-ratelimit-requests-limit": "lots", "retry-after": "9" * 1_000_000})
    assert [(r.name, r.levelno) for r in caplog.records] == [("ratekeeper.headers", logging.DEBUG)] * 2
    assert (
        caplog.records[0].getMessage()
        == "malformed retry-after header ignored: '" + "9" * 120 + "' (1000000 chars)"
    )
    assert caplog.records[1].getMessage() == (
        "malformed anthropic-ratelimit-requests-limit header ignored: 'lots' (4 chars)"
    )


# -- huge and arbitrary input ------------------------------------------------------------------------

TEXT_HEADERS = {
    "request-id",
    U + "status",
    U + "representative-claim",
    U + "overage-disabled-reason",
    U + "5h-status",
    U + "7d-status",
    U + "overage-status",
}


def known_fields() -> dict[str, Callable[[RateLimitSnapshot], object]]:
    """Every header ratekeeper reads, with the field it lands in."""

    def limit_field(attribute: str, field: str) -> Callable[[RateLimitSnapshot], object]:
        return lambda s: getattr(getattr(s, attribute), field)

    def window_field(name: str, field: str) -> Callable[[RateLimitSnapshot], object]:
        return lambda s: getattr(window(s, name), field)

    fields: dict[str, Callable[[RateLimitSnapshot], object]] = {
        "request-id": lambda s: s.request_id,
        "date": lambda s: s.server_date,
        "retry-after": lambda s: s.retry_after,
        "retry-after-ms": lambda s: s.retry_after,
        U + "status": lambda s: unified(s).status,
        U + "reset": lambda s: unified(s).reset,
        U + "representative-claim": lambda s: unified(s).representative_claim,
        U + "fallback-percentage": lambda s: unified(s).fallback_percentage,
        U + "overage-disabled-reason": lambda s: unified(s).overage_disabled_reason,
        "x-quota-credits-used": lambda s: quota(s).credits_used,
        "x-quota-balance": lambda s: quota(s).balance,
        "x-quota-markup": lambda s: quota(s).markup,
        "x-quota-credits-reserved": lambda s: quota(s).credits_reserved,
        "x-quota-balance-reserved": lambda s: quota(s).balance_reserved,
    }
    for attribute, prefix in BUCKETS.items():
        for field in ("limit", "remaining", "reset"):
            fields[prefix + field] = limit_field(attribute, field)
    for name in ("5h", "7d", "overage"):
        for field in ("status", "reset", "utilization", "surpassed-threshold"):
            fields[f"{U}{name}-{field}"] = window_field(name, field.replace("-", "_"))
    return fields


KNOWN = known_fields()


def test_the_known_header_table_is_complete() -> None:
    assert len(KNOWN) == 14 + 8 * 3 + 3 * 4
    assert set(KNOWN) >= TEXT_HEADERS


@pytest.mark.parametrize("filler", ["9", " ", "x", "\u00e9"])
def test_a_megabyte_in_every_header(filler: str) -> None:
    big = filler * 1_000_000
    headers = dict.fromkeys(KNOWN, big) | {"x-custom": big, U + "mystery": big}
    snapshot = parse_headers(headers, received_at=RECEIVED)
    for name, field in KNOWN.items():
        keep = name in TEXT_HEADERS and filler != " "
        assert field(snapshot) == (big if keep else None), name
        assert (name in snapshot.unparsed) is not keep, name
    assert snapshot.custom == {"x-custom": big}
    assert unified(snapshot).extra == {U + "mystery": big}


@given(st.sampled_from(sorted(KNOWN)), st.text())
def test_any_text_in_a_known_header_is_parsed_or_recorded(name: str, value: str) -> None:
    snapshot = parse_headers({name: value}, received_at=RECEIVED)
    parsed = KNOWN[name](snapshot)
    assert (parsed is None) == (name in snapshot.unparsed)
    if parsed is None:
        assert snapshot.unparsed == {name: value}
    assert snapshot.custom == {}


@given(st.dictionaries(st.text(), st.text()))
def test_arbitrary_text_headers_never_raise(headers: dict[str, str]) -> None:
    snapshot = parse_headers(headers)
    names = {name.lower() for name in headers}
    assert set(snapshot.custom) <= names
    assert set(snapshot.unparsed) <= names
    assert set(snapshot.custom).isdisjoint(snapshot.unparsed)


@given(st.lists(st.tuples(st.binary(), st.binary())))
def test_arbitrary_byte_headers_never_raise(pairs: list[tuple[bytes, bytes]]) -> None:
    snapshot = parse_headers(pairs)
    assert set(snapshot.custom).isdisjoint(snapshot.unparsed)


@given(st.integers(min_value=0, max_value=10**39))
def test_counts_round_trip(n: int) -> None:
    assert parse_one("anthropic-ratelimit-tokens-limit", str(n)).token_limit == LimitInfo(limit=n)


@given(st.floats(min_value=0, allow_nan=False, allow_infinity=False))
def test_fractions_round_trip(x: float) -> None:
    assert window(parse_one(U + "5h-utilization", repr(x)), "5h").utilization == x


offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda minutes: dt.timezone(dt.timedelta(minutes=minutes))
)


@given(st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2200, 1, 1), timezones=offsets))
def test_rfc3339_resets_round_trip(moment: dt.datetime) -> None:
    snapshot = parse_one("anthropic-ratelimit-requests-reset", moment.isoformat())
    assert snapshot.request_limit == LimitInfo(reset=moment)
    assert parse_headers({k: str(v) for k, v in snapshot.to_dict().items()}) == attrs.evolve(
        snapshot, received_at=None
    )
