"""Feedback for shared pools: a response's headers and status, applied to the state in Redis.

``Limiter.observe`` in remote mode: the resync of limits and levels (``resync.lua``),
429 and 529 pauses and the burst's shrink (``control.lua``), subscription holds and the
spend cap for the whole organization; and the replies that carry the shared burst back
to the local mirror.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Callable, Mapping
from typing import Final, final

import attrs

from ratekeeper.core._feedback import response_estimate
from ratekeeper.core._headers import parse_headers
from ratekeeper.core._pool import Pool
from ratekeeper.core._reading import (
    ROUNDING_MARGIN,
    burst_bound,
    capped_pause,
    error_fields,
    explained_by_remaining,
    fitted_burst,
    reset_before_date,
    unified_wait,
)
from ratekeeper.core._snapshot import LimitInfo, RateLimitSnapshot
from ratekeeper.gate._own_traffic import note_evidence, own_traffic
from ratekeeper.gate._resync import _RESYNC_DIMS
from ratekeeper.gate._state import Permit, PoolRuntime
from ratekeeper.redis._answers import RedisClock
from ratekeeper.redis._ops import RawReply, ScriptCall
from ratekeeper.redis._pools import SPECIAL, EngineParts, _RemotePool
from ratekeeper.redis._prefetch import Prefetches
from ratekeeper.redis._replies import BurstReply, PauseReply, ResyncReply

__all__ = ["Feedback"]


@attrs.frozen
class _BurstChange:
    """A change of the shared burst a report asks for: ``control.lua``'s call, and whether it shrinks."""

    call: ScriptCall
    fitted: bool


@final
class Feedback:
    """One engine's feedback: what a response says, to the shared state and the local mirror."""

    def __init__(self, parts: EngineParts, prefetches: Prefetches, clock: RedisClock) -> None:
        self._parts = parts
        self._prefetches = prefetches
        self._clock = clock

    def observe(
        self,
        headers: object,
        *,
        status: int,
        body: object,
        permit: Permit | None,
        runtime: PoolRuntime | None,
    ) -> RateLimitSnapshot:
        """``Limiter._observe`` in remote mode: resyncs, pauses and holds go to the shared state."""
        limiter = self._parts.limiter
        snap = parse_headers(headers, received_at=_dt.datetime.now(_dt.UTC))  # type: ignore[arg-type]
        error_type, error_code, message = error_fields(body)
        spend = error_code == "enforced_spend_limit_reached"
        calls: list[ScriptCall] = []
        with limiter._lock:
            now = limiter._now()
            skew = snap.clock_skew or 0.0
            if spend:
                limiter._account.spend_limit(snap, now, message)
                assert limiter._account.spend_until is not None
                assert limiter._account.spend_resets_at is not None
                seconds = limiter._account.spend_until - now
                iso = limiter._account.spend_resets_at.isoformat()
                calls.append(
                    self._parts.calls.control((self._parts.backend.org_key(),), "spend", repr(seconds), iso)
                )
            if runtime is not None:
                limits = snap.limits()
                runtime.note_reported(limits)
                remote = self._parts.remote_for(runtime)
                fitted = self._resync(remote, snap, limits, permit, now, calls)
                if status == 429 and not spend:
                    calls.append(self._on_429(remote, snap, permit, now, fitted))
                elif status == 529 or error_type == "overloaded_error":
                    calls.append(self._on_529(remote, snap, now))
                elif status < 400:
                    runtime.overload_backoff = 0.0
            unified = snap.unified
            if unified is not None:
                if unified.status == "rejected" or (status == 429 and unified.status is not None):
                    calls += self._on_rejected(snap, now, skew, runtime)
                else:
                    limiter._account.on_unified(snap, now, skew, status, runtime)
            if snap.quota is not None:
                limiter._account.on_quota(snap, permit, now)
            if status == 402 and limiter._account.wallet is not None:
                held = permit.credits if permit is not None else 0.0
                limiter._account.wallet.resync(max(0.0, held - 1.0), now)
        for call in calls:
            self._parts.backend.send(call)
        return snap

    # ------------------------------------------------------------------ resync

    def _resync(
        self,
        remote: _RemotePool,
        snap: RateLimitSnapshot,
        limits: Mapping[str, LimitInfo],
        permit: Permit | None,
        now: float,
        calls: list[ScriptCall],
    ) -> bool:
        """Under the lock: ``Limiter._resync`` for a shared pool; True if the headers fitted the burst.

        The resync goes to Redis (``resync.lua``: limits, and levels by the local
        limiter's rule, from the note reserve.lua kept of the pool at the request's grant;
        what only this process can know goes with it: its refused request's tokens and
        its earlier requests not sent yet). The burst bound is computed here with the
        local limiter's helper; a clearly smaller one shrinks the local mirror at once (so
        a 429 in the same response is classified as the local limiter would) and the
        shared burst with ``control.lua fit``.
        """
        if not limits:
            return False
        limiter = self._parts.limiter
        runtime = remote.runtime
        pool = runtime.pool
        date = snap.server_date
        bound, floor = math.inf, 0.0
        since, extra = self._since(runtime, permit)
        args: list[str | int] = [since, "1" if limiter._learn else "0"]
        for dim in _RESYNC_DIMS:
            info = limits.get(dim)
            if info is None:
                continue
            # the local mirror learns at once (resync.lua applies the same rule to the shared
            # state), so the burst bound below divides by the limit in force
            new_limit = float(info.limit) if info.limit is not None and limiter._learn else 0.0
            if new_limit > 0 and _learns(pool, dim, new_limit) and pool.set_limit(dim, new_limit, now):
                limiter._emit("limit_change", runtime, now, {dim: info.limit})
                self._parts.wake_head(runtime)
            margin = 0.0 if dim == "requests" else ROUNDING_MARGIN
            limit = repr(float(info.limit)) if info.limit is not None else ""
            target = repr(info.remaining - margin) if info.remaining is not None else ""
            args += [dim, limit, target, repr(extra.get(dim, 0.0))]
            bucket = pool.buckets.get(dim)
            if info.remaining is not None and bucket is not None and bucket.rate > 0.0:
                floor = max(floor, (info.remaining - margin) / pool.limits[dim])
                if permit is not None and info.reset is not None and date is not None:
                    age = max(0.0, now - permit.started_at)
                    bound = min(bound, burst_bound(info.remaining, info.reset, date, dim, pool, age))
        burst = self._shared_burst(remote, fitted_burst(bound, floor), floor, now)
        if burst is not None and not burst.fitted:
            calls.append(burst.call)  # widened first: the resync may then lift into the room
        args[2:2] = self._reading(runtime, limits, date, permit, now)
        calls.append(self._parts.calls.resync(remote.keys, args, self._resync_handler(runtime)))
        if burst is not None and burst.fitted:
            calls.append(burst.call)
        return burst is not None and burst.fitted

    def _shared_burst(
        self, remote: _RemotePool, bound: float, floor: float, now: float
    ) -> _BurstChange | None:
        """The burst a report bounds between ``floor`` and ``bound``: the mirror's change, and Redis's.

        Shrunk to a clearly smaller bound (``control.lua fit``), or widened to the floor
        (``widen``: the pool opened small, ``opening``, and the server's bucket holds more;
        not past another dimension's bound, since one burst serves them all).
        """
        limiter = self._parts.limiter
        runtime = remote.runtime
        pool = runtime.pool
        if not limiter._adaptive:
            return None
        if bound < 1.0 and pool.fit_burst(bound, now):
            op, burst, fitted = "fit", bound, True
        elif floor <= bound and pool.widen_burst(floor, now):
            op, burst, fitted = "widen", floor, False
        else:
            return None
        limiter._emit("burst_change", runtime, now, {"burst": pool.burst, "from": "headers"})
        call = self._parts.calls.control(
            remote.keys.control, op, repr(burst), on_reply=self.burst_handler(runtime)
        )
        return _BurstChange(call, fitted)

    def _reading(
        self,
        runtime: PoolRuntime,
        limits: Mapping[str, LimitInfo],
        date: _dt.datetime | None,
        permit: Permit | None,
        now: float,
    ) -> list[str]:
        """``resync.lua``'s moment, cutoff, span of the admission and the observed request's part.

        The moment is what this process's reports have shown (``core._feedback``: the
        reading believed once the other is refuted, else the lower of the two: 'either'
        once both were, 'unknown' before either was, where the earlier answers bound it
        too, as ``_below_answers`` does in-process); a refusal's report only lowers ('').
        The cutoff is when the answer arrived in Redis time, less a request's way to the
        server (the local limiter's ``transit``: a request sent before it is in a report
        taken as the answer left), the admission within that way of the send; each less
        (or plus) how far the clock's mapping may be off. Every report moves the latest
        moments on; a refusal is answered as it arrives: of then, whatever the moment.
        """
        transit = _note_moment(runtime, limits, date, permit, now)
        offset = self._clock.offset
        if transit is None or offset is None:
            return ["", "", "", "", "", ""]
        assert permit is not None
        error = self._clock.error
        redis_now = time.monotonic() + offset
        marked = permit.sent_at == permit.sent_at
        sent = redis_now - max(0.0, now - (permit.sent_at if marked else permit.started_at))
        cutoff, since_sent = redis_now - transit - error, sent - transit - error
        if not math.isfinite(cutoff):
            return ["", "", "", "", "", ""]
        own = "all" if permit.seq >= 0 else ("" if marked else "one")
        belief = runtime.moment.belief
        if permit.response_status is not None and permit.response_status >= 400:
            mode, cutoff = "", since_sent  # (answered as it arrived: of then; only lowers)
        else:
            mode = "either" if belief == "mixed" else belief  # (admission, response or unknown)
        lifts = _token_lifts(runtime) if mode else ""
        return [mode, repr(cutoff), repr(since_sent), repr(sent + transit + error), own, lifts]

    def _since(self, runtime: PoolRuntime, permit: Permit | None) -> tuple[int, dict[str, float]]:
        """The observed request's reservation (-1: none) and what the server had not counted of it.

        A prefetched request's is its prefetch's, with what of the prefetch the server
        had not counted as extra.
        """
        if permit is None:
            return -1, {}
        entry = self._prefetches.admitted.get(permit.seq)
        if permit.seq >= 0:
            return permit.seq, self._uncounted(runtime, permit)
        if entry is None:
            return -1, {}
        c, fresh = entry
        extra = self._uncounted(runtime, permit)
        # fresh then, less what of it went back since (resync counts that as given back)
        for dim, amount in fresh.items():
            unseen = amount - c.given.get(dim, 0.0)
            if unseen > 0.0:
                extra[dim] = extra.get(dim, 0.0) + unseen
        return c.seq, extra

    def _resync_handler(self, runtime: PoolRuntime) -> Callable[[RawReply], None]:
        limiter = self._parts.limiter

        def done(raw: RawReply) -> None:
            reply = ResyncReply.parse(raw)
            with limiter._lock:
                now = limiter._now()
                for change in reply.changes:
                    dim, value = change.dimension, change.value
                    if change.kind == "limit":
                        if runtime.pool.set_limit(dim, value, now):  # not known here yet
                            limiter._emit("limit_change", runtime, now, {dim: value})
                            self._parts.wake_head(runtime)
                    else:
                        if value > 0.0:  # the response rule lifted it: whoever waits may fit
                            runtime.raised += 1
                            self._parts.wake_head(runtime)
                        else:
                            runtime.resyncs += 1
                        limiter._emit("resync", runtime, now, {"dimension": dim, "delta": value})

        return done

    def _uncounted(self, runtime: PoolRuntime, permit: Permit) -> dict[str, float]:
        """What the pool had charged at ``permit``'s grant that the server had not counted.

        Its own tokens if the server refused it, and this process's requests admitted
        before it and not sent yet (another process's, Redis cannot know: if any, the
        level stays that much high until their own responses correct it).
        """
        extra: dict[str, float] = {}
        if permit.response_status is not None and permit.response_status >= 400:
            for dim, amount in permit._charged.items():
                if dim != "requests":
                    extra[dim] = extra.get(dim, 0.0) + amount
        order = self._prefetches.order
        mine = order(permit)
        for other in runtime.in_flight.values():
            if not other.sent and other is not permit and order(other) < mine:
                for dim, amount in other._charged.items():
                    extra[dim] = extra.get(dim, 0.0) + amount
        return extra

    # ------------------------------------------------------------------ the shared burst

    def burst_handler(self, runtime: PoolRuntime) -> Callable[[RawReply], None]:
        """A callback for a reply that carries the shared burst (settle, control fit): the mirror follows."""

        def done(raw: RawReply) -> None:
            self._follow_burst(runtime, BurstReply.parse(raw).burst)

        return done

    def _follow_burst(self, runtime: PoolRuntime, burst: float | None) -> None:
        if burst is None:
            return
        limiter = self._parts.limiter
        with limiter._lock:
            if abs(burst - runtime.pool.burst) > 1e-12:
                now = limiter._now()
                runtime.pool.set_burst(min(1.0, max(burst, 1.0 / 60.0)), now)
                limiter._emit("burst_change", runtime, now, {"burst": burst})

    def _pause_handler(self, runtime: PoolRuntime) -> Callable[[RawReply], None]:
        def done(raw: RawReply) -> None:
            bursts = PauseReply.parse(raw).bursts
            if bursts:
                self._follow_burst(runtime, bursts[0])

        return done

    # ------------------------------------------------------------------ pauses and holds

    @staticmethod
    def _hold(remote: _RemotePool, until: float) -> None:
        # until Redis has the pause, this process's own head must not reserve past it
        if until > remote.hold_until:
            remote.hold_until = until

    def _on_429(
        self, remote: _RemotePool, snap: RateLimitSnapshot, permit: Permit | None, now: float, fitted: bool
    ) -> ScriptCall:
        """``Limiter._on_429`` for a shared pool: the same classification, the pause and shrink in Redis.

        Predicted: the burst was not just fitted to the headers and the server's remaining
        shows a dimension this request doesn't fit in. Otherwise, unless ``fitted``, the
        burst halves, once per event: ``control.lua`` skips the 429s of requests admitted
        (by any process) before the pool's last shrink or fit.
        """
        limiter = self._parts.limiter
        runtime = remote.runtime
        runtime.rate_limited += 1
        predicted = permit is not None and not fitted and explained_by_remaining(snap, permit.reserved)
        if predicted:
            runtime.rate_limited_predicted += 1
        retry = 1.0 if snap.retry_after is None else capped_pause(snap.retry_after, "a 429's retry-after")
        shrink = not predicted and not fitted and limiter._adaptive
        self._hold(remote, now + retry)
        if remote.prefetch is not None:
            self._prefetches.close(remote, remote.prefetch)
        runtime.pool.pause(now + retry, "429 rate_limit_error")
        limiter._emit("pause", runtime, now, {"seconds": retry, "reason": "429"})
        limiter._emit("rate_limited", runtime, now, {"predicted": predicted, "retry_after": retry})
        seq = self._prefetches.redis_seq(permit) if permit is not None else -1
        return self._parts.calls.control(
            remote.keys.control,
            "pause",
            repr(retry),
            "429 rate_limit_error",
            "1" if shrink else "0",
            seq,
            on_reply=self._pause_handler(runtime),
        )

    def _on_529(self, remote: _RemotePool, snap: RateLimitSnapshot, now: float) -> ScriptCall:
        runtime = remote.runtime
        runtime.overloaded += 1
        backoff = min(8.0, max(0.5, runtime.overload_backoff * 2.0))
        runtime.overload_backoff = backoff
        wait = backoff if snap.retry_after is None else capped_pause(snap.retry_after, "a 529's retry-after")
        self._hold(remote, now + wait)
        runtime.pool.pause(now + wait, "529 overloaded")
        self._parts.limiter._emit("pause", runtime, now, {"seconds": wait, "reason": "529"})
        self._parts.limiter._emit("overloaded", runtime, now, {"backoff": wait})
        return self._parts.calls.control(remote.keys.control, "pause", repr(wait), "529 overloaded", "0")

    def _on_rejected(
        self, snap: RateLimitSnapshot, now: float, skew: float, runtime: PoolRuntime | None
    ) -> list[ScriptCall]:
        unified = snap.unified
        assert unified is not None
        wait = unified_wait(snap, skew)
        claim = unified.representative_claim
        scope = claim.rsplit("_", 1)[1] if claim in ("seven_day_opus", "seven_day_sonnet") else "all"
        reason = f"subscription limit ({claim})"
        for remote in self._parts.remotes.values():
            if scope in remote.scopes.split(",") or remote.runtime is runtime:
                self._hold(remote, now + wait)
                remote.runtime.pool.pause(now + wait, reason)
                detail = {"seconds": wait, "reason": "unified rejected"}
                self._parts.limiter._emit("pause", remote.runtime, now, detail)
        calls = [
            self._parts.calls.control((self._parts.backend.org_key(),), "hold", repr(wait), reason, scope)
        ]
        if runtime is not None and runtime.pool.name in SPECIAL:
            remote = self._parts.remote_for(runtime)
            calls.append(self._parts.calls.control(remote.keys.control, "pause", repr(wait), reason, "0"))
        return calls


def _note_moment(
    runtime: PoolRuntime,
    limits: Mapping[str, LimitInfo],
    date: _dt.datetime | None,
    permit: Permit | None,
    now: float,
) -> float | None:
    """What the report shows of the moment it describes, read from this process's own traffic.

    The local limiter's evidence (``gate._resync``), on the requests bucket only: other
    processes only ever draw on it (a request the server counted stays counted), so under
    the right reading the series still never goes up. On a token bucket their settlements
    give back, which this process does not see: a rise there would refute nothing. Returns
    how long a request may take to reach the server (None: the report's age is unknown).
    """
    if permit is None:  # a report of unknown age shows nothing of it
        return None
    own = own_traffic(runtime, permit, now, replay=False)
    refused = permit.response_status is not None and permit.response_status >= 400
    info = limits.get("requests")
    if info is not None and info.remaining is not None and "requests" in runtime.pool.limits:
        lowest = float(info.remaining)
        unsent = own.unsent.get("requests", 0.0) + own.unsent_maybe.get("requests", 0.0)
        note_evidence(runtime, "requests", lowest, response_estimate(lowest, unsent), own, now)
    if not refused and date is not None and reset_before_date(limits, date, runtime.pool):
        runtime.moment.reset_before_date()  # full again before the answer left: not of then
    return own.transit


#: The token buckets a report of the answer may set in Redis whatever the output rule, and
#: those it may set only when output is reserved as max_tokens (see ``_token_lifts``).
_INPUT_LIFTS: Final = ("input_tokens", "priority_input_tokens")
_OUTPUT_LIFTS: Final = ("output_tokens", "priority_output_tokens", "tokens")


def _token_lifts(runtime: PoolRuntime) -> str:
    """``resync.lua``'s lifts: the token buckets whose level a report of the answer may set.

    What a report of the answer cannot show is what the shared model charged and the
    server had not counted then, and Redis knows that of every process's records (their
    tokens not sent, the sends after the report's moment). Input, the server counts at
    admission, and output reserved as max_tokens too; output counted as it is produced
    (the real-time rule) each request under way may still draw beyond what any report
    shows, and only its own process knows how much: those buckets keep the lower-only rule.
    """
    limits = runtime.pool.limits
    dims: list[str] = [dim for dim in _INPUT_LIFTS if dim in limits]
    if runtime.reserves_max_tokens:
        dims += [dim for dim in _OUTPUT_LIFTS if dim in limits]
    return ",".join(dims)


def _learns(pool: Pool, dim: str, limit: float) -> bool:
    """``Limiter._resync``'s rule (and ``resync.lua``'s): which ``-limit`` headers a pool adopts."""
    if dim == "tokens":
        return dim in pool.limits or limit < pool.limits.get("input_tokens", 0.0) + pool.limits.get(
            "output_tokens", 0.0
        )
    return dim in pool.limits or dim.startswith("priority")
