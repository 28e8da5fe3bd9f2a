"""The uncontended fast path agrees with the general path, bucket for bucket.

``Pool.take_plain`` must admit exactly when ``wait_time`` says 0 (and no draw
exceeds a limit) and leave the same levels as ``take``; ``give_back_plain``
the same as ``give_back``; a refund applied without reading the clock the same
as one applied after the refill. The limiter's fast and general paths must
leave the same state for the same traffic.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from limiter_support import FakeClock

from ratekeeper import Demand, Limiter, Usage
from ratekeeper.core._feedback import _Series
from ratekeeper.core._pool import Pool
from ratekeeper.gate._state import Permit

LIMITS = st.fixed_dictionaries(
    {
        "requests": st.sampled_from([1.0, 5.0, 50.0]),
        "input_tokens": st.sampled_from([1_000.0, 30_000.0]),
        "output_tokens": st.sampled_from([500.0, 8_000.0]),
    },
    optional={"tokens": st.sampled_from([1_000.0, 20_000.0])},
)
AMOUNT = st.sampled_from([0.0, 1.0, 499.0, 500.0, 999.0, 8_000.0, 25_000.0, 40_000.0])
TIME = st.floats(min_value=0.0, max_value=90.0)


def _pool_pair(
    limits: dict[str, float], burst: float, history: list[tuple[float, float, float]]
) -> tuple[Pool, Pool]:
    """Two identical pools after the same charges: the fast path meets emptied and indebted buckets."""
    pools = Pool("p", limits, now=0.0, burst=burst), Pool("p", limits, now=0.0, burst=burst)
    for pool in pools:
        for t, inp, out in history:
            pool.give_back(
                {"requests": -1.0, "input_tokens": -inp, "output_tokens": -out, "tokens": -(inp + out)}, t
            )
    return pools


HISTORY = st.lists(st.tuples(st.floats(0.0, 30.0), AMOUNT, AMOUNT), max_size=4).map(sorted)


@given(LIMITS, st.sampled_from([1.0, 0.5, 1 / 60]), HISTORY, AMOUNT, AMOUNT, TIME)
def test_take_plain_is_wait_time_then_take(
    limits: dict[str, float],
    burst: float,
    history: list[tuple[float, float, float]],
    inp: float,
    out: float,
    now: float,
) -> None:
    fast, general = _pool_pair(limits, burst, history)
    draws = {"requests": 1.0, "input_tokens": inp, "output_tokens": out, "tokens": inp + out}
    over_a_limit = any(draws[d] > limit for d, limit in limits.items())
    expected = not over_a_limit and general.wait_time(draws, now) == 0.0
    if expected:
        general.take(draws, now)
    assert (fast.take_plain(inp, out, now) is not None) is expected
    later = now + 7.0  # the general path skips zero draws: its refill splits differ by rounding
    assert fast.levels(later) == pytest.approx(general.levels(later), rel=1e-12, abs=1e-9)


@given(LIMITS, HISTORY, st.sampled_from([-3_000.0, -1.0, 0.0, 1.0, 600.0, 7_000.0]), AMOUNT, TIME)
def test_give_back_plain_is_give_back(
    limits: dict[str, float],
    history: list[tuple[float, float, float]],
    give_in: float,
    give_out: float,
    now: float,
) -> None:
    fast, general = _pool_pair(limits, 1.0, history)
    fast.give_back_plain(give_in, give_out, now)
    general.give_back({"input_tokens": give_in, "output_tokens": give_out, "tokens": give_in + give_out}, now)
    assert fast.levels(now + 3.0) == pytest.approx(general.levels(now + 3.0), rel=1e-12, abs=1e-9)


@given(LIMITS, HISTORY, st.sampled_from([0.0, 1.0, 600.0, 7_000.0]), AMOUNT, TIME)
def test_a_refund_needs_no_clock(
    limits: dict[str, float],
    history: list[tuple[float, float, float]],
    give_in: float,
    give_out: float,
    now: float,
) -> None:
    """Settlement's fast path applies refunds at each bucket's own time: the levels are the same."""
    untimed, timed = _pool_pair(limits, 1.0, history)
    untimed.give_back_plain(give_in, give_out, -math.inf)
    timed.give_back_plain(give_in, give_out, now + 30.0)
    assert untimed.levels(now + 30.0) == pytest.approx(timed.levels(now + 30.0), rel=1e-12, abs=1e-9)


class _Int(int):
    """An int the fast path does not take (it checks ``type(n) is int``)."""


TRAFFIC = st.lists(
    st.tuples(
        st.floats(0.0, 5.0),  # seconds since the last request
        st.sampled_from([0, 100, 3_000, 29_000]),  # input_tokens
        st.sampled_from([0, 1, 700, 8_000]),  # max_tokens
        st.sampled_from([0, 50, 2_000, 9_000]),  # output produced
        st.booleans(),  # settle (else release, sent)
    ),
    max_size=25,
)


def _end_state(limiter: Limiter) -> Any:
    """The Sonnet pool's levels, utilization and permits in flight (None: never made)."""
    stats = limiter.statistics().pools.get("sonnet-4.x")
    return None if stats is None else (stats.levels, stats.utilization, stats.in_flight)


def _assert_same_end(fast: tuple[Any, Any], general: tuple[Any, Any]) -> None:
    """Both runs admitted the same, and end in the same state (to the float's rounding)."""
    (fast_admitted, fast_state), (general_admitted, general_state) = fast, general
    assert fast_admitted == general_admitted
    if fast_state is None or general_state is None:
        assert fast_state is general_state
        return
    assert fast_state[0] == pytest.approx(general_state[0], rel=1e-12, abs=1e-9)  # levels
    assert fast_state[1] == pytest.approx(general_state[1], rel=1e-12, abs=1e-12)  # utilization
    assert fast_state[2] == general_state[2]  # in flight


@given(TRAFFIC)
def test_fast_and_general_limiters_end_in_the_same_state(
    traffic: list[tuple[float, int, int, int, bool]],
) -> None:
    """The same requests with int arguments (fast path) and int subclasses, settled with
    ``credits=0.0`` (the general path: the fast one takes exact ints, no credits) end alike."""
    results = []
    for fast in (True, False):
        clock = FakeClock()
        limiter = Limiter("tier-1", clock=clock)
        admitted = []
        for dt, inp, max_tokens, produced, settle in traffic:
            clock.advance(dt)
            try:
                if fast:
                    permit = limiter.acquire_nowait(
                        "claude-sonnet-4-5", input_tokens=inp, max_tokens=max_tokens
                    )
                else:
                    permit = limiter.acquire_nowait(
                        "claude-sonnet-4-5", input_tokens=_Int(inp), max_tokens=_Int(max_tokens)
                    )
            except Exception as exc:
                admitted.append(type(exc).__name__)
                continue
            admitted.append("ok")
            permit.mark_sent()
            if settle:
                usage = Usage(input_tokens=inp, output_tokens=min(produced, max_tokens))
                permit.settle(usage) if fast else permit.settle(usage, credits=0.0)
            else:
                permit.release()
        results.append((admitted, _end_state(limiter)))
    _assert_same_end(*results)


def _series_breaks_by_loop(
    points: list[tuple[float, float, float]],
    t0: float,
    ceiling: float,
    point: tuple[float, float, float, float],
) -> bool:
    """The admission reading's test as it was written: every kept point compared in turn."""
    at, value, blur, tolerance = point
    low, high = value - blur, value + blur
    broken = at >= t0 and low > ceiling + tolerance
    for t, lo, hi in points[-32:]:
        if (t <= at and low > hi + tolerance) or (t >= at and lo > high + tolerance):
            broken = True
            break
    points.append((at, low, high))
    return broken


SERIES_VALUE = st.one_of(
    st.sampled_from([0.0, 1.0, 99.5, 100.0, math.inf, -math.inf, math.nan]),
    st.floats(-200.0, 200.0, allow_nan=False),
)


@given(
    st.lists(
        st.tuples(
            st.one_of(st.sampled_from([0.0, 1.0, 5.0, math.nan]), st.floats(0.0, 10.0)),
            SERIES_VALUE,
            st.sampled_from([0.0, 0.5, 3.0]),
            st.sampled_from([1.01, 2001.0]),
        ),
        max_size=80,
    )
)
def test_series_columns_break_where_the_loop_does(points: list[tuple[float, float, float, float]]) -> None:
    """The min()/max() shortcuts over the kept points answer as the loop over them did, nan included."""
    series = _Series(0.0, 0.0, 1.0, 100.0)
    kept: list[tuple[float, float, float]] = []
    for point in points:
        assert series.admission_breaks(*point) == _series_breaks_by_loop(kept, 0.0, 100.0, point)


@given(TRAFFIC)
def test_a_threads_acquire_takes_the_fast_path_to_the_same_state(
    traffic: list[tuple[float, int, int, int, bool]],
) -> None:
    """``acquire_sync`` with a ``Demand``, outside any event loop, admitted by ``admit_plain``
    (as a task's acquire is) or, with that refused, by the general path: the same end."""
    results = []
    for fast in (True, False):
        clock = FakeClock()
        limiter = Limiter("tier-1", clock=clock)
        if not fast:
            limiter._engine.admit_plain = lambda model, plain: None  # type: ignore[method-assign]
        admitted = []
        for dt, inp, max_tokens, produced, settle in traffic:
            clock.advance(dt)
            demand = Demand(input_tokens=inp, max_tokens=max_tokens)
            try:
                with limiter.acquire_sync("claude-sonnet-4-5", demand, timeout=0.0) as permit:
                    admitted.append(("ok", permit.seq, dict(permit.reserved)))
                    permit.mark_sent()
                    if settle:
                        permit.settle(Usage(input_tokens=inp, output_tokens=min(produced, max_tokens)))
            except Exception as exc:
                admitted.append((type(exc).__name__, 0, {}))
        results.append((admitted, _end_state(limiter)))
    _assert_same_end(*results)


@given(TRAFFIC)
def test_an_awaited_acquire_takes_the_fast_path_to_the_same_state(
    traffic: list[tuple[float, int, int, int, bool]],
) -> None:
    """``await limiter.acquire_demand(...)`` (as the async middleware does), admitted by
    ``admit_plain`` as ``async with`` is, or with that refused by the general path: the same end."""

    async def run(fast: bool) -> tuple[list[tuple[str, int, dict[str, float]]], Any]:
        clock = FakeClock()
        limiter = Limiter("tier-1", clock=clock)
        if not fast:
            limiter._engine.admit_plain = lambda model, plain: None  # type: ignore[method-assign]
        admitted: list[tuple[str, int, dict[str, float]]] = []
        for dt, inp, max_tokens, produced, settle in traffic:
            clock.advance(dt)
            demand = Demand(input_tokens=inp, max_tokens=max_tokens)
            try:
                permit = await limiter.acquire_demand("claude-sonnet-4-5", demand, timeout=0.0)
            except Exception as exc:
                admitted.append((type(exc).__name__, 0, {}))
                continue
            admitted.append(("ok", permit.seq, dict(permit.reserved)))
            permit.mark_sent()
            if settle:
                permit.settle(Usage(input_tokens=inp, output_tokens=min(produced, max_tokens)))
            else:
                permit.release()
        return admitted, _end_state(limiter)

    _assert_same_end(anyio.run(run, True), anyio.run(run, False))


def _permit_fields(permit: Permit) -> list[tuple[str, object]]:
    """Every slot of a permit (nan as a string, so nan equals nan), its limiter and pool by type."""
    out: list[tuple[str, object]] = []
    for slot in Permit.__slots__:
        value = getattr(permit, slot)
        if slot in ("_limiter", "_engine", "_runtime"):
            value = type(value)
        elif slot == "_send":
            value = [type(v) for v in value] + value
        out.append((slot, "nan" if value != value else value))
    return out


@given(
    st.lists(
        st.tuples(
            st.floats(0.0, 3.0),  # seconds since the last request
            st.sampled_from([0, 100, 3_000]),  # input_tokens
            st.sampled_from([0, 1, 700]),  # max_tokens
            st.sampled_from(["settle", "release", "keep"]),
        ),
        min_size=1,
        max_size=12,
    ),
    st.sampled_from(["max_tokens", "actual"]),
)
def test_a_fast_grant_is_the_general_one_slot_for_slot(
    traffic: list[tuple[float, int, int, str]], rule: str
) -> None:
    """A permit ``grant_plain`` built (the uncontended grant) has every slot the general
    path's ``Permit.__init__`` and ``note_grant`` give it, with the same values (its mark of
    what was spent, its send entry), and its pool keeps the same sends and wait samples."""

    def run(fast: bool) -> tuple[list[object], list[object]]:
        clock = FakeClock()
        limiter = Limiter("tier-1", clock=clock, output_rule=rule)
        if not fast:
            limiter._engine.admit_plain = lambda model, plain: None  # type: ignore[method-assign]
        permits: list[object] = []
        for dt, inp, max_tokens, then in traffic:
            clock.advance(dt)
            try:
                with limiter.acquire_sync(
                    "claude-sonnet-4-5", input_tokens=inp, max_tokens=max_tokens, timeout=0.0
                ) as p:
                    permits.append(_permit_fields(p))
                    if then == "settle":
                        p.mark_sent()
                        p.settle(Usage(input_tokens=inp, output_tokens=max_tokens // 2))
                    elif then == "keep":
                        p.mark_sent()
            except Exception as exc:  # (a short bucket: both paths must refuse alike)
                permits.append(type(exc).__name__)
        runtime = limiter._pools["sonnet-4.x"]
        state = [list(runtime.sends), runtime.waits.quantile(0.5), runtime.granted, len(runtime.in_flight)]
        return permits, state

    assert run(True) == run(False)


@pytest.mark.parametrize("rule", ["max_tokens", "actual"])
def test_a_fast_permits_reservation_stays_as_granted(rule: str) -> None:
    """The uncontended grant shares one dict as the reservation, the charge and the send
    entry's charges: charging output as a stream runs, and releasing, leave it as granted."""
    limiter = Limiter("tier-1", clock=FakeClock(), output_rule=rule, opening=60)
    streamed = limiter.acquire_nowait("claude-sonnet-4-5", input_tokens=100, max_tokens=50)
    granted = dict(streamed.reserved)
    entry = limiter._pools["sonnet-4.x"].sends[-1]
    streamed.mark_sent()
    streamed.record_output(80)  # beyond the reservation: charged
    assert dict(streamed.reserved) == granted
    assert entry[2] == granted
    unsent = limiter.acquire_nowait("claude-sonnet-4-5", input_tokens=100, max_tokens=50)
    entry = limiter._pools["sonnet-4.x"].sends[-1]
    unsent.release()
    assert dict(unsent.reserved) == granted
    assert entry[2] == {}
