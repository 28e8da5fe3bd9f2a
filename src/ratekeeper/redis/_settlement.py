"""A shared pool's permits, settled: the local bookkeeping at once, the change to Redis via the outbox.

``settle`` (the actual cost), ``progress`` (output beyond the reservation, as a stream
produces it) and ``release`` (the permit ends without a settlement: ``release.lua``
applies the same rules as the local limiter). A permit admitted from a prefetch
settles with its prefetch instead, which goes back to Redis once it is closed.
"""

from __future__ import annotations

from typing import final

from ratekeeper.core._accounting import Cost, Usage
from ratekeeper.gate._demand import _diff, _draws
from ratekeeper.gate._state import _ACTIVE, _RELEASED, _SETTLED, Permit
from ratekeeper.redis._pools import EngineParts
from ratekeeper.redis._prefetch import Prefetches

__all__ = ["Settlement"]


@final
class Settlement:
    """One engine's settlements, and the changes they send to Redis."""

    def __init__(self, parts: EngineParts, prefetches: Prefetches) -> None:
        self._parts = parts
        self._prefetches = prefetches

    def settle(self, permit: Permit, usage: Usage, credits: float | None, *, wake: bool = True) -> Cost:
        """``Limiter._settle`` in remote mode: the difference goes to Redis with the next round trip.

        (``wake`` is the ``Engine`` protocol's: whoever a refund lets in learns it from Redis.)
        """
        limiter = self._parts.limiter
        with limiter._lock:
            now = limiter._now()
            runtime = permit._runtime
            remote = self._parts.remote_for(runtime)
            priority = permit.reserved.get("priority_input_tokens", 0.0) > 0.0
            actual = runtime.rules.settled_cost(usage, priority=priority, credits=credits)
            new = _draws(actual)
            diff = _diff(permit._charged, new)
            if diff:
                runtime.admitted.add(now, diff, -1.0)
            limiter._account.settle_credits(permit.credits, credits, now)
            permit._charged = new
            permit._state = _SETTLED
            runtime.in_flight.pop(permit.seq, None)
            entry = self._prefetches.admitted.pop(permit.seq, None)
            if entry is not None:
                self._prefetches.refund(remote, entry[0], diff, done=True)
            else:
                call = self._parts.calls.settle(
                    remote.keys,
                    permit.seq,
                    "settle",
                    diff,
                    recovery=self._parts.calls.recovery,
                    uncounted={},
                    on_reply=remote.on_burst,
                )
                self._parts.backend.send(call)
            self._parts.wake_head(runtime)
        return actual

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

    @staticmethod
    def settle_observing(permit: Permit, usage: object, credits: float | None, headers: object) -> Cost:
        """The report first, then the settlement: the Redis scripts read a report before it."""
        permit.observe(headers)
        return permit._settle(usage, credits, wake=True)

    def progress(self, permit: Permit, output: float) -> None:
        """``Limiter._progress`` in remote mode: output beyond the reservation is charged in Redis."""
        limiter = self._parts.limiter
        with limiter._lock:
            if permit._state != _ACTIVE:
                return
            extra = output - permit._charged.get("output_tokens", 0.0)
            if extra <= 0.0:
                return
            runtime = permit._runtime
            more = {"output_tokens": extra, "tokens": extra}
            if "priority_output_tokens" in permit._charged:
                more["priority_output_tokens"] = extra
            runtime.admitted.add(limiter._now(), more)
            charged = dict(permit._charged)  # a new dict: the permit's reservation may share the old one
            for dim, amount in more.items():
                charged[dim] = charged.get(dim, 0.0) + amount
            permit._charged = charged
            diff = {dim: -amount for dim, amount in more.items()}
            remote = self._parts.remote_for(runtime)
            entry = self._prefetches.admitted.get(permit.seq)
            if entry is not None:
                self._prefetches.refund(remote, entry[0], diff, done=False)
            else:
                call = self._parts.calls.settle(
                    remote.keys, permit.seq, "progress", diff, recovery="", uncounted={}, on_reply=None
                )
                self._parts.backend.send(call)

    def sent(self, permit: Permit) -> None:
        """``Permit.mark_sent`` in remote mode: Redis counts the send (see ``sent.lua``)."""
        seq = self._prefetches.redis_seq(permit)
        requests = permit._charged.get("requests", 0.0)
        if seq < 0 or not requests:  # (a prefetch's request that is done: its record is too)
            return
        remote = self._parts.remote_for(permit._runtime)
        tokens = {dim: amount for dim, amount in permit._charged.items() if dim != "requests" and amount}
        self._parts.backend.send(self._parts.calls.sent(remote.keys, seq, requests, tokens))

    def release(self, permit: Permit) -> None:
        """``Limiter._release`` in remote mode (same rules, applied by ``release.lua``)."""
        limiter = self._parts.limiter
        with limiter._lock:
            if permit._state != _ACTIVE:
                return
            now = limiter._now()
            runtime = permit._runtime
            charged = permit._charged
            if not permit.sent:
                mode, refund = "unsent", dict(charged)
            elif permit.response_status is not None and permit.response_status >= 400:
                mode, refund = "error", {k: v for k, v in charged.items() if k != "requests"}
            else:
                mode, refund = "kept", {}
            if refund:
                runtime.admitted.add(now, refund, -1.0)
            if limiter._account.wallet is not None and permit.credits and (not permit.sent or refund):
                limiter._account.wallet.give_back(permit.credits, now)
            permit._state = _RELEASED
            runtime.in_flight.pop(permit.seq, None)
            remote = self._parts.remote_for(runtime)
            entry = self._prefetches.admitted.pop(permit.seq, None)
            if entry is not None:
                self._prefetches.refund(remote, entry[0], refund, done=True, uncounted=True, sent=permit.sent)
            else:
                self._parts.backend.send(self._parts.calls.release(remote.keys, permit.seq, mode, charged))
            if refund:
                self._parts.wake_head(runtime)
