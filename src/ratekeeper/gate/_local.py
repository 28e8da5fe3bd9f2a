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
from typing import TYPE_CHECKING, final

import anyio

from ratekeeper.core._accounting import Cost, Demand, Usage, request_cost
from ratekeeper.core._snapshot import RateLimitSnapshot
from ratekeeper.errors import (
    AcquireTimeout,
    CapacityExceeded,
    ConfigurationError,
    InsufficientCredits,
    WouldBlock,
)
from ratekeeper.gate._demand import _ONE_REQUEST, Plain, _diff, _draws, _for_model
from ratekeeper.gate._resync import _RESYNC_DIMS, PoolFeedback
from ratekeeper.gate._state import (
    _ACTIVE,
    _FAILED,
    _GONE,
    _GRANTED,
    _RELEASED,
    _SETTLED,
    _WAITING,
    Permit,
    PoolRuntime,
    Waiter,
    _drawn,
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
        self._now = limiter._now
        self._clock = limiter._clock
        self._offset = limiter._time.offset  # the gate clock's (see GateClock), read on the fast path
        self._window = limiter._window
        self._feedback = PoolFeedback(limiter, dispatch=self.dispatch, fail_impossible=self._fail_impossible)

    def wake(self, rt: PoolRuntime, now: float) -> None:
        """Under the lock: a pool's state changed (a pause, a limit, a refund): re-plan its queue."""
        self.dispatch(rt, now)

    def set_limits(self, rt: PoolRuntime, limits: Mapping[str, float]) -> None:
        """Under the lock, after the pool's limits changed: fail who can never fit, wake who can."""
        self._fail_impossible(rt)
        self.dispatch(rt, self._now())

    def give_back(self, rt: PoolRuntime, amounts: Mapping[str, float]) -> None:
        """Under the lock, after ``amounts`` went back to the pool by hand: wake who now fits."""
        self.dispatch(rt, self._now())

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
            rt, draws, credit = self.prepare(model, demand, now)
            wait = rt.pool.wait_time(draws, now)
            if rt.queued or wait > 0.0:
                reason = rt.pool.pause_reason if rt.pool.paused_until > now else ""
                raise WouldBlock(rt.pool.name, wait, reason)
            return self.grant_now(rt, model, draws, credit, now)

    def grant_now(
        self, rt: PoolRuntime, model: str, draws: dict[str, float], credit: float, now: float
    ) -> Permit:
        rt.pool.take(draws, now)
        if credit and self._lim._wallet is not None:
            self._lim._wallet.charge(credit, now)
        seq = next(self._seq)
        rt.record(now, draws)
        permit = Permit(self._lim, rt, model, draws, credit, seq, now)
        rt.in_flight[seq] = permit
        rt.granted += 1
        if self._lim._on_event is not None:
            self._lim._emit("grant", rt, now, {"waited": 0.0})
        rt.note_grant(permit, now)
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
        rt, draws, credit = self.prepare(model, demand, now)
        if not rt.queued and rt.pool.wait_time(draws, now) == 0.0:
            rt.waits.add(0.0)
            return rt, draws, credit, self.grant_now(rt, model, draws, credit, now)
        return rt, draws, credit, None

    def admit_plain(self, model: str, plain: Plain) -> Permit | None:
        """``_admit_at_once`` for an ordinary request, with no intermediate objects.

        None sends the caller down the general path, which admits, waits or says
        what is wrong: a model not seen yet, a queue, a pause, a short bucket, a
        draw over a limit, a spend limit or warm-up in force, a strange clock.
        """
        lock = self._lock
        lock.acquire()  # not ``with``: this path is measured in nanoseconds, and ``with`` costs ~100
        try:
            rt = self._model_runtime.get(model)
            if rt is None or rt.queued or self._lim._spend_until is not None or self._lim._warmup is not None:
                return None
            clock = self._clock
            if clock is None and (loop := _running_loop()) is not None:
                now = loop.time() + self._offset
            else:
                now = self._now()
                if not -math.inf < now < math.inf:
                    return None
            input_tokens, max_tokens, cache_read, cache_write, expected = plain
            if rt.cache_reads_count:
                input_tokens += cache_read
            inp = float(input_tokens + cache_write)
            out = float(max_tokens) if rt.reserves_max_tokens else float(min(expected or 0, max_tokens))
            if rt.pool.take_plain(inp, out, now) is None:
                return None
            if inp or out:
                draws = {"requests": 1.0, "input_tokens": inp, "output_tokens": out, "tokens": inp + out}
            else:
                draws = {"requests": 1.0, "input_tokens": inp, "output_tokens": out}
            rt.waits.add(0.0)
            seq = next(self._seq)
            rt.admitted.add_request(now, 1.0, inp, out)  # rt.record(now, draws), unrolled
            permit = Permit(self._lim, rt, model, draws, 0.0, seq, now)
            rt.in_flight[seq] = permit
            rt.granted += 1
            if self._lim._on_event is not None:
                self._lim._emit("grant", rt, now, {"waited": 0.0})
            rt.note_grant(permit, now)
            return permit
        finally:
            lock.release()

    async def acquire(self, model: str, demand: Demand, priority: int, timeout: float | None) -> Permit:
        with self._lock:
            now = self._now()
            rt, draws, credit, permit = self._admit_free(model, demand, now)
            if permit is not None:
                return permit
            if timeout is not None and timeout <= 0:
                raise AcquireTimeout(rt.pool.name, timeout)
            waiter = self.enqueue(rt, draws, priority, now, credit)
            waiter.permit = None
            bind_async(waiter)
            self.dispatch(rt, now)
        deadline = math.inf if timeout is None else now + timeout
        try:
            return await self._wait_async(rt, waiter, model, credit, deadline, timeout)
        except BaseException:
            with self._lock:
                self.abandon(rt, waiter, self._now())
            raise

    async def _wait_async(
        self,
        rt: PoolRuntime,
        waiter: Waiter,
        model: str,
        credit: float,
        deadline: float,
        timeout: float | None,
    ) -> Permit:
        while True:
            with self._lock:
                now = self._now()
                permit = self.collect(rt, waiter, model, credit, now, deadline, timeout)
                if permit is not None:
                    return permit
                event = anyio.Event()
                waiter.event = event
                until = deadline
                if rt.head() is waiter and rt.next_wake < until:
                    until = rt.next_wake
            if until == math.inf:
                await event.wait()
            else:
                with anyio.move_on_after(max(0.0, until - now)):
                    await event.wait()
            if not event.is_set():
                with self._lock:
                    if waiter.state == _WAITING:
                        self.dispatch(rt, self._now())

    def collect(
        self,
        rt: PoolRuntime,
        waiter: Waiter,
        model: str,
        credit: float,
        now: float,
        deadline: float,
        timeout: float | None,
    ) -> Permit | None:
        """Under the lock: the waiter's permit if granted, an error if failed, None to keep waiting."""
        if waiter.state == _GRANTED:
            permit = Permit(self._lim, rt, model, waiter.draws, credit, waiter.seq, now)
            placeholder = rt.in_flight.pop(waiter.seq, None)
            if placeholder is not None:  # from the grant: its time and its place among our charges
                permit.started_at = placeholder.started_at
                permit._mark = placeholder._mark
                permit._send = placeholder._send
            rt.in_flight[waiter.seq] = permit
            waiter.permit = permit
            return permit
        if waiter.state == _FAILED:
            assert waiter.error is not None
            if isinstance(waiter.error, CapacityExceeded):
                raise _for_model(model, waiter.error)
            raise waiter.error
        if now >= deadline:
            self.abandon(rt, waiter, now)
            raise AcquireTimeout(rt.pool.name, timeout if timeout is not None else 0.0)
        return None

    def acquire_thread(self, model: str, demand: Demand, priority: int, timeout: float | None) -> Permit:
        with self._lock:
            now = self._now()
            rt, draws, credit, permit = self._admit_free(model, demand, now)
            if permit is not None:
                return permit
            waiter = self.enqueue(rt, draws, priority, now, credit)
            waiter.sync_event = threading.Event()
            self.dispatch(rt, now)
        deadline = math.inf if timeout is None else now + timeout
        try:
            while True:
                with self._lock:
                    now = self._now()
                    permit = self.collect(rt, waiter, model, credit, now, deadline, timeout)
                    if permit is not None:
                        return permit
                    waiter.sync_event.clear()
                    until = deadline
                    if rt.head() is waiter and rt.next_wake < until:
                        until = rt.next_wake
                woke = waiter.sync_event.wait(None if until == math.inf else max(0.0, until - now))
                if not woke:
                    with self._lock:
                        if waiter.state == _WAITING:
                            self.dispatch(rt, self._now())
        except BaseException:
            with self._lock:
                self.abandon(rt, waiter, self._now())
            raise

    def enqueue(
        self, rt: PoolRuntime, draws: dict[str, float], priority: int, now: float, credit: float = 0.0
    ) -> Waiter:
        waiter = Waiter(draws, priority, next(self._seq), now)
        waiter.credit = credit
        rt.queue.push(waiter)
        rt.queued += 1
        return waiter

    def abandon(self, rt: PoolRuntime, waiter: Waiter, now: float) -> None:
        """A waiter leaves (cancelled, timed out, failed): nothing it held stays reserved."""
        if waiter.state == _WAITING:
            waiter.state = _GONE
            rt.queued -= 1
            self.dispatch(rt, now)
        elif waiter.state == _GRANTED:
            permit = waiter.permit
            if permit is None:
                # granted but the task never picked it up: it never left, give it all back
                rt.in_flight.pop(waiter.seq, None)
                rt.pool.give_back(waiter.draws, now)
                rt.granted -= 1
                rt.record(now, waiter.draws, -1.0, counted=False)
                if waiter.credit and self._lim._wallet is not None:
                    self._lim._wallet.give_back(waiter.credit, now)
                waiter.state = _GONE
                self.dispatch(rt, now)
            elif permit._state == _ACTIVE and not permit.sent:
                self._release_locked(permit, now)

    def dispatch(self, rt: PoolRuntime, now: float) -> None:
        """Grant every waiter that can go now; wake exactly those, plus a new head."""
        if self._lim._warmup is not None:
            self._lim._apply_warmup(now)
        if not rt.queued:  # nobody waits: drop what is left of the cancelled and the granted
            if rt.queue:
                rt.queue.clear()
            rt.next_wake = math.inf
            return
        pool = rt.pool
        old_head = rt.head()
        while True:
            head = rt.head()
            if head is None:
                rt.next_wake = math.inf
                return
            wait = pool.wait_time(head.draws, now)
            if wait > 0.0:
                break
            self._grant_waiter(rt, head, now)
        rt.next_wake = now + wait
        # Every request draws one request token: when even that would delay the head, none can pass.
        if self._window and pool.fits_without_delaying(_ONE_REQUEST, head.draws, wait, now):
            # Look at up to ``window`` live waiters behind the head. The ones granted or gone
            # met on the way are dropped from the queue, so they never use up the window.
            budget = self._window
            for w in rt.queue.first(budget + 1):  # the head and up to ``window`` behind it
                if w is not head and pool.fits_without_delaying(w.draws, head.draws, wait, now):
                    self._grant_waiter(rt, w, now)
        if head is not old_head or head.event is None or not head.event.is_set():
            head.wake()  # the head re-plans its timer

    def _grant_waiter(self, rt: PoolRuntime, w: Waiter, now: float) -> None:
        wallet = self._lim._wallet
        if w.credit and wallet is not None:
            # checked again now: other requests may have drawn on the wallet while this one waited
            balance = wallet.level_at(now)
            if balance < w.credit:
                w.state = _FAILED
                w.error = InsufficientCredits(w.credit, max(balance, 0.0))
                rt.queued -= 1
                w.wake()
                return
            wallet.charge(w.credit, now)
        rt.pool.take(w.draws, now)
        w.state = _GRANTED
        rt.queued -= 1
        rt.granted += 1
        rt.waits.add(now - w.enqueued_at)
        rt.record(now, w.draws)
        w.seq = next(self._seq)  # permits are numbered in the order they are admitted
        # a placeholder so observe() of earlier permits counts this one as in flight
        rt.in_flight[w.seq] = _placeholder(self._lim, rt, w, now)
        self._lim._emit("grant", rt, now, {"waited": now - w.enqueued_at})  # a long wait is said at INFO
        w.wake()

    def _fail_impossible(self, rt: PoolRuntime) -> None:
        """After a limit went down, the waiters whose cost can no longer ever fit fail at once."""
        for w in rt.queue.waiting():
            try:
                rt.pool.check(w.draws)
            except CapacityExceeded as exc:
                w.state = _FAILED
                w.error = exc
                rt.queued -= 1
                w.wake()

    def settle_observing(self, permit: Permit, usage: object, credits: float | None, headers: object) -> Cost:
        """``settle`` with a complete answer's headers: settle, read the headers, then wake."""
        cost = permit._settle(usage, credits, wake=False)
        permit.sent = True
        permit.response_status = 200
        self._feedback.observe(headers, status=200, body=None, permit=permit, runtime=permit._runtime)
        rt = permit._runtime
        with self._lock:
            self.dispatch(rt, self._now())  # whoever the refund lets in, now that it is read
        return cost

    def settle(self, permit: Permit, usage: Usage, credits: float | None, *, wake: bool = True) -> Cost:
        with self._lock:
            now = self._now()
            rt = permit._runtime
            priority = "priority_output_tokens" in permit.reserved  # _draws sets both or neither
            actual = rt.rules.settled_cost(usage, priority=priority, credits=credits)
            new = _draws(actual)
            for dim, amount in permit._charged.items():
                if dim not in _RESYNC_DIMS:  # not usage (a batch's queue slots): stays as charged
                    new[dim] = amount
            diff = _diff(permit._charged, new)
            estimated = permit._charged.get("input_tokens", 0.0)
            if estimated > 0.0:
                rt.shortfalls.append(max(0.0, (new.get("input_tokens", 0.0) - estimated) / estimated))
            rt.pool.give_back(diff, now)
            if diff:
                rt.record(now, diff, -1.0)
                if permit.sent:
                    rt.changes.append((now, diff, *_drawn(permit)))
            if self._lim._wallet is not None and permit.credits and credits is not None:
                self._lim._wallet.give_back(permit.credits - credits, now) if permit.credits >= credits else (
                    self._lim._wallet.charge(credits - permit.credits, now)
                )
            permit._charged = new
            permit._state = _SETTLED
            rt.in_flight.pop(permit.seq, None)
            self._feedback.grow_burst(rt, now)
            if wake:
                self.dispatch(rt, now)
            return actual

    def settle_plain(
        self, permit: Permit, uncached: int, output: int, read: int, write: int, *, wake: bool = True
    ) -> Cost:
        """``_settle`` for a permit of requests and tokens only, without intermediate objects."""
        lock = self._lock
        lock.acquire()  # not ``with``: see _admit_plain
        try:
            if permit._state != _ACTIVE:  # settled or released by another thread meanwhile
                if permit._state == _SETTLED:
                    raise ConfigurationError("this permit is already settled")
                return Cost()
            charged = permit._charged
            rt = permit._runtime
            pool = rt.pool
            inp = float(uncached + write + read) if rt.cache_reads_count else float(uncached + write)
            out = float(output)
            estimated = charged.get("input_tokens", 0.0)
            give_in = estimated - inp
            give_out = charged.get("output_tokens", 0.0) - out
            if estimated > 0.0:
                rt.shortfalls.append(max(0.0, -give_in / estimated))
            if give_in >= 0.0 and give_out >= 0.0 and pool.burst == 1.0 and rt.share == 1.0 and not rt.queued:
                # Only refunds, and nobody to wake: no clock is read. A refund leaves the
                # same level whether it is added before or after the refill since the
                # bucket's last update (both clamp at capacity), so each bucket takes it
                # at its own last time; a charge could not (it must follow the refill).
                now = -math.inf
            else:
                clock = self._clock
                if clock is None and (loop := _running_loop()) is not None:
                    now = loop.time() + self._offset
                else:
                    now = self._now()
                    if not -math.inf < now < math.inf:
                        now = -math.inf  # a broken clock: no time passes, nothing is lost
            if give_in or give_out:
                pool.give_back_plain(give_in, give_out, now)
                rt.admitted.add_request(now, 0.0, -give_in, -give_out)  # rt.record(now, diff, -1.0)
                if permit.sent:  # for replaying after a report (see _resync): when it happened
                    at = now if now > -math.inf else self._now()
                    change = {
                        "input_tokens": give_in,
                        "output_tokens": give_out,
                        "tokens": give_in + give_out,
                    }
                    rt.changes.append((at, change, *_drawn(permit)))
            if inp or out:
                permit._charged = {
                    "requests": 1.0,
                    "input_tokens": inp,
                    "output_tokens": out,
                    "tokens": inp + out,
                }
            else:
                permit._charged = {"requests": 1.0, "input_tokens": inp, "output_tokens": out}
            permit._state = _SETTLED
            del rt.in_flight[permit.seq]
            if now > -math.inf:
                if pool.burst < 1.0 or rt.share < 1.0:
                    self._feedback.grow_burst(rt, now)
                if wake and (rt.queued or rt.queue or self._lim._warmup is not None):
                    self.dispatch(rt, now)
            elif wake and rt.queue:
                rt.queue.clear()  # what _dispatch does when nobody waits: drop the cancelled
            return request_cost(inp, out)
        finally:
            lock.release()

    def progress(self, permit: Permit, output: float) -> None:
        if permit._state != _ACTIVE:
            return
        with self._lock:
            charged = permit._charged.get("output_tokens", 0.0)
            extra = output - charged
            if extra <= 0.0:
                return
            now = self._now()
            rt = permit._runtime
            more = {"output_tokens": extra, "tokens": extra}
            if "priority_output_tokens" in permit._charged:
                more["priority_output_tokens"] = extra
            rt.pool.take(more, now)
            rt.record(now, more)
            rt.changes.append((now, {d: -a for d, a in more.items()}, math.inf, math.inf))
            for dim, amount in more.items():
                permit._charged[dim] = permit._charged.get(dim, 0.0) + amount

    def release(self, permit: Permit) -> None:
        with self._lock:
            if permit._state == _ACTIVE:
                self._release_locked(permit, self._now())

    def _release_locked(self, permit: Permit, now: float) -> None:
        rt = permit._runtime
        charged = permit._charged
        if not permit.sent:
            refund = dict(charged)
        elif permit.response_status is not None and permit.response_status >= 400:
            refund = {k: v for k, v in charged.items() if k != "requests"}
        else:
            refund = {}
        if refund:
            rt.pool.give_back(refund, now)
            rt.record(now, refund, -1.0, counted=False)
            if permit._send is not None:  # refused (or never sent): it drew nothing but the request
                drew = permit._send[2]
                for dim in refund:
                    drew.pop(dim, None)
        if self._lim._wallet is not None and permit.credits and (not permit.sent or refund):
            self._lim._wallet.give_back(permit.credits, now)
        permit._state = _RELEASED
        rt.in_flight.pop(permit.seq, None)
        self.dispatch(rt, now)
