"""The local engine: this process's own pools, queues and grants.

``LocalEngine`` is what ``Limiter`` drives when no backend shares the limits: it
admits, queues, grants, settles and releases against the pools the limiter holds,
under the limiter's one lock. Reports are read by its ``PoolFeedback``.

Scheduling: the oldest waiter of the highest priority is the *head*. It is
granted as soon as its cost fits. While it waits, a later waiter may go first
only if that does not delay the head (EASY backfilling), looking at a bounded
window behind the head so a grant costs the same however long the queue is.
Only the head sleeps on a timer; everybody else sleeps until a grant or a
change of plan wakes exactly them. An ordinary request that fits at once takes
a fast path (``admit_plain``, ``settle_plain``) that ``tests/test_fast_path.py``
holds to the general one.
"""

from __future__ import annotations

import math
import threading
from asyncio import _get_running_loop as _running_loop
from collections.abc import Mapping
from time import monotonic as _monotonic
from typing import TYPE_CHECKING, final

import anyio

from ratekeeper.core._accounting import Cost, Demand
from ratekeeper.core._bucket import take_request
from ratekeeper.core._snapshot import RateLimitSnapshot
from ratekeeper.errors import (
    AcquireTimeout,
    CapacityExceeded,
    InsufficientCredits,
    WouldBlock,
)
from ratekeeper.gate._demand import _ONE_REQUEST, Plain, _for_model
from ratekeeper.gate._local_settle import LocalSettlement
from ratekeeper.gate._plain import grant_plain
from ratekeeper.gate._resync import PoolFeedback
from ratekeeper.gate._state import (
    _ACTIVE,
    _FAILED,
    _GONE,
    _GRANTED,
    _WAITING,
    Permit,
    PoolRuntime,
    Waiter,
    _placeholder,
    bind_async,
)

if TYPE_CHECKING:
    from ratekeeper.gate._host import GateHost

__all__ = ["LocalEngine"]


@final
class LocalEngine:
    """The ``Engine`` of a limiter whose limits are this process's alone (see ``gate._engine``)."""

    def __init__(self, limiter: GateHost) -> None:
        self._lim = limiter
        # the limiter's own, held here too: the fast path reads them on every request
        # (``lock``, ``now`` and ``prepare`` are also the hooks tests drive the engine with)
        self._lock = self.lock = limiter._lock
        self.now = limiter._now
        self.prepare = limiter._prepare
        self._seq = limiter._seq
        self._model_runtime = limiter._model_runtime
        self._account = limiter._account
        self._now = limiter._now
        self._clock = limiter._clock
        self._offset = limiter._time.offset  # the gate clock's (see GateClock), read on the fast path
        self._gate_clock = limiter._time
        self._window = limiter._window
        self._feedback = PoolFeedback(limiter, dispatch=self.dispatch, fail_impossible=self._fail_impossible)
        # the permit side is the settlement's: its bound methods, so a permit's call to its
        # engine costs no extra call on the way (settle_plain is measured in nanoseconds)
        self._settlement = settlement = LocalSettlement(limiter, self._feedback, self.dispatch)
        self.settle = settlement.settle
        self.settle_plain = settlement.settle_plain
        self.release = settlement.release

    def settle_observing(self, permit: Permit, usage: object, credits: float | None, headers: object) -> Cost:
        """``settle`` with a complete answer's headers (see ``LocalSettlement.settle_observing``)."""
        return self._settlement.settle_observing(permit, usage, credits, headers)

    def progress(self, permit: Permit, output: float) -> None:
        """Charge output produced beyond the reservation (see ``LocalSettlement.progress``)."""
        self._settlement.progress(permit, output)

    def wake(self, runtime: PoolRuntime, now: float) -> None:
        """Under the lock: a pool's state changed (a pause, a limit, a refund): re-plan its queue."""
        self.dispatch(runtime, now)

    def set_limits(self, runtime: PoolRuntime, limits: Mapping[str, float]) -> None:
        """Under the lock, after the pool's limits changed: fail who can never fit, wake who can."""
        self._fail_impossible(runtime)
        self.dispatch(runtime, self._now())

    def give_back(self, runtime: PoolRuntime, amounts: Mapping[str, float]) -> None:
        """Under the lock, after ``amounts`` went back to the pool by hand: wake who now fits."""
        self.dispatch(runtime, self._now())

    def observe(
        self,
        headers: object,
        *,
        status: int,
        body: object,
        permit: Permit | None,
        runtime: PoolRuntime | None,
    ) -> RateLimitSnapshot:
        """Read a response's report (see ``PoolFeedback.observe``)."""
        return self._feedback.observe(headers, status=status, body=body, permit=permit, runtime=runtime)

    def acquire_nowait(self, model: str, demand: Demand) -> Permit:
        """``acquire_nowait`` on this process's own pools (also the Redis path's fallback)."""
        with self._lock:
            now = self._now()
            runtime, draws, credit = self.prepare(model, demand, now)
            wait = runtime.pool.wait_time(draws, now)
            if runtime.queued or wait > 0.0:
                reason = runtime.pool.pause_reason if runtime.pool.paused_until > now else ""
                raise WouldBlock(runtime.pool.name, wait, reason)
            return self.grant_now(runtime, model, draws, credit, now)

    def grant_now(
        self, runtime: PoolRuntime, model: str, draws: dict[str, float], credit: float, now: float
    ) -> Permit:
        runtime.pool.take(draws, now)
        if credit and self._account.wallet is not None:
            self._account.wallet.charge(credit, now)
        seq = next(self._seq)
        runtime.record(now, draws)
        permit = Permit(self._lim, runtime, model, draws, credit, seq, now)
        runtime.in_flight[seq] = permit
        runtime.granted += 1
        if self._lim._on_event is not None:
            self._lim._emit("grant", runtime, now, {"waited": 0.0})
        runtime.note_grant(permit, now)
        return permit

    def admit_at_once(
        self, model: str, demand: Demand, priority: int, timeout: float | None
    ) -> Permit | None:
        """``_acquire``'s first step: the permit if nobody waits and the buckets can take it now."""
        with self._lock:
            return self._admit_free(model, demand, self._now())[3]

    def _admit_free(
        self, model: str, demand: Demand, now: float
    ) -> tuple[PoolRuntime, dict[str, float], float, Permit | None]:
        """Under the lock: the first step of every admission that may wait (a task's, a thread's,
        ``admit_at_once``): the demand checked and its pool found, and a permit if nobody waits
        and the buckets take it now (else None: the caller joins the line)."""
        runtime, draws, credit = self.prepare(model, demand, now)
        if not runtime.queued and runtime.pool.wait_time(draws, now) == 0.0:
            runtime.waits.add(0.0)
            return runtime, draws, credit, self.grant_now(runtime, model, draws, credit, now)
        return runtime, draws, credit, None

    def admit_plain(self, model: str, plain: Plain) -> Permit | None:
        """``_admit_at_once`` for an ordinary request, with no intermediate objects.

        None sends the caller down the general path, which admits, waits or says
        what is wrong: a model not seen yet, a queue, a pause, a short bucket, a
        draw over a limit, a spend limit or warm-up in force, a strange clock.
        """
        lock = self._lock
        lock.acquire()  # not ``with``: this path is measured in nanoseconds, and ``with`` costs ~100
        try:
            runtime = self._model_runtime.get(model)
            if (
                runtime is None
                or runtime.queued
                or self._account.spend_until is not None
                or self._lim._warmup is not None
            ):
                return None
            clock = self._clock
            if clock is None and (loop := _running_loop()) is not None:
                gate_clock = self._gate_clock  # gate_clock.now(), without its call
                if loop is gate_clock.monotonic_loop:
                    now = _monotonic() + self._offset
                else:
                    now = gate_clock.loop_time(loop) + self._offset
            else:
                now = self._now()
                if not -math.inf < now < math.inf:
                    return None
            input_tokens, max_tokens, cache_read, cache_write, expected = plain
            if runtime.cache_reads_count:
                input_tokens += cache_read
            inp = float(input_tokens + cache_write)
            if runtime.reserves_max_tokens:
                out = float(max_tokens)
            else:
                out = float(min(expected or 0, max_tokens))
                if max_tokens > runtime.most_output:
                    runtime.most_output = float(max_tokens)
            pool = runtime.pool  # pool.take_plain(inp, out, now), unrolled
            if pool.paused_until > now:
                return None
            requests, in_bucket, out_bucket, tokens = pool.plain or pool.plain_buckets()
            if (
                requests is None
                or in_bucket is None
                or out_bucket is None
                or take_request(requests, in_bucket, out_bucket, tokens, inp, out, now) is None
            ):
                return None
            permit = grant_plain(self._lim, runtime, model, inp, out, next(self._seq), now)
            if self._lim._on_event is not None:
                self._lim._emit("grant", runtime, now, {"waited": 0.0})
            return permit
        finally:
            lock.release()

    async def acquire(self, model: str, demand: Demand, priority: int, timeout: float | None) -> Permit:
        with self._lock:
            now = self._now()
            runtime, draws, credit, permit = self._admit_free(model, demand, now)
            if permit is not None:
                return permit
            if timeout is not None and timeout <= 0:
                raise AcquireTimeout(runtime.pool.name, timeout)
            waiter = self.enqueue(runtime, draws, priority, now, credit)
            waiter.permit = None
            bind_async(waiter)
            self.dispatch(runtime, now)
        deadline = math.inf if timeout is None else now + timeout
        try:
            return await self._wait_async(runtime, waiter, model, credit, deadline, timeout)
        except BaseException:
            with self._lock:
                self.abandon(runtime, waiter, self._now())
            raise

    async def _wait_async(
        self,
        runtime: PoolRuntime,
        waiter: Waiter,
        model: str,
        credit: float,
        deadline: float,
        timeout: float | None,
    ) -> Permit:
        while True:
            with self._lock:
                now = self._now()
                permit = self.collect(runtime, waiter, model, credit, now, deadline, timeout)
                if permit is not None:
                    return permit
                event = anyio.Event()
                waiter.event = event
                until = deadline
                if runtime.head() is waiter and runtime.next_wake < until:
                    until = runtime.next_wake
            if until == math.inf:
                await event.wait()
            else:
                with anyio.move_on_after(max(0.0, until - now)):
                    await event.wait()
            if not event.is_set():
                with self._lock:
                    if waiter.state == _WAITING:
                        self.dispatch(runtime, self._now())

    def collect(
        self,
        runtime: PoolRuntime,
        waiter: Waiter,
        model: str,
        credit: float,
        now: float,
        deadline: float,
        timeout: float | None,
    ) -> Permit | None:
        """Under the lock: the waiter's permit if granted, an error if failed, None to keep waiting."""
        if waiter.state == _GRANTED:
            permit = Permit(self._lim, runtime, model, waiter.draws, credit, waiter.seq, now)
            placeholder = runtime.in_flight.pop(waiter.seq, None)
            if placeholder is not None:  # from the grant: its time and its place among our charges
                permit.started_at = placeholder.started_at
                permit._mark = placeholder._mark
                permit._send = placeholder._send
            runtime.in_flight[waiter.seq] = permit
            waiter.permit = permit
            return permit
        if waiter.state == _FAILED:
            assert waiter.error is not None
            if isinstance(waiter.error, CapacityExceeded):
                raise _for_model(model, waiter.error)
            raise waiter.error
        if now >= deadline:
            self.abandon(runtime, waiter, now)
            raise AcquireTimeout(runtime.pool.name, timeout if timeout is not None else 0.0)
        return None

    def acquire_thread(self, model: str, demand: Demand, priority: int, timeout: float | None) -> Permit:
        with self._lock:
            now = self._now()
            runtime, draws, credit, permit = self._admit_free(model, demand, now)
            if permit is not None:
                return permit
            waiter = self.enqueue(runtime, draws, priority, now, credit)
            waiter.sync_event = threading.Event()
            self.dispatch(runtime, now)
        deadline = math.inf if timeout is None else now + timeout
        try:
            while True:
                with self._lock:
                    now = self._now()
                    permit = self.collect(runtime, waiter, model, credit, now, deadline, timeout)
                    if permit is not None:
                        return permit
                    waiter.sync_event.clear()
                    until = deadline
                    if runtime.head() is waiter and runtime.next_wake < until:
                        until = runtime.next_wake
                woke = waiter.sync_event.wait(None if until == math.inf else max(0.0, until - now))
                if not woke:
                    with self._lock:
                        if waiter.state == _WAITING:
                            self.dispatch(runtime, self._now())
        except BaseException:
            with self._lock:
                self.abandon(runtime, waiter, self._now())
            raise

    def enqueue(
        self, runtime: PoolRuntime, draws: dict[str, float], priority: int, now: float, credit: float = 0.0
    ) -> Waiter:
        waiter = Waiter(draws, priority, next(self._seq), now)
        waiter.credit = credit
        runtime.queue.push(waiter)
        runtime.queued += 1
        return waiter

    def abandon(self, runtime: PoolRuntime, waiter: Waiter, now: float) -> None:
        """A waiter leaves (cancelled, timed out, failed): nothing it held stays reserved."""
        if waiter.state == _WAITING:
            waiter.state = _GONE
            runtime.queued -= 1
            self.dispatch(runtime, now)
        elif waiter.state == _GRANTED:
            permit = waiter.permit
            if permit is None:
                # granted but the task never picked it up: it never left, give it all back
                runtime.in_flight.pop(waiter.seq, None)
                runtime.pool.give_back(waiter.draws, now)
                runtime.granted -= 1
                runtime.record(now, waiter.draws, -1.0, counted=False)
                if waiter.credit and self._account.wallet is not None:
                    self._account.wallet.give_back(waiter.credit, now)
                waiter.state = _GONE
                self.dispatch(runtime, now)
            elif permit._state == _ACTIVE and not permit.sent:
                self._settlement.release_locked(permit, now)

    def dispatch(self, runtime: PoolRuntime, now: float) -> None:
        """Grant every waiter that can go now; wake exactly those, plus a new head."""
        if self._lim._warmup is not None:
            self._lim._apply_warmup(now)
        if not runtime.queued:  # nobody waits: drop what is left of the cancelled and the granted
            if runtime.queue:
                runtime.queue.clear()
            runtime.next_wake = math.inf
            return
        pool = runtime.pool
        old_head = runtime.head()
        while True:
            head = runtime.head()
            if head is None:
                runtime.next_wake = math.inf
                return
            wait = pool.wait_time(head.draws, now)
            if wait > 0.0:
                break
            self._grant_waiter(runtime, head, now)
        runtime.next_wake = now + wait
        # Every request draws one request token: when even that would delay the head, none can pass.
        if self._window and pool.fits_without_delaying(_ONE_REQUEST, head.draws, wait, now):
            # Look at up to ``window`` live waiters behind the head. The ones granted or gone
            # met on the way are dropped from the queue, so they never use up the window.
            budget = self._window
            for w in runtime.queue.first(budget + 1):  # the head and up to ``window`` behind it
                if w is not head and pool.fits_without_delaying(w.draws, head.draws, wait, now):
                    self._grant_waiter(runtime, w, now)
        if head is not old_head or head.event is None or not head.event.is_set():
            head.wake()  # the head re-plans its timer

    def _grant_waiter(self, runtime: PoolRuntime, w: Waiter, now: float) -> None:
        wallet = self._account.wallet
        if w.credit and wallet is not None:
            # checked again now: other requests may have drawn on the wallet while this one waited
            balance = wallet.level_at(now)
            if balance < w.credit:
                w.state = _FAILED
                w.error = InsufficientCredits(w.credit, max(balance, 0.0))
                runtime.queued -= 1
                w.wake()
                return
            wallet.charge(w.credit, now)
        runtime.pool.take(w.draws, now)
        w.state = _GRANTED
        runtime.queued -= 1
        runtime.granted += 1
        runtime.waits.add(now - w.enqueued_at)
        runtime.record(now, w.draws)
        w.seq = next(self._seq)  # permits are numbered in the order they are admitted
        # a placeholder so observe() of earlier permits counts this one as in flight
        runtime.in_flight[w.seq] = _placeholder(self._lim, runtime, w, now)
        self._lim._emit("grant", runtime, now, {"waited": now - w.enqueued_at})  # a long wait is said at INFO
        w.wake()

    def _fail_impossible(self, runtime: PoolRuntime) -> None:
        """After a limit went down, the waiters whose cost can no longer ever fit fail at once."""
        for w in runtime.queue.waiting():
            try:
                runtime.pool.check(w.draws)
            except CapacityExceeded as exc:
                w.state = _FAILED
                w.error = exc
                runtime.queued -= 1
                w.wake()
