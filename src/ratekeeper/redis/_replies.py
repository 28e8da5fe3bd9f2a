"""Each script's reply, read from the strings Redis sent into named values, in one place.

Every script returns ``{status, now, ...}`` (``now``: Redis time, seconds); what follows
is the script's own (see the head of each ``lua/*.lua``). A reply that does not have
the shape its script returns raises ``MalformedReply``, naming the script and the reply.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar, final

import attrs

from ratekeeper.redis._ops import RawReply

__all__ = [
    "BurstReply",
    "MalformedReply",
    "PauseReply",
    "PrefetchGrant",
    "ReserveReply",
    "ResyncChange",
    "ResyncReply",
]

_T = TypeVar("_T")


@final
class MalformedReply(ValueError):
    """Internal: a script's reply is not what the script returns (the script and this code disagree)."""

    def __init__(self, script: str, raw: RawReply, why: str) -> None:
        super().__init__(f"ratekeeper: {script}.lua replied {raw!r}, which it never does ({why})")
        self.script = script
        self.raw = raw


def _read(script: str, raw: RawReply, fields: int, read: Callable[[], _T]) -> _T:
    """``read()``, with any failure to read a field (and fewer than ``fields``) as ``MalformedReply``."""
    if len(raw) < fields:
        raise MalformedReply(script, raw, f"fewer than {fields} fields")
    try:
        return read()
    except (ValueError, IndexError) as exc:
        raise MalformedReply(script, raw, str(exc)) from None


@attrs.frozen
class PrefetchGrant:
    """Capacity a reserve took ahead for this process's next requests: reservation ``seq``."""

    seq: int
    amounts: Mapping[str, float]

    @classmethod
    def parse(cls, text: str) -> PrefetchGrant:
        """``"seq;dim=amount,..."`` as ``reserve.lua`` writes it."""
        seq, _, encoded = text.partition(";")
        amounts: dict[str, float] = {}
        for part in encoded.split(","):
            dim, _, amount = part.partition("=")
            if dim:
                amounts[dim] = float(amount)
        return cls(int(seq), amounts)


@attrs.frozen
class ReserveReply:
    """``reserve.lua``: ``{status, now, wait, reason, prefetch, seq...}``.

    ``status``: OK, DUP (its id was used: a cancel came first), NOPOOL (init the pool
    first), SPEND (``reason``: when the cap resets, ISO 8601; ``wait``: seconds until
    then), TOOBIG (``reason``: "dim amount limit" of the first candidate not granted).
    ``seqs``: the reservations of the candidates granted, a prefix of them, in order.
    ``wait``: the estimated time until the next candidate fits.
    """

    status: str
    now: float
    wait: float
    reason: str
    prefetch: PrefetchGrant | None
    seqs: tuple[int, ...]

    @classmethod
    def parse(cls, raw: RawReply) -> ReserveReply:
        """Read ``raw``, or raise ``MalformedReply``."""

        def read() -> ReserveReply:
            prefetch = PrefetchGrant.parse(raw[4]) if len(raw) > 4 and raw[4] else None
            seqs = tuple(int(seq) for seq in raw[5:])
            return cls(raw[0], float(raw[1]), float(raw[2]), raw[3], prefetch, seqs)

        return _read("reserve", raw, 4, read)


@attrs.frozen
class BurstReply:
    """``settle.lua`` (``{status, now, burst}``) and ``control.lua fit`` (``{status, now, burst, fitted}``).

    ``burst``: the pool's shared burst after the change; None unless ``status`` is OK.
    """

    status: str
    now: float
    burst: float | None

    @classmethod
    def parse(cls, raw: RawReply, script: str = "settle") -> BurstReply:
        """Read ``raw``, or raise ``MalformedReply``."""
        ok = raw[:1] == ["OK"] and len(raw) >= 3
        return _read(script, raw, 2, lambda: cls(raw[0], float(raw[1]), float(raw[2]) if ok else None))


@attrs.frozen
class PauseReply:
    """``control.lua pause``: ``{status, now, burst...}``, the burst of each pool paused (that exists)."""

    status: str
    now: float
    bursts: tuple[float, ...]

    @classmethod
    def parse(cls, raw: RawReply) -> PauseReply:
        """Read ``raw``, or raise ``MalformedReply``."""
        return _read("control", raw, 2, lambda: cls(raw[0], float(raw[1]), tuple(map(float, raw[2:]))))


@attrs.frozen
class ResyncChange:
    """One change ``resync.lua`` made: a limit adopted (``limit``) or a level lowered by ``value``."""

    kind: str
    dimension: str
    value: float

    @classmethod
    def parse(cls, text: str) -> ResyncChange:
        """``"limit:dim:value"`` or ``"level:dim:delta"``."""
        kind, dimension, value = text.split(":")
        if kind not in ("limit", "level"):
            raise ValueError(f"unknown change {kind!r}")
        return cls(kind, dimension, float(value))


@attrs.frozen
class ResyncReply:
    """``resync.lua``: ``{status, now, change...}`` (status OK or NOPOOL)."""

    status: str
    now: float
    changes: tuple[ResyncChange, ...]

    @classmethod
    def parse(cls, raw: RawReply) -> ResyncReply:
        """Read ``raw``, or raise ``MalformedReply``."""
        return _read(
            "resync", raw, 2, lambda: cls(raw[0], float(raw[1]), tuple(map(ResyncChange.parse, raw[2:])))
        )
