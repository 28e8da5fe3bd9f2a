"""Prefetch: capacity one reserve took ahead, from which this process admits without a round trip.

When a reserve finds the pool with plenty to spare and nobody else in line, it also
reserves ``prefetch`` more requests like the last one, under one seq; the process admits
its next requests from that (for at most ``prefetch_ttl`` seconds, while none of its own
waits) and returns what it did not use with one settle once they are all done.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import final

from ratekeeper.gate._state import Permit, PoolRuntime
from ratekeeper.redis._pools import EngineParts, Prefetch, _RemotePool
from ratekeeper.redis._replies import PrefetchGrant

__all__ = ["Prefetches"]


@final
class Prefetches:
    """One engine's prefetches, and the permits admitted from them until they are done."""

    def __init__(self, parts: EngineParts) -> None:
        self._parts = parts
        # permits admitted from a prefetch (by their local seq, negative), until they are
        # done: the prefetch, and what of it the server had never counted right after
        self.admitted: dict[int, tuple[Prefetch, dict[str, float]]] = {}

    def admit(
        self, remote: _RemotePool, model: str, draws: dict[str, float], credit: float, now: float
    ) -> Permit | None:
        """Under the lock: admit from the open prefetch, or close it and say None.

        It closes when it expired, when this process has waiters (they go through
        Redis in order, and what it holds should be there for them), during a hold,
        and when this request does not fit in what is left.
        """
        c = remote.prefetch
        assert c is not None
        runtime = remote.runtime
        if credit or now >= c.until or runtime.queued or now < remote.hold_until:
            if not credit:
                self.close(remote, c)
            return None
        left = c.left
        limits = runtime.pool.limits
        for dim, amount in draws.items():
            if amount > 0.0:
                have = left.get(dim)
                if (have is None and dim in limits) or (have is not None and have < amount):
                    self.close(remote, c)
                    return None
        fresh = c.fresh
        for dim, amount in draws.items():
            if dim in left:
                left[dim] -= amount
                fresh[dim] -= min(fresh[dim], amount)
        limiter = self._parts.limiter
        # local, negative, decreasing: Redis knows only the prefetch's seq
        seq = -1 - next(limiter._seq)
        permit = Permit(limiter, runtime, model, draws, 0.0, seq, now)
        c.holders += 1
        self.admitted[seq] = (c, dict(fresh))
        self.track(runtime, permit, now)
        runtime.granted += 1
        runtime.waits.add(0.0)
        runtime.admitted.add(now, draws)
        if limiter._on_event is not None:
            limiter._emit("grant", runtime, now, {"waited": 0.0, "prefetched": True})
        return permit

    def granted(self, remote: _RemotePool, grant: PrefetchGrant, now: float) -> None:
        """Under the lock: a reserve's reply carried a prefetch; it replaces the open one."""
        if remote.prefetch is not None:
            self.close(remote, remote.prefetch)
        ttl = self._parts.backend.prefetch_ttl
        c = remote.prefetch = Prefetch(grant.seq, dict(grant.amounts), now + ttl)

        def expire() -> None:
            with self._parts.limiter._lock:
                if c.open:
                    self.close(remote, c)

        self._parts.backend.call_later(ttl, expire)

    def close(self, remote: _RemotePool, c: Prefetch) -> None:
        """Under the lock: admit nothing more from ``c`` and give back what it has not handed out."""
        c.open = False
        if remote.prefetch is c:
            remote.prefetch = None
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
        if c.kept:
            for dim, amount in c.kept.items():
                unused[dim] = unused.get(dim, 0.0) + amount
            for dim, amount in c.kept_uncounted.items():
                uncounted[dim] = uncounted.get(dim, 0.0) + amount
            c.kept, c.kept_uncounted = {}, {}
        self._send_back(remote, c, unused, uncounted)

    def close_all(self, remotes: Mapping[str, _RemotePool]) -> None:
        """Under the lock: close every open prefetch of ``remotes``."""
        for remote in remotes.values():
            if remote.prefetch is not None:
                self.close(remote, remote.prefetch)

    def _send_back(
        self,
        remote: _RemotePool,
        c: Prefetch,
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
        call = self._parts.calls.settle(
            remote.keys,
            c.seq,
            "settle" if last else "progress",
            diff,
            recovery=self._parts.calls.recovery if last else "",
            uncounted=uncounted or {},
            on_reply=remote.on_burst if last else None,
        )
        self._parts.backend.send(call)
        if any(amount > 0.0 for amount in diff.values()):
            self._parts.wake_head(remote.runtime)

    def refund(
        self,
        remote: _RemotePool,
        c: Prefetch,
        amounts: Mapping[str, float],
        done: bool,
        uncounted: bool = False,
        sent: bool = True,
    ) -> None:
        """Under the lock: a prefetched request's refund (> 0) or extra charge (< 0).

        While ``c`` is open it goes to what ``c`` can still hand out; once closed, to
        Redis. ``uncounted``: the request never reached the server, or it refused it.
        ``sent``: it left for the server. Its token refunds are then held for Redis, not
        handed out again: ``resync.lua`` reads a record's tokens less those sent as what
        a report of the answer cannot hold, which a refund handed out again would make
        too little, and Redis holds back a refund a report already showed (see there).
        """
        if done:
            c.holders -= 1
        # (a dimension the prefetch lacks, the pool lacks: Redis would ignore it too)
        diff = {dim: amount for dim, amount in amounts.items() if amount and dim in c.left}
        if not c.open:
            self._send_back(remote, c, diff, diff if uncounted else None)
            return
        left = c.left
        for dim, amount in diff.items():
            if sent and amount > 0.0 and dim != "requests":
                c.kept[dim] = c.kept.get(dim, 0.0) + amount
                if uncounted:
                    c.kept_uncounted[dim] = c.kept_uncounted.get(dim, 0.0) + amount
                continue
            left[dim] += amount
            if uncounted and amount > 0.0:
                c.fresh[dim] += amount
        if any(v < 0.0 for v in left.values()):
            self.close(remote, c)  # it owes Redis more than it holds: settle up

    def track(self, runtime: PoolRuntime, permit: Permit, now: float) -> None:
        """Under the lock: ``permit`` is in flight, noted in its grant order (see ``order``)."""
        runtime.in_flight[permit.seq] = permit
        runtime.note_grant(permit, now, self.order(permit))

    def redis_seq(self, permit: Permit) -> int:
        """The Redis reservation a permit's request belongs to (-1: not known any more)."""
        entry = self.admitted.get(permit.seq)
        if entry is not None:
            return entry[0].seq
        return permit.seq

    def order(self, permit: Permit) -> tuple[int, int]:
        """Admission order across the Redis seqs and the requests of each prefetch."""
        entry = self.admitted.get(permit.seq)
        if entry is not None:
            return entry[0].seq, -permit.seq  # (local seqs decrease)
        return permit.seq, 0
