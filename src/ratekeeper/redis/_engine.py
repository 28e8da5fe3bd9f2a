"""The limiter's remote mode: admission, settlement and feedback through a shared backend.

A ``Limiter`` built with ``backend=RedisBackend(...)`` hands its permit
operations to a ``RemoteEngine``. Per pool, a process keeps a local line of
waiters (the limiter's own queue structure, priority then FIFO); only the
waiter at its head talks to Redis, and one round trip (``reserve.lua``) tries
a batch of the line in order, so a burst of local requests costs one call.
The answer says how long until the next one fits; the head sleeps that long
(at most ``poll_interval``) and asks again.

Prefetch (``_prefetch.py``): when a reserve finds the pool with plenty to spare
and nobody else in line, it also reserves ``prefetch`` more requests like the last
one, under one seq, from which the process admits its next requests without a
round trip.

Synchronous permit methods (``settle``, ``release``, ``observe``,
``record_output``) change local bookkeeping at once and queue their Redis
change in the backend's outbox; it rides along with the next reserve or a
flusher thread sends it a few milliseconds later.

When Redis cannot be reached, ``on_unavailable="fail"`` raises
``BackendUnavailable``; ``"local"`` admits through a private in-process
``Limiter`` holding ``fallback_fraction`` of every limit, until Redis answers again
(``_fallback.py``). A response's feedback goes to the shared state through
``_feedback.py``; the script calls are written by ``_calls.py`` and their replies
read by ``_replies.py``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from typing import final

import anyio

from ratekeeper.core._accounting import Demand
from ratekeeper.core._snapshot import RateLimitSnapshot
from ratekeeper.errors import AcquireTimeout, WouldBlock
from ratekeeper.gate._demand import Plain
from ratekeeper.gate._limiter import Limiter
from ratekeeper.gate._state import (
    _FAILED,
    _GONE,
    _GRANTED,
    _WAITING,
    Permit,
    PoolRuntime,
    WaiterState,
    bind_async,
)
from ratekeeper.redis._answers import RedisClock, ReserveAnswers
from ratekeeper.redis._calls import PREFETCH_FLOOR, PREFETCH_SHARE, ScriptCalls
from ratekeeper.redis._fallback import LocalFallback
from ratekeeper.redis._feedback import Feedback
from ratekeeper.redis._ops import Backend, RawReply, RedisDown, Result, ScriptCall, encode_draws
from ratekeeper.redis._pools import FALLBACK, EngineParts, _RemotePool, _RemoteWaiter
from ratekeeper.redis._prefetch import Prefetches
from ratekeeper.redis._replies import ReserveReply
from ratekeeper.redis._settlement import Settlement

__all__ = ["PREFETCH_FLOOR", "PREFETCH_SHARE", "RemoteEngine"]

#: What a waiter does next: (its state, the candidates it must drive to Redis or None, wait until).
_Move = tuple[WaiterState, list[_RemoteWaiter] | None, float]


@final
class RemoteEngine:
    """The strategy a ``Limiter`` delegates to when it has a backend."""

    def __init__(self, limiter: Limiter, backend: Backend) -> None:
        self._limiter = limiter
        self._backend = backend
        self._pools: dict[str, _RemotePool] = {}
        self._window = max(1, limiter._window)
        self._clock = RedisClock()
        self._calls = ScriptCalls(backend, repr(limiter._burst_recovery) if limiter._adaptive else "")
        self._fallback = LocalFallback(limiter, backend)
        parts = EngineParts(limiter, backend, self._calls, self._pools, self._remote, self._wake_head)
        self._prefetches = Prefetches(parts)
        self._answers = ReserveAnswers(parts, self._prefetches, self._clock)
        self._feedback = Feedback(parts, self._prefetches, self._clock)
        # the permit side is the settlement's (settle, settle_plain, settle_observing,
        # progress, release), handed out as this engine's own
        self._settlement = settlement = Settlement(parts, self._prefetches)
        self.settle = settlement.settle
        self.settle_plain = settlement.settle_plain
        self.settle_observing = settlement.settle_observing
        self.progress = settlement.progress
        self.release = settlement.release
        backend.on_close(self.close_prefetches)

    # ------------------------------------------------------------------ pools

    def _remote(self, runtime: PoolRuntime) -> _RemotePool:
        """The local side of ``runtime``'s shared pool (made on first use)."""
        remote = self._pools.get(runtime.pool.name)
        if remote is None:
            name = runtime.pool.name
            keys = self._backend.pool_keys(name)
            remote = self._pools[name] = _RemotePool(runtime, keys, self._feedback.burst_handler(runtime))
            runtime.on_sent = self._settlement.sent
        return remote

    def _reserve_call(
        self, remote: _RemotePool, cands: list[_RemoteWaiter], queue: bool = True, prefetch: int = 0
    ) -> ScriptCall:
        candidates = [(self._clock.arrival(w), w.draws) for w in cands]
        return self._calls.reserve(remote.keys, remote.scopes, candidates, queue=queue, prefetch=prefetch)

    def _cancel(self, remote: _RemotePool, reserve: ScriptCall) -> None:
        """A reserve's reply never came, or was an error: what it granted goes back, unsent.

        (``release.lua`` 'cancel' marks the id used: a reserve arriving later grants nothing.)
        """
        if reserve.ident is None:
            return
        self._backend.send(self._calls.cancel(remote.keys, reserve.ident))

    # ------------------------------------------------------------------ acquire

    async def acquire(self, model: str, demand: Demand, priority: int, timeout: float | None) -> Permit:
        """``Limiter._acquire`` in remote mode."""
        limiter = self._limiter
        if not self._backend.available():
            return await self._fallback.acquire(model, demand, priority, timeout)
        entered = self._enter_line(model, demand, priority, timeout)
        if isinstance(entered, Permit):
            return entered
        remote, w, credit, deadline = entered
        try:
            while True:
                with limiter._lock:
                    now = limiter._now()
                    state, cands, until = self._next_move(remote, w, now, deadline, timeout)
                    if state == _WAITING and cands is None:
                        # bound to its event loop only when it waits: an admitted head never does
                        if w.threadsafe is None:
                            bind_async(w)
                        event = anyio.Event()
                        w.event = event
                if state == _GRANTED:
                    return self._permit(remote, w, model, credit)
                if state == FALLBACK:
                    left = None if deadline == math.inf else max(0.0, deadline - limiter._now())
                    return await self._fallback.acquire(model, demand, priority, left)
                if cands is not None:
                    await self._drive_async(remote, cands)
                    continue
                if until == math.inf:
                    await event.wait()
                else:
                    with anyio.move_on_after(max(0.0, until - now)):
                        await event.wait()
        except BaseException:
            with limiter._lock:
                self._abandon(remote, w)
            raise

    def acquire_thread(self, model: str, demand: Demand, priority: int, timeout: float | None) -> Permit:
        """``Limiter._acquire_thread`` in remote mode: the same line, waited on in a thread."""
        limiter = self._limiter
        if not self._backend.available():
            return self._fallback.acquire_thread(model, demand, priority, timeout)
        entered = self._enter_line(model, demand, priority, timeout)
        if isinstance(entered, Permit):
            return entered
        remote, w, credit, deadline = entered
        w.sync_event = event = threading.Event()
        try:
            while True:
                with limiter._lock:
                    now = limiter._now()
                    state, cands, until = self._next_move(remote, w, now, deadline, timeout)
                    event.clear()
                if state == _GRANTED:
                    return self._permit(remote, w, model, credit)
                if state == FALLBACK:
                    left = None if deadline == math.inf else max(0.0, deadline - limiter._now())
                    return self._fallback.acquire_thread(model, demand, priority, left)
                if cands is not None:
                    self._drive_sync(remote, cands)
                    continue
                event.wait(None if until == math.inf else max(0.0, until - now))
        except BaseException:
            with limiter._lock:
                self._abandon(remote, w)
            raise

    def acquire_nowait(self, model: str, demand: Demand) -> Permit:
        """``Limiter.acquire_nowait`` in remote mode: one round trip, no place in line kept."""
        limiter = self._limiter
        if not self._backend.available():
            return self._fallback.acquire_nowait(model, demand)
        with limiter._lock:
            now = limiter._now()
            runtime, draws, credit = limiter._prepare(model, demand, now)
            remote = self._remote(runtime)
            if remote.prefetch is not None:
                permit = self._prefetches.admit(remote, model, draws, credit, now)
                if permit is not None:
                    return permit
            if runtime.queued or remote.hold_until > now:
                reason = runtime.pool.pause_reason if remote.hold_until > now else "others are waiting"
                wait = max(0.0, remote.next_try - now, remote.hold_until - now)
                raise WouldBlock(runtime.pool.name, wait, reason)
            w = _RemoteWaiter(draws, 0, next(limiter._seq), now)
        reply = self._reserve_now(remote, w)
        if reply is None:
            return self._fallback.acquire_nowait(model, demand)
        if reply.status == "NOPOOL":
            remote.inited = False
            return self.acquire_nowait(model, demand)
        self._answers.raise_for(runtime, reply)
        if not reply.seqs:
            raise WouldBlock(runtime.pool.name, reply.wait, reply.reason)
        w.rseq = reply.seqs[0]
        w.state = _GRANTED
        return self._permit(remote, w, model, credit, queued=False)

    def _reserve_now(self, remote: _RemotePool, w: _RemoteWaiter) -> ReserveReply | None:
        """``acquire_nowait``'s round trip: the reserve's reply, or None if Redis is to count as down."""
        calls = self._backend.take_outbox()
        if not remote.inited:
            calls.append(_init_call(self._calls, remote))
        calls.append(self._reserve_call(remote, [w], queue=False))
        sent = time.monotonic()
        try:
            results = self._backend.run_sync(calls)
        except BaseException as exc:
            self._backend.put_back(calls[:-1])
            self._cancel(remote, calls[-1])
            if isinstance(exc, RedisDown):
                return None
            raise
        reply = self._answers.read(calls, results, sent)
        if reply is None:  # an error reply: the script may have granted before it failed
            self._cancel(remote, calls[-1])
        return reply

    def _enter_line(
        self, model: str, demand: Demand, priority: int, timeout: float | None
    ) -> tuple[_RemotePool, _RemoteWaiter, float, float] | Permit:
        """A permit at once from this process's prefetch, or a place in the local line."""
        limiter = self._limiter
        with limiter._lock:
            now = limiter._now()
            runtime, draws, credit = limiter._prepare(model, demand, now)
            remote = self._remote(runtime)
            if remote.prefetch is not None:
                permit = self._prefetches.admit(remote, model, draws, credit, now)
                if permit is not None:
                    return permit
            w = _RemoteWaiter(draws, priority, next(limiter._seq), now)
            runtime.queue.push(w)
            runtime.queued += 1
        deadline = math.inf if timeout is None else now + max(0.0, timeout)
        return remote, w, credit, deadline

    def _next_move(
        self, remote: _RemotePool, w: _RemoteWaiter, now: float, deadline: float, timeout: float | None
    ) -> _Move:
        """Under the lock: what ``w`` does next: (state, candidates to drive, or wait until)."""
        if w.state == _GRANTED or w.state == FALLBACK:
            return w.state, None, 0.0
        if w.state == _FAILED:
            assert w.error is not None
            raise w.error
        runtime = remote.runtime
        is_head = runtime.head() is w
        if is_head and not remote.driving and now >= remote.next_try and now >= remote.hold_until:
            remote.driving = True
            return _WAITING, self._candidates(runtime), 0.0
        if now >= deadline:
            self._abandon(remote, w)
            raise AcquireTimeout(runtime.pool.name, timeout if timeout is not None else 0.0)
        until = deadline
        if is_head and not remote.driving:
            until = min(until, max(remote.next_try, remote.hold_until))
        return _WAITING, None, until

    def _candidates(self, runtime: PoolRuntime) -> list[_RemoteWaiter]:
        """Under the lock: the waiters one reserve tries, in line order (at most the window)."""
        return runtime.queue.first(self._window)  # type: ignore[return-value]

    # ------------------------------------------------------------------ driving the line

    async def _drive_async(self, remote: _RemotePool, cands: list[_RemoteWaiter]) -> None:
        calls = self._drive_calls(remote, cands)
        sent = time.monotonic()
        try:
            # shielded: a reply that grants must be applied even if this task is being cancelled
            with anyio.CancelScope(shield=True):
                results = await self._backend.run_async(calls)
        except BaseException as exc:
            self._reserve_failed(remote, cands, calls, exc, sent)
            return
        self._apply_reserve(remote, cands, calls, results, sent)

    def _drive_sync(self, remote: _RemotePool, cands: list[_RemoteWaiter]) -> None:
        calls = self._drive_calls(remote, cands)
        sent = time.monotonic()
        try:
            results = self._backend.run_sync(calls)
        except BaseException as exc:
            self._reserve_failed(remote, cands, calls, exc, sent)
            return
        self._apply_reserve(remote, cands, calls, results, sent)

    def _reserve_failed(
        self,
        remote: _RemotePool,
        cands: list[_RemoteWaiter],
        calls: list[ScriptCall],
        exc: BaseException,
        sent: float,
    ) -> None:
        """A reserve round trip failed: Redis down is a policy matter, anything else propagates."""
        if isinstance(exc, RedisDown):
            self._apply_reserve(remote, cands, calls, None, sent)
            return
        with self._limiter._lock:
            remote.driving = False
        self._backend.put_back(calls[:-1])
        self._cancel(remote, calls[-1])
        raise exc

    def _drive_calls(self, remote: _RemotePool, cands: list[_RemoteWaiter]) -> list[ScriptCall]:
        calls = self._backend.take_outbox()
        if not remote.inited:
            calls.append(_init_call(self._calls, remote))
        prefetch = self._backend.prefetch if remote.prefetch is None else 0
        calls.append(self._reserve_call(remote, cands, prefetch=prefetch))
        return calls

    def _apply_reserve(
        self,
        remote: _RemotePool,
        cands: list[_RemoteWaiter],
        calls: list[ScriptCall],
        results: list[Result] | None,
        sent: float,
    ) -> None:
        """Apply a reserve's answer: grant, fail, or plan the next attempt; wake whoever must act.

        ``results`` None: the round trip failed, any call of it may have run or not. The
        changes go back to the outbox (their ids make a second run a no-op) and the
        reserve is cancelled. An error reply to the reserve counts as Redis unavailable.
        """
        reply = None
        if results is None:
            self._backend.put_back(calls[:-1])
            self._cancel(remote, calls[-1])
        else:
            reply = self._answers.read(calls, results, sent)
            if reply is None:  # an error reply: the script may have granted before it failed
                self._cancel(remote, calls[-1])
        with self._limiter._lock:
            remote.driving = False
            if reply is None:
                self._answers.went_down()
            else:
                self._answers.apply(remote, cands, reply)

    def _abandon(self, remote: _RemotePool, w: _RemoteWaiter) -> None:
        """Under the lock: a waiter leaves; what it held goes back, its place in line too."""
        runtime = remote.runtime
        if w.state == _WAITING:
            w.state = _GONE
            runtime.queued -= 1
            if runtime.head() is None and remote.ticket and not remote.driving:
                remote.ticket = False
                self._backend.send(self._reserve_call(remote, []))  # n = 0: leave the line
            head = runtime.head()
            if head is not None:
                head.wake()
        elif w.state == _GRANTED and w.permit is None:
            w.state = _GONE
            self._backend.send(self._calls.release(remote.keys, w.rseq, "unsent", w.draws))

    def _permit(
        self, remote: _RemotePool, w: _RemoteWaiter, model: str, credit: float, *, queued: bool = True
    ) -> Permit:
        limiter = self._limiter
        runtime = remote.runtime
        with limiter._lock:
            now = limiter._now()
            permit = Permit(limiter, runtime, model, w.draws, credit, w.rseq, now)
            w.permit = permit
            self._prefetches.track(runtime, permit, now)
            runtime.granted += 1
            runtime.waits.add(now - w.enqueued_at)
            runtime.admitted.add(now, w.draws)
            if credit and limiter._account.wallet is not None:
                limiter._account.wallet.charge(credit, now)
            limiter._emit("grant", runtime, now, {"waited": now - w.enqueued_at})  # long: at INFO
        return permit

    def _wake_head(self, runtime: PoolRuntime) -> None:
        """Under the lock: capacity came back locally; the head may try again at once."""
        remote = self._pools.get(runtime.pool.name)
        if remote is not None and runtime.queued:
            remote.next_try = -math.inf
            head = runtime.head()
            if head is not None:
                head.wake()

    def close_prefetches(self) -> None:
        """Close every prefetch (what they hold goes back as their requests finish).

        ``RedisBackend.close`` calls this before its last flush.
        """
        with self._limiter._lock:
            self._prefetches.close_all(self._pools)

    # ------------------------------------------------------------------ the Engine protocol's rest

    def admit_plain(self, model: str, plain: Plain) -> Permit | None:
        """No fast path: every admission is a round trip to Redis (``acquire`` and the rest)."""
        return None

    def admit_at_once(
        self, model: str, demand: Demand, priority: int, timeout: float | None
    ) -> Permit | None:
        """No fast path (see ``admit_plain``)."""
        return None

    def wake(self, runtime: PoolRuntime, now: float) -> None:
        """Under the lock: re-plan the pool's line (the next round trip carries it)."""
        self._wake_head(runtime)

    # ------------------------------------------------------------------ feedback

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
        return self._feedback.observe(headers, status=status, body=body, permit=permit, runtime=runtime)

    # ------------------------------------------------------------------ by hand

    def set_limits(self, runtime: PoolRuntime, limits: Mapping[str, float]) -> None:
        """Under the lock: ``Limiter.set_limits`` in remote mode (shared by every process)."""
        remote = self._remote(runtime)
        args: list[str] = []
        for dim, value in limits.items():
            args += [dim, repr(float(value))]
        self._backend.send(self._calls.control(remote.keys.control, "limits", *args))
        self._wake_head(runtime)

    def give_back(self, runtime: PoolRuntime, amounts: Mapping[str, float]) -> None:
        """Under the lock: return amounts to a shared pool (``batch_finished``)."""
        remote = self._remote(runtime)
        self._backend.send(self._calls.control(remote.keys.control, "giveback", encode_draws(amounts)))
        self._wake_head(runtime)


def _init_call(calls: ScriptCalls, remote: _RemotePool) -> ScriptCall:
    """``init.lua`` for ``remote``'s pool; once it has answered, the pool is known to exist."""

    def done(reply: RawReply) -> None:
        remote.inited = True

    return calls.init(remote.keys, remote.runtime.pool, done)
