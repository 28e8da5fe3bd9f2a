"""What a response's rate-limit report says about the server, whatever moment it describes.

Pure: numbers in, numbers out; time is passed in. The limiter (and the Redis
engine) gather what they know of their own traffic, call these functions, and
apply the result; no rule about reports is written anywhere else.

Which moment a non-streamed response's headers describe is undocumented: the
buckets when the request was admitted (the numbers held until the answer is
sent), or when the answer is sent (after the request's own settlement and
after everything admitted meanwhile, this client's own requests included).
Each reading gives its own estimate of what the server holds *now*:

- at admission: the report, plus how this client's own traffic moved the
  bucket since that admission (refill, less what reached the server, plus its
  refunds), replayed with the server's clamp at full;
- at the response: the report itself, less what this client has granted but
  not yet sent (the server cannot have counted that).

The two differ by how much the client's own level moved during the request:
nothing in a steady state, a whole burst at the start. Until the traffic shows
which reading the server uses, a correction goes to the lower estimate (safe
under both); once one reading is refuted, to the other's.

How a reading is refuted: take a reading's estimate of the server's level,
less the client's own traffic since a fixed instant ``t0`` (refill at the
server's rate, less everything granted, plus refunds). Under the right reading
that is the server's level at ``t0`` less what others drew and what the
server's clamp at full threw away since: it never goes up, and it never
exceeds the bucket's largest size. A reading whose series goes up (beyond the
reports' rounding) is not the one the server uses.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Final, Literal, final

import attrs

__all__ = [
    "BELIEFS",
    "NO_READINGS",
    "Belief",
    "Moment",
    "MomentEvidence",
    "Readings",
    "admission_estimate",
    "correction",
    "response_estimate",
]

Belief = Literal["unknown", "admission", "response", "mixed"]
#: An instant a report describes, and the grant order of its request (for one instant's reports).
Moment = tuple[float, float]
BELIEFS: Final = ("unknown", "admission", "response", "mixed")

#: Refutations one reading needs, with none of the other's, before the limiter relies on the other.
REFUTATIONS_TO_DECIDE: Final = 2


def admission_estimate(
    lowest: float,
    admitted_at: float,
    now: float,
    events: Iterable[tuple[float, float]],
    *,
    rate: float,
    capacity: float,
    pending: float,
    late: float = 0.0,
) -> float:
    """The server's level now, if ``lowest`` was its level when the request was admitted.

    Replays this client's own traffic since ``admitted_at`` on a bucket that
    starts at the report: ``events`` are ``(time, change)`` in time order (a
    request reaching the server draws, a settlement gives back), the refill is
    ``rate`` and clamps at ``capacity`` as the server's does; ``pending`` is what
    the client has drawn for requests not sent yet (in its model, not the
    server's), taken off at the end. Without the clamp a long request on a short
    bucket would count seconds of refill the server threw away; with the refill
    added before the draws instead (clamping once), it would count none.

    ``admitted_at`` is when the request was sent; the server may have admitted it
    up to ``late`` seconds after (the network, a stalled sender). The refill is
    counted from the latest such moment and a give-back at or before it is not counted
    (the report may already hold both), while every draw since the send is (the
    report may hold none of them): safe wherever in that window the admission was.

    >>> admission_estimate(4_000, 0.0, 10.0, [(1.0, -3_000), (9.0, 2_000)],
    ...                    rate=1_000.0, capacity=5_000.0, pending=500.0)
    4500.0
    >>> admission_estimate(4_000, 0.0, 10.0, [(0.5, 1_000), (1.0, -3_000), (9.0, 2_000)],
    ...                    rate=1_000.0, capacity=20_000.0, pending=500.0, late=1.0)
    11500.0
    """
    level, t = float(lowest), admitted_at + max(0.0, late)
    for at, change in events:
        if at <= t and change > 0:
            continue
        if at > t:
            level = min(capacity, level + rate * (at - t))
            t = at
        level = min(capacity, level + change)
    if now > t:
        level = min(capacity, level + rate * (now - t))
    return level - pending


def response_estimate(lowest: float, unsent: float) -> float:
    """The server's level now, if ``lowest`` was its level when the answer was sent.

    ``unsent``: what this client has drawn for requests not sent yet (and for a
    refused one it will give back): in its model, not in the server's report.

    >>> response_estimate(lowest=4_000, unsent=1_024)
    2976.0
    """
    return float(lowest - unsent)


@final
@attrs.frozen
class Readings:
    """What each reading of the reports so far says a bucket holds, relative to the model.

    ``offsets``: each reading's value less the model's level (the two move
    together with the client's own traffic; a bucket full at its capacity holds
    no more under either). ``moments``: the instant the report that last set
    each value describes under that reading (the request's admission, or the
    answer's sending), with the request's grant order to tell apart reports of
    one instant, so an older report never lifts a value a newer one set.
    """

    offsets: tuple[float, float] = (0.0, 0.0)
    moments: tuple[Moment, Moment] = ((-math.inf, -math.inf), (-math.inf, -math.inf))
    #: ``(instant, offset)`` of the response reading of earlier reports that may still be the
    #: latest any report describes (see ``correction``): instants ascending, offsets rising.
    answers: tuple[tuple[float, float], ...] = ()

    def shifted(self, shift: float) -> Readings:
        """These readings with every value ``shift`` higher against the model."""
        return Readings(
            (self.offsets[0] + shift, self.offsets[1] + shift),
            self.moments,
            tuple((at, offset + shift) for at, offset in self.answers),
        )


NO_READINGS: Final = Readings()


def correction(
    level: float,
    capacity: float,
    estimates: tuple[float, float],
    moments: tuple[Moment, Moment],
    belief: Belief,
    readings: Readings = NO_READINGS,
    *,
    latest: tuple[Moment, Moment] | None = None,
) -> tuple[float, Readings]:
    """Where the model's level goes after a report, and the readings then.

    ``estimates`` are the report's value of the server's level now under the
    admission and the response reading, ``moments`` the instants it describes
    under each. Under a reading, a report more recent than any before it gives the
    value (down or up: it has seen all they saw, and more of others' traffic); an
    older one can only lower it (both are bounds). The model goes to the value of the
    reading believed, or the lower of the two while the moment is not known (safe
    under both). So learning the moment gives back what the refuted reading took
    off, and a stale report never lifts the model.
    ``latest``: for a report of unknown moment, the latest it can be (``moments`` are then the
    earliest): no report older lifts what it lowered. Earlier answers bound it too (``_answers``).

    >>> r = Readings()
    >>> target, r = correction(10.0, 100.0, (4.0, 12.0), ((1.0, 1), (5.0, 1)), "unknown", r)
    >>> target, r.offsets
    (4.0, (0.0, 8.0))
    >>> target, r = correction(4.0, 100.0, (3.0, 9.0), ((0.5, 2), (6.0, 2)), "response", r)
    >>> target, r.offsets
    (9.0, (-6.0, 0.0))
    """
    # (both readings alike, unrolled: this runs for every dimension of every response)
    (adm_estimate, resp_estimate), (adm_at, resp_at) = estimates, moments
    (adm_offset, resp_offset), (adm_seen, resp_seen) = readings.offsets, readings.moments
    if adm_at > adm_seen:
        adm = min(capacity, adm_estimate)
    else:
        adm = min(min(capacity, level + adm_offset), adm_estimate)
    if resp_at > resp_seen:
        resp = min(capacity, resp_estimate)
    else:
        resp = min(min(capacity, level + resp_offset), resp_estimate)
    seen = moments if latest is None else latest
    adm_seen, resp_seen = max(seen[0], adm_seen), max(seen[1], resp_seen)
    if belief == "admission":
        target = adm
    elif belief == "response":
        target = resp
    else:
        target = min(adm, resp)
        if belief == "unknown":
            target = _below_answers(target, level, readings.answers, adm_seen[0])
    if target != target:  # nan: no estimate
        return level, readings
    if belief == "unknown":
        new = (seen[1][0], min(capacity, resp_estimate))
        kept = _answers(readings.answers, level, capacity, target, adm_seen[0], new, belief)
    else:  # (what _answers keeps once the moment is believed: none)
        kept = ()
    return target, Readings((adm - target, resp - target), (adm_seen, resp_seen), kept)


def _below_answers(
    target: float, level: float, answers: tuple[tuple[float, float], ...], admitted_by: float
) -> float:
    """``target``, at most the value of every answer no earlier than ``admitted_by``.

    ``admitted_by``: the latest instant a report so far can have been taken at its
    request's admission; an earlier report's answer no earlier than that may be the
    latest moment of them all (see ``_answers``). Only while the moment is unknown: once
    the server is known to mix, each report is read by itself (the bound held back 2-3%
    of a one-minute run then; see docs/benchmarks.md).
    """
    for at, offset in answers:
        if at >= admitted_by:
            target = min(target, level + offset)
    return target


#: How many earlier answers a reading keeps: past that, two merge into one that is lower and
#: lasts longer (safe: it bounds where either did, and longer).
_ANSWERS: Final = 8


def _answers(
    answers: tuple[tuple[float, float], ...],
    level: float,
    capacity: float,
    target: float,
    admitted_by: float,
    new: tuple[float, float],
    belief: Belief,
) -> tuple[tuple[float, float], ...]:
    """The answers that may still be the latest moment, the new report's too, against ``target``.

    When the server may report either moment, each report's moment is one of two, and
    the one that bounds the level is the report whose moment is the latest of all: under
    some mix of readings that is the answer of any report sent no earlier than the latest
    admission a report can show (take every other report as of its admission). Whatever
    the mix, the level is then at most the lowest of those answers' values and of the
    latest admission's. An answer that an admission after it outdates can never be the
    latest again, nor can one a later and lower answer outlasts. ``new``: the report's own
    answer (a NaN value adds none). None are kept once the moment is believed: the belief
    never goes back to unknown.
    """
    if belief != "unknown":
        return ()
    if not answers:  # (the first report, most often)
        return ((new[0], new[1] - target),) if new[1] == new[1] else ()
    values = [(at, min(capacity, level + offset)) for at, offset in answers if at >= admitted_by]
    if new[1] == new[1] and new[0] >= admitted_by:
        values.append(new)
        if len(values) > 1 and values[-2][0] >= new[0]:  # (it is the latest, most often)
            values.sort(key=_earliest_then_highest)
    kept: list[tuple[float, float]] = []
    lowest = math.inf
    for at, value in reversed(values):
        if value < lowest:
            lowest = value
            kept.append((at, value - target))
    kept.reverse()
    while len(kept) > _ANSWERS:
        kept[0:2] = [(kept[1][0], kept[0][1])]
    return tuple(kept)


def _earliest_then_highest(answer: tuple[float, float]) -> tuple[float, float]:
    return answer[0], -answer[1]


@final
class MomentEvidence:
    """What a pool's reports have shown about the moment they describe.

    ``note`` takes each report's estimate of the server's level under each
    reading, each with the instant it describes (``admitted_at``, ``now``), the
    client's own running total on that dimension at ``now`` (``spent``:
    everything charged, net of settlements) and what of it came after the
    admission (``spent_since``), and the server's refill ``rate``. A series
    runs from ``t0`` (``start``: the pool's creation; else the first note),
    and starts again when a dimension's rate changes (refutations so far are
    kept: they are facts). ``belief`` is ``admission`` or ``response`` once the
    other reading has been refuted ``REFUTATIONS_TO_DECIDE`` times and it never,
    ``mixed`` when both have been, else ``unknown``.

    Ten requests admitted at once into a full bucket of 100 (no refill), three
    answers whose reports all say 90 left: taken at admission, the 1st, 5th and
    9th would have said 99, 95 and 91.

    >>> ev = MomentEvidence()
    >>> ev.start(0.0)
    >>> for k, t in [(1, 1.0), (5, 2.0), (9, 3.0)]:
    ...     ev.note("requests", 90.0, 90.0, admitted_at=0.0, now=t, spent=10.0,
    ...             spent_since=10.0 - k, rate=0.0, tolerance=1.5, ceiling=100.0)
    >>> ev.belief, ev.refuted_admission, ev.refuted_response
    ('response', 2, 0)
    """

    __slots__ = ("_series", "_since", "_t0", "refuted_admission", "refuted_response", "reports")

    def __init__(self) -> None:
        self._t0 = math.nan
        self._since = -math.inf
        # dimension -> (t0, spent at t0, rate, ceiling, admission points, lowest response value)
        self._series: dict[str, _Series] = {}
        self.refuted_admission = 0
        self.refuted_response = 0
        self.reports = 0

    def start(self, t0: float) -> None:
        """Series begin at ``t0``, when the client had spent nothing (its pool's creation)."""
        self._t0 = t0

    def restart(self, now: float) -> None:
        """Forget the series (not the refutations): the client's own traffic since is uncertain.

        After a refusal, say: whether the server counted the refused request's
        RPM token is not known, so values on either side of it do not compare.
        """
        self._series.clear()
        self._t0 = math.nan
        self._since = now

    def note(
        self,
        dim: str,
        admission: float,
        response: float,
        *,
        admitted_at: float,
        now: float,
        spent: float,
        spent_since: float,
        rate: float,
        tolerance: float,
        ceiling: float,
        admission_blur: float = 0.0,
        response_blur: float = 0.0,
    ) -> None:
        """One report (see the module's docstring).

        ``admission``: the report as the level at ``admitted_at`` (less what
        the server had not counted then); ``response``: as the level at
        ``now`` (less what it has not counted now); each may be off by its
        ``*_blur`` either way (requests that may or may not have reached the
        server by then). ``ceiling`` is the largest the server's bucket can be
        (its per-minute limit), so its level at ``t0`` was at most that.
        ``tolerance`` covers the report's rounding.
        """
        series = self._series.get(dim)
        if series is None or series.rate != rate:
            if self._t0 == self._t0 and series is None:
                series = _Series(self._t0, 0.0, rate, ceiling)
            else:  # from this report on: the server held at most ``ceiling`` now too
                series = _Series(now, spent, rate, ceiling)
            self._series[dim] = series
        self.reports += 1
        # a reading's value, less the client's own traffic from t0 to the instant it describes
        # (refill at the server's rate, before its clamp): the server's level at t0, less what
        # others took and its clamp threw away since, under the reading the server uses
        at_adm = admission - (rate * (admitted_at - series.t0) - (spent - spent_since - series.spent0))
        at_resp = response - (rate * (now - series.t0) - (spent - series.spent0))
        if admitted_at >= self._since and series.admission_breaks(
            admitted_at, at_adm, admission_blur, tolerance
        ):
            self.refuted_admission += 1
        if at_resp - response_blur > min(series.lowest_response, series.ceiling) + tolerance:
            self.refuted_response += 1
        series.lowest_response = min(series.lowest_response, at_resp + response_blur)

    def reset_before_date(self) -> None:
        """A report whose ``-reset`` is before its ``date`` (beyond their second's rounding).

        ``date`` is when the answer was sent; a bucket reported at that moment
        cannot have been full again before it. The report was taken earlier
        (at the request's admission, say): not at the response.
        """
        self.reports += 1
        self.refuted_response += 1

    @property
    def belief(self) -> Belief:
        """The reading the reports are consistent with (see the class docstring)."""
        adm, resp = self.refuted_admission, self.refuted_response
        if adm >= REFUTATIONS_TO_DECIDE and resp == 0:
            return "response"
        if resp >= REFUTATIONS_TO_DECIDE and adm == 0:
            return "admission"
        if adm and resp:
            return "mixed"
        return "unknown"


#: How many admission-reading points a series keeps: answers arrive out of admission order
#: only within about one request's life, so the recent ones are the ones to compare.
_POINTS: Final = 32


@final
class _Series:
    __slots__ = ("_his", "_los", "_nans", "_ts", "ceiling", "lowest_response", "rate", "spent0", "t0")

    def __init__(self, t0: float, spent0: float, rate: float, ceiling: float) -> None:
        self.t0 = t0
        self.spent0 = spent0
        self.rate = rate
        self.ceiling = ceiling
        # the highest each reading's value can be, at the lowest point so far
        self.lowest_response = math.inf
        # (instant, lowest, highest) of the latest admission-reading values, as three columns
        # so the usual test (every point earlier than the new one) is a min() in C, not a loop
        self._ts: deque[float] = deque(maxlen=_POINTS)
        self._los: deque[float] = deque(maxlen=_POINTS)
        self._his: deque[float] = deque(maxlen=_POINTS)
        # how many of the points kept hold a nan, which min() and max() do not order
        self._nans = 0

    def admission_breaks(self, at: float, value: float, blur: float, tolerance: float) -> bool:
        """Add a point; True if it and an earlier one rise with time (the series cannot)."""
        low, high = value - blur, value + blur
        # (before t0 the level can have been above the ceiling less the traffic since)
        broken = at >= self.t0 and low > self.ceiling + tolerance
        ts, los, his = self._ts, self._los, self._his
        if not broken and ts:
            if not self._nans and max(ts) < at:  # answers in order: every point is earlier
                broken = low > min(his) + tolerance
            elif not self._nans and min(ts) > at:
                broken = max(los) > high + tolerance
            else:
                for t, lo, hi in zip(ts, los, his, strict=True):
                    if (t <= at and low > hi + tolerance) or (t >= at and lo > high + tolerance):
                        broken = True
                        break
        if len(ts) == _POINTS and (ts[0] != ts[0] or los[0] != los[0] or his[0] != his[0]):
            self._nans -= 1  # about to fall out of the window
        if at != at or low != low or high != high:
            self._nans += 1
        ts.append(at)
        los.append(low)
        his.append(high)
        return broken
