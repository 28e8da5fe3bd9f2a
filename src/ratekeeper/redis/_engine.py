"""The limiter's remote mode: admission, settlement and feedback through a shared backend.

A ``Limiter`` built with ``backend=RedisBackend(...)`` hands its permit
operations to a ``RemoteEngine``. Per pool, a process keeps a local line of
waiters (the limiter's own queue structure, priority then FIFO); only the
waiter at its head talks to Redis, and one round trip (``reserve.lua``) tries
a batch of the line in order, so a burst of local requests costs one call.
The answer says how long until the next one fits; the head sleeps that long
(at most ``poll_interval``) and asks again.

Prefetch: when a reserve finds the pool with plenty to spare and nobody else
in line, it also reserves ``prefetch`` more requests like the last one, under
one seq; the process admits its next requests from that without a round trip
(for at most ``prefetch_ttl`` seconds, while none of its own waits) and
returns what it did not use with one settle once they are all done.

Synchronous permit methods (``settle``, ``release``, ``observe``,
``record_output``) change local bookkeeping at once and queue their Redis
change in the backend's outbox; it rides along with the next reserve or a
flusher thread sends it a few milliseconds later.

When Redis cannot be reached, ``on_unavailable="fail"`` raises
``BackendUnavailable``; ``"local"`` admits through a private in-process
``Limiter`` holding ``fallback_fraction`` of every limit, until Redis answers again.
"""

from __future__ import annotations

import datetime as _dt
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, final

import anyio

from ratekeeper.core._accounting import Cost, Demand, Usage
from ratekeeper.core._bucket import TokenBucket
from ratekeeper.core._headers import RateLimitSnapshot, parse_headers
from ratekeeper.core._pool import Pool
from ratekeeper.core._reading import (
    ROUNDING_MARGIN,
    burst_bound,
    error_fields,
    explained_by_remaining,
    fitted_burst,
    unified_wait,
)
from ratekeeper.errors import AcquireTimeout, CapacityExceeded, SpendLimitReached, WouldBlock
from ratekeeper.gate._demand import Plain, _diff, _draws
from ratekeeper.gate._limiter import Limiter
from ratekeeper.gate._resync import _RESYNC_DIMS
from ratekeeper.gate._state import Permit, PermitState, WaiterState, bind_async
from ratekeeper.gate._state import PoolRuntime as _PoolRuntime
from ratekeeper.gate._state import Waiter as _Waiter
from ratekeeper.redis._backend import Down, Op, Refused, Reply, Result

if TYPE_CHECKING:
    from ratekeeper.redis._backend import RedisBackend

__all__ = ["RemoteEngine"]

#: A waiter moved to the local fallback limiter (Redis went away while it waited).
_FALLBACK: Final = WaiterState.FALLBACK
_ACTIVE, _SETTLED, _RELEASED = PermitState.ACTIVE, PermitState.SETTLED, PermitState.RELEASED
_WAITING, _GRANTED, _FAILED, _GONE = (
    WaiterState.WAITING,
    WaiterState.GRANTED,
    WaiterState.FAILED,
    WaiterState.GONE,
)
#: Pools that no subscription hold covers (the local limiter exempts them too).
_SPECIAL: Final = ("count_tokens", "batches")
#: Added to every computed wait, so the retry lands just after the refill, not just before.
_SLACK: Final = 0.0005
#: A prefetch holds at most this fraction of any bucket it draws on...
PREFETCH_SHARE: Final = 0.05
#: ...and is taken only while it leaves every such bucket at least this fraction full:
#: when capacity is short, every request goes through the shared line.
PREFETCH_FLOOR: Final = 0.5


def _encode(draws: Mapping[str, float]) -> str:
    return ",".join(f"{dim}={amount!r}" for dim, amount in draws.items() if amount)


def _scopes(pool: str) -> str:
    if pool in _SPECIAL:
        return ""
    for family in ("opus", "sonnet", "haiku"):
        if pool.startswith(family):
            return f"all,{family}"
    return "all"


class _RWaiter(_Waiter):
    """A local waiter of a remote pool: its monotonic arrival and, once granted, its Redis seq."""

    __slots__ = ("mono", "rseq")

    def __init__(self, draws: dict[str, float], priority: int, seq: int, now: float) -> None:
        super().__init__(draws, priority, seq, now)
        self.mono = time.monotonic()
        self.rseq = -1


@final
class _RPool:
    """A remote pool's local side: keys, the driving flag, the next attempt, a local hold."""

    __slots__ = (
        "driving",
        "hold_until",
        "inited",
        "keys",
        "next_try",
        "on_burst",
        "prefetch",
        "rt",
        "scopes",
        "settle_keys",
        "ticket",
    )

    def __init__(self, rt: _PoolRuntime, keys: tuple[str, ...], on_burst: Callable[[Reply], None]) -> None:
        self.rt = rt
        self.keys = keys
        # org, pool, res, lease, notes, uncounted log: what settle, release and resync touch
        self.settle_keys = (*keys[:4], keys[6], keys[7])
        self.on_burst = on_burst  # a reply carrying the shared burst updates the local mirror
        self.scopes = _scopes(rt.pool.name)
        self.driving = False
        self.next_try = -math.inf
        self.hold_until = -math.inf  # a pause this process saw, until Redis has it too
        self.inited = False
        self.ticket = False
        self.prefetch: _Prefetch | None = None  # the one requests are admitted from now


@final
class _Prefetch:
    """Capacity one reserve took ahead for this process's next requests (Redis seq ``seq``).

    ``left`` is what is not handed out (refunds of its requests come back to it);
    ``open`` until it expires, runs short or must make way; once closed and its last
    request is done, ``left`` goes back to Redis in one settle (``returned``).
    ``fresh`` is the part of ``left`` the server has never counted (never handed out,
    or given back by a request that never reached it; not settlement refunds, which
    the server makes too): resync allows for it. ``given`` is what of it went back.
    """

    __slots__ = ("fresh", "given", "holders", "left", "open", "returned", "seq", "until")

    def __init__(self, seq: int, left: dict[str, float], until: float) -> None:
        self.seq = seq
        self.left = left
        self.fresh = dict(left)
        self.given: dict[str, float] = {}
        self.until = until
        self.holders = 0
        self.open = True
        self.returned = False


@final
class RemoteEngine:
    """The strategy a ``Limiter`` delegates to when it has a backend."""

    def __init__(self, limiter: Limiter, backend: RedisBackend) -> None:
        self._limiter = limiter
        self._backend = backend
        self._pools: dict[str, _RPool] = {}
        self._window = max(1, limiter._window)
        self._offset: float | None = None  # Redis time minus time.monotonic()
        self._best_rtt = math.inf
        self._fallback: Limiter | None = None
        self._heartbeat = backend.ticket_ttl / 3.0
        self._recovery = repr(limiter._burst_recovery) if limiter._adaptive else ""
        self._key_ttl_ms = int(backend.key_ttl * 1000)
        # how long Redis keeps an op's id: as long as anything may still send it again
        self._op_ttl_ms = math.ceil(backend.lease * 1000)
        # permits admitted from a prefetch (by their local seq, negative), until they are
        # done: the prefetch, and what of it the server had never counted right after
        self._prefetched: dict[int, tuple[_Prefetch, dict[str, float]]] = {}
        backend.on_close(self.close_prefetches)

    @property
    def backend(self) -> RedisBackend:
        """The backend this engine talks to."""
        return self._backend

    # ------------------------------------------------------------------ pools

    def _rpool(self, rt: _PoolRuntime) -> _RPool:
        rp = self._pools.get(rt.pool.name)
        if rp is None:
            name = rt.pool.name
            rp = self._pools[name] = _RPool(rt, self._backend.pool_keys(name), self._on_burst(rt))
        return rp

    def _init_op(self, rp: _RPool) -> Op:
        pool = rp.rt.pool
        args: list[str | float] = [repr(pool.burst), int(self._backend.key_ttl * 1000)]
        for dim, bucket in pool.buckets.items():
            args += [
                dim,
                repr(pool.limits[dim]),
                repr(bucket.capacity),
                repr(bucket.rate),
                repr(bucket.debt_limit),
            ]

        def done(reply: Reply) -> None:
            rp.inited = True

        return Op("init", rp.keys[1:2], args, done)

    def _arrival(self, w: _RWaiter) -> str:
        offset = self._offset
        return "" if offset is None else repr(w.mono + offset)

    def _reserve_op(self, rp: _RPool, cands: list[_RWaiter], queue: bool = True, prefetch: int = 0) -> Op:
        b = self._backend
        args: list[str | int] = [
            b.participant,
            repr(b.lease),
            repr(b.ticket_ttl),
            int(b.key_ttl * 1000),
            rp.scopes,
            "1" if queue else "0",
            len(cands),
        ]
        for w in cands:
            args += [self._arrival(w), _encode(w.draws)]
        args += [prefetch, repr(PREFETCH_SHARE), repr(PREFETCH_FLOOR)]
        # an id when it can grant: a reserve whose reply never came is cancelled by it
        return Op("reserve", rp.keys[:7], args, ident=b.new_ident() if cands else None)

    def _cancel(self, rp: _RPool, reserve: Op) -> None:
        """A reserve's reply never came: whatever it granted goes back once Redis answers.

        ``release.lua`` in 'cancel' mode reads what the reserve with this id granted (the
        reservations, unsent: all of it returns) and marks the id used, so the reserve,
        should it reach Redis only now, grants nothing.
        """
        if reserve.ident is None:
            return
        args: list[str | int] = ["", "cancel", "", self._key_ttl_ms, self._op_ttl_ms]
        self._backend.send(Op("release", rp.settle_keys, args, ident=reserve.ident))

    def _learn_time(self, redis_now: str, sent: float) -> None:
        # NTP's rule: trust the fastest round trips, whose midpoint is closest to when
        # Redis read its clock (a first call that also connects would skew it by ms).
        # The bar rises slowly so the estimate keeps following the two clocks' drift.
        received = time.monotonic()
        rtt = received - sent
        self._best_rtt *= 1.01
        if rtt <= self._best_rtt:
            self._best_rtt = rtt
            self._offset = float(redis_now) - (sent + received) / 2.0

    # ------------------------------------------------------------------ acquire (async)

    async def acquire(self, model: str, demand: Demand, priority: int, timeout: float | None) -> Permit:
        """``Limiter._acquire`` in remote mode."""
        limiter = self._limiter
        if not self._backend.available():
            return await self._unavailable_async(model, demand, priority, timeout)
        joined = self._join(model, demand, priority, timeout)
        if isinstance(joined, Permit):
            return joined
        rp, w, credit, deadline = joined
        try:
            while True:
                with limiter._lock:
                    now = limiter._now()
                    state, cands, until = self._step(rp, w, now, deadline, timeout)
                    if state == _WAITING and cands is None:
                        # bound to its event loop only when it waits: an admitted head never does
                        if w.threadsafe is None:
                            bind_async(w)
                        event = anyio.Event()
                        w.event = event
                if state == _GRANTED:
                    return self._permit(rp, w, model, credit)
                if state == _FALLBACK:
                    left = None if deadline == math.inf else max(0.0, deadline - limiter._now())
                    return await self._unavailable_async(model, demand, priority, left)
                if cands is not None:
                    await self._drive_async(rp, cands)
                    continue
                if until == math.inf:
                    await event.wait()
                else:
                    with anyio.move_on_after(max(0.0, until - now)):
                        await event.wait()
        except BaseException:
            with limiter._lock:
                self._abandon(rp, w)
            raise

    def acquire_thread(self, model: str, demand: Demand, priority: int, timeout: float | None) -> Permit:
        """``Limiter._acquire_thread`` in remote mode: the same line, waited on in a thread."""
        limiter = self._limiter
        if not self._backend.available():
            return self._unavailable_thread(model, demand, priority, timeout)
        joined = self._join(model, demand, priority, timeout)
        if isinstance(joined, Permit):
            return joined
        rp, w, credit, deadline = joined
        w.sync_event = event = threading.Event()
        try:
            while True:
                with limiter._lock:
                    now = limiter._now()
                    state, cands, until = self._step(rp, w, now, deadline, timeout)
                    event.clear()
                if state == _GRANTED:
                    return self._permit(rp, w, model, credit)
                if state == _FALLBACK:
                    left = None if deadline == math.inf else max(0.0, deadline - limiter._now())
                    return self._unavailable_thread(model, demand, priority, left)
                if cands is not None:
                    self._drive_sync(rp, cands)
                    continue
                event.wait(None if until == math.inf else max(0.0, until - now))
        except BaseException:
            with limiter._lock:
                self._abandon(rp, w)
            raise

    def acquire_nowait(self, model: str, demand: Demand) -> Permit:
        """``Limiter.acquire_nowait`` in remote mode: one round trip, no place in line kept."""
        limiter = self._limiter
        if not self._backend.available():
            fallback = self._fallback_for(model)
            if fallback is None:
                raise self._backend.unavailable_error()
            return fallback._engine.acquire_nowait(model, demand)
        with limiter._lock:
            now = limiter._now()
            rt, draws, credit = limiter._prepare(model, demand, now)
            rp = self._rpool(rt)
            if rp.prefetch is not None:
                permit = self._from_prefetch(rp, model, draws, credit, now)
                if permit is not None:
                    return permit
            if rt.queued or rp.hold_until > now:
                reason = rt.pool.pause_reason if rp.hold_until > now else "others are waiting"
                raise WouldBlock(rt.pool.name, max(0.0, rp.next_try - now, rp.hold_until - now), reason)
            w = _RWaiter(draws, 0, next(limiter._seq), now)
        ops = self._backend.take_outbox()
        if not rp.inited:
            ops.append(self._init_op(rp))
        ops.append(self._reserve_op(rp, [w], queue=False))
        sent = time.monotonic()
        try:
            replies = self._backend.run_sync(ops)
        except Down:
            self._backend.put_back(ops[:-1])
            self._cancel(rp, ops[-1])
            replies = None
        except BaseException:
            self._backend.put_back(ops[:-1])
            self._cancel(rp, ops[-1])
            raise
        if replies is not None:
            self._backend.deliver(ops[:-1], replies[:-1])
            reply = replies[-1]
            refused = _refused(ops, replies)
            if refused is not None:
                self._backend.mark_down(refused.error)  # an error reply: as if Redis did not answer
                replies = None
        if replies is None:
            fallback = self._fallback_for(model)
            if fallback is None:
                raise self._backend.unavailable_error() from None
            return fallback._engine.acquire_nowait(model, demand)
        assert not isinstance(reply, Refused)
        self._learn_time(reply[1], sent)
        status, wait, why, seqs = reply[0], float(reply[2]), reply[3], reply[5:]
        if status == "NOPOOL":
            rp.inited = False
            return self.acquire_nowait(model, demand)
        self._raise_for(rt, status, why, reply)
        if not seqs:
            raise WouldBlock(rt.pool.name, wait, why)
        w.rseq = int(seqs[0])
        w.state = _GRANTED
        return self._permit(rp, w, model, credit, queued=False)

    def _join(
        self, model: str, demand: Demand, priority: int, timeout: float | None
    ) -> tuple[_RPool, _RWaiter, float, float] | Permit:
        """A permit at once from this process's prefetch, or a place in the local line."""
        limiter = self._limiter
        with limiter._lock:
            now = limiter._now()
            rt, draws, credit = limiter._prepare(model, demand, now)
            rp = self._rpool(rt)
            if rp.prefetch is not None:
                permit = self._from_prefetch(rp, model, draws, credit, now)
                if permit is not None:
                    return permit
            w = _RWaiter(draws, priority, next(limiter._seq), now)
            dq = rt.queue.get(priority)
            if dq is None:
                dq = rt.queue[priority] = deque()
            dq.append(w)
            rt.queued += 1
        deadline = math.inf if timeout is None else now + max(0.0, timeout)
        return rp, w, credit, deadline

    def _step(
        self, rp: _RPool, w: _RWaiter, now: float, deadline: float, timeout: float | None
    ) -> tuple[WaiterState, list[_RWaiter] | None, float]:
        """Under the lock: what ``w`` does next: (state, candidates to drive, or wait until)."""
        if w.state == _GRANTED or w.state == _FALLBACK:
            return w.state, None, 0.0
        if w.state == _FAILED:
            assert w.error is not None
            raise w.error
        rt = rp.rt
        is_head = rt.head() is w
        if is_head and not rp.driving and now >= rp.next_try and now >= rp.hold_until:
            rp.driving = True
            cands: list[_RWaiter] = []
            for dq in rt.ordered():
                for other in dq:
                    if other.state == _WAITING:
                        cands.append(other)  # type: ignore[arg-type]
                        if len(cands) >= self._window:
                            break
                if len(cands) >= self._window:
                    break
            return _WAITING, cands, 0.0
        if now >= deadline:
            self._abandon(rp, w)
            raise AcquireTimeout(rt.pool.name, timeout if timeout is not None else 0.0)
        until = deadline
        if is_head and not rp.driving:
            until = min(until, max(rp.next_try, rp.hold_until))
        return _WAITING, None, until

    async def _drive_async(self, rp: _RPool, cands: list[_RWaiter]) -> None:
        ops = self._drive_ops(rp, cands)
        sent = time.monotonic()
        try:
            # shielded: a reply that grants must be applied even if this task is being cancelled
            with anyio.CancelScope(shield=True):
                replies = await self._backend.run_async(ops)
        except BaseException as exc:
            self._failed(rp, cands, ops, exc, sent)
            return
        self._driven(rp, cands, ops, replies, sent)

    def _drive_sync(self, rp: _RPool, cands: list[_RWaiter]) -> None:
        ops = self._drive_ops(rp, cands)
        sent = time.monotonic()
        try:
            replies = self._backend.run_sync(ops)
        except BaseException as exc:
            self._failed(rp, cands, ops, exc, sent)
            return
        self._driven(rp, cands, ops, replies, sent)

    def _failed(
        self, rp: _RPool, cands: list[_RWaiter], ops: list[Op], exc: BaseException, sent: float
    ) -> None:
        """A reserve round trip failed: Redis down is a policy matter, anything else propagates."""
        if isinstance(exc, Down):
            self._driven(rp, cands, ops, None, sent)
            return
        with self._limiter._lock:
            rp.driving = False
        self._backend.put_back(ops[:-1])
        self._cancel(rp, ops[-1])
        raise exc

    def _drive_ops(self, rp: _RPool, cands: list[_RWaiter]) -> list[Op]:
        ops = self._backend.take_outbox()
        if not rp.inited:
            ops.append(self._init_op(rp))
        prefetch = self._backend.prefetch if rp.prefetch is None else 0
        ops.append(self._reserve_op(rp, cands, prefetch=prefetch))
        return ops

    def _driven(
        self, rp: _RPool, cands: list[_RWaiter], ops: list[Op], replies: list[Result] | None, sent: float
    ) -> None:
        """Apply a reserve's answer: grant, fail, or plan the next attempt; wake whoever must act.

        ``replies`` None: the round trip failed, any op of it may have run or not. The
        changes go back to the outbox (their ids make a second run a no-op) and the
        reserve is cancelled. An error reply to the reserve counts as Redis unavailable.
        """
        limiter = self._limiter
        if replies is None:
            self._backend.put_back(ops[:-1])
            self._cancel(rp, ops[-1])
            with limiter._lock:
                rp.driving = False
                self._went_down()
            return
        self._backend.deliver(ops[:-1], replies[:-1])
        reply = replies[-1]
        refused = _refused(ops, replies)
        if refused is not None:
            self._backend.mark_down(refused.error)
            with limiter._lock:
                rp.driving = False
                self._went_down()
            return
        assert not isinstance(reply, Refused)
        self._learn_time(reply[1], sent)
        status, wait, why, seqs = reply[0], float(reply[2]), reply[3], reply[5:]
        rt = rp.rt
        with limiter._lock:
            now = limiter._now()
            rp.driving = False
            if len(reply) > 4 and reply[4]:
                self._prefetch_granted(rp, reply[4], now)
            for w, seq in zip(cands, seqs, strict=False):
                w.rseq = int(seq)
                if w.state == _WAITING:
                    w.state = _GRANTED
                    rt.queued -= 1
                    w.wake()
                else:  # left while the call was out: it never sent anything
                    self._backend.send(self._release_op(rp, w.rseq, "unsent", w.draws))
            rp.ticket = len(seqs) < len(cands)
            if status == "NOPOOL":
                rp.inited = False
                rp.next_try = -math.inf
            elif status == "OK":
                if len(seqs) < len(cands):
                    pause = min(wait, self._backend.poll_interval, self._heartbeat)
                    rp.next_try = now + pause + _SLACK
                else:
                    rp.next_try = -math.inf
            else:
                rp.next_try = -math.inf
                try:
                    self._raise_for(rt, status, why, reply)
                except SpendLimitReached as exc:
                    self._fail_all(exc.resets_at)
                except CapacityExceeded as exc:
                    w = cands[len(seqs)]
                    if w.state == _WAITING:
                        w.state = _FAILED
                        w.error = exc
                        rt.queued -= 1
                        w.wake()
            head = rt.head()
            if head is not None:
                head.wake()

    def _raise_for(self, rt: _PoolRuntime, status: str, why: str, reply: Reply) -> None:
        if status == "SPEND":
            resets = _dt.datetime.fromisoformat(why) if why else _dt.datetime.now(_dt.UTC)
            with self._limiter._lock:
                if self._limiter._spend_until is None:
                    self._limiter._spend_until = self._limiter._now() + float(reply[2])
                    self._limiter._spend_resets_at = resets
            raise SpendLimitReached(resets)
        if status == "TOOBIG":
            dim, amount, limit = why.split()
            raise CapacityExceeded(rt.pool.name, dim, float(amount), float(limit))

    def _fail_all(self, resets_at: _dt.datetime) -> None:
        self._limiter._fail_all(lambda: SpendLimitReached(resets_at))

    def _went_down(self) -> None:
        """Under the lock: Redis failed; every waiter fails or moves to the fallback."""
        fallback = self._backend.on_unavailable == "local"
        for rp in self._pools.values():
            rt = rp.rt
            for dq in rt.queue.values():
                for w in dq:
                    if w.state == _WAITING:
                        if fallback:
                            w.state = _FALLBACK
                        else:
                            w.state = _FAILED
                            w.error = self._backend.unavailable_error()
                        rt.queued -= 1
                        w.wake()
                dq.clear()
            rp.next_try = -math.inf
            rp.inited = False  # Redis may come back empty

    def _abandon(self, rp: _RPool, w: _RWaiter) -> None:
        """Under the lock: a waiter leaves; what it held goes back, its place in line too."""
        rt = rp.rt
        if w.state == _WAITING:
            w.state = _GONE
            rt.queued -= 1
            if rt.head() is None and rp.ticket and not rp.driving:
                rp.ticket = False
                self._backend.send(self._reserve_op(rp, []))  # n = 0: leave the line
            head = rt.head()
            if head is not None:
                head.wake()
        elif w.state == _GRANTED and w.permit is None:
            w.state = _GONE
            self._backend.send(self._release_op(rp, w.rseq, "unsent", w.draws))

    def _permit(self, rp: _RPool, w: _RWaiter, model: str, credit: float, *, queued: bool = True) -> Permit:
        limiter = self._limiter
        rt = rp.rt
        with limiter._lock:
            now = limiter._now()
            permit = Permit(limiter, rt, model, w.draws, credit, w.rseq, now)
            w.permit = permit
            rt.in_flight[w.rseq] = permit
            rt.granted += 1
            rt.waits.add(now - w.enqueued_at)
            rt.admitted.add(now, w.draws)
            if credit and limiter._wallet is not None:
                limiter._wallet.charge(credit, now)
            limiter._emit("grant", rt, now, {"waited": now - w.enqueued_at})  # a long wait is said at INFO
        return permit

    # ------------------------------------------------------------------ prefetch

    def _from_prefetch(
        self, rp: _RPool, model: str, draws: dict[str, float], credit: float, now: float
    ) -> Permit | None:
        """Under the lock: admit from the open prefetch, or close it and say None.

        It closes when it expired, when this process has waiters (they go through
        Redis in order, and what it holds should be there for them), during a hold,
        and when this request does not fit in what is left.
        """
        c = rp.prefetch
        assert c is not None
        rt = rp.rt
        if credit or now >= c.until or rt.queued or now < rp.hold_until:
            if not credit:
                self._close_prefetch(rp, c)
            return None
        left = c.left
        limits = rt.pool.limits
        for dim, amount in draws.items():
            if amount > 0.0:
                have = left.get(dim)
                if (have is None and dim in limits) or (have is not None and have < amount):
                    self._close_prefetch(rp, c)
                    return None
        fresh = c.fresh
        for dim, amount in draws.items():
            if dim in left:
                left[dim] -= amount
                fresh[dim] -= min(fresh[dim], amount)
        limiter = self._limiter
        # local, negative, decreasing: Redis knows only the prefetch's seq
        seq = -1 - next(limiter._seq)
        permit = Permit(limiter, rt, model, draws, 0.0, seq, now)
        c.holders += 1
        self._prefetched[seq] = (c, dict(fresh))
        rt.in_flight[seq] = permit
        rt.granted += 1
        rt.waits.add(0.0)
        rt.admitted.add(now, draws)
        if limiter._on_event is not None:
            limiter._emit("grant", rt, now, {"waited": 0.0, "prefetched": True})
        return permit

    def _prefetch_granted(self, rp: _RPool, text: str, now: float) -> None:
        """Under the lock: a reserve's reply carried a prefetch ("seq;dim=amount,...")."""
        seq, _, encoded = text.partition(";")
        left: dict[str, float] = {}
        for part in encoded.split(","):
            dim, _, amount = part.partition("=")
            if dim:
                left[dim] = float(amount)
        if rp.prefetch is not None:
            self._close_prefetch(rp, rp.prefetch)
        ttl = self._backend.prefetch_ttl
        c = rp.prefetch = _Prefetch(int(seq), left, now + ttl)

        def expire() -> None:
            with self._limiter._lock:
                if c.open:
                    self._close_prefetch(rp, c)

        self._backend.call_later(ttl, expire)

    def _close_prefetch(self, rp: _RPool, c: _Prefetch) -> None:
        """Under the lock: admit nothing more from ``c`` and give back what it has not handed out."""
        c.open = False
        if rp.prefetch is c:
            rp.prefetch = None
        # the requests still out keep their part of the reservation; the rest goes back now
        unused = {dim: amount for dim, amount in c.left.items() if amount}
        uncounted: dict[str, float] = {}
        for dim in unused:
            c.left[dim] = 0.0
            given = min(unused[dim], c.fresh[dim])
            if given > 0.0:
                uncounted[dim] = given
                c.fresh[dim] -= given
                c.given[dim] = c.given.get(dim, 0.0) + given
        self._prefetch_op(rp, c, unused, uncounted)

    def _prefetch_op(
        self,
        rp: _RPool,
        c: _Prefetch,
        diff: Mapping[str, float],
        uncounted: Mapping[str, float] | None = None,
    ) -> None:
        """Under the lock: apply a closed prefetch's ``diff`` in Redis (its record with it).

        ``settle.lua`` in 'progress' mode changes the reservation's record and the
        pool; the last one, when no request of it is out, also removes the record.
        ``uncounted``: the refunds in ``diff`` the server never counted.
        """
        if c.returned:
            return
        last = c.holders == 0
        if not diff and not last:
            return
        if last:
            c.returned = True
        mode = "settle" if last else "progress"
        args: list[str | int] = [
            c.seq,
            mode,
            _encode(diff),
            self._recovery if last else "",
            _encode(uncounted or {}),
            self._key_ttl_ms,
            self._op_ttl_ms,
        ]
        on_reply = rp.on_burst if last else None
        self._backend.send(Op("settle", rp.settle_keys, args, on_reply, self._backend.new_ident()))
        if any(amount > 0.0 for amount in diff.values()):
            self._poke(rp.rt)

    def _to_prefetch(
        self, rp: _RPool, c: _Prefetch, amounts: Mapping[str, float], done: bool, uncounted: bool = False
    ) -> None:
        """Under the lock: a prefetched request's refund (> 0) or extra charge (< 0).

        While ``c`` is open it goes to what ``c`` can still hand out; once closed, to
        Redis. ``uncounted``: the request never reached the server, or it refused it.
        """
        if done:
            c.holders -= 1
        # (a dimension the prefetch lacks, the pool lacks: Redis would ignore it too)
        diff = {dim: amount for dim, amount in amounts.items() if amount and dim in c.left}
        if not c.open:
            self._prefetch_op(rp, c, diff, diff if uncounted else None)
            return
        left = c.left
        for dim, amount in diff.items():
            left[dim] += amount
            if uncounted and amount > 0.0:
                c.fresh[dim] += amount
        if any(v < 0.0 for v in left.values()):
            self._close_prefetch(rp, c)  # it owes Redis more than it holds: settle up

    def _redis_seq(self, permit: Permit) -> int:
        """The Redis reservation a permit's request belongs to (-1: not known any more)."""
        entry = self._prefetched.get(permit.seq)
        if entry is not None:
            return entry[0].seq
        return permit.seq

    def _order(self, permit: Permit) -> tuple[int, int]:
        """Admission order across the Redis seqs and the requests of each prefetch."""
        entry = self._prefetched.get(permit.seq)
        if entry is not None:
            return entry[0].seq, -permit.seq  # (local seqs decrease)
        return permit.seq, 0

    def close_prefetches(self) -> None:
        """Close every prefetch (what they hold goes back as their requests finish).

        ``RedisBackend.close`` calls this before its last flush.
        """
        with self._limiter._lock:
            for rp in self._pools.values():
                if rp.prefetch is not None:
                    self._close_prefetch(rp, rp.prefetch)

    # ------------------------------------------------------------------ unavailable

    def _fallback_for(self, model: str) -> Limiter | None:
        """The local fallback limiter with ``model``'s pool at a fraction of the limits (or None)."""
        backend = self._backend
        if backend.on_unavailable != "local":
            return None
        limiter = self._limiter
        with limiter._lock:
            now = limiter._now()
            if self._fallback is None:
                self._fallback = Limiter(
                    limiter._preset,
                    rules=limiter._rules,
                    burst=limiter._burst,
                    adaptive_burst=limiter._adaptive,
                    learn_limits=False,  # the headers carry the whole organization's limits
                    backfill_window=limiter._window,
                    clock=limiter._clock,
                    on_event=limiter._on_event,
                )
            fallback = self._fallback
            if model in limiter._pools or model in _SPECIAL:
                rt = limiter._pools[model]
            else:
                rt = limiter._runtime_for(model, now)
        with fallback._lock:
            if rt.pool.name not in fallback._pools:
                fallback._pools[rt.pool.name] = _scaled(rt, backend.fallback_fraction, now)
            if model not in _SPECIAL:
                fallback._model_pool[model] = rt.pool.name
        return fallback

    async def _unavailable_async(
        self, model: str, demand: Demand, priority: int, timeout: float | None
    ) -> Permit:
        fallback = self._fallback_for(model)
        if fallback is None:
            raise self._backend.unavailable_error()
        return await fallback._engine.acquire(model, demand, priority, timeout)

    def _unavailable_thread(self, model: str, demand: Demand, priority: int, timeout: float | None) -> Permit:
        fallback = self._fallback_for(model)
        if fallback is None:
            raise self._backend.unavailable_error()
        return fallback._engine.acquire_thread(model, demand, priority, timeout)

    # ------------------------------------------------------------------ settlement

    def _release_op(self, rp: _RPool, seq: int, mode: str, charged: Mapping[str, float]) -> Op:
        args: list[str | int] = [seq, mode, _encode(charged), self._key_ttl_ms, self._op_ttl_ms]
        return Op("release", rp.settle_keys, args, ident=self._backend.new_ident())

    def _settle_op(
        self, rp: _RPool, seq: int, mode: str, diff: Mapping[str, float], recovery: str, on_reply: bool
    ) -> Op:
        args: list[str | int] = [seq, mode, _encode(diff), recovery, "", self._key_ttl_ms, self._op_ttl_ms]
        callback = rp.on_burst if on_reply else None
        return Op("settle", rp.settle_keys, args, callback, self._backend.new_ident())

    def _poke(self, rt: _PoolRuntime) -> None:
        """Under the lock: capacity came back locally; the head may try again at once."""
        rp = self._pools.get(rt.pool.name)
        if rp is not None and rt.queued:
            rp.next_try = -math.inf
            head = rt.head()
            if head is not None:
                head.wake()

    # ------------------------------------------------------------------ the Engine protocol's rest

    def admit_plain(self, model: str, plain: Plain) -> Permit | None:
        """No fast path: every admission is a round trip to Redis (``acquire`` and the rest)."""
        return None

    def admit_at_once(
        self, model: str, demand: Demand, priority: int, timeout: float | None
    ) -> Permit | None:
        """No fast path (see ``admit_plain``)."""
        return None

    def settle_plain(
        self, permit: Permit, uncached: int, output: int, read: int, write: int, *, wake: bool = True
    ) -> Cost:
        """``settle`` from the four counts."""
        usage = Usage(
            input_tokens=uncached,
            output_tokens=output,
            cache_read_input_tokens=read,
            cache_creation_input_tokens=write,
        )
        return self.settle(permit, usage, None, wake=wake)

    def settle_observing(self, permit: Permit, usage: object, credits: float | None, headers: object) -> Cost:
        """The report first, then the settlement: the Redis scripts read a report before it."""
        permit.observe(headers)
        return permit._settle(usage, credits, wake=True)

    def wake(self, rt: _PoolRuntime, now: float) -> None:
        """Under the lock: re-plan the pool's line (the next round trip carries it)."""
        self._poke(rt)

    def settle(self, permit: Permit, usage: Usage, credits: float | None, *, wake: bool = True) -> Cost:
        """``Limiter._settle`` in remote mode: the difference goes to Redis with the next round trip."""
        limiter = self._limiter
        with limiter._lock:
            now = limiter._now()
            rt = permit._runtime
            rp = self._rpool(rt)
            priority = permit.reserved.get("priority_input_tokens", 0.0) > 0.0
            actual = rt.rules.settled_cost(usage, priority=priority, credits=credits)
            new = _draws(actual)
            diff = _diff(permit._charged, new)
            if diff:
                rt.admitted.add(now, diff, -1.0)
            wallet = limiter._wallet
            if wallet is not None and permit.credits and credits is not None:
                if permit.credits >= credits:
                    wallet.give_back(permit.credits - credits, now)
                else:
                    wallet.charge(credits - permit.credits, now)
            permit._charged = new
            permit._state = _SETTLED
            rt.in_flight.pop(permit.seq, None)
            entry = self._prefetched.pop(permit.seq, None)
            if entry is not None:
                self._to_prefetch(rp, entry[0], diff, done=True)
            else:
                self._backend.send(self._settle_op(rp, permit.seq, "settle", diff, self._recovery, True))
            self._poke(rt)
        return actual

    def progress(self, permit: Permit, output: float) -> None:
        """``Limiter._progress`` in remote mode: output beyond the reservation is charged in Redis."""
        limiter = self._limiter
        with limiter._lock:
            if permit._state != _ACTIVE:
                return
            extra = output - permit._charged.get("output_tokens", 0.0)
            if extra <= 0.0:
                return
            rt = permit._runtime
            more = {"output_tokens": extra, "tokens": extra}
            if "priority_output_tokens" in permit._charged:
                more["priority_output_tokens"] = extra
            rt.admitted.add(limiter._now(), more)
            for dim, amount in more.items():
                permit._charged[dim] = permit._charged.get(dim, 0.0) + amount
            diff = {dim: -amount for dim, amount in more.items()}
            rp = self._rpool(rt)
            entry = self._prefetched.get(permit.seq)
            if entry is not None:
                self._to_prefetch(rp, entry[0], diff, done=False)
            else:
                self._backend.send(self._settle_op(rp, permit.seq, "progress", diff, "", False))

    def release(self, permit: Permit) -> None:
        """``Limiter._release`` in remote mode (same rules, applied by ``release.lua``)."""
        limiter = self._limiter
        with limiter._lock:
            if permit._state != _ACTIVE:
                return
            now = limiter._now()
            rt = permit._runtime
            charged = permit._charged
            if not permit.sent:
                mode, refund = "unsent", dict(charged)
            elif permit.response_status is not None and permit.response_status >= 400:
                mode, refund = "error", {k: v for k, v in charged.items() if k != "requests"}
            else:
                mode, refund = "kept", {}
            if refund:
                rt.admitted.add(now, refund, -1.0)
            if limiter._wallet is not None and permit.credits and (not permit.sent or refund):
                limiter._wallet.give_back(permit.credits, now)
            permit._state = _RELEASED
            rt.in_flight.pop(permit.seq, None)
            rp = self._rpool(rt)
            entry = self._prefetched.pop(permit.seq, None)
            if entry is not None:
                self._to_prefetch(rp, entry[0], refund, done=True, uncounted=True)
            else:
                self._backend.send(self._release_op(rp, permit.seq, mode, charged))
            if refund:
                self._poke(rt)

    # ------------------------------------------------------------------ feedback

    def observe(
        self,
        headers: object,
        *,
        status: int,
        body: object,
        permit: Permit | None,
        runtime: _PoolRuntime | None,
    ) -> RateLimitSnapshot:
        """``Limiter._observe`` in remote mode: resyncs, pauses and holds go to the shared state."""
        limiter = self._limiter
        snap = parse_headers(headers, received_at=_dt.datetime.now(_dt.UTC))  # type: ignore[arg-type]
        error_type, error_code, message = error_fields(body)
        spend = error_code == "enforced_spend_limit_reached"
        ops: list[Op] = []
        with limiter._lock:
            now = limiter._now()
            skew = snap.clock_skew or 0.0
            if spend:
                limiter._spend_limit(snap, now, message)
                assert limiter._spend_until is not None
                assert limiter._spend_resets_at is not None
                seconds = limiter._spend_until - now
                iso = limiter._spend_resets_at.isoformat()
                ops.append(Op("control", [self._backend.org_key()], ["spend", repr(seconds), iso]))
            if runtime is not None:
                rp = self._rpool(runtime)
                fitted = self._resync(rp, snap, permit, now, ops)
                if status == 429 and not spend:
                    ops.append(self._on_429(rp, snap, permit, now, fitted))
                elif status == 529 or error_type == "overloaded_error":
                    ops.append(self._on_529(rp, snap, now))
                elif status < 400:
                    runtime.overload_backoff = 0.0
            unified = snap.unified
            if unified is not None:
                if unified.status == "rejected" or (status == 429 and unified.status is not None):
                    ops += self._on_rejected(snap, now, skew, runtime)
                else:
                    limiter._on_unified(snap, now, skew, status, runtime)
            if snap.quota is not None:
                limiter._on_quota(snap, permit, now)
            if status == 402 and limiter._wallet is not None:
                held = permit.credits if permit is not None else 0.0
                limiter._wallet.resync(max(0.0, held - 1.0), now)
        for op in ops:
            self._backend.send(op)
        return snap

    def _resync(
        self, rp: _RPool, snap: RateLimitSnapshot, permit: Permit | None, now: float, ops: list[Op]
    ) -> bool:
        """Under the lock: ``Limiter._resync`` for a shared pool; True if the headers fitted the burst.

        The resync goes to Redis (``resync.lua``: limits, and levels by the local
        limiter's rule, from the note reserve.lua kept of the pool at the request's grant;
        what only this process can know goes with it: its refused request's tokens and
        its earlier requests not sent yet). The burst bound is computed here with the
        local limiter's helper; a clearly smaller one shrinks the local mirror at once (so
        a 429 in the same response is classified as the local limiter would) and the
        shared burst with
        ``control.lua fit``.
        """
        limits = snap.limits()
        if not limits:
            return False
        limiter = self._limiter
        rt = rp.rt
        pool = rt.pool
        date = snap.server_date
        bound = math.inf
        floor = 0.0
        # since: the observed request's reservation (a prefetched request's is its
        # prefetch's, with what of the prefetch the server had not counted as extra)
        since = -1
        extra: dict[str, float] = {}
        if permit is not None:
            entry = self._prefetched.get(permit.seq)
            if permit.seq >= 0:
                since = permit.seq
                extra = self._uncounted(rt, permit)
            elif entry is not None:
                c, fresh = entry
                since = c.seq
                extra = self._uncounted(rt, permit)
                # fresh then, less what of it went back since (resync counts that as given back)
                for dim, amount in fresh.items():
                    unseen = amount - c.given.get(dim, 0.0)
                    if unseen > 0.0:
                        extra[dim] = extra.get(dim, 0.0) + unseen
        args: list[str | int] = [since, "1" if limiter._learn else "0"]
        for dim in _RESYNC_DIMS:
            info = limits.get(dim)
            if info is None:
                continue
            # the local mirror learns at once (resync.lua applies the same rule to the shared
            # state), so the burst bound below divides by the limit in force
            new_limit = float(info.limit) if info.limit is not None and limiter._learn else 0.0
            if new_limit > 0 and _learns(pool, dim, new_limit) and pool.set_limit(dim, new_limit, now):
                limiter._emit("limit_change", rt, now, {dim: info.limit})
                self._poke(rt)
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
        bound = fitted_burst(bound, floor)

        def done(reply: Reply) -> None:
            with limiter._lock:
                now = limiter._now()
                for change in reply[2:]:
                    kind, dim, value = change.split(":")
                    if kind == "limit":
                        if rt.pool.set_limit(dim, float(value), now):  # not known here yet
                            limiter._emit("limit_change", rt, now, {dim: float(value)})
                            self._poke(rt)
                    else:
                        rt.resyncs += 1
                        limiter._emit("resync", rt, now, {"dimension": dim, "delta": float(value)})

        ops.append(Op("resync", rp.settle_keys, args, done))
        if not (limiter._adaptive and bound < 1.0 and pool.fit_burst(bound, now)):
            return False
        limiter._emit("burst_change", rt, now, {"burst": pool.burst, "from": "headers"})
        ops.append(Op("control", [rp.keys[0], rp.keys[1]], ["fit", repr(bound)], self._on_burst(rt)))
        return True

    def _uncounted(self, rt: _PoolRuntime, permit: Permit) -> dict[str, float]:
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
        order = self._order(permit)
        for other in rt.in_flight.values():
            if not other.sent and other is not permit and self._order(other) < order:
                for dim, amount in other._charged.items():
                    extra[dim] = extra.get(dim, 0.0) + amount
        return extra

    def _on_burst(self, rt: _PoolRuntime) -> Callable[[Reply], None]:
        def done(reply: Reply) -> None:
            if reply[0] != "OK" or len(reply) < 3:
                return
            burst = float(reply[2])
            limiter = self._limiter
            with limiter._lock:
                if abs(burst - rt.pool.burst) > 1e-12:
                    now = limiter._now()
                    rt.pool.set_burst(min(1.0, max(burst, 1.0 / 60.0)), now)
                    limiter._emit("burst_change", rt, now, {"burst": burst})

        return done

    def _hold(self, rp: _RPool, until: float) -> None:
        # until Redis has the pause, this process's own head must not reserve past it
        if until > rp.hold_until:
            rp.hold_until = until

    def _on_429(
        self, rp: _RPool, snap: RateLimitSnapshot, permit: Permit | None, now: float, fitted: bool
    ) -> Op:
        """``Limiter._on_429`` for a shared pool: the same classification, the pause and shrink in Redis.

        Predicted: the burst was not just fitted to the headers and the server's remaining
        shows a dimension this request doesn't fit in. Otherwise, unless ``fitted``, the
        burst halves, once per event: ``control.lua`` skips the 429s of requests admitted
        (by any process) before the pool's last shrink or fit.
        """
        limiter = self._limiter
        rt = rp.rt
        rt.rate_limited += 1
        predicted = permit is not None and not fitted and explained_by_remaining(snap, permit.reserved)
        if predicted:
            rt.rate_limited_predicted += 1
        retry = snap.retry_after if snap.retry_after is not None else 1.0
        shrink = not predicted and not fitted and limiter._adaptive
        self._hold(rp, now + retry)
        if rp.prefetch is not None:
            self._close_prefetch(rp, rp.prefetch)
        rt.pool.pause(now + retry, "429 rate_limit_error")
        limiter._emit("pause", rt, now, {"seconds": retry, "reason": "429"})
        limiter._emit("rate_limited", rt, now, {"predicted": predicted, "retry_after": retry})
        seq = self._redis_seq(permit) if permit is not None else -1
        args = ["pause", repr(retry), "429 rate_limit_error", "1" if shrink else "0", seq]
        return Op("control", [rp.keys[0], rp.keys[1]], args, self._on_pause(rt))

    def _on_pause(self, rt: _PoolRuntime) -> Callable[[Reply], None]:
        burst_done = self._on_burst(rt)

        def done(reply: Reply) -> None:
            if len(reply) >= 3:
                burst_done(["OK", reply[1], reply[2]])

        return done

    def _on_529(self, rp: _RPool, snap: RateLimitSnapshot, now: float) -> Op:
        rt = rp.rt
        rt.overloaded += 1
        backoff = min(8.0, max(0.5, rt.overload_backoff * 2.0))
        rt.overload_backoff = backoff
        wait = snap.retry_after if snap.retry_after is not None else backoff
        self._hold(rp, now + wait)
        rt.pool.pause(now + wait, "529 overloaded")
        self._limiter._emit("pause", rt, now, {"seconds": wait, "reason": "529"})
        self._limiter._emit("overloaded", rt, now, {"backoff": wait})
        return Op("control", [rp.keys[0], rp.keys[1]], ["pause", repr(wait), "529 overloaded", "0"])

    def _on_rejected(
        self, snap: RateLimitSnapshot, now: float, skew: float, runtime: _PoolRuntime | None
    ) -> list[Op]:
        unified = snap.unified
        assert unified is not None
        wait = unified_wait(snap, skew)
        claim = unified.representative_claim
        scope = claim.rsplit("_", 1)[1] if claim in ("seven_day_opus", "seven_day_sonnet") else "all"
        reason = f"subscription limit ({claim})"
        for rp in self._pools.values():
            if scope in rp.scopes.split(",") or rp.rt is runtime:
                self._hold(rp, now + wait)
                rp.rt.pool.pause(now + wait, reason)
                self._limiter._emit("pause", rp.rt, now, {"seconds": wait, "reason": "unified rejected"})
        ops = [Op("control", [self._backend.org_key()], ["hold", repr(wait), reason, scope])]
        if runtime is not None and runtime.pool.name in _SPECIAL:
            rp = self._rpool(runtime)
            ops.append(Op("control", [rp.keys[0], rp.keys[1]], ["pause", repr(wait), reason, "0"]))
        return ops

    # ------------------------------------------------------------------ by hand

    def set_limits(self, rt: _PoolRuntime, limits: Mapping[str, float]) -> None:
        """Under the lock: ``Limiter.set_limits`` in remote mode (shared by every process)."""
        rp = self._rpool(rt)
        args: list[str] = ["limits"]
        for dim, value in limits.items():
            args += [dim, repr(float(value))]
        self._backend.send(Op("control", [rp.keys[0], rp.keys[1]], args))
        self._poke(rt)

    def give_back(self, rt: _PoolRuntime, amounts: Mapping[str, float]) -> None:
        """Under the lock: return amounts to a shared pool (``batch_finished``)."""
        rp = self._rpool(rt)
        args: list[str | int] = ["giveback", _encode(amounts), self._op_ttl_ms]
        ident = self._backend.new_ident()
        self._backend.send(Op("control", [rp.keys[0], rp.keys[1]], args, ident=ident))
        self._poke(rt)


def _refused(ops: list[Op], replies: list[Result]) -> Refused | None:
    """Why a reserve round trip must count as Redis unavailable, or None.

    Its reserve got an error reply; or the pool's init did and the reserve found no
    pool: trying again would only repeat both (a user without a permission init needs).
    """
    reply = replies[-1]
    if isinstance(reply, Refused):
        return reply
    if reply[0] == "NOPOOL" and len(ops) >= 2 and ops[-2].script == "init":
        init = replies[-2]
        if isinstance(init, Refused):
            return init
    return None


def _learns(pool: Pool, dim: str, limit: float) -> bool:
    """``Limiter._resync``'s rule (and ``resync.lua``'s): which ``-limit`` headers a pool adopts."""
    if dim == "tokens":
        return dim in pool.limits or limit < pool.limits.get("input_tokens", 0.0) + pool.limits.get(
            "output_tokens", 0.0
        )
    return dim in pool.limits or dim.startswith("priority")


def _scaled(rt: _PoolRuntime, fraction: float, now: float) -> _PoolRuntime:
    """A copy of a pool's configuration at ``fraction`` of every limit, buckets full."""
    source = rt.pool
    pool = Pool(source.name, {}, now=now, burst=source.burst)
    for dim, bucket in source.buckets.items():
        pool.limits[dim] = source.limits[dim] * fraction
        pool.buckets[dim] = TokenBucket(
            bucket.capacity * fraction,
            bucket.rate * fraction,
            now=now,
            debt_limit=bucket.debt_limit * fraction,
        )
    return _PoolRuntime(pool, rt.rules)
