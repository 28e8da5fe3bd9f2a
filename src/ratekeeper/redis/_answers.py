"""A reserve's answer, applied to the local line: grants, the next attempt, failures, Redis down.

And the offset between Redis time and this process's monotonic clock, learnt from the
same answers: a waiter's arrival goes to Redis in Redis time, so that the shared line
orders every process's waiters by when they arrived.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from typing import Final, final

from ratekeeper.errors import CapacityExceeded, SpendLimitReached
from ratekeeper.gate._state import _FAILED, _GRANTED, _WAITING, PoolRuntime
from ratekeeper.redis._ops import Refused, Result, ScriptCall
from ratekeeper.redis._pools import FALLBACK, EngineParts, _RemotePool, _RemoteWaiter
from ratekeeper.redis._prefetch import Prefetches
from ratekeeper.redis._replies import ReserveReply

__all__ = ["RedisClock", "ReserveAnswers"]

#: Added to every computed wait, so the retry lands just after the refill, not just before.
_SLACK: Final = 0.0005


@final
class RedisClock:
    """Redis time minus ``time.monotonic()``, from the fastest round trips seen (None: not yet)."""

    __slots__ = ("_best_rtt", "offset")

    def __init__(self) -> None:
        self.offset: float | None = None
        self._best_rtt = math.inf

    def learn(self, redis_now: float, sent: float) -> None:
        """A reply read Redis time ``redis_now``; its round trip left at ``sent`` (monotonic)."""
        # NTP's rule: trust the fastest round trips, whose midpoint is closest to when
        # Redis read its clock (a first call that also connects would skew it by ms).
        # The bar rises slowly so the estimate keeps following the two clocks' drift.
        received = time.monotonic()
        rtt = received - sent
        self._best_rtt *= 1.01
        if rtt <= self._best_rtt:
            self._best_rtt = rtt
            self.offset = redis_now - (sent + received) / 2.0

    @property
    def error(self) -> float:
        """How far ``offset`` may be off, at most: the round trip it was read from (inf: none yet)."""
        return self._best_rtt

    def arrival(self, w: _RemoteWaiter) -> str:
        """``w``'s arrival in Redis time, as reserve.lua reads it ('': not known, Redis uses its now)."""
        offset = self.offset
        return "" if offset is None else repr(w.mono + offset)


@final
class ReserveAnswers:
    """Reads a reserve round trip's results and applies them to the engine's local lines."""

    def __init__(self, parts: EngineParts, prefetches: Prefetches, clock: RedisClock) -> None:
        self._parts = parts
        self._prefetches = prefetches
        self._clock = clock
        self._heartbeat = parts.backend.ticket_ttl / 3.0

    def read(self, calls: list[ScriptCall], results: list[Result], sent: float) -> ReserveReply | None:
        """The reserve's reply, the changes before it delivered; None if Redis must count as down.

        ``calls`` end with the reserve; its round trip left at ``sent``. An error reply
        to the reserve (or to the pool's init, the reserve then finding no pool) marks
        Redis down: trying again would only repeat it.
        """
        self._parts.backend.deliver(calls[:-1], results[:-1])
        refused = _refused(calls, results)
        if refused is not None:
            self._parts.backend.mark_down(refused.error)  # an error reply: as if Redis did not answer
            return None
        raw = results[-1]
        assert not isinstance(raw, Refused)
        reply = ReserveReply.parse(raw)
        self._clock.learn(reply.now, sent)
        return reply

    def apply(self, remote: _RemotePool, cands: list[_RemoteWaiter], reply: ReserveReply) -> None:
        """Under the lock: grant, fail, or plan the next attempt; wake whoever must act."""
        now = self._parts.limiter._now()
        if reply.prefetch is not None:
            self._prefetches.granted(remote, reply.prefetch, now)
        self._grant(remote, cands, reply.seqs)
        self._plan_next(remote, cands, reply, now)
        head = remote.runtime.head()
        if head is not None:
            head.wake()

    def _grant(self, remote: _RemotePool, cands: list[_RemoteWaiter], seqs: tuple[int, ...]) -> None:
        """Under the lock: the candidates a reserve granted (a prefix) leave the line, or give it back."""
        runtime = remote.runtime
        for w, seq in zip(cands, seqs, strict=False):
            w.rseq = seq
            if w.state == _WAITING:
                w.state = _GRANTED
                runtime.queued -= 1
                w.wake()
            else:  # left while the call was out: it never sent anything
                self._parts.backend.send(self._parts.calls.release(remote.keys, w.rseq, "unsent", w.draws))
        remote.ticket = len(seqs) < len(cands)

    def _plan_next(
        self, remote: _RemotePool, cands: list[_RemoteWaiter], reply: ReserveReply, now: float
    ) -> None:
        """Under the lock: when the head asks again, after a reserve's ``reply``; what it refused fails."""
        runtime = remote.runtime
        granted = len(reply.seqs)
        if reply.status == "NOPOOL":
            remote.inited = False
            remote.next_try = -math.inf
        elif reply.status == "OK":
            if granted < len(cands):
                pause = min(reply.wait, self._parts.backend.poll_interval, self._heartbeat)
                remote.next_try = now + pause + _SLACK
            else:
                remote.next_try = -math.inf
        else:
            remote.next_try = -math.inf
            try:
                self.raise_for(runtime, reply)
            except SpendLimitReached as exc:
                resets_at = exc.resets_at
                self._parts.limiter._table.fail_waiters(lambda: SpendLimitReached(resets_at))
            except CapacityExceeded as exc:
                w = cands[granted]
                if w.state == _WAITING:
                    w.state = _FAILED
                    w.error = exc
                    runtime.queued -= 1
                    w.wake()

    def raise_for(self, runtime: PoolRuntime, reply: ReserveReply) -> None:
        """The error a reserve's SPEND or TOOBIG means (a spend cap is noted in the limiter first)."""
        status, why = reply.status, reply.reason
        if status == "SPEND":
            resets = _dt.datetime.fromisoformat(why) if why else _dt.datetime.now(_dt.UTC)
            with self._parts.limiter._lock:
                if self._parts.limiter._account.spend_until is None:
                    self._parts.limiter._account.spend_until = self._parts.limiter._now() + reply.wait
                    self._parts.limiter._account.spend_resets_at = resets
            raise SpendLimitReached(resets)
        if status == "TOOBIG":
            dim, amount, limit = why.split()
            raise CapacityExceeded(runtime.pool.name, dim, float(amount), float(limit))

    def went_down(self) -> None:
        """Under the lock: Redis failed; every waiter fails or moves to the fallback."""
        fallback = self._parts.backend.on_unavailable == "local"
        for remote in self._parts.remotes.values():
            runtime = remote.runtime
            for w in runtime.queue.waiting():
                if fallback:
                    w.state = FALLBACK
                else:
                    w.state = _FAILED
                    w.error = self._parts.backend.unavailable_error()
                runtime.queued -= 1
                w.wake()
            runtime.queue.clear()
            remote.next_try = -math.inf
            remote.inited = False  # Redis may come back empty


def _refused(calls: list[ScriptCall], results: list[Result]) -> Refused | None:
    """Why a reserve round trip must count as Redis unavailable, or None.

    Its reserve got an error reply; or the pool's init did and the reserve found no
    pool: trying again would only repeat both (a user without a permission init needs).
    """
    reply = results[-1]
    if isinstance(reply, Refused):
        return reply
    if reply[0] == "NOPOOL" and len(calls) >= 2 and calls[-2].script == "init":
        init = results[-2]
        if isinstance(init, Refused):
            return init
    return None
