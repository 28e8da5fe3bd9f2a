"""Token buckets read from reports of either moment in Redis, up as well as down (issue 12).

The shared model's token levels follow a report the way the requests bucket does once the
moment the reports describe is known (``resync.lua``): the report less what the server
may not have counted (tokens not sent, sends after the report's moment). Unlike a request,
a token reservation comes back in part when it settles, and a report may already hold the
refund the server made itself: so a bucket read from a report keeps out the refunds of the
reservations granted before it (``settle.lua``, ``release.lua``), and a prefetch holds its
sent requests' token refunds for Redis instead of handing them out again.

Every test starts its own ``redis-server``; the limiter's clock is the test's, Redis keeps
its own ``TIME`` (waits of a fraction of a second).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_server import RedisServer
from test_redis import level

from ratekeeper import Demand, Limiter, RedisBackend
from ratekeeper.core._feedback import response_estimate
from ratekeeper.core._reading import ROUNDING_MARGIN
from ratekeeper.redis._wire import load_scripts

SONNET = "claude-sonnet-4-5"
POOL = "sonnet-4.x"
LIMITS = {POOL: {"requests": 60.0, "input_tokens": 100_000.0, "output_tokens": 20_000.0}}
DEMAND = Demand(input_tokens=100, max_tokens=1_000)


def _limiter(
    server: RedisServer, made: list[RedisBackend], *, clock: list[float] | None = None, **options: Any
) -> tuple[Limiter, RedisBackend]:
    rule = options.pop("output_rule", None)
    limits = options.pop("limits", LIMITS)
    events = options.pop("events", None)
    backend = RedisBackend(server.url, org="acme", **options)
    made.append(backend)
    extra: dict[str, Any] = {}
    if clock is not None:
        extra["clock"] = lambda: clock[0]
    if events is not None:
        extra["on_event"] = lambda event: events.append(event)
    return Limiter("tier-1", opening=60.0, limits=limits, backend=backend, output_rule=rule, **extra), backend


def headers(requests: int, input_: int, output: int) -> dict[str, str]:
    out = {}
    for name, limit, remaining in (
        ("requests", 60, requests),
        ("input-tokens", 100_000, input_),
        ("output-tokens", 20_000, output),
    ):
        out[f"anthropic-ratelimit-{name}-limit"] = str(limit)
        out[f"anthropic-ratelimit-{name}-remaining"] = str(remaining)
    return out


def _sent(
    limiter: Limiter,
    stack: contextlib.ExitStack,
    n: int,
    sent: int | None = None,
    t: list[float] | None = None,
) -> list[Any]:
    """``n`` permits of DEMAND, the first ``sent`` of them (all by default) sent, half a second apart."""
    permits = []
    for k in range(n):
        permit = stack.enter_context(limiter.acquire_sync(SONNET, DEMAND))
        if k < (n if sent is None else sent):
            permit.mark_sent()
        permits.append(permit)
        if t is not None:
            t[0] += 0.5
    return permits


def _learn_response(mine: list[Any], report: dict[str, str], t: list[float], backend: RedisBackend) -> None:
    """The first report read before the moment is known (lowered twice), then two more: of the answers."""
    mine[0].observe(report, status=200)
    assert backend.flush()
    for k in (3, 7):
        t[0] += 1.0
        mine[k].observe(report, status=200)
    assert backend.flush()


@pytest.mark.parametrize("prefetch", [0, 3])
def test_a_report_of_the_answer_gives_back_the_tokens_the_admission_reading_took_twice(
    redis_server: RedisServer, backends: list[RedisBackend], prefetch: int
) -> None:
    t = [1000.0]
    a, a_backend = _limiter(redis_server, backends, clock=t, prefetch=prefetch, prefetch_ttl=60.0)
    b, b_backend = _limiter(redis_server, backends, prefetch=0)
    with contextlib.ExitStack() as stack:
        mine = _sent(a, stack, 8, t=t)
        _sent(b, stack, 10)
        assert b_backend.flush()
        time.sleep(0.4)  # well before the answers: the server has all eighteen
        # each answer's report counts all eighteen: 18,000 output tokens and 1,800 input gone
        report = headers(42, 98_200, 2_000)
        mine[0].observe(report, status=200)
        assert a_backend.flush()
        # read as of its grant (the moment not known yet): the 17 admitted since, twice
        assert level(redis_server, "output_tokens") < -10_000
        for k in (3, 7):
            t[0] += 1.0
            mine[k].observe(report, status=200)
        assert a_backend.flush()
        assert a.statistics()[POOL].report_moment == "response"
        # taken as the answers left: the report's lowest reading, up from far below it
        assert level(redis_server, "output_tokens") == pytest.approx(2_000 - ROUNDING_MARGIN, abs=1)
        assert level(redis_server, "input_tokens") == pytest.approx(98_200 - ROUNDING_MARGIN, abs=1)
        assert a.statistics()[POOL].raised > 0


def test_tokens_not_sent_or_sent_after_the_report_are_taken_off_it(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    t = [1000.0]
    a, a_backend = _limiter(redis_server, backends, clock=t, prefetch=0)
    b, b_backend = _limiter(redis_server, backends, prefetch=0)
    with contextlib.ExitStack() as stack:
        mine = _sent(a, stack, 8, t=t)
        theirs = _sent(b, stack, 10, sent=6)
        assert b_backend.flush()
        time.sleep(0.4)
        report = headers(46, 98_600, 6_000)  # the fourteen sent
        _learn_response(mine, report, t, a_backend)
        assert a.statistics()[POOL].report_moment == "response"
        for permit in theirs[6:8]:  # sent now: maybe after the next report's moment
            permit.mark_sent()
        assert b_backend.flush()
        t[0] += 1.0
        mine[6].observe(report, status=200)
        assert a_backend.flush()
        # four of another process's reservations the report may not hold: two never sent, two late
        assert level(redis_server, "output_tokens") == pytest.approx(6_000 - ROUNDING_MARGIN - 4_000, abs=1)
        assert level(redis_server, "input_tokens") == pytest.approx(98_600 - ROUNDING_MARGIN - 400, abs=1)


def test_a_refund_the_report_may_hold_does_not_come_back_a_second_time(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    t = [1000.0]
    a, a_backend = _limiter(redis_server, backends, clock=t, prefetch=0)
    with contextlib.ExitStack() as stack:
        mine = _sent(a, stack, 8, t=t)
        time.sleep(0.4)
        _learn_response(mine, headers(52, 99_200, 12_000), t, a_backend)
        assert a.statistics()[POOL].report_moment == "response"
        read = level(redis_server, "output_tokens")
        # its answer's report holds its settlement: the server gave back 900 already
        mine[7].settle({"input_tokens": 100, "output_tokens": 100})
        assert a_backend.flush()
        assert level(redis_server, "output_tokens") == pytest.approx(read, abs=1e-6)
        # granted after that report: its refund is the model's alone, and comes back
        with a.acquire_sync(SONNET, DEMAND) as later:
            later.mark_sent()
            assert a_backend.flush()
            before = level(redis_server, "output_tokens")
            later.settle({"input_tokens": 100, "output_tokens": 100})
        assert a_backend.flush()
        assert level(redis_server, "output_tokens") == pytest.approx(before + 900, abs=1e-6)


def test_output_counted_as_it_is_produced_is_not_lifted(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    """Under the real-time rule a request under way may draw more than any report shows yet."""
    t = [1000.0]
    events: list[Any] = []
    a, a_backend = _limiter(redis_server, backends, clock=t, prefetch=0, output_rule="actual", events=events)
    b, b_backend = _limiter(redis_server, backends, prefetch=0, output_rule="actual")
    with contextlib.ExitStack() as stack:
        mine = _sent(a, stack, 8, t=t)
        _sent(b, stack, 10)
        assert b_backend.flush()
        time.sleep(0.4)
        # (output is charged as it is learned of: the reports' own output, by another client)
        _learn_response(mine, headers(42, 98_200, 18_000), t, a_backend)
        assert a.statistics()[POOL].report_moment == "response"
        t[0] += 1.0
        mine[6].observe(headers(42, 98_200, 20_000), status=200)  # more than the model holds
        assert a_backend.flush()
    lifted = {e.detail["dimension"] for e in events if e.kind == "resync" and e.detail["delta"] > 0}
    # input follows the reports (read as of both moments at first, then of the answer)...
    assert level(redis_server, "input_tokens") == pytest.approx(98_200 - ROUNDING_MARGIN, abs=1e-6)
    # ...output stays where the first report set it (18,000 less the margin, and some refill)
    assert level(redis_server, "output_tokens") < 20_000 - ROUNDING_MARGIN - 1_000
    assert "output_tokens" not in lifted


def test_a_prefetched_requests_token_refund_goes_to_redis_not_to_its_next_request(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    """Handed out again, it would make the record's tokens less those sent too little (see resync.lua)."""
    big = {POOL: {"requests": 600.0, "input_tokens": 1_000_000.0, "output_tokens": 200_000.0}}
    a, a_backend = _limiter(redis_server, backends, prefetch=3, prefetch_ttl=60.0, limits=big)
    larger = Demand(input_tokens=100, max_tokens=1_500)
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(a.acquire_sync(SONNET, DEMAND))
        one, two = (stack.enter_context(a.acquire_sync(SONNET, DEMAND)) for _ in range(2))
        assert first.seq >= 0
        assert one.seq < 0  # two of the prefetch's three
        assert two.seq < 0
        one.mark_sent()
        one.settle({"input_tokens": 100, "output_tokens": 0})  # 1,000 back
        assert a_backend.flush()
        held = level(redis_server, "output_tokens")  # (the refund waits with the prefetch)
        # the prefetch has one request's room left, 1,000 output tokens: with the refund handed
        # out again it would hold 2,000, enough for this one
        third = stack.enter_context(a.acquire_sync(SONNET, larger))
        assert third.seq >= 0  # through Redis: the prefetch closed, the refund is not for it
        assert a_backend.flush()
        remote = a._engine._pools[POOL]  # type: ignore[attr-defined]
        again = remote.prefetch.left["output_tokens"] if remote.prefetch is not None else 0.0
        # the closed prefetch gave back its unused 1,000 and the refund; the third took its
        # own and perhaps a new prefetch
        expected = held - 1_500 - again + 2_000
        assert level(redis_server, "output_tokens") == pytest.approx(expected, abs=50)  # (refill)
        after = level(redis_server, "output_tokens")
        two.release()  # never sent: back to Redis too, the prefetch's last request
        assert a_backend.flush()
        assert level(redis_server, "output_tokens") == pytest.approx(after + 1_000, abs=50)


# ---------------------------------------------------------------- the Lua against the Python model


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    plan=st.lists(
        st.tuples(st.integers(1, 2_000), st.integers(1, 2_000), st.sampled_from(["unsent", "early", "late"])),
        min_size=1,
        max_size=8,
    ),
    remaining=st.integers(0, 20_000),
)
def test_the_lua_response_rule_agrees_with_the_python_model(
    redis_server: RedisServer, plan: list[tuple[int, int, str]], remaining: int
) -> None:
    """On the same records and log of sends, resync.lua's level is ``response_estimate``'s."""
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    r.flushall()
    backend = RedisBackend(redis_server.url, org="acme", prefetch=0)
    try:
        limits = {POOL: {"requests": 600.0, "input_tokens": 1e6, "output_tokens": 90_000.0}}
        limiter = Limiter("tier-1", opening=60.0, limits=limits, backend=backend)
        observed = limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)
        observed.mark_sent()
        permits = []
        for output, _, when in plan:
            permit = limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=output)
            if when == "early":
                permit.mark_sent()
            permits.append(permit)
        assert backend.flush()
        cutoff = float(r.time()[0]) + r.time()[1] / 1e6 + 0.001
        time.sleep(0.002)
        for permit, (_, _, when) in zip(permits, plan, strict=True):
            if when == "late":
                permit.mark_sent()
        assert backend.flush()
        engine_keys = limiter._engine._pools[POOL].keys  # type: ignore[attr-defined]
        # the Python model, on what Redis holds: records' tokens not sent, sends after the cutoff
        unsent = 0.0
        records: dict[str, str] = r.hgetall(engine_keys.reservations)  # type: ignore[assignment]
        for seq, draws in records.items():
            if seq == str(observed.seq):
                continue
            t = {name: value for name, _, value in (part.partition("=") for part in draws.split(","))}
            unsent += max(0.0, float(t.get("output_tokens", 0)) - float(t.get("~output_tokens", 0)))
        sends: list[str] = r.zrangebyscore(engine_keys.sends, f"({cutoff!r}", "+inf")  # type: ignore[assignment]
        for member in sends:
            if member.split(":", 1)[0] == str(observed.seq):
                continue
            tokens = member.rsplit("|", 1)[1]
            for part in filter(None, tokens.split(",")):
                dim, amount = part.split("=")
                if dim == "output_tokens":
                    unsent += float(amount)
        expected = max(-90_000.0, min(90_000.0, response_estimate(remaining, unsent)))
        text, _ = load_scripts()["resync"]
        moment = ["response", repr(cutoff), repr(cutoff), repr(cutoff), "all"]
        args: list[str | int] = [observed.seq, "0", 60_000, *moment]
        args += ["output_tokens", "output_tokens", "", repr(float(remaining)), "0"]
        reply = r.eval(text, len(engine_keys.resync), *engine_keys.resync, *args)
        assert reply[0] == "OK"
        assert level(redis_server, "output_tokens") == pytest.approx(expected, abs=1e-6)
        for permit in [observed, *permits]:
            permit.release()
    finally:
        backend.close()
