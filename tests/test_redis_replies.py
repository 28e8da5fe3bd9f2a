"""Each script's reply, read into named values (``ratekeeper.redis._replies``); no Redis needed."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ratekeeper.redis._ops import PoolKeys
from ratekeeper.redis._replies import (
    BurstReply,
    MalformedReply,
    PauseReply,
    PrefetchGrant,
    ReserveReply,
    ResyncChange,
    ResyncReply,
)


def test_a_reserve_that_granted_two_and_took_a_prefetch() -> None:
    reply = ReserveReply.parse(["OK", "1700000000.25", "0", "", "12;requests=3,input_tokens=30", "10", "11"])
    assert reply == ReserveReply(
        "OK", 1700000000.25, 0.0, "", PrefetchGrant(12, {"requests": 3.0, "input_tokens": 30.0}), (10, 11)
    )


@pytest.mark.parametrize(
    ("raw", "status", "wait", "reason"),
    [
        (["DUP", "5", "0", "", ""], "DUP", 0.0, ""),
        (["NOPOOL", "5", "0", "", ""], "NOPOOL", 0.0, ""),
        (
            ["SPEND", "5", "86400", "2026-02-01T00:00:00+00:00", ""],
            "SPEND",
            86400.0,
            "2026-02-01T00:00:00+00:00",
        ),
        (["TOOBIG", "5", "0", "output_tokens 9000 8000", ""], "TOOBIG", 0.0, "output_tokens 9000 8000"),
        (["OK", "5", "0.125", "", ""], "OK", 0.125, ""),
    ],
)
def test_a_reserve_that_granted_nothing(raw: list[str], status: str, wait: float, reason: str) -> None:
    assert ReserveReply.parse(raw) == ReserveReply(status, 5.0, wait, reason, None, ())


def test_a_burst_is_read_only_from_an_ok_reply() -> None:
    assert BurstReply.parse(["OK", "5", "0.5"]).burst == 0.5
    assert BurstReply.parse(["OK", "5", "0.25", "1"], "control").burst == 0.25  # control fit
    assert BurstReply.parse(["DUP", "5", ""]).burst is None
    assert BurstReply.parse(["NOPOOL", "5", "1"]).burst is None
    assert BurstReply.parse(["NOPOOL", "5"], "control").burst is None


def test_a_pause_reply_carries_each_pools_burst() -> None:
    assert PauseReply.parse(["OK", "5", "0.5"]) == PauseReply("OK", 5.0, (0.5,))
    assert PauseReply.parse(["OK", "5"]).bursts == ()  # the pool does not exist (yet)


def test_a_resync_reply_lists_its_changes() -> None:
    reply = ResyncReply.parse(["OK", "5", "limit:requests:50", "level:tokens:-12.5"])
    assert reply.changes == (ResyncChange("limit", "requests", 50.0), ResyncChange("level", "tokens", -12.5))
    assert ResyncReply.parse(["NOPOOL", "5"]).changes == ()


@pytest.mark.parametrize(
    ("parse", "raw", "message"),
    [
        (
            ReserveReply.parse,
            ["OK", "5"],
            "reserve.lua replied ['OK', '5'], which it never does (fewer than 4 fields)",
        ),
        (
            ReserveReply.parse,
            ["OK", "5", "0", "", "", "x"],
            "reserve.lua replied ['OK', '5', '0', '', '', 'x'], which it never does "
            "(invalid literal for int() with base 10: 'x')",
        ),
        (
            ReserveReply.parse,
            ["OK", "5", "0", "", "12;requests"],
            "reserve.lua replied ['OK', '5', '0', '', '12;requests'], which it never does "
            "(could not convert string to float: '')",
        ),
        (BurstReply.parse, ["OK"], "settle.lua replied ['OK'], which it never does (fewer than 2 fields)"),
        (
            BurstReply.parse,
            ["OK", "5", "wide"],
            "settle.lua replied ['OK', '5', 'wide'], which it never does "
            "(could not convert string to float: 'wide')",
        ),
        (
            PauseReply.parse,
            ["OK", "later"],
            "control.lua replied ['OK', 'later'], which it never does "
            "(could not convert string to float: 'later')",
        ),
        (
            ResyncReply.parse,
            ["OK", "5", "limit:requests"],
            "resync.lua replied ['OK', '5', 'limit:requests'], which it never does "
            "(not enough values to unpack (expected 3, got 2))",
        ),
        (
            ResyncReply.parse,
            ["OK", "5", "burst:requests:1"],
            "resync.lua replied ['OK', '5', 'burst:requests:1'], which it never does "
            "(unknown change 'burst')",
        ),
    ],
)
def test_a_malformed_reply_names_its_script_and_what_is_wrong(
    parse: Callable[[list[str]], object], raw: list[str], message: str
) -> None:
    with pytest.raises(MalformedReply) as caught:
        parse(raw)
    assert str(caught.value) == f"ratekeeper: {message}"
    assert caught.value.raw == raw


def test_pool_keys_name_what_each_script_takes() -> None:
    keys = PoolKeys(*(f"k{i}" for i in range(9)))
    assert keys.every == ("k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8")
    assert keys.reserve == keys.every[:7]
    assert keys.settle == (*keys.every[:4], "k6", "k7")
    assert keys.resync == (*keys.settle, "k8")
    assert keys.sent == ("k2", "k8")
    assert keys.control == ("k0", "k1")
