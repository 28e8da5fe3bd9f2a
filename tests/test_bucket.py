"""TokenBucket: step tables at fixed instants, then hypothesis properties above them.

The tables follow Go's x/time/rate tests (``TestLimiterBurst1``,
``TestLimiterBurst3``, ``TestLimiterJumpBackwards``): limit 10/s, instants
``t0..t9`` 0.1 s apart, one row per call with the level it leaves.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from ratekeeper import TokenBucket

T0 = 1000.0
t0, t1, t2, t3, t4, t5, t6, t7, t8, t9 = (T0 + i / 10 for i in range(10))
LIMIT = 10.0  # tokens per second
INF = math.inf

# (t, n, ok, level after the call)
Take = tuple[float, float, bool, float]


def run_takes(bucket: TokenBucket, rows: list[Take]) -> None:
    for i, (t, n, ok, level) in enumerate(rows):
        assert bucket.try_take(n, t) is ok, f"row {i}: try_take({n}, t{round((t - T0) * 10)})"
        assert bucket.level_at(t) == pytest.approx(level, abs=1e-9), f"row {i}: level"


# -- step tables ---------------------------------------------------------------


def test_burst_1() -> None:
    run_takes(
        TokenBucket(1, LIMIT, now=t0),
        [
            (t0, 1, True, 0),
            (t0, 1, False, 0),
            (t0, 1, False, 0),
            (t1, 1, True, 0),  # 0.1 s at 10/s: one token back
            (t1, 1, False, 0),
            (t1, 1, False, 0),
            (t2, 2, False, 1),  # more than the burst: refused, nothing taken
            (t2, 1, True, 0),
            (t3, 0.5, True, 0.5),
            (t3, 0.5, True, 0),
            (t3, 0.5, False, 0),
            (t9, 1, True, 0),  # six intervals idle: still only one token (the burst)
            (t9, 0, True, 0),
        ],
    )


def test_burst_3() -> None:
    run_takes(
        TokenBucket(3, LIMIT, now=t0),
        [
            (t0, 2, True, 1),
            (t0, 2, False, 1),
            (t0, 1, True, 0),
            (t0, 1, False, 0),
            (t1, 4, False, 1),  # more than the burst
            (t2, 1, True, 1),
            (t3, 1, True, 1),
            (t4, 1, True, 1),
            (t4, 1, True, 0),
            (t4, 1, False, 0),
            (t4, 1, False, 0),
            (t9, 3, True, 0),  # refilled to the burst, not to five
            (t9, 0, True, 0),
        ],
    )


def test_starts_full_unless_told() -> None:
    assert TokenBucket(3, LIMIT, now=t0).level_at(t0) == 3
    assert TokenBucket(3, LIMIT, level=1.5, now=t0).level_at(t0) == 1.5
    assert TokenBucket(3, LIMIT, level=99, now=t0).level_at(t0) == 3  # clamped
    assert TokenBucket(3, LIMIT, level=-99, now=t0).level_at(t0) == -3  # clamped to -debt_limit
    assert TokenBucket(3, LIMIT, level=-99, now=t0, debt_limit=1).level_at(t0) == -1
    assert TokenBucket(3, LIMIT, level=INF, now=t0).level_at(t0) == 3


@pytest.mark.parametrize(
    ("t", "n", "wait"),
    [
        (t0, 0, 0.0),
        (t0, 1, 0.1),
        (t0, 2.5, 0.25),
        (t0, 3, 0.3),
        (t0, 3.5, INF),  # more than the burst: never
        (t1, 1, 0.0),
        (t1, 2, 0.1),
        (t2, 3, 0.1),
        (t3, 3, 0.0),
        (t9, 3, 0.0),
        (t9, INF, INF),
    ],
)
def test_time_until_from_empty(t: float, n: float, wait: float) -> None:
    bucket = TokenBucket(3, LIMIT, level=0, now=t0)
    assert bucket.time_until(n, t) == pytest.approx(wait, abs=1e-9)
    assert bucket.level_at(t0) == 0  # a pure question: nothing changed
    assert bucket.last_time == t0


@pytest.mark.parametrize(
    ("t", "n", "wait"),
    [
        (t1, 1, 0.0),
        (t1, 2, 0.1),
        # t0 counts as t1, the latest instant seen: the wait is measured from t0
        (t0, 1, 0.0),
        (t0, 2, 0.2),
        (t0, 3, 0.3),
    ],
)
def test_time_until_before_latest_time(t: float, n: float, wait: float) -> None:
    bucket = TokenBucket(3, LIMIT, level=0, now=t0)
    assert bucket.try_take(0, t1)  # the bucket has seen t1; level 1
    assert bucket.time_until(n, t) == pytest.approx(wait, abs=1e-9)


def test_time_until_in_debt_and_without_refill() -> None:
    bucket = TokenBucket(3, LIMIT, now=t0)
    bucket.charge(5, t0)
    assert bucket.level_at(t0) == -2
    assert bucket.time_until(0, t0) == pytest.approx(0.2)
    assert bucket.time_until(1, t0) == pytest.approx(0.3)
    assert bucket.try_take(0, t1) is False  # still 1 token in debt
    assert bucket.try_take(1, t3) is True
    stuck = TokenBucket(3, 0.0, level=1, now=t0)
    assert stuck.time_until(1, t0) == 0.0
    assert stuck.time_until(2, t9) == INF


def test_time_until_is_exact_at_epoch_seconds() -> None:
    # At 1.7e9 s a float step is 2.4e-7 s: the promised instant must not round short.
    now = 1_700_000_000.123
    bucket = TokenBucket(2_000_000, 2_000_000 / 60, level=0, now=now)
    for n in (1, 999.5, 123_456.789, 1_999_999):
        wait = bucket.time_until(n, now)
        assert wait == pytest.approx(n / (2_000_000 / 60), abs=2 * math.ulp(now))
        probe = TokenBucket(2_000_000, 2_000_000 / 60, level=0, now=now)
        assert probe.time_until(n, now + wait) == 0.0, n  # no second, sub-ulp wait
        assert probe.try_take(n, now + wait), n


# (t, n, level after give_back)
@pytest.mark.parametrize(
    "rows",
    [
        [(t0, 1, 1), (t0, 1, 2), (t0, 5, 3)],  # never above the capacity
        [(t1, 0.5, 1.5), (t0, 0.5, 2.0)],  # t0 counts as t1: no refill, no loss
        [(t2, 0, 2), (t3, 1, 3)],  # refill, then the refund is clamped
    ],
)
def test_give_back(rows: list[tuple[float, float, float]]) -> None:
    bucket = TokenBucket(3, LIMIT, level=0, now=t0)
    for t, n, level in rows:
        bucket.give_back(n, t)
        assert bucket.level_at(t) == pytest.approx(level, abs=1e-9)


def test_give_back_settles_a_debt() -> None:
    bucket = TokenBucket(3, LIMIT, now=t0)
    bucket.charge(5, t0)
    bucket.give_back(4, t0)
    assert bucket.level_at(t0) == 2


def test_jump_backwards() -> None:
    # x/time/rate's TestLimiterJumpBackwards; here an earlier `now` counts as the
    # latest one, so going back and forward again earns nothing.
    bucket = TokenBucket(3, LIMIT, now=t1)
    run_takes(
        bucket,
        [
            (t1, 1, True, 2),  # start at t1
            (t0, 1, True, 1),  # jump back to t0: counts as t1
            (t0, 1, True, 0),
            (t0, 1, False, 0),
            (t1, 1, False, 0),  # back at t1: the interval t0..t1 is not earned again
            (t2, 1, True, 0),  # a real step forward earns a token
            (t0, 0, True, 0),
            (t2, 1, False, 0),
            (t3, 1, True, 0),
        ],
    )
    assert bucket.last_time == t3
    bucket.give_back(1, t0)
    bucket.charge(0.5, t1)
    assert bucket.last_time == t3
    assert bucket.level_at(t3) == 0.5
    assert bucket.level_at(t0) == 0.5


def test_level_at_does_not_change_the_bucket() -> None:
    bucket = TokenBucket(3, LIMIT, level=0, now=t0)
    assert bucket.level_at(t2) == pytest.approx(2)
    assert bucket.level_at(t9) == 3
    assert bucket.level_at(t0 - 100) == 0
    assert bucket.last_time == t0
    assert bucket.level_at(t0) == 0


@pytest.mark.parametrize(
    ("level", "capacity", "expected"),
    [
        (4, 20, 14),  # grow: the 6 used stay used
        (4, 8, 2),  # shrink: likewise
        (4, 6, 0),
        (4, 5, -1),  # into debt: the server's smaller bucket is overdrawn
        (4, 2, -2),  # clamped at the debt limit, which follows the capacity
        (10, 5, 5),  # a full bucket stays full
    ],
)
def test_set_limits_keeps_the_used_amount(level: float, capacity: float, expected: float) -> None:
    bucket = TokenBucket(10, 1.0, level=level, now=t0)
    bucket.set_limits(t0, capacity=capacity)
    assert bucket.capacity == capacity
    assert bucket.debt_limit == capacity
    assert bucket.rate == 1.0
    assert bucket.level_at(t0) == expected


def test_set_limits_brings_the_level_up_to_date_first() -> None:
    bucket = TokenBucket(10, 1.0, level=0, now=0.0)
    bucket.set_limits(1.0, rate=2.0)  # the first second refilled at the old rate
    assert bucket.level_at(1.0) == 1.0
    assert bucket.level_at(2.0) == 3.0
    assert bucket.try_take(0, 2.0)
    bucket.set_limits(0.5, capacity=4, rate=0.0)  # 0.5 counts as 2.0; 7 were used
    assert bucket.level_at(2.0) == -3.0
    assert bucket.level_at(100.0) == -3.0
    assert (bucket.capacity, bucket.rate, bucket.last_time) == (4.0, 0.0, 2.0)


def test_set_limits_keeps_an_explicit_debt_limit() -> None:
    bucket = TokenBucket(10, 1.0, level=0, now=0.0, debt_limit=1)
    bucket.set_limits(0.0, capacity=5)
    assert bucket.debt_limit == 1
    assert bucket.level_at(0.0) == -1  # used 10, clamped to the debt limit


@pytest.mark.parametrize(
    ("remaining", "allow_increase", "change", "level"),
    [
        (3, False, -2, 3),
        (7, False, 0, 5),  # a report above the level is ignored: it may be stale
        (7, True, 2, 7),
        (5, False, 0, 5),
        (50, True, 5, 10),  # clamped to the capacity
        (-50, False, -15, -10),  # and to the debt limit
        (-INF, False, -15, -10),
    ],
)
def test_resync(remaining: float, allow_increase: bool, change: float, level: float) -> None:
    bucket = TokenBucket(10, 1.0, level=0, now=0.0)
    assert bucket.resync(remaining, 5.0, allow_increase=allow_increase) == change
    assert bucket.level_at(5.0) == level
    assert bucket.last_time == 5.0


def test_resync_in_the_past_counts_as_the_latest_time() -> None:
    bucket = TokenBucket(10, 1.0, level=0, now=0.0)
    bucket.try_take(0, 5.0)
    assert bucket.resync(8, 1.0) == 0  # the level at 5.0 is 5: 8 is not lower
    assert bucket.resync(2, 1.0) == -3
    assert bucket.level_at(5.0) == 2


@pytest.mark.parametrize(
    ("debt_limit", "charges", "level"),
    [
        (None, [2], 1),
        (None, [2, 2], -1),
        (None, [2, 2, 2, 2], -3),  # the debt limit defaults to the capacity
        (0, [2, 2], 0),
        (10, [2, 2, 2, 2], -5),
        (10, [INF], -10),
        (INF, [1e12], 3 - 1e12),
    ],
)
def test_charge_goes_into_bounded_debt(debt_limit: float | None, charges: list[float], level: float) -> None:
    bucket = TokenBucket(3, LIMIT, now=t0, debt_limit=debt_limit)
    for n in charges:
        bucket.charge(n, t0)
    assert bucket.level_at(t0) == level
    assert bucket.try_take(0, t0) is (level >= 0)


def test_set_level() -> None:
    bucket = TokenBucket(3, LIMIT, level=0, now=t0)
    bucket.set_level(2, t1)
    assert bucket.level_at(t1) == 2
    bucket.set_level(9, t0)  # t0 counts as t1
    assert (bucket.level_at(t1), bucket.last_time) == (3, t1)
    bucket.set_level(-9, t1)
    assert bucket.level_at(t1) == -3


def test_inf_amounts() -> None:
    bucket = TokenBucket(3, LIMIT, now=t0)
    assert bucket.try_take(INF, t0) is False
    assert bucket.level_at(t0) == 3
    assert bucket.time_until(INF, t0) == INF
    bucket.charge(INF, t0)
    assert bucket.level_at(t0) == -3
    bucket.give_back(INF, t0)
    assert bucket.level_at(t0) == 3


NAN = math.nan


def _make(bucket_call: Callable[[TokenBucket], object]) -> Callable[[], object]:
    return lambda: bucket_call(TokenBucket(3, LIMIT, level=1, now=t0))


ERRORS: list[tuple[Callable[[], object], str]] = [
    (lambda: TokenBucket(0, 1), "capacity must be a positive finite number, got 0"),
    (lambda: TokenBucket(-1, 1), "capacity must be a positive finite number, got -1"),
    (lambda: TokenBucket(INF, 1), "capacity must be a positive finite number, got inf"),
    (lambda: TokenBucket(NAN, 1), "capacity must be a positive finite number, got nan"),
    (lambda: TokenBucket(1, -0.5), "rate must be a non-negative finite number, got -0.5"),
    (lambda: TokenBucket(1, INF), "rate must be a non-negative finite number, got inf"),
    (lambda: TokenBucket(1, NAN), "rate must be a non-negative finite number, got nan"),
    (lambda: TokenBucket(1, 1, level=NAN), "level must be a number, got nan"),
    (lambda: TokenBucket(1, 1, debt_limit=-1), "debt_limit must be a non-negative number, got -1"),
    (lambda: TokenBucket(1, 1, debt_limit=NAN), "debt_limit must be a non-negative number, got nan"),
    (lambda: TokenBucket(1, 1, now=NAN), "now must be a finite number, got nan"),
    (lambda: TokenBucket(1, 1, now=INF), "now must be a finite number, got inf"),
    (lambda: TokenBucket(1, 1, now=-INF), "now must be a finite number, got -inf"),
    (_make(lambda b: b.try_take(-1, t1)), "amount must be a non-negative number, got -1"),
    (_make(lambda b: b.try_take(NAN, t1)), "amount must be a non-negative number, got nan"),
    (_make(lambda b: b.charge(-1e-9, t1)), "amount must be a non-negative number, got -1e-09"),
    (_make(lambda b: b.give_back(-1, t1)), "amount must be a non-negative number, got -1"),
    (_make(lambda b: b.time_until(NAN, t1)), "amount must be a non-negative number, got nan"),
    (_make(lambda b: b.try_take(1, NAN)), "now must be a finite number, got nan"),
    (_make(lambda b: b.try_take(1, INF)), "now must be a finite number, got inf"),
    (_make(lambda b: b.try_take(1, -INF)), "now must be a finite number, got -inf"),
    (_make(lambda b: b.charge(1, NAN)), "now must be a finite number, got nan"),
    (_make(lambda b: b.give_back(1, INF)), "now must be a finite number, got inf"),
    (_make(lambda b: b.time_until(1, NAN)), "now must be a finite number, got nan"),
    (_make(lambda b: b.time_until(1, INF)), "now must be a finite number, got inf"),
    (_make(lambda b: b.level_at(NAN)), "now must be a finite number, got nan"),
    (_make(lambda b: b.level_at(INF)), "now must be a finite number, got inf"),
    (_make(lambda b: b.set_level(NAN, t1)), "level must be a number, got nan"),
    (_make(lambda b: b.set_level(1, NAN)), "now must be a finite number, got nan"),
    (_make(lambda b: b.resync(NAN, t1)), "remaining must be a number, got nan"),
    (_make(lambda b: b.resync(1, INF)), "now must be a finite number, got inf"),
    (_make(lambda b: b.set_limits(t1, capacity=0)), "capacity must be a positive finite number, got 0"),
    (_make(lambda b: b.set_limits(t1, capacity=INF)), "capacity must be a positive finite number, got inf"),
    (_make(lambda b: b.set_limits(t1, rate=-1)), "rate must be a non-negative finite number, got -1"),
    (_make(lambda b: b.set_limits(t1, rate=NAN)), "rate must be a non-negative finite number, got nan"),
    (_make(lambda b: b.set_limits(NAN)), "now must be a finite number, got nan"),
]


@pytest.mark.parametrize(("call", "message"), ERRORS, ids=[m for _, m in ERRORS])
def test_argument_errors(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call()


def test_errors_leave_the_bucket_unchanged() -> None:
    bucket = TokenBucket(3, LIMIT, level=1, now=t0)
    for call in (
        lambda: bucket.try_take(1, INF),
        lambda: bucket.try_take(-1, t5),
        lambda: bucket.set_limits(t5, rate=-1),
        lambda: bucket.set_level(NAN, t5),
        lambda: bucket.resync(NAN, t5),
    ):
        with pytest.raises(ValueError, match="must be"):
            call()
    assert (bucket.level_at(t0), bucket.last_time, bucket.rate) == (1, t0, LIMIT)


def test_repr() -> None:
    bucket = TokenBucket(3, LIMIT, level=0, now=t0)
    assert repr(bucket) == "TokenBucket(capacity=3, rate=10/s, level=0 at t=1000)"
    bucket.try_take(0.5, T0 + 0.25)
    assert repr(bucket) == "TokenBucket(capacity=3, rate=10/s, level=2 at t=1000.25)"


# -- properties ------------------------------------------------------------------

capacities = st.floats(min_value=1e-3, max_value=1e7)
rates = st.floats(min_value=0, max_value=1e6)
times = st.floats(min_value=-1e6, max_value=2e9)
fractions = st.floats(min_value=0, max_value=1)
OPS = ("try_take", "charge", "give_back", "set_level", "resync", "resync_up", "time_until")


class BucketMachine(RuleBasedStateMachine):
    """Random operations at random (also backwards) times keep the level in bounds."""

    bucket: TokenBucket
    now: float

    @initialize(
        capacity=capacities,
        rate=rates,
        debt=st.none() | st.floats(min_value=0, max_value=1e7),
        start=st.floats(min_value=-1e3, max_value=1e6),
    )
    def start(self, capacity: float, rate: float, debt: float | None, start: float) -> None:
        self.bucket = TokenBucket(capacity, rate, level=0, now=start, debt_limit=debt)
        self.now = start

    @rule(dt=st.floats(min_value=-100, max_value=100))
    def move_clock(self, dt: float) -> None:
        self.now += dt  # the clock may step back: the bucket must not care

    @rule(op=st.sampled_from(OPS), scale=st.floats(min_value=0, max_value=3))
    def operate(self, op: str, scale: float) -> None:
        b, n = self.bucket, scale * self.bucket.capacity
        before = b.level_at(self.now)
        if op == "try_take":
            ok = b.try_take(n, self.now)
            assert ok is (before >= n - 1e-9 * max(1.0, n))
        elif op == "charge":
            b.charge(n, self.now)
        elif op == "give_back":
            b.give_back(n, self.now)
        elif op == "set_level":
            b.set_level(n - b.capacity, self.now)
        elif op in ("resync", "resync_up"):
            b.resync(n - b.capacity, self.now, allow_increase=op == "resync_up")
        else:
            assert b.time_until(n, self.now) >= 0
        if op in ("try_take", "charge", "resync"):
            assert b.level_at(self.now) <= before

    @rule(capacity=capacities, rate=st.none() | rates)
    def change_limits(self, capacity: float, rate: float | None) -> None:
        self.bucket.set_limits(self.now, capacity=capacity, rate=rate)

    @invariant()
    def level_in_bounds(self) -> None:
        b = self.bucket
        for t in (b.last_time, self.now, b.last_time + 1e3):
            assert -b.debt_limit <= b.level_at(t) <= b.capacity


TestBucketMachine = BucketMachine.TestCase


@given(
    capacity=capacities,
    refill_seconds=st.floats(min_value=1e-3, max_value=1e4),
    start=st.floats(min_value=-1e6, max_value=1e6),
    level=st.floats(min_value=-1, max_value=1),
    u1=fractions,
    u2=fractions,
)
def test_refill_is_linear_until_full(
    capacity: float, refill_seconds: float, start: float, level: float, u1: float, u2: float
) -> None:
    rate = capacity / refill_seconds
    start_level = level * capacity
    bucket = TokenBucket(capacity, rate, level=start_level, now=start)
    full_after = (capacity - start_level) / rate
    dt1, dt2 = u1 * full_after / 2, u2 * full_after / 2
    # exact up to the clock's resolution: `start + dt` is rounded to a float
    tol = 1e-9 * capacity + 2 * rate * math.ulp(abs(start) + full_after)
    for dt in (dt1, dt2, dt1 + dt2):
        assert bucket.level_at(start + dt) == pytest.approx(start_level + rate * dt, rel=1e-9, abs=tol)
    gained = bucket.level_at(start + dt1 + dt2) - bucket.level_at(start + dt1)
    assert gained == pytest.approx(rate * dt2, rel=1e-9, abs=tol)
    assert bucket.level_at(start + full_after * 1.001 + 1e-3) == capacity
    assert bucket.level_at(start + full_after * 1e3 + 1e3) == capacity


@given(
    capacity=capacities,
    rate=rates,
    start=times,
    level=fractions,
    take=fractions,
    later=st.floats(min_value=-10, max_value=10),
)
def test_take_then_give_back_is_the_identity(
    capacity: float, rate: float, start: float, level: float, take: float, later: float
) -> None:
    bucket = TokenBucket(capacity, rate, level=level * capacity, now=start)
    now = start + later
    before = bucket.level_at(now)
    n = take * capacity
    if bucket.try_take(n, now):
        bucket.give_back(n, now)
    # up to the slack that lets a take within 1e-9 of the level through
    assert bucket.level_at(now) == pytest.approx(before, rel=1e-9, abs=1e-9 * max(1.0, capacity))
    assert bucket.last_time == max(start, now)


def _exactness_case(
    capacity: float, refill_seconds: float, start: float, level: float, take: float, dt: float
) -> tuple[TokenBucket, float, float]:
    # Realistic limits: a bucket refills fully in between 0.1 s and 10 minutes.
    bucket = TokenBucket(capacity, capacity / refill_seconds, level=level * capacity, now=start)
    return bucket, take * capacity, start + dt


exactness = {
    "capacity": st.floats(min_value=1, max_value=1e7),
    "refill_seconds": st.floats(min_value=0.1, max_value=600),
    "level": st.floats(min_value=-1, max_value=1),
    "take": fractions,
    "dt": st.floats(min_value=-10, max_value=10),
}


@given(start=st.floats(min_value=-1e6, max_value=2e9), **exactness)
def test_time_until_is_enough(
    capacity: float, refill_seconds: float, start: float, level: float, take: float, dt: float
) -> None:
    bucket, n, now = _exactness_case(capacity, refill_seconds, start, level, take, dt)
    wait = bucket.time_until(n, now)
    assert bucket.try_take(n, now + wait)


@given(start=st.floats(min_value=-1e6, max_value=1e6), **exactness)
def test_time_until_is_not_more_than_needed(
    capacity: float, refill_seconds: float, start: float, level: float, take: float, dt: float
) -> None:
    bucket, n, now = _exactness_case(capacity, refill_seconds, start, level, take, dt)
    wait = bucket.time_until(n, now)
    assume(wait > 0)
    assert not bucket.try_take(n, now + wait * (1 - 1e-6) - 1e-6)


@given(
    ops=st.lists(
        st.tuples(st.sampled_from(OPS[:5]), fractions, st.floats(min_value=-5, max_value=5)),
        max_size=30,
    ),
    capacity=capacities,
    rate=rates,
)
def test_backwards_time_counts_as_the_latest_time(
    ops: list[tuple[str, float, float]], capacity: float, rate: float
) -> None:
    """A bucket fed a jumbled clock is exactly a bucket fed the clock's running maximum."""
    jumbled = TokenBucket(capacity, rate, level=0, now=T0)
    steady = TokenBucket(capacity, rate, level=0, now=T0)
    clock = latest = T0
    for op, fraction, dt in ops:
        clock += dt
        latest = max(latest, clock)
        n = fraction * capacity
        for bucket, t in ((jumbled, clock), (steady, latest)):
            getattr(bucket, op)(n, t)
        assert jumbled.last_time == steady.last_time == latest
        assert jumbled.level_at(latest) == steady.level_at(latest)
        assert jumbled.level_at(clock) == jumbled.level_at(latest)


@given(
    capacity=capacities,
    rate=rates,
    level=fractions,
    back=st.floats(min_value=0, max_value=1e6),
    n=fractions,
)
def test_going_back_never_raises_the_level(
    capacity: float, rate: float, level: float, back: float, n: float
) -> None:
    bucket = TokenBucket(capacity, rate, level=level * capacity, now=T0)
    before = bucket.level_at(T0)
    assert bucket.level_at(T0 - back) == before
    bucket.try_take(n * capacity, T0 - back)
    bucket.charge(0, T0 - back)
    assert bucket.level_at(T0) <= before
    assert bucket.last_time == T0
