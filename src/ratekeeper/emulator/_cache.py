"""The emulated prompt cache: entries keyed by the hash of a request's prefix.

A ``cache_control`` breakpoint on a segment names the prefix up to and
including it (tools, then system, then messages). Looking up, the server
tries the segment of every breakpoint and the ``LOOKBACK`` segments before
it, and reads the longest prefix that is live. It then writes an entry for
every later breakpoint whose prefix reaches the model's minimum cacheable
length. An entry is usable only from ``available_at`` (when the response that
wrote it begins) until it expires; a hit refreshes its lifetime (5 minutes,
or 1 hour with ``"ttl": "1h"``).
"""

from __future__ import annotations

from typing import Final

import attrs

from ratekeeper.emulator._tokens import CountedRequest

__all__ = ["LOOKBACK", "CachePlan", "PromptCache"]

LOOKBACK: Final = 20
_TTL_5M: Final = 300.0
_TTL_1H: Final = 3600.0


@attrs.define
class _Entry:
    available_at: float
    expires_at: float
    ttl: float
    owner: str


@attrs.frozen
class CachePlan:
    """How one request's input splits between cache reads, cache writes and plain input."""

    read: int
    write_5m: int
    write_1h: int
    input: int
    hit_key: str | None
    writes: tuple[tuple[str, float], ...]

    @property
    def creation(self) -> int:
        """All cache-write tokens (``cache_creation_input_tokens``)."""
        return self.write_5m + self.write_1h


def _ttl(cache_control: object) -> float:
    if isinstance(cache_control, dict) and cache_control.get("ttl") == "1h":
        return _TTL_1H
    return _TTL_5M


class PromptCache:
    """The organization's prompt cache."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._swept = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def _live(self, key: str, now: float) -> bool:
        e = self._entries.get(key)
        return e is not None and e.available_at <= now < e.expires_at

    def plan(self, counted: CountedRequest, min_tokens: int, now: float) -> CachePlan:
        """Where ``counted``'s input would come from at ``now`` (changes nothing)."""
        segs = counted.segments
        prefix: list[int] = []
        run = 0
        for s in segs:
            run += s.tokens
            prefix.append(run)
        breaks = [i for i, s in enumerate(segs) if s.cache_control is not None]
        hit = -1
        for b in breaks:
            for i in range(b, max(-1, b - LOOKBACK - 1), -1):
                if i > hit and self._live(segs[i].key, now):
                    hit = i
                    break
        read = prefix[hit] if hit >= 0 else 0
        writes: list[tuple[str, float]] = []
        w5 = w1 = 0
        done = read
        for b in breaks:
            if b <= hit or prefix[b] < min_tokens:
                continue
            ttl = _ttl(segs[b].cache_control)
            if ttl == _TTL_1H:
                w1 += prefix[b] - done
            else:
                w5 += prefix[b] - done
            done = prefix[b]
            writes.append((segs[b].key, ttl))
        return CachePlan(
            read=read,
            write_5m=w5,
            write_1h=w1,
            input=counted.total - read - w5 - w1,
            hit_key=segs[hit].key if hit >= 0 else None,
            writes=tuple(writes),
        )

    def commit(self, plan: CachePlan, now: float, available_at: float, owner: str) -> None:
        """Apply ``plan``: refresh the entry read, store the entries written."""
        self.expire(now)
        if plan.hit_key is not None:
            e = self._entries[plan.hit_key]
            e.expires_at = max(e.expires_at, now + e.ttl)
        for key, ttl in plan.writes:
            old = self._entries.get(key)
            if old is not None and old.expires_at > now:
                old.available_at = min(old.available_at, available_at)
                old.expires_at = max(old.expires_at, available_at + ttl)
                old.ttl = max(old.ttl, ttl)
            else:
                self._entries[key] = _Entry(available_at, available_at + ttl, ttl, owner)

    def cancel(self, owner: str, now: float) -> None:
        """Forget the entries ``owner`` wrote that had not become usable by ``now``."""
        for key in [k for k, e in self._entries.items() if e.owner == owner and e.available_at > now]:
            del self._entries[key]

    def expire(self, now: float) -> None:
        """Drop expired entries (a sweep at most every 30 seconds of server time)."""
        if now - self._swept < 30.0:
            return
        self._swept = now
        for key in [k for k, e in self._entries.items() if e.expires_at <= now]:
            del self._entries[key]
