"""A shared pool's local side, its local waiters and its prefetch, as the remote engine keeps them."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Final, final

import attrs

from ratekeeper.gate._limiter import Limiter
from ratekeeper.gate._state import PoolRuntime, Waiter, WaiterState
from ratekeeper.redis._calls import ScriptCalls
from ratekeeper.redis._ops import Backend, PoolKeys, RawReply

__all__ = ["FALLBACK", "SPECIAL", "EngineParts", "Prefetch", "_RemotePool", "_RemoteWaiter"]

#: A waiter moved to the local fallback limiter (Redis went away while it waited).
FALLBACK: Final = WaiterState.FALLBACK
#: Pools that no subscription hold covers (the local limiter exempts them too).
SPECIAL: Final = ("count_tokens", "batches")


def scopes(pool: str) -> str:
    """The organization-wide holds that apply to ``pool``: ``all``, and its model family's."""
    if pool in SPECIAL:
        return ""
    for family in ("opus", "sonnet", "haiku"):
        if pool.startswith(family):
            return f"all,{family}"
    return "all"


class _RemoteWaiter(Waiter):
    """A local waiter of a remote pool: its monotonic arrival and, once granted, its Redis seq."""

    __slots__ = ("mono", "rseq")

    def __init__(self, draws: dict[str, float], priority: int, seq: int, now: float) -> None:
        super().__init__(draws, priority, seq, now)
        self.mono = time.monotonic()
        self.rseq = -1


@final
class _RemotePool:
    """A remote pool's local side: keys, the driving flag, the next attempt, a local hold."""

    __slots__ = (
        "driving",
        "hold_until",
        "inited",
        "keys",
        "next_try",
        "on_burst",
        "prefetch",
        "runtime",
        "scopes",
        "ticket",
    )

    def __init__(self, runtime: PoolRuntime, keys: PoolKeys, on_burst: Callable[[RawReply], None]) -> None:
        self.runtime = runtime
        self.keys = keys
        self.on_burst = on_burst  # a reply carrying the shared burst updates the local mirror
        self.scopes = scopes(runtime.pool.name)
        self.driving = False  # a reserve of this pool's line is out
        self.next_try = -math.inf
        self.hold_until = -math.inf  # a pause this process saw, until Redis has it too
        self.inited = False
        self.ticket = False  # this process holds a place in the shared line
        self.prefetch: Prefetch | None = None  # the one requests are admitted from now


@final
class Prefetch:
    """Capacity one reserve took ahead for this process's next requests (Redis seq ``seq``).

    ``left`` is what is not handed out (refunds of its requests come back to it);
    ``open`` until it expires, runs short or must make way; once closed and its last
    request is done, ``left`` goes back to Redis in one settle (``returned``).
    ``fresh`` is the part of ``left`` the server has never counted (never handed out,
    or given back by a request that never reached it; not settlement refunds, which
    the server makes too): resync allows for it. ``given`` is what of it went back.
    ``kept``: token refunds of its requests that reached the server, held for Redis
    rather than handed out again (``Prefetches.refund``); ``kept_uncounted`` the part
    of them the server never counted (a refusal's).
    """

    __slots__ = (
        "fresh",
        "given",
        "holders",
        "kept",
        "kept_uncounted",
        "left",
        "open",
        "returned",
        "seq",
        "until",
    )

    def __init__(self, seq: int, left: dict[str, float], until: float) -> None:
        self.seq = seq
        self.left = left
        self.fresh = dict(left)
        self.given: dict[str, float] = {}
        self.kept: dict[str, float] = {}
        self.kept_uncounted: dict[str, float] = {}
        self.until = until
        self.holders = 0
        self.open = True
        self.returned = False


@attrs.frozen(eq=False)
class EngineParts:
    """What one engine's helpers (prefetch, answers, settlement, feedback) share.

    ``remotes``: the engine's shared pools by name; ``remote_for`` makes one on first
    use; ``wake_head``: under the lock, capacity came back, the pool's head may try again.
    """

    limiter: Limiter
    backend: Backend
    calls: ScriptCalls
    remotes: Mapping[str, _RemotePool]
    remote_for: Callable[[PoolRuntime], _RemotePool]
    wake_head: Callable[[PoolRuntime], None]
