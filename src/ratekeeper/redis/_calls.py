"""Each script's call, with its arguments typed and in the order the script reads them.

The head of each ``lua/*.lua`` says what its ``KEYS`` and ``ARGV`` are; ``ScriptCalls``
is the one place that writes them, for one engine (its backend's settings, its
limiter's burst recovery).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Final, final

from ratekeeper.core._pool import Pool
from ratekeeper.redis._ops import Backend, PoolKeys, RawReply, ScriptCall, encode_draws

__all__ = ["PREFETCH_FLOOR", "PREFETCH_SHARE", "ScriptCalls"]

#: A prefetch holds at most this fraction of any bucket it draws on...
PREFETCH_SHARE: Final = 0.05
#: ...and is taken only while it leaves every such bucket at least this fraction full:
#: when capacity is short, every request goes through the shared line.
PREFETCH_FLOOR: Final = 0.5

OnReply = Callable[[RawReply], None]


@final
class ScriptCalls:
    """Builds the calls of one engine: ``recovery`` is its limiter's burst recovery ('' if not adaptive)."""

    def __init__(self, backend: Backend, recovery: str) -> None:
        self._backend = backend
        self.recovery = recovery
        self.key_ttl_ms = int(backend.key_ttl * 1000)
        # how long Redis keeps an op's id: as long as anything may still send it again
        self.op_ttl_ms = math.ceil(backend.lease * 1000)

    def init(self, keys: PoolKeys, pool: Pool, on_reply: OnReply) -> ScriptCall:
        """``init.lua``: create the pool's buckets, full, unless they exist."""
        args: list[str | float] = [repr(pool.burst), self.key_ttl_ms]
        for dim, bucket in pool.buckets.items():
            args += [
                dim,
                repr(pool.limits[dim]),
                repr(bucket.capacity),
                repr(bucket.rate),
                repr(bucket.debt_limit),
            ]
        return ScriptCall("init", (keys.org, keys.pool), args, on_reply)

    def reserve(
        self,
        keys: PoolKeys,
        scopes: str,
        candidates: Iterable[tuple[str, Mapping[str, float]]],
        *,
        queue: bool,
        prefetch: int,
    ) -> ScriptCall:
        """``reserve.lua``: admit ``candidates`` (arrival in Redis time or '', draws) in order.

        With an id when it can grant: a reserve whose reply never came is cancelled by it.
        """
        b = self._backend
        pairs: list[str | int] = []
        for arrival, draws in candidates:
            pairs += [arrival, encode_draws(draws)]
        args: list[str | int] = [
            b.participant,
            repr(b.lease),
            repr(b.ticket_ttl),
            self.key_ttl_ms,
            scopes,
            "1" if queue else "0",
            len(pairs) // 2,
            *pairs,
            prefetch,
            repr(PREFETCH_SHARE),
            repr(PREFETCH_FLOOR),
        ]
        return ScriptCall("reserve", keys.reserve, args, ident=b.new_ident() if pairs else None)

    def cancel(self, keys: PoolKeys, ident: str) -> ScriptCall:
        """``release.lua`` in 'cancel' mode: give back what the reserve with id ``ident`` granted."""
        args: list[str | int] = ["", "cancel", "", self.key_ttl_ms, self.op_ttl_ms]
        return ScriptCall("release", keys.settle, args, ident=ident)

    def release(self, keys: PoolKeys, seq: int, mode: str, charged: Mapping[str, float]) -> ScriptCall:
        """``release.lua``: reservation ``seq`` ends without a settlement (``mode``: unsent, error, kept)."""
        args: list[str | int] = [seq, mode, encode_draws(charged), self.key_ttl_ms, self.op_ttl_ms]
        return ScriptCall("release", keys.settle, args, ident=self._backend.new_ident())

    def settle(
        self,
        keys: PoolKeys,
        seq: int,
        mode: str,
        diff: Mapping[str, float],
        *,
        recovery: str,
        uncounted: Mapping[str, float],
        on_reply: OnReply | None,
    ) -> ScriptCall:
        """``settle.lua``: apply ``diff`` to reservation ``seq`` (``mode``: settle or progress)."""
        args: list[str | int] = [
            seq,
            mode,
            encode_draws(diff),
            recovery,
            encode_draws(uncounted),
            self.key_ttl_ms,
            self.op_ttl_ms,
        ]
        return ScriptCall("settle", keys.settle, args, on_reply, self._backend.new_ident())

    def resync(self, keys: PoolKeys, args: list[str | int], on_reply: OnReply) -> ScriptCall:
        """``resync.lua``: ``args`` are since, learn, moment, cutoff, since_sent, admitted_by,
        own, lifts, then quadruples (dim, limit, target, extra).

        With an id, as every change: sent again after a reply that never came, it is a no-op.
        """
        full = [*args[:2], self.op_ttl_ms, *args[2:]]
        return ScriptCall("resync", keys.resync, full, on_reply, self._backend.new_ident())

    def sent(self, keys: PoolKeys, seq: int, requests: float, tokens: Mapping[str, float]) -> ScriptCall:
        """``sent.lua``: a request of reservation ``seq`` (``requests`` of it) is leaving.

        ``tokens``: its charge on the token buckets. With an id: counted twice, a prefetch's
        unsent requests would look sent.
        """
        args: list[str | int] = [seq, repr(requests), self.key_ttl_ms, self.op_ttl_ms, encode_draws(tokens)]
        return ScriptCall("sent", keys.sent, args, ident=self._backend.new_ident())

    def control(
        self, keys: tuple[str, ...], op: str, *args: str | int, on_reply: OnReply | None = None
    ) -> ScriptCall:
        """``control.lua``: the operation ``op`` and its own ``args`` (see the script's head).

        With an id, as every change: run again later, a pause or hold would last longer.
        """
        return ScriptCall("control", keys, (op, self.op_ttl_ms, *args), on_reply, self._backend.new_ident())
