"""parse_headers converts each family on first read: any order of reading says what a full reading says."""

from __future__ import annotations

import datetime as dt
import logging

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratekeeper import LimitInfo, RateLimitSnapshot, parse_headers
from ratekeeper.core import _headers
from ratekeeper.core._snapshot import _DIMENSIONS

U = "anthropic-ratelimit-unified-"
NAMES = [
    "date",
    "retry-after",
    "retry-after-ms",
    "request-id",
    *(prefix + field for _, _, prefix in _DIMENSIONS for field in ("limit", "remaining", "reset")),
    "x-quota-balance",
    "x-quota-markup",
    "x-quota-credits-used",
    U + "status",
    U + "reset",
    U + "5h-utilization",
    U + "7d-status",
    U + "odd",
    "x-custom",
    "content-type",
]
VALUES = st.sampled_from(
    [
        "1000",
        "-3",
        "0.5",
        "lots",
        "2024-05-01T13:29:17Z",
        "Wed, 01 May 2024 13:29:07 GMT",
        "1714570157",
        "allowed",
        "",
        "9" * 300,
    ]
)
HEADERS = st.dictionaries(st.sampled_from(NAMES), VALUES | st.binary(max_size=3), max_size=20)
FIELDS = [field.name for field in attrs.fields(RateLimitSnapshot)]
RECEIVED = dt.datetime(2024, 5, 1, 13, 29, 7, tzinfo=dt.UTC)


def _full_reading(snapshot: RateLimitSnapshot) -> list[tuple[str, object]]:
    return [(name, getattr(snapshot, name)) for name in FIELDS] + [
        ("custom order", list(snapshot.custom.items())),
        ("unparsed order", list(snapshot.unparsed.items())),
    ]


def _eager(headers: dict[str, str | bytes]) -> RateLimitSnapshot:
    # with debug logging on, parse_headers reads every family before it returns, in the old order
    logger = logging.getLogger("ratekeeper.headers")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        return parse_headers(headers, received_at=RECEIVED)
    finally:
        logger.setLevel(level)


@given(HEADERS, st.permutations([*FIELDS, "custom", "unparsed"]), st.booleans())
def test_reading_in_any_order_says_what_a_full_reading_says(
    headers: dict[str, str | bytes], order: list[str], memos_cleared: bool
) -> None:
    if memos_cleared:
        _headers._LIMIT_MEMO.clear()
        _headers._UNIFIED_MEMO.clear()
        _headers._QUOTA_MEMO.clear()
    lazy = parse_headers(headers, received_at=RECEIVED)
    for name in order[: len(order) // 2]:
        getattr(lazy, name)
    eager = _eager(headers)
    assert _full_reading(lazy) == _full_reading(eager)
    assert lazy == eager
    assert repr(lazy) == repr(eager)
    assert hash(lazy) == hash(eager)


@given(HEADERS, st.permutations([*FIELDS, "custom", "unparsed"]), st.integers(0, len(FIELDS) + 2))
def test_limits_reads_the_buckets_as_a_full_reading_does(
    headers: dict[str, str | bytes], order: list[str], read_before: int
) -> None:
    # limits() reads every bucket family in one call, whatever was read before it
    lazy = parse_headers(headers, received_at=RECEIVED)
    for name in order[:read_before]:
        getattr(lazy, name)
    eager = _eager(headers)
    assert list(lazy.limits().items()) == list(eager.limits().items())
    assert _full_reading(lazy) == _full_reading(eager)


def test_limits_of_a_constructed_snapshot() -> None:
    info = LimitInfo(limit=50, remaining=49)
    snapshot = RateLimitSnapshot(output_token_limit=info, request_limit=info)
    assert list(snapshot.limits().items()) == [("requests", info), ("output_tokens", info)]
    assert RateLimitSnapshot().limits() == {}


def test_a_family_not_read_is_not_converted() -> None:
    _headers._UNIFIED_MEMO.clear()
    snapshot = parse_headers({"anthropic-ratelimit-requests-limit": "50", U + "status": "allowed"})
    assert snapshot.request_limit is not None
    assert not _headers._UNIFIED_MEMO
    assert snapshot.unified is not None
    assert _headers._UNIFIED_MEMO


def test_an_unknown_attribute_is_still_an_attribute_error() -> None:
    snapshot = parse_headers({"x-a": "1"})
    with pytest.raises(AttributeError, match="'RateLimitSnapshot' object has no attribute 'nope'"):
        snapshot.nope  # type: ignore[attr-defined]  # noqa: B018


def test_malformed_values_are_logged_only_with_debug_on_and_then_at_parse_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ratekeeper.headers")
    snapshot = parse_headers({"anthropic-ratelimit-requests-limit": "lots"})
    assert snapshot.unparsed == {"anthropic-ratelimit-requests-limit": "lots"}
    assert not caplog.records  # (the same as before: debug records are not made at INFO)
