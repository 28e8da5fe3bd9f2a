"""What the backend and the remote engine exchange: script calls, their results, the keys.

A ``ScriptCall`` is one run of a Lua script (``lua/``) with its keys and arguments;
a round trip gives back, per call, its raw reply (``RawReply``, the strings the script
returned; ``_replies.py`` reads them into named values) or ``Refused`` when Redis
answered that call with an error. ``RedisDown`` says the round trip as a whole failed.
``Backend`` is what the remote engine needs of ``RedisBackend``: the engine's modules
import this one, never ``_backend.py``, so that the backend can make the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, final

import attrs

if TYPE_CHECKING:
    from ratekeeper.errors import BackendUnavailable

__all__ = [
    "Backend",
    "PoolKeys",
    "RawReply",
    "RedisDown",
    "Refused",
    "Result",
    "ScriptCall",
    "encode_draws",
]

#: A script's reply as Redis sent it: a list of strings (``_replies.py`` names its fields).
RawReply = list[str]


@final
class ScriptCall:
    """One script call: ``script`` with ``keys`` and ``args``; ``on_reply`` sees its reply.

    ``ident``: the call's id, for a change that must not apply twice (reserve, settle,
    release, a give-back). Its key (``RedisBackend.op_key``) goes last in ``KEYS``; the
    script records it for ``lease`` seconds, and a second run of the same call is a no-op
    (reply ``DUP``). ``sent``: when it first left in a round trip (monotonic; 0: never).
    """

    __slots__ = ("args", "ident", "keys", "on_reply", "script", "sent")

    def __init__(
        self,
        script: str,
        keys: Sequence[str],
        args: Sequence[str | int | float],
        on_reply: Callable[[RawReply], None] | None = None,
        ident: str | None = None,
    ) -> None:
        self.script = script
        self.keys = tuple(keys)
        self.args = tuple(args)
        self.on_reply = on_reply
        self.ident = ident
        self.sent = 0.0


@final
class Refused(Exception):
    """Internal: Redis answered one call with an error reply (``error``); the others of its round trip stand.

    The script may have run in part (Redis does not undo a script's writes before an
    error), so the call is never sent again.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


#: What a round trip gives back per call: its reply, or the error Redis answered it with.
Result = RawReply | Refused


class RedisDown(Exception):
    """Internal: Redis did not answer (connection refused, reset, timed out)."""


@attrs.frozen
class PoolKeys:
    """Every key one pool's scripts touch, all under the organization's hash tag."""

    org: str  #: the organization hash: reservation counter, spend cap, subscription holds
    pool: str  #: the pool's buckets, burst, pause
    reservations: str  #: seq -> what the reservation charged
    leases: str  #: seq scored by when its lease ends
    line: str  #: the line of waiting participants, scored by their oldest waiter's arrival
    line_needs: str  #: participant -> its ticket's expiry and its oldest waiter's needs
    notes: str  #: seq -> the pool right after its grant, for resync
    uncounted: str  #: the log of refunds the server never counted
    sends: str  #: the log of sends, scored by when Redis heard of each

    @property
    def every(self) -> tuple[str, ...]:
        """All nine, in the order above."""
        return attrs.astuple(self)

    @property
    def reserve(self) -> tuple[str, ...]:
        """``reserve.lua``'s keys (an op id key may follow)."""
        return (
            self.org,
            self.pool,
            self.reservations,
            self.leases,
            self.line,
            self.line_needs,
            self.notes,
        )

    @property
    def settle(self) -> tuple[str, ...]:
        """What ``settle.lua``, ``release.lua`` and ``resync.lua`` touch."""
        return (self.org, self.pool, self.reservations, self.leases, self.notes, self.uncounted)

    @property
    def resync(self) -> tuple[str, ...]:
        """``resync.lua``'s: ``settle``'s, then the log of sends."""
        return (*self.settle, self.sends)

    @property
    def sent(self) -> tuple[str, str]:
        """``sent.lua``'s: the reservations, then the log of sends."""
        return (self.reservations, self.sends)

    @property
    def control(self) -> tuple[str, str]:
        """``control.lua``'s keys for this pool: the organization, then the pool."""
        return (self.org, self.pool)


def encode_draws(draws: Mapping[str, float]) -> str:
    """``dim=amount,...`` as the scripts read it (zero amounts left out)."""
    return ",".join(f"{dim}={amount!r}" for dim, amount in draws.items() if amount)


class Backend(Protocol):
    """What the remote engine uses of its backend (``RedisBackend`` is the one there is)."""

    participant: str
    on_unavailable: str
    fallback_fraction: float
    lease: float
    ticket_ttl: float
    poll_interval: float
    key_ttl: float
    prefetch: int
    prefetch_ttl: float

    def available(self) -> bool: ...
    def mark_down(self, error: BaseException) -> None: ...
    def unavailable_error(self) -> BackendUnavailable: ...
    def org_key(self) -> str: ...
    def pool_keys(self, pool: str) -> PoolKeys: ...
    def new_ident(self) -> str: ...
    def run_sync(self, ops: Sequence[ScriptCall]) -> list[Result]: ...
    async def run_async(self, ops: Sequence[ScriptCall]) -> list[Result]: ...
    def send(self, op: ScriptCall) -> None: ...
    def call_later(self, delay: float, callback: Callable[[], None]) -> None: ...
    def on_close(self, callback: Callable[[], None]) -> None: ...
    def take_outbox(self) -> list[ScriptCall]: ...
    def put_back(self, ops: Sequence[ScriptCall]) -> None: ...
    def deliver(self, ops: Sequence[ScriptCall], results: Sequence[Result]) -> None: ...
