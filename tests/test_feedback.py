"""The feedback model alone (``ratekeeper.core._feedback``): pure functions of numbers and instants."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratekeeper.core._feedback import (
    NO_READINGS,
    MomentEvidence,
    admission_estimate,
    correction,
    response_estimate,
)

# ---------------------------------------------------------------- estimates


def test_admission_estimate_replays_own_traffic_with_the_servers_clamp() -> None:
    # full at the report; ten seconds at 1,000/s would overflow: only what fits is kept
    assert admission_estimate(5_000, 0.0, 10.0, [], rate=1_000.0, capacity=5_000.0, pending=0.0) == 5_000
    # 1,000 + 2 s of refill - 4,000 drawn, + 1 s of refill + 1,000 given back, + 1 s of refill
    events = [(2.0, -4_000.0), (3.0, 1_000.0)]
    assert admission_estimate(1_000, 0.0, 4.0, events, rate=1_000.0, capacity=5_000.0, pending=0.0) == 2_000
    # a long quiet stretch, then a draw: the server threw away all but 4,000 of the refill
    # (without the clamp: 1,000 + 30,000 - 4,000 = 27,000)
    quiet = [(30.0, -4_000.0)]
    assert admission_estimate(1_000, 0.0, 30.0, quiet, rate=1_000.0, capacity=5_000.0, pending=0.0) == 1_000


def test_admission_estimate_takes_pending_off_at_the_end() -> None:
    assert admission_estimate(2_000, 0.0, 0.0, [], rate=0.0, capacity=5_000.0, pending=1_500.0) == 500


@given(
    lowest=st.floats(-5_000, 5_000),
    events=st.lists(st.tuples(st.floats(0, 20), st.floats(-3_000, 3_000)), max_size=8),
    rate=st.floats(0, 1_000),
)
def test_admission_estimate_never_exceeds_the_capacity_and_never_mints(
    lowest: float, events: list[tuple[float, float]], rate: float
) -> None:
    """At most the capacity, and at most the report plus everything that could have come in."""
    events.sort()
    got = admission_estimate(lowest, 0.0, 20.0, events, rate=rate, capacity=5_000.0, pending=0.0)
    assert got <= 5_000.0 + 1e-6
    assert got <= lowest + rate * 20.0 + sum(c for _, c in events if c > 0) + 1e-6


@given(
    lowest=st.floats(-5_000, 5_000),
    events=st.lists(st.tuples(st.floats(0, 20), st.floats(-3_000, 3_000)), max_size=8),
    rate=st.floats(0, 1_000),
    late=st.floats(0, 5),
    where=st.floats(0, 1),
)
def test_a_late_admission_is_never_read_as_more_than_the_server_holds(
    lowest: float, events: list[tuple[float, float]], rate: float, late: float, where: float
) -> None:
    """Sent at 0, admitted at any moment up to ``late`` after: never above the server's level.

    The server's report holds every change up to its admission and none after; the client
    does not know which of its changes came before it, so the reading must be safe for all.
    """
    events.sort()
    admitted = where * late
    truth = admission_estimate(
        lowest,
        admitted,
        20.0,
        [e for e in events if e[0] > admitted],
        rate=rate,
        capacity=5_000.0,
        pending=0.0,
    )
    got = admission_estimate(lowest, 0.0, 20.0, events, rate=rate, capacity=5_000.0, pending=0.0, late=late)
    assert got <= truth + 1e-6


def test_a_late_admission_counts_no_refill_before_it_could_have_happened() -> None:
    """A request admitted up to 2 s after its send: the report may be 2 s younger than the send."""
    on_time = admission_estimate(1_000, 0.0, 5.0, [], rate=100.0, capacity=5_000.0, pending=0.0)
    late = admission_estimate(1_000, 0.0, 5.0, [], rate=100.0, capacity=5_000.0, pending=0.0, late=2.0)
    assert (on_time, late) == (1_500, 1_300)


def test_response_estimate_is_the_report_less_what_it_cannot_count() -> None:
    assert response_estimate(4_500, 1_024) == 3_476


# ---------------------------------------------------------------- corrections


def test_unknown_moment_takes_the_lower_reading_and_keeps_the_other() -> None:
    target, readings = correction(10_000, 90_000, (2_000, 9_000), ((1.0, 1), (5.0, 1)), "unknown")
    assert target == 2_000
    assert readings.offsets == (0.0, 7_000.0)


def test_learning_the_moment_gives_back_what_the_refuted_reading_took() -> None:
    _, readings = correction(10_000, 90_000, (2_000, 9_000), ((1.0, 1), (5.0, 1)), "unknown")
    # the next report, believed at the response: the model goes up to that reading's value
    target, readings = correction(2_500, 90_000, (1_000, 9_600), ((2.0, 2), (6.0, 2)), "response", readings)
    assert target == 9_600
    assert readings.offsets[1] == 0.0


def test_an_older_report_lowers_but_never_lifts() -> None:
    _, readings = correction(10_000, 90_000, (3_000, 3_000), ((5.0, 7), (5.0, 7)), "admission")
    # a report of an earlier admission that says more: it saw less of the others' traffic
    target, _ = correction(3_000, 90_000, (8_000, 8_000), ((4.0, 3), (4.0, 3)), "admission", readings)
    assert target == 3_000
    # one that says less still lowers
    target, _ = correction(3_000, 90_000, (1_000, 1_000), ((4.0, 3), (4.0, 3)), "admission", readings)
    assert target == 1_000


def test_a_report_of_unknown_age_lifts_nothing_and_bars_older_ones() -> None:
    now = (10.0, math.inf)
    target, readings = correction(
        5_000, 90_000, (2_000, 2_000), NO_READINGS.moments, "admission", latest=(now, now)
    )
    assert target == 2_000
    # a permit's report of an admission before it cannot lift what it lowered
    target, _ = correction(2_000, 90_000, (6_000, 6_000), ((9.0, 4), (9.0, 4)), "admission", readings)
    assert target == 2_000
    target, _ = correction(2_000, 90_000, (9_000, 9_000), NO_READINGS.moments, "admission", readings)
    assert target == 2_000


def test_an_answer_after_the_latest_admission_bounds_a_lift() -> None:
    """Report A may be of its answer at 3 s; report B of its admission at 2 s: A is the later.

    Read one reading at a time, B is newer than A under both and would lift to 8,000; under
    the mix (A of its answer, B of its admission) the server holds what A said.
    """
    _, readings = correction(10_000, 90_000, (9_000, 5_000), ((1.0, 1), (3.0, 1)), "unknown")
    target, readings = correction(5_000, 90_000, (8_000, 8_000), ((2.0, 2), (4.0, 2)), "unknown", readings)
    assert target == 5_000
    # once a report's admission is after A's answer, A can no longer be the latest moment
    target, readings = correction(5_000, 90_000, (7_000, 7_500), ((3.5, 3), (5.0, 3)), "unknown", readings)
    assert target == 7_000
    assert [at for at, _ in readings.answers] == [5.0]


def test_a_believed_moment_is_read_alone() -> None:
    _, readings = correction(10_000, 90_000, (9_000, 5_000), ((1.0, 1), (3.0, 1)), "unknown")
    target, _ = correction(5_000, 90_000, (8_000, 8_000), ((2.0, 2), (4.0, 2)), "admission", readings)
    assert target == 8_000


def test_answers_kept_are_few_and_never_higher_than_those_they_replace() -> None:
    readings = NO_READINGS
    level = 50_000.0
    for k in range(20):  # ever later answers, all after the one admission: each may be the latest
        level, readings = correction(
            level, 90_000, (60_000, 40_000 + 100 * k), ((1.0, 0), (2.0 + k, k)), "unknown", readings
        )
    assert level == 40_000
    assert len(readings.answers) <= 8
    assert min(offset for _, offset in readings.answers) == 0.0
    assert readings.answers[-1] == (21.0, 1_900.0)


def test_readings_above_the_capacity_hold_the_capacity() -> None:
    target, readings = correction(80_000, 90_000, (95_000, 120_000), ((1.0, 1), (1.0, 1)), "unknown")
    assert target == 90_000
    assert (readings.offsets, readings.moments) == ((0.0, 0.0), ((1.0, 1), (1.0, 1)))


# ---------------------------------------------------------------- what the reports show


def _note(
    ev: MomentEvidence, report: float, *, admitted_at: float, now: float, spent: float, since: float
) -> None:
    """One report of the requests bucket (limit 100, no refill), the same under both readings."""
    ev.note(
        "requests",
        report,
        report,
        admitted_at=admitted_at,
        now=now,
        spent=spent,
        spent_since=since,
        rate=0.0,
        tolerance=1.01,
        ceiling=100.0,
    )


def _burst_answer(ev: MomentEvidence, k: int, report: float) -> None:
    """The answer of the k-th of ten requests admitted at once into a full bucket, k seconds on."""
    _note(ev, report, admitted_at=0.0, now=float(k), spent=10.0, since=10.0 - k)


def _burst(truth: str) -> MomentEvidence:
    """Ten requests admitted at once into a full bucket of 100 (no refill); answers one a second.

    At the response each answer says 90 left; at admission, the k-th request's says 100 - k.
    """
    ev = MomentEvidence()
    ev.start(0.0)
    for k in (1, 4, 7, 10):
        _burst_answer(ev, k, 90.0 if truth == "response" else 100.0 - k)
    return ev


@pytest.mark.parametrize("truth", ["admission", "response"])
def test_a_burst_shows_which_moment_the_server_reports(truth: str) -> None:
    ev = _burst(truth)
    assert ev.belief == truth
    wrong = ev.refuted_response if truth == "admission" else ev.refuted_admission
    right = ev.refuted_admission if truth == "admission" else ev.refuted_response
    assert (right, wrong >= 2) == (0, True)


def test_reports_of_both_moments_show_mixed() -> None:
    ev = MomentEvidence()
    ev.start(0.0)
    # answers alternating between the two moments, for one burst of ten
    for k in (1, 2, 5, 6, 9):
        _burst_answer(ev, k, 90.0 if k % 2 else 100.0 - k)
    assert ev.belief == "mixed"


def test_nothing_is_decided_from_reports_that_agree_under_both() -> None:
    ev = MomentEvidence()
    ev.start(0.0)
    for k in range(1, 6):  # one request at a time: admission and response see the same
        _note(ev, 100.0 - k, admitted_at=float(k), now=k + 0.5, spent=float(k), since=0.0)
    assert ev.belief == "unknown"


def test_a_restart_keeps_what_was_refuted_and_drops_the_series() -> None:
    ev = _burst("response")
    ev.restart(20.0)
    assert ev.belief == "response"
    # a report admitted before the restart cannot refute anything now
    _note(ev, 50.0, admitted_at=5.0, now=21.0, spent=20.0, since=0.0)
    assert ev.refuted_response == 0


_NOTE = st.tuples(
    st.sampled_from(["requests", "output_tokens"]),
    st.floats(-100, 100),
    st.floats(-100, 100),
    st.floats(0, 10),
    st.floats(0, 10),
    st.floats(0, 50),
    st.floats(0, 20),
)


@given(st.lists(st.one_of(_NOTE, st.just("restart"), st.just("reset")), max_size=12))
def test_mixed_is_for_good(steps: list[object]) -> None:
    # the limiter stops noting once both readings are refuted (gate._own_traffic.note_evidence):
    # nothing noted after that could move the belief
    ev = MomentEvidence()
    ev.start(0.0)
    ev.refuted_admission = ev.refuted_response = 1
    assert ev.belief == "mixed"
    for step in steps:
        if step == "restart":
            ev.restart(5.0)
        elif step == "reset":
            ev.reset_before_date()
        else:
            assert isinstance(step, tuple)
            dim, admission, response, admitted_at, later, spent, since = step
            ev.note(
                dim, admission, response, admitted_at=admitted_at, now=admitted_at + later, spent=spent,
                spent_since=min(since, spent), rate=1.0, tolerance=1.5, ceiling=100.0,
            )  # fmt: skip
        assert ev.belief == "mixed"
