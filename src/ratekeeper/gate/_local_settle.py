"""Settling the local engine's permits: usage in, refunds and charges to the pools.

``LocalSettlement`` moves a permit's reservation to what the request really
used (``settle``, and ``settle_plain``, the fast path for an ordinary request that
``tests/test_fast_path.py`` holds to the general one), charges output as a stream
produces it (``progress``), and gives back what an unsent or refused request held
(``release``). ``LocalEngine`` hands these methods out as its own.
"""

from __future__ import annotations

import math
from asyncio import _get_running_loop as _running_loop
from collections.abc import Callable
from time import monotonic as _monotonic
from typing import TYPE_CHECKING, final

from ratekeeper.core._accounting import Cost, Usage, request_cost
from ratekeeper.errors import ConfigurationError
from ratekeeper.gate._demand import _diff, _draws
from ratekeeper.gate._plain import settle_plain_amounts
from ratekeeper.gate._resync import _RESYNC_DIMS, PoolFeedback
from ratekeeper.gate._state import _ACTIVE, _RELEASED, _SETTLED, Permit, PoolRuntime, _drawn

if TYPE_CHECKING:
    from ratekeeper.gate._host import GateHost

__all__ = ["LocalSettlement"]


@final
class LocalSettlement:
    """The permit side of the local engine: settle, progress, release (under the limiter's lock)."""

    def __init__(
        self, host: GateHost, feedback: PoolFeedback, dispatch: Callable[[PoolRuntime, float], None]
    ) -> None:
        self._host = host
        self._lock = host._lock
        self._now = host._now
        self._clock = host._clock
        self._offset = host._time.offset  # the gate clock's (see GateClock), read on the fast path
        self._gate_clock = host._time
        self._account = host._account
        self._feedback = feedback
        # the engine's: grant whoever the refund lets in
        self._dispatch = dispatch

    def settle_observing(self, permit: Permit, usage: object, credits: float | None, headers: object) -> Cost:
        """``settle`` with a complete answer's headers: settle, read the headers, then wake."""
        cost = permit._settle(usage, credits, wake=False)
        permit.sent = True
        permit.response_status = 200
        self._feedback.observe(headers, status=200, body=None, permit=permit, runtime=permit._runtime)
        runtime = permit._runtime
        with self._lock:
            self._dispatch(runtime, self._now())  # whoever the refund lets in, now that it is read
        return cost

    def settle(self, permit: Permit, usage: Usage, credits: float | None, *, wake: bool = True) -> Cost:
        """Move the permit's charge to its actual usage; wake whoever the refund lets in."""
        with self._lock:
            now = self._now()
            runtime = permit._runtime
            priority = "priority_output_tokens" in permit.reserved  # _draws sets both or neither
            actual = runtime.rules.settled_cost(usage, priority=priority, credits=credits)
            new = _draws(actual)
            for dim, amount in permit._charged.items():
                if dim not in _RESYNC_DIMS:  # not usage (a batch's queue slots): stays as charged
                    new[dim] = amount
            diff = _diff(permit._charged, new)
            estimated = permit._charged.get("input_tokens", 0.0)
            if estimated > 0.0:
                runtime.shortfalls.append(max(0.0, (new.get("input_tokens", 0.0) - estimated) / estimated))
            runtime.pool.give_back(diff, now)
            if diff:
                runtime.record(now, diff, -1.0)
                if permit.sent:
                    runtime.changes.append((now, diff, *_drawn(permit)))
            self._account.settle_credits(permit.credits, credits, now)
            permit._charged = new
            permit._state = _SETTLED
            runtime.in_flight.pop(permit.seq, None)
            self._feedback.grow_burst(runtime, now)
            if wake:
                self._dispatch(runtime, now)
            return actual

    def settle_plain(
        self, permit: Permit, uncached: int, output: int, read: int, write: int, *, wake: bool = True
    ) -> Cost:
        """``settle`` for a permit of requests and tokens only, without intermediate objects."""
        lock = self._lock
        lock.acquire()  # not ``with``: see admit_plain
        try:
            if permit._state != _ACTIVE:  # settled or released by another thread meanwhile
                if permit._state == _SETTLED:
                    raise ConfigurationError("this permit is already settled")
                return Cost()
            charged = permit._charged
            runtime = permit._runtime
            pool = runtime.pool
            inp = float(uncached + write + read) if runtime.cache_reads_count else float(uncached + write)
            out = float(output)
            estimated = charged.get("input_tokens", 0.0)
            give_in = estimated - inp
            give_out = charged.get("output_tokens", 0.0) - out
            if estimated > 0.0:  # (by how much the estimate fell short: max(0.0, -give_in / estimated))
                runtime.shortfalls.append(-give_in / estimated if give_in < 0.0 else 0.0)
            burst = pool.burst
            share = runtime.share
            if give_in >= 0.0 and give_out >= 0.0 and burst == 1.0 and share == 1.0 and not runtime.queued:
                # Only refunds, and nobody to wake: no clock is read. A refund leaves the
                # same level whether it is added before or after the refill since the
                # bucket's last update (both clamp at capacity), so each bucket takes it
                # at its own last time; a charge could not (it must follow the refill).
                now = -math.inf
            else:
                now = self._settle_time()
            settle_plain_amounts(permit, inp, out, give_in, give_out, now)
            if permit.sent and (give_in or give_out):  # for replaying after a report (see _resync)
                at = now if now > -math.inf else self._now()
                change = {"input_tokens": give_in, "output_tokens": give_out, "tokens": give_in + give_out}
                runtime.changes.append((at, change, *_drawn(permit)))
            permit._state = _SETTLED
            del runtime.in_flight[permit.seq]
            if now > -math.inf:
                # (what grow_burst would change: a cut share, or a burst below what the
                # headers allow after a clean stretch; asked here, it costs no call)
                if share < 1.0 or (
                    burst < pool.ceiling and now - pool.clean_since >= self._host._burst_recovery
                ):
                    self._feedback.grow_burst(runtime, now)
                if wake and (runtime.queued or runtime.queue.stored or self._host._warmup is not None):
                    self._dispatch(runtime, now)
            elif wake and runtime.queue.stored:
                runtime.queue.clear()  # what _dispatch does when nobody waits: drop the cancelled
            return request_cost(inp, out)
        finally:
            lock.release()

    def _settle_time(self) -> float:
        clock = self._clock
        if clock is None and (loop := _running_loop()) is not None:
            gate_clock = self._gate_clock  # gate_clock.now(), without its call
            if loop is gate_clock.monotonic_loop:
                return _monotonic() + self._offset
            return gate_clock.loop_time(loop) + self._offset
        now = self._now()
        # a broken clock: no time passes, nothing is lost
        return now if -math.inf < now < math.inf else -math.inf

    def progress(self, permit: Permit, output: float) -> None:
        """Output produced beyond what is charged (a stream under the real-time rule): charge it."""
        if permit._state != _ACTIVE:
            return
        with self._lock:
            extra = output - permit._charged.get("output_tokens", 0.0)
            if extra <= 0.0:
                return
            now = self._now()
            runtime = permit._runtime
            more = {"output_tokens": extra, "tokens": extra}
            if "priority_output_tokens" in permit._charged:
                more["priority_output_tokens"] = extra
            runtime.pool.take(more, now)
            runtime.record(now, more)
            runtime.changes.append((now, {d: -a for d, a in more.items()}, math.inf, math.inf))
            charged = dict(permit._charged)  # a new dict: the permit's reservation may share the old one
            for dim, amount in more.items():
                charged[dim] = charged.get(dim, 0.0) + amount
            permit._charged = charged

    def release(self, permit: Permit) -> None:
        """Give back what the request did not use (see ``Permit.release``)."""
        with self._lock:
            if permit._state == _ACTIVE:
                self.release_locked(permit, self._now())

    def release_locked(self, permit: Permit, now: float) -> None:
        """``release`` under the lock (also for a granted waiter whose task left)."""
        runtime = permit._runtime
        charged = permit._charged
        if not permit.sent:
            refund = dict(charged)
        elif permit.response_status is not None and permit.response_status >= 400:
            refund = {k: v for k, v in charged.items() if k != "requests"}
        else:
            refund = {}
        if refund:
            runtime.pool.give_back(refund, now)
            runtime.record(now, refund, -1.0, counted=False)
            send = permit._send
            if send is not None:  # refused (or never sent): it drew nothing but the request
                # (a new dict: the permit's reservation and charge may share the old one)
                send[2] = {dim: amount for dim, amount in send[2].items() if dim not in refund}
        if self._account.wallet is not None and permit.credits and (not permit.sent or refund):
            self._account.wallet.give_back(permit.credits, now)
        permit._state = _RELEASED
        runtime.in_flight.pop(permit.seq, None)
        self._dispatch(runtime, now)
