"""parse_headers' shortcuts say what a full reading says: the unified family remembered by its
texts, and an httpx ``Headers`` read from its raw pairs."""

from __future__ import annotations

import logging

import httpx2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratekeeper import parse_headers
from ratekeeper.core import _headers

U = "anthropic-ratelimit-unified-"
UNIFIED = {
    U + "status": "allowed_warning",
    U + "reset": "1772380800",
    U + "representative-claim": "seven_day",
    U + "5h-status": "allowed",
    U + "5h-utilization": "0.12",
    U + "7d-reset": "1772380800",
    U + "7d-surpassed-threshold": "0.75",
    U + "upgrade-paths": "max_20x,team",
}


def test_the_order_of_the_windows_is_part_of_what_is_remembered() -> None:
    forward = parse_headers(UNIFIED)
    backward = parse_headers(dict(reversed(UNIFIED.items())))
    assert forward.unified is not None
    assert backward.unified is not None
    assert list(forward.unified.windows) == ["5h", "7d"]
    assert list(backward.unified.windows) == ["7d", "5h"]


def test_a_malformed_unified_value_is_reported_and_logged_every_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="ratekeeper.headers")
    headers = UNIFIED | {U + "5h-utilization": "lots"}
    for _ in range(2):
        snapshot = parse_headers(headers)
        assert snapshot.unparsed == {U + "5h-utilization": "lots"}
    assert len(caplog.records) == 2


def test_an_undecodable_unified_value_is_not_taken_for_text_remembered() -> None:
    # the text "\xff" (a backslash, x, f, f) is a well-formed status; the byte 0xff is not UTF-8,
    # and decodes (for the record in ``unparsed``) to that same text
    text = parse_headers({U + "status": "\\xff"})
    assert text.unified is not None
    assert text.unified.status == "\\xff"
    raw = parse_headers([(U.encode() + b"status", b"\xff")])
    assert raw.unified is not None
    assert raw.unified.status is None
    assert raw.unparsed == {U + "status": "\\xff"}


def test_a_long_value_is_not_remembered() -> None:
    _headers._UNIFIED_MEMO.clear()
    parse_headers({U + "upgrade-paths": "x" * 10_000})
    assert not _headers._UNIFIED_MEMO


QUOTA = {"x-quota-credits-used": "28500", "x-quota-balance": "-12.5", "x-quota-markup": "1.25"}


@pytest.mark.parametrize(
    ("memo", "family"),
    [(_headers._UNIFIED_MEMO, UNIFIED), (_headers._QUOTA_MEMO, QUOTA)],
    ids=["unified", "quota"],
)
def test_a_remembered_family_is_the_one_read(memo: dict[object, object], family: dict[str, str]) -> None:
    memo.clear()
    first = parse_headers(family | {"x-other": "1"})
    repr(first)  # every field read: a family is converted, and remembered, when first read
    assert memo  # remembered
    again = parse_headers(dict(family) | {"x-other": "1"})
    assert again == first
    assert again.custom == {"x-other": "1"}  # the family's names taken, nothing else
    memo.clear()
    assert parse_headers(family | {"x-other": "1"}) == first


def test_one_more_quota_header_is_another_family() -> None:
    first = parse_headers(QUOTA)
    assert parse_headers(QUOTA | {"x-quota-credits-reserved": "5"}).quota != first.quota


def test_a_malformed_quota_value_is_reported_and_logged_every_time(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ratekeeper.headers")
    headers = QUOTA | {"x-quota-markup": "lots"}
    for _ in range(2):
        snapshot = parse_headers(headers)
        assert snapshot.unparsed == {"x-quota-markup": "lots"}
    assert len(caplog.records) == 2
    assert parse_headers({"x-quota-balance": "1" * 10_000}).unparsed  # too long to be a number
    _headers._QUOTA_MEMO.clear()
    parse_headers({"x-quota-balance": "1" * 300})
    assert not _headers._QUOTA_MEMO  # nor remembered


NAMES = st.sampled_from(
    [
        "x-a",
        "X-A",
        "x-\u00e4",
        "X-\u00c4",
        "date",
        "Request-Id",
        "anthropic-ratelimit-requests-limit",
        "Anthropic-RateLimit-Requests-Limit",
        U + "5h-status",
        U + "5H-STATUS",
        "x-quota-balance",
    ]
)
VALUES = st.sampled_from(["1", "50", "allowed", "caf\u00e9", " 2 ", "Sun, 01 Mar 2026 13:29:01 GMT", ""])


@given(st.lists(st.tuples(NAMES, VALUES), max_size=8))
def test_httpx_headers_read_as_their_items(pairs: list[tuple[str, str]]) -> None:
    headers = httpx2.Headers([(n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs])
    assert parse_headers(headers) == parse_headers(list(headers.items()))
