"""Reading a response's report into the local pools: resync, 429s, 529s, the burst.

``PoolFeedback.observe`` reads a report under both moments it may describe (at the
request's admission, replayed with this client's traffic since, or when the answer
left) and corrects the buckets as ``core._feedback`` says; it fits the burst to the
bucket size the headers show, and a 429 pauses the pool, halves the burst when
nothing explains it, or cuts the share of the refill the pool counts on when
others' use does.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeAlias, final

from ratekeeper.core._feedback import (
    NO_READINGS,
    Readings,
    admission_estimate,
    correction,
    response_estimate,
)
from ratekeeper.core._headers import parse_headers
from ratekeeper.core._reading import (
    ROUNDING_MARGIN,
    burst_bound,
    capped_pause,
    error_fields,
    explained_by_remaining,
    fitted_burst,
)
from ratekeeper.core._snapshot import LimitInfo, RateLimitSnapshot
from ratekeeper.gate._state import _ACTIVE, Permit, PoolRuntime

if TYPE_CHECKING:
    from ratekeeper.gate._host import GateHost

__all__ = ["PoolFeedback", "note_evidence", "own_traffic"]

#: The share of the refill rate a pool counts on: cut by this factor on a 429 that the server's
#: report explains but the model did not foresee, raised by SHARE_STEP every SHARE_STEP_EVERY
#: clean seconds, never below MIN_SHARE (additive increase, multiplicative decrease).
SHARE_DECREASE: Final = 0.7
SHARE_STEP: Final = 0.02
SHARE_STEP_EVERY: Final = 5.0
MIN_SHARE: Final = 0.25
#: The longest a request is taken to travel to the server (in case no answer came quickly):
#: one the server may not have received yet is not counted in a report taken at its response.
MAX_TRANSIT: Final = 0.25
#: How long a request can be taken to travel once refusals showed MAX_TRANSIT is too short (a
#: slow network, a sender stalled between its send and the wire): doubled on each such event.
MAX_LEARNED_TRANSIT: Final = 4.0
#: A learned transit is at most this share of the pool's bucket (in seconds of refill): where
#: buckets are short, the refusals are the bucket's (the burst answers them), and a transit near
#: the bucket's length would leave most of each report's refill uncounted.
TRANSIT_SHARE_OF_BUCKET: Final = 0.05
#: The dimensions our own draws on are estimates until settled (the server counts the real input).
_ESTIMATED: Final = frozenset({"input_tokens", "tokens", "priority_input_tokens"})
#: The dimensions output draws on.
_PRODUCED: Final = frozenset({"output_tokens", "tokens", "priority_output_tokens"})
#: ``date`` and ``-reset`` are given to the second: a reset this far before the date is real.
_RESET_ROUNDING: Final = 1.5
#: Header dimension names that map onto pool buckets.
_RESYNC_DIMS: Final = (
    "requests",
    "input_tokens",
    "output_tokens",
    "tokens",
    "priority_input_tokens",
    "priority_output_tokens",
)
#: The dimensions whose reports show which moment they describe: the client's own traffic is
#: known exactly there (a request is one request; a max_tokens reservation is what the server
#: reserves too), so only the reports' rounding blurs them. Input is estimated: it would not.
_EVIDENCE_DIMS: Final = frozenset({"requests", "output_tokens"})
_EVIDENCE_TOLERANCE: Final = {"requests": 1.01, "output_tokens": 2 * ROUNDING_MARGIN + 1.0}


#: A report's two readings of one level (at the admission, at the answer) and their moments.
_Readings: TypeAlias = tuple[float, float, tuple[tuple[float, float], tuple[float, float]]]


@final
class _OwnTraffic:
    """This client's own traffic a report may not hold, per dimension, from ``own_traffic``.

    ``early``: drawn in the model and not counted by the server when the request reached
    it; ``unsent``: drawn and not sent now. Sent within ``transit`` of the admission, before
    the request (``early_maybe``) or after it (``late_maybe``), and within ``transit`` of now
    (``unsent_maybe``): may or may not be counted. ``since``: spent since the grant;
    ``counted_since``: what the server counted of it; ``replay``: the changes to replay on
    the report (``None``: the rings do not reach back that far).
    """

    __slots__ = (
        "admitted",
        "counted_since",
        "early",
        "early_maybe",
        "late_maybe",
        "refused",
        "replay",
        "seq",
        "since",
        "transit",
        "unsent",
        "unsent_maybe",
    )

    def __init__(self, since: dict[str, float]) -> None:
        self.since = since
        self.counted_since: dict[str, float] = {}
        self.early: dict[str, float] = {}
        self.early_maybe: dict[str, float] = {}
        self.late_maybe: dict[str, float] = {}
        self.unsent: dict[str, float] = {}
        self.unsent_maybe: dict[str, float] = {}
        self.replay: list[tuple[float, Mapping[str, float]]] | None = None
        self.refused = False
        self.admitted = 0.0
        self.seq = -1
        self.transit = 0.0


@final
class PoolFeedback:
    """The local engine's reading of reports: every correction a response makes to a pool."""

    def __init__(
        self,
        limiter: GateHost,
        *,
        dispatch: Callable[[PoolRuntime, float], None],
        fail_impossible: Callable[[PoolRuntime], None],
    ) -> None:
        self._lim = limiter
        # the engine's: grant whoever fits now; fail whoever never can (after a limit went down)
        self._dispatch = dispatch
        self._fail_impossible = fail_impossible
        self._lock = limiter._lock
        self._now = limiter._now
        self._seq = limiter._seq

    def observe(
        self,
        headers: object,
        *,
        status: int,
        body: object,
        permit: Permit | None,
        runtime: PoolRuntime | None,
    ) -> RateLimitSnapshot:
        snap = parse_headers(headers, received_at=_dt.datetime.now(_dt.UTC))  # type: ignore[arg-type]
        error_type, error_code, message = error_fields(body)
        with self._lock:
            now = self._now()
            skew = snap.clock_skew or 0.0
            if error_code == "enforced_spend_limit_reached":
                self._lim._account.spend_limit(snap, now, message)
            changed = False
            if runtime is not None:
                fitted, changed = self._resync(runtime, snap, permit, now)
                if status == 429 and error_code != "enforced_spend_limit_reached":
                    self._on_429(runtime, snap, permit, now, fitted)
                elif status == 529 or error_type == "overloaded_error":
                    self._on_529(runtime, snap, now)
                elif status < 400:
                    runtime.overload_backoff = 0.0
                    self.grow_burst(runtime, now)
            if snap.unified is not None:
                self._lim._account.on_unified(snap, now, skew, status, runtime)
            if snap.quota is not None:
                self._lim._account.on_quota(snap, permit, now)
            if status == 402 and self._lim._account.wallet is not None:
                # the proxy refused: the wallet holds less than this reservation
                held = permit.credits if permit is not None else 0.0
                self._lim._account.wallet.resync(max(0.0, held - 1.0), now)
            if changed and runtime is not None:
                # only once the report's pause (a 429's retry-after, a 529's backoff) is in
                # place: a lift read from a refusal's headers must not let a waiter in first
                self._dispatch(runtime, now)
        return snap

    def _resync(
        self, runtime: PoolRuntime, snap: RateLimitSnapshot, permit: Permit | None, now: float
    ) -> tuple[bool, bool]:
        """Correct the pool from a response's headers: (they showed a smaller burst, a level moved).

        First what the report cannot hold of this client's own traffic, then the bucket's
        shape (limits, and its size from the reset times), then each level, read under
        both moments the report may describe. It wakes nobody: the caller dispatches once
        the rest of the report is applied.
        """
        limits = snap.limits()
        if not limits:
            return False, False
        runtime.note_reported(limits)
        if permit is not None:
            own = own_traffic(runtime, permit, now)
        else:  # a response of unknown age: all in flight is unseen
            own = _OwnTraffic(since={})
            for other in runtime.in_flight.values():
                _add(own.since, other._charged)
        fitted, changed = self._fit_shape(runtime, limits, snap.server_date, permit, now)
        if permit is not None:
            self._check_room(runtime, permit, now)
        pool = runtime.pool
        for dim in _RESYNC_DIMS:
            info = limits.get(dim)
            if info is None or info.remaining is None or dim not in pool.limits:
                continue
            # the report's lowest reading, always: keeping a level anywhere in the rounding
            # band could admit up to twice the rounding more than the server has left
            lowest = info.remaining - (0.0 if dim == "requests" else ROUNDING_MARGIN)
            if permit is not None:  # the report's age is known: see _feedback
                readings = self._readings(runtime, dim, lowest, own, now)
            else:
                # a response of unknown age: the report less everything that could be
                # missing from it, under either reading; it lifts nothing
                unknown = lowest - own.since.get(dim, 0.0)
                readings = unknown, unknown, NO_READINGS.moments
            changed = self._correct(runtime, dim, readings, permit, now) or changed
        return fitted, changed

    def _fit_shape(
        self,
        runtime: PoolRuntime,
        limits: Mapping[str, LimitInfo],
        date: _dt.datetime | None,
        permit: Permit | None,
        now: float,
    ) -> tuple[bool, bool]:
        """Learn the limits the headers give and fit the burst: (fitted to them, anything changed).

        The server's bucket size comes from "-reset is when the bucket is full again":
        capacity = remaining + rate * (reset - date). The smallest upper bound over the
        dimensions tells a shorter enforcement interval before any 429 does.
        """
        pool = runtime.pool
        changed = False
        upper = math.inf
        burst_floor = 0.0
        stale = False  # a bucket full again before the answer was sent: not a report of then
        for dim in _RESYNC_DIMS:
            info = limits.get(dim)
            if info is None:
                continue
            if info.limit is not None and info.limit > 0 and self._lim._learn:
                if dim == "tokens":
                    combined = pool.limits.get("input_tokens", 0.0) + pool.limits.get("output_tokens", 0.0)
                    learn = dim in pool.limits or info.limit < combined
                else:
                    learn = dim in pool.limits or dim.startswith("priority")
                scale = self._lim._warm_scale(now) * runtime.share
                if learn and pool.set_limit(dim, float(info.limit), now, rate_scale=scale):
                    changed = True
                    self._fail_impossible(runtime)
                    self._lim._emit("limit_change", runtime, now, {dim: info.limit})
            if info.remaining is not None and dim in pool.limits and pool.buckets[dim].rate > 0.0:
                lowest = info.remaining - (0.0 if dim == "requests" else ROUNDING_MARGIN)
                # the server's bucket holds at least what it reports left
                burst_floor = max(burst_floor, lowest / pool.limits[dim])
                if permit is not None and info.reset is not None and date is not None:
                    # (a response of unknown age bounds nothing)
                    age = max(0.0, now - permit.started_at)
                    upper = min(upper, burst_bound(info.remaining, info.reset, date, dim, pool, age))
                    if not stale and (date - info.reset).total_seconds() > _RESET_ROUNDING:
                        stale = True
        if stale and not (
            permit is not None and permit.response_status is not None and permit.response_status >= 400
        ):
            runtime.moment.reset_before_date()
        fitted = False
        upper = fitted_burst(upper, burst_floor)
        if self._lim._adaptive and upper < 1.0 and pool.fit_burst(upper, now):
            fitted = changed = True
            runtime.shrink_seq = next(self._seq)
            self._lim._emit("burst_change", runtime, now, {"burst": pool.burst, "from": "headers"})
        elif self._lim._adaptive and burst_floor <= upper and pool.widen_burst(burst_floor, now):
            # (not when another dimension of the same report bounds the bucket below that: one
            # burst serves them all, and widening past the bound would shrink on the next report)
            changed = True
            self._lim._emit("burst_change", runtime, now, {"burst": pool.burst, "from": "headers"})
        return fitted, changed

    def _readings(
        self, runtime: PoolRuntime, dim: str, lowest: float, own: _OwnTraffic, now: float
    ) -> _Readings:
        """The level now if the report was of the admission, and if of the answer; with their moments.

        Also notes the evidence of which moment the server reports, where the client's own
        traffic is known exactly.
        """
        bucket = runtime.pool.buckets[dim]
        admitted, transit = own.admitted, own.transit
        then = own.early.get(dim, 0.0)
        then_maybe = own.early_maybe.get(dim, 0.0)
        # (what was sent within a round trip before this request may reach the server
        # after it: requests sent together arrive in any order)
        if own.replay is not None:
            admission = admission_estimate(
                lowest - then_maybe,
                admitted,
                now,
                # at one instant, what gives back first: a bucket full then throws
                # it away, as the server's may have (the other order could mint)
                sorted(((t, c.get(dim, 0.0)) for t, c in own.replay), key=_gives_back_first),
                rate=bucket.rate,
                capacity=bucket.capacity,
                pending=own.unsent.get(dim, 0.0),
                late=transit,
            )
        else:  # the rings do not reach back to the admission: all refill first, the safe side
            admission = (
                min(lowest + bucket.rate * max(0.0, now - admitted - transit), bucket.capacity)
                - own.since.get(dim, 0.0)
                - then
                - then_maybe
            )
        now_maybe = own.unsent_maybe.get(dim, 0.0)
        response = response_estimate(lowest, own.unsent.get(dim, 0.0) + now_maybe)
        if dim in _EVIDENCE_DIMS:
            note_evidence(runtime, dim, lowest, response, own, now)
        # a refusal is answered as it arrives: its report is of then, either way
        order = float(own.seq)
        moments = ((admitted, order), (admitted, order) if own.refused else (now, order))
        return admission, response, moments

    def _correct(
        self, runtime: PoolRuntime, dim: str, readings: _Readings, permit: Permit | None, now: float
    ) -> bool:
        """Move ``dim``'s bucket to what both readings allow (see ``core._feedback.correction``)."""
        admission, response, moments = readings
        pool = runtime.pool
        bucket = pool.buckets[dim]
        level = bucket.level_at(now)
        target, kept = correction(
            level,
            bucket.capacity,
            (admission, response),
            moments,
            runtime.moment.belief,
            runtime.readings.get(dim, NO_READINGS),
            latest=None if permit is not None else ((now, math.inf), (now, math.inf)),
        )
        if target > level and (
            (dim in _PRODUCED and not runtime.reserves_max_tokens)
            or (dim in _ESTIMATED and permit is not None and permit._state == _ACTIVE)
        ):
            # Not lifted: output charged as it is produced is still to come (requests under
            # way will draw it, and no report shows that yet); and a report read before
            # its own request settles already counts that request's real input, which
            # the settlement will give back again as our estimate's excess (a stream's
            # report, at its first byte: its max_tokens reservation is the server's too).
            target = level
        if target > level:  # a reading refuted: what it took off comes back
            delta = bucket.resync(target, now, allow_increase=True)
        else:
            delta = pool.resync(dim, target, now)
        after = level + delta
        if after != target:  # clamped (debt, capacity): the readings stay where they were
            shift = target - after
            kept = Readings((kept.offsets[0] + shift, kept.offsets[1] + shift), kept.moments)
        runtime.readings[dim] = kept
        if delta == 0.0:
            return False
        if delta < 0.0:
            runtime.resyncs += 1
        else:
            runtime.raised += 1
        self._lim._emit("resync", runtime, now, {"dimension": dim, "delta": delta})
        return True

    def _check_room(self, runtime: PoolRuntime, permit: Permit, now: float) -> None:
        """Say once per dimension when the server's bucket is smaller than a request reserves."""
        for dim, amount in permit.reserved.items():
            bucket = runtime.pool.buckets.get(dim)
            if bucket is None or amount <= bucket.capacity or dim in runtime.too_small:
                continue
            runtime.too_small.add(dim)
            detail = {"dimension": dim, "capacity": bucket.capacity, "reserved": amount}
            self._lim._emit("bucket_too_small", runtime, now, detail)

    def _on_429(
        self, runtime: PoolRuntime, snap: RateLimitSnapshot, permit: Permit | None, now: float, fitted: bool
    ) -> None:
        runtime.rate_limited += 1
        pool = runtime.pool
        # Predicted: the server's bucket is as large as ours (else ``fitted``: the headers
        # showed a shorter enforcement interval and the burst was just resized to it) and
        # its remaining shows a dimension this request doesn't fit in, so the refusal is
        # explained by usage we now know about. Otherwise the server enforces a shorter
        # interval than our burst assumes, in a way the headers did not show: halve it.
        predicted = permit is not None and not fitted and explained_by_remaining(snap, permit.reserved)
        if predicted:
            runtime.rate_limited_predicted += 1
            if self._lim._adaptive and (permit is None or permit.seq > runtime.share_seq):
                # others draw on the pool too: count on less of each refill (once per event:
                # the 429s of requests admitted before the last cut are old news)
                runtime.share_seq = next(self._seq)
                runtime.share = max(MIN_SHARE, runtime.share * SHARE_DECREASE)
                runtime.share_since = now
                pool.scale_rates(self._lim._warm_scale(now) * runtime.share, now)
                self._lim._emit("share_change", runtime, now, {"share": runtime.share})
        elif self._lim._adaptive and not fitted and (permit is None or permit.seq > runtime.shrink_seq):
            # once per event: the 429s of requests admitted before the last shrink are old news
            burst = pool.shrink_burst(now)
            runtime.shrink_seq = next(self._seq)
            self._lim._emit("burst_change", runtime, now, {"burst": burst})
        if self._lim._adaptive and permit is not None and permit.seq > runtime.transit_seq:
            # A refusal can also mean the report this request was let in on was read as taken
            # earlier than it was: requests reach the server later than the model assumed
            # (it then counts refill the server had already given). Allow them longer, once per
            # event; the cost is a little refill per report not counted on.
            runtime.transit_seq = next(self._seq)
            longer = min(_transit_cap(runtime), max(2.0 * MAX_TRANSIT, 2.0 * runtime.transit))
            if longer > runtime.transit:
                runtime.transit = longer
                self._lim._emit("transit_change", runtime, now, {"transit": longer})
        retry = snap.retry_after
        retry = 1.0 if retry is None else capped_pause(retry, "a 429's retry-after")
        if pool.pause(now + retry, "429 rate_limit_error"):
            self._lim._emit("pause", runtime, now, {"seconds": retry, "reason": "429"})
        self._lim._emit("rate_limited", runtime, now, {"predicted": predicted, "retry_after": retry})
        self._dispatch(runtime, now)

    def _on_529(self, runtime: PoolRuntime, snap: RateLimitSnapshot, now: float) -> None:
        runtime.overloaded += 1
        backoff = min(8.0, max(0.5, runtime.overload_backoff * 2.0))
        runtime.overload_backoff = backoff
        wait = (
            capped_pause(snap.retry_after, "a 529's retry-after") if snap.retry_after is not None else backoff
        )
        if runtime.pool.pause(now + wait, "529 overloaded"):
            self._lim._emit("pause", runtime, now, {"seconds": wait, "reason": "529"})
        self._lim._emit("overloaded", runtime, now, {"backoff": wait})
        self._dispatch(runtime, now)

    def grow_burst(self, runtime: PoolRuntime, now: float) -> None:
        """Traffic flows cleanly: after ``burst_recovery`` seconds without a 429 the burst grows back."""
        if runtime.share < 1.0 and now - runtime.share_since >= SHARE_STEP_EVERY:
            runtime.share = min(1.0, runtime.share + SHARE_STEP)
            runtime.share_since = now
            runtime.pool.scale_rates(self._lim._warm_scale(now) * runtime.share, now)
            self._lim._emit("share_change", runtime, now, {"share": runtime.share})
        if self._lim._adaptive and runtime.pool.burst < 1.0:
            old = runtime.pool.burst
            if runtime.pool.grow_burst(now, clean_for=self._lim._burst_recovery) != old:
                self._lim._emit("burst_change", runtime, now, {"burst": runtime.pool.burst})


def own_traffic(runtime: PoolRuntime, permit: Permit, now: float, *, replay: bool = True) -> _OwnTraffic:
    """What a report of ``permit``'s request cannot hold of this client's own traffic.

    A request sent within ``transit`` of a moment may or may not have reached the
    server by then: those are kept apart (``*_maybe``) so each reading counts them the
    safe way and the evidence of the moment as a blur either way.
    """
    own = _OwnTraffic(since=runtime.spent_since(permit._mark))
    own.refused = permit.response_status is not None and permit.response_status >= 400
    if own.refused:
        # refused: the server never took its tokens, and release() will give them back
        for dim, amount in permit._charged.items():
            if dim != "requests":
                own.early[dim] = own.early.get(dim, 0.0) + amount
                own.unsent[dim] = own.unsent.get(dim, 0.0) + amount
    # a report taken as its answer left counts every request sent a round trip before
    # now, and a round trip is no longer than the quickest answer took
    sent_at = permit.sent_at
    if sent_at == sent_at:
        runtime.fastest = min(runtime.fastest, now - sent_at)
    else:
        sent_at = permit.started_at
    own.transit = transit = max(
        min(runtime.fastest, MAX_TRANSIT), min(runtime.transit, _transit_cap(runtime))
    )
    own.admitted = admitted = sent_at
    own.seq = seq = permit.seq
    order = _order(permit)
    for other in runtime.in_flight.values():
        if not other.sent:
            _add(own.unsent, other._charged)
            if _order(other) < order:  # drawn in the model before this request, never sent
                _add(own.early, other._charged)
    oldest = min(admitted, now) - transit
    floor = oldest - runtime.look_back()
    for t, other_seq, charged, granted, other_order in reversed(runtime.sends):
        if granted < floor:
            break
        if t < oldest or other_seq == seq:  # most of them: tested before a look-up
            continue
        held = runtime.in_flight.get(other_seq)
        if held is not None and not held.sent:
            continue
        if t > now - transit:
            _add(own.unsent_maybe, charged)
        if abs(t - admitted) <= transit:
            _add(own.early_maybe if other_order < order else own.late_maybe, charged)
        elif t > admitted and other_order < order:  # reached the server after this request
            _add(own.early, charged)
    if replay:
        own.replay = runtime.changes_since(admitted, seq)
    # ``since`` is everything we charged (or refunded) since this request was granted, in
    # flight or done; what was given back since without the server ever counting it stays
    # in (if admitted before this request, the server never had it; if after, counting it
    # lowers more than needed: safe)
    own.counted_since = runtime.admitted.since(permit._mark[0])
    if own.refused:  # did it cost an RPM token? unknown: earlier and later values do not compare
        runtime.moment.restart(now)
    return own


def _order(permit: Permit) -> Any:
    """Where ``permit``'s grant stands among the others (see ``PoolRuntime.sends``)."""
    send = permit._send
    return permit.seq if send is None else send[4]


def note_evidence(
    runtime: PoolRuntime, dim: str, lowest: float, response: float, own: _OwnTraffic, now: float
) -> None:
    """Note what a report shows of the moment it describes, where our own traffic is known exactly.

    (Requests always; output only where its max_tokens reservation is the server's too.
    Not for a refusal: it is answered as it arrives, and either reading fits it.)
    """
    if own.refused or not (dim == "requests" or runtime.reserves_max_tokens):
        return
    then = own.early.get(dim, 0.0)
    then_maybe = own.early_maybe.get(dim, 0.0)
    now_maybe = own.unsent_maybe.get(dim, 0.0)
    limit = runtime.pool.limits[dim]
    after_maybe = own.late_maybe.get(dim, 0.0)
    runtime.moment.note(
        dim,
        lowest - then + (after_maybe - then_maybe) / 2,
        response + now_maybe / 2,
        admission_blur=(then_maybe + after_maybe) / 2,
        response_blur=now_maybe / 2,
        admitted_at=own.admitted,
        now=now,
        # what the server counted of ours: refusals and unsent given back
        spent=runtime.counted_total(dim),
        spent_since=own.counted_since.get(dim, 0.0),
        rate=limit / 60.0,
        tolerance=_EVIDENCE_TOLERANCE[dim],
        ceiling=limit,
    )


def _transit_cap(runtime: PoolRuntime) -> float:
    """The longest transit a pool may learn: MAX_LEARNED_TRANSIT, less on a short bucket."""
    return min(MAX_LEARNED_TRANSIT, TRANSIT_SHARE_OF_BUCKET * 60.0 * runtime.pool.burst)


def _gives_back_first(event: tuple[float, float]) -> tuple[float, float]:
    return event[0], -event[1]


def _add(totals: dict[str, float], amounts: Mapping[str, float]) -> None:
    for dim, amount in amounts.items():
        totals[dim] = totals.get(dim, 0.0) + amount
