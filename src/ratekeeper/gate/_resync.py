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
from typing import TYPE_CHECKING, Final, TypeAlias, final

from ratekeeper.core._feedback import (
    NO_READINGS,
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
    reset_before_date,
    taken_by,
)
from ratekeeper.core._snapshot import LimitInfo, RateLimitSnapshot
from ratekeeper.gate._own_traffic import (
    EVIDENCE_DIMS,
    MAX_TRANSIT,
    OwnTraffic,
    add,
    note_evidence,
    own_traffic,
    still_to_come,
    transit_cap,
)
from ratekeeper.gate._state import Permit, PoolRuntime

if TYPE_CHECKING:
    from ratekeeper.gate._host import GateHost

__all__ = ["PoolFeedback"]

#: The share of the refill rate a pool counts on: cut by this factor on a 429 that the server's
#: report explains but the model did not foresee, raised by SHARE_STEP every SHARE_STEP_EVERY
#: clean seconds, never below MIN_SHARE (additive increase, multiplicative decrease).
SHARE_DECREASE: Final = 0.7
SHARE_STEP: Final = 0.02
SHARE_STEP_EVERY: Final = 5.0
MIN_SHARE: Final = 0.25
#: Header dimension names that map onto pool buckets.
_RESYNC_DIMS: Final = (
    "requests",
    "input_tokens",
    "output_tokens",
    "tokens",
    "priority_input_tokens",
    "priority_output_tokens",
)


#: ``error_fields`` of no body.
_NO_ERROR: Final = (None, None, "")

#: A report's two readings of one level (at the admission, at the answer) and their moments.
_Readings: TypeAlias = tuple[float, float, tuple[tuple[float, float], tuple[float, float]]]


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
        if type(headers) is RateLimitSnapshot:  # the middleware's, parsed already: no clock read
            snap = headers
        else:
            snap = parse_headers(headers, received_at=_dt.datetime.now(_dt.UTC))  # type: ignore[arg-type]
        error_type, error_code, message = error_fields(body) if body is not None else _NO_ERROR
        with self._lock:
            now = self._now()
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
            if snap.unified is not None:  # (the skew only for it: a datetime subtraction)
                self._lim._account.on_unified(snap, now, snap.clock_skew or 0.0, status, runtime)
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
            own = OwnTraffic(since={})
            for other in runtime.in_flight.values():
                add(own.since, other._charged)
        fitted, changed = self._fit_shape(runtime, limits, snap.server_date, permit, now)
        if permit is not None:
            self._check_room(runtime, permit, now)
            if not own.refused and runtime.moment.belief == "mixed":
                # (where the server is known to report either moment, each report by itself;
                # otherwise the evidence soon decides the reading for all of them)
                own.taken_by = taken_by(limits, snap.server_date, now)
        pool = runtime.pool
        # a resync event (DEBUG, and no count of its own) reaches only the hook and a DEBUG log:
        # with neither, its detail is not built three times a response
        heard = self._lim._on_event is not None or self._lim._events_log.debug_on()
        if permit is not None:
            # a refusal is answered as it arrives: its report is of then, either way
            order = float(own.seq)
            moments = ((own.admitted, order), (own.admitted, order) if own.refused else (now, order))
        for dim in _RESYNC_DIMS:
            info = limits.get(dim)
            if info is None or info.remaining is None or dim not in pool.limits:
                continue
            # the report's lowest reading, always: keeping a level anywhere in the rounding
            # band could admit up to twice the rounding more than the server has left
            lowest = info.remaining - (0.0 if dim == "requests" else ROUNDING_MARGIN)
            if permit is not None:  # the report's age is known: see _feedback
                readings = self._readings(runtime, dim, lowest, own, now, moments)
            else:
                # a response of unknown age: the report less everything that could be
                # missing from it, under either reading; it lifts nothing
                unknown = lowest - own.since.get(dim, 0.0)
                readings = unknown, unknown, NO_READINGS.moments
            changed = self._correct(runtime, dim, readings, permit, now, heard) or changed
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
        lim = self._lim
        pool_limits, buckets = pool.limits, pool.buckets  # (set_limit changes these in place)
        changed = False
        upper = math.inf
        burst_floor = 0.0
        scale = math.nan  # read at the first limit learned: the same for every dimension here
        # (a response of unknown age bounds nothing)
        age = max(0.0, now - permit.started_at) if permit is not None and date is not None else None
        for dim in _RESYNC_DIMS:
            info = limits.get(dim)
            if info is None:
                continue
            limit = info.limit
            if limit is not None and limit > 0 and lim._learn:
                if dim == "tokens":
                    combined = pool_limits.get("input_tokens", 0.0) + pool_limits.get("output_tokens", 0.0)
                    learn = dim in pool_limits or limit < combined
                else:
                    learn = dim in pool_limits or dim.startswith("priority")
                if scale != scale:
                    scale = lim._warm_scale(now) * runtime.share
                # (set_limit changes nothing for a limit it holds already: not called then)
                if (
                    learn
                    and (pool_limits.get(dim) != limit or dim not in buckets)
                    and pool.set_limit(dim, float(limit), now, rate_scale=scale)
                ):
                    changed = True
                    self._fail_impossible(runtime)
                    lim._emit("limit_change", runtime, now, {dim: limit})
            remaining = info.remaining
            if remaining is not None and dim in pool_limits and buckets[dim].rate > 0.0:
                lowest = remaining - (0.0 if dim == "requests" else ROUNDING_MARGIN)
                # the server's bucket holds at least what it reports left
                burst_floor = max(burst_floor, lowest / pool_limits[dim])
                if age is not None and info.reset is not None:
                    assert date is not None
                    upper = min(upper, burst_bound(remaining, info.reset, date, dim, pool, age))
        refused = permit is not None and permit.response_status is not None and permit.response_status >= 400
        if permit is not None and date is not None and not refused and reset_before_date(limits, date, pool):
            runtime.moment.reset_before_date()  # full again before the answer left: not of then
        fitted, resized = self._fit_burst(runtime, fitted_burst(upper, burst_floor), burst_floor, now)
        return fitted, changed or resized

    def _fit_burst(self, runtime: PoolRuntime, upper: float, lower: float, now: float) -> tuple[bool, bool]:
        """Fit the burst to the bucket size a report bounds: (shrunk to it, resized at all)."""
        pool = runtime.pool
        if self._lim._adaptive and upper < 1.0 and pool.fit_burst(upper, now):
            runtime.shrink_seq = next(self._seq)
            self._lim._emit("burst_change", runtime, now, {"burst": pool.burst, "from": "headers"})
            return True, True
        if self._lim._adaptive and lower <= upper and pool.widen_burst(lower, now):
            # (not when another dimension of the same report bounds the bucket below that: one
            # burst serves them all, and widening past the bound would shrink on the next report)
            self._lim._emit("burst_change", runtime, now, {"burst": pool.burst, "from": "headers"})
            return False, True
        return False, False

    def _readings(
        self,
        runtime: PoolRuntime,
        dim: str,
        lowest: float,
        own: OwnTraffic,
        now: float,
        moments: tuple[tuple[float, float], tuple[float, float]],
    ) -> _Readings:
        """The level now if the report was of the admission, and if of the answer; with their moments.

        ``moments``: the two instants the report may describe (the same for every dimension).

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
            events = [(t, c.get(dim, 0.0)) for t, c in own.replay]
            if len(events) > 1:
                # at one instant, what gives back first: a bucket full then throws
                # it away, as the server's may have (the other order could mint)
                events.sort(key=_gives_back_first)
            pending = own.unsent.get(dim, 0.0)
            start, rate, capacity = lowest - then_maybe, bucket.rate, bucket.capacity
            admission = admission_estimate(
                start, admitted, now, events, rate=rate, capacity=capacity, pending=pending, late=transit
            )
            if own.taken_by is not None:
                # a report shown older than its answer was taken between the admission and
                # its earliest reset: with the refill counted from the latest it can have
                # been, safe anywhere in between, whatever the server does with others
                late = max(transit, own.taken_by - admitted)
                own.bounded = admission_estimate(
                    start, admitted, now, events, rate=rate, capacity=capacity, pending=pending, late=late
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
        if dim in EVIDENCE_DIMS:
            note_evidence(runtime, dim, lowest, response, own, now)
        if own.taken_by is not None and own.replay is not None:
            # not a report of the answer's moment: in place of that reading, the bound (the
            # admission reading stays, for when the reports turn out to be of the admission)
            response = max(own.bounded, min(admission, response))
        return admission, response, moments

    def _correct(
        self,
        runtime: PoolRuntime,
        dim: str,
        readings: _Readings,
        permit: Permit | None,
        now: float,
        heard: bool = True,
    ) -> bool:
        """Move ``dim``'s bucket to what both readings allow (see ``core._feedback.correction``).

        ``heard``: whether a ``resync`` event reaches anyone (see ``_resync``).
        """
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
        owed = 0.0  # of the readings' values, what the level stays below only for now
        if target > level:
            # Lifted only as far as the traffic still to come leaves safe: output charged as it
            # is produced (requests under way may each draw up to their max_tokens beyond what
            # they reserved, and no report shows that yet); and a report read before its own
            # request settles already counts that request's real input, which the settlement
            # may give back again, up to its whole estimate (a stream's report, at its first
            # byte: its max_tokens reservation is the server's too).
            produced, settled = still_to_come(runtime, dim, permit)
            lifted = max(level, target - produced - settled)
            # the output still to come is charged as it is learned of: the readings keep their
            # value (kept lowered, each report would take it off again on top)
            owed = max(0.0, target - lifted - settled)
            target = lifted
        if target > level:  # a reading refuted: what it took off comes back
            delta = bucket.resync(target, now, allow_increase=True)
        else:
            delta = pool.resync(dim, target, now)
        after = level + delta
        if after != target or owed:  # clamped (debt, capacity): the readings stay where they were
            kept = kept.shifted(target - after + owed)
        runtime.readings[dim] = kept
        if delta == 0.0:
            return False
        if delta < 0.0:
            runtime.resyncs += 1
        else:
            runtime.raised += 1
        if heard:
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
            longer = min(transit_cap(runtime), max(2.0 * MAX_TRANSIT, 2.0 * runtime.transit))
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


def _gives_back_first(event: tuple[float, float]) -> tuple[float, float]:
    return event[0], -event[1]
