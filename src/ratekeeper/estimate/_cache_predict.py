"""Predict which parts of a request the prompt cache will read or write (spec section 8).

The predictor remembers the prefixes that requests wrote, keyed by a hash of
their content, and when each expires; a new request's breakpoints are looked
up in it. It is pure: time is an argument.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final, Protocol, final

import attrs

from ratekeeper.estimate._body_fields import bad
from ratekeeper.estimate._body_scan import TTL_SECONDS, Layout, scan_body, token_counter

__all__ = ["CachePrediction", "PromptCachePredictor"]

_ONE_HOUR: Final = TTL_SECONDS["1h"]


class _HasCache(Protocol):
    @property
    def cache(self) -> CachePrediction: ...


@final
@attrs.frozen
class CachePrediction:
    """How a request's input is predicted to split between the prompt cache and fresh input.

    ``write_1h_tokens`` is the part of ``write_tokens`` written with the
    one-hour TTL. What the predictor must remember once the response starts
    travels with it, so :meth:`PromptCachePredictor.record` can take it.
    """

    read_tokens: int = 0
    write_tokens: int = 0
    write_1h_tokens: int = 0
    #: (prefix key, TTL in seconds or None for "refresh with the entry's own TTL").
    _touch: tuple[tuple[int, float | None], ...] = attrs.field(default=(), repr=False, eq=False)


@attrs.define
class _Entry:
    expires_at: float
    ttl: float


@final
class PromptCachePredictor:
    """Predicts prompt-cache reads and writes from the prefixes recently sent.

    A prefix up to a ``cache_control`` breakpoint (tools, then system, then
    messages) that a request wrote is a cache read for a later request that
    reaches it within its TTL (5 minutes, refreshed on every hit, or one hour).
    An entry exists only once :meth:`record` was called for the request that
    wrote it, which the caller does when that request's response **starts**:
    the API can't serve a prefix before the response that writes it begins, so
    a request sent earlier is predicted to write it too. Without ``record``
    every breakpoint is predicted to be a write, which over-reserves and is safe.

    The cache is per model (the exact model id is part of the key; an alias and
    its dated id count as different models) and per organization: use one
    predictor per API key. Memory is bounded: at most ``max_entries`` entries,
    least recently used first out, expired entries dropped first.

    >>> p = PromptCachePredictor()
    >>> body = {"model": "claude-sonnet-4-5", "max_tokens": 100, "system": [
    ...     {"type": "text", "text": "x" * 8000, "cache_control": {"type": "ephemeral"}}],
    ...     "messages": [{"role": "user", "content": "hi"}]}
    >>> p.predict(body, now=0.0)
    CachePrediction(read_tokens=0, write_tokens=2290, write_1h_tokens=0)
    >>> p.record(body, now=1.0)  # the response started
    >>> p.predict(body, now=200.0)
    CachePrediction(read_tokens=2290, write_tokens=0, write_1h_tokens=0)
    >>> p.predict(body, now=302.0).read_tokens  # written at 1.0, 5 minutes TTL
    0
    """

    def __init__(self, *, max_entries: int = 4096) -> None:
        if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 1:
            raise bad("max_entries", "a positive integer", max_entries)
        self._max_entries = max_entries
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def predict(self, body: Mapping[str, Any], now: float) -> CachePrediction:
        """The cache split ``body`` is predicted to get if sent at ``now``.

        Token counts here are the uncalibrated character estimate; a
        :class:`~ratekeeper.TokenEstimator` that holds this predictor uses its calibrated ones.
        """
        scan = scan_body(body)
        return self._predict(Layout.of(scan, token_counter(1.0 / scan.profile.chars_per_token)), now)

    def record(self, request: _HasCache | CachePrediction | Mapping[str, Any], now: float) -> None:
        """Note that ``request``'s response started at ``now``: its prefixes are cached from now on.

        Takes the :class:`~ratekeeper.Estimate` or :class:`CachePrediction` made for the
        request (cheapest), or the body itself. Prefixes it read are refreshed;
        prefixes at its breakpoints long enough to cache are written (or refreshed).
        """
        if isinstance(request, CachePrediction):
            prediction = request
        elif isinstance(request, Mapping):
            prediction = self.predict(request, now)
        else:
            prediction = request.cache
        if not prediction._touch:
            return  # nothing to cache (no breakpoint long enough) and nothing read
        with self._lock:
            for key, ttl in prediction._touch:
                entry = self._entries.get(key)
                if ttl is None:  # a lookback hit: refresh with the TTL it was written with
                    if entry is None or entry.expires_at <= now:
                        continue
                    ttl = entry.ttl
                if entry is None:
                    self._entries[key] = _Entry(now + ttl, ttl)
                else:
                    # Never shorten: a clock that runs backwards must not expire anything early.
                    entry.expires_at = max(entry.expires_at, now + ttl)
                    entry.ttl = max(entry.ttl, ttl)
                    self._entries.move_to_end(key)
            self._prune(now)

    def clear(self) -> None:
        """Forget every cached prefix."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<PromptCachePredictor entries={len(self._entries)} max_entries={self._max_entries}>"

    def _predict(self, layout: Layout, now: float) -> CachePrediction:
        read = 0
        touch: list[tuple[int, float | None]] = []
        for bp in layout.breakpoints:
            for key, tokens in bp.candidates:  # longest prefix first
                if tokens <= read:
                    break
                entry = self._entries.get(key)
                if entry is not None and entry.expires_at > now:
                    read = tokens
                    touch.append((key, None))
                    break
        write = write_1h = 0
        upto = read
        for bp in layout.breakpoints:
            if bp.tokens < layout.min_cacheable:
                continue  # too short to cache: plain input, and nothing to remember
            touch.append((bp.candidates[0][0], bp.ttl))
            if bp.tokens > upto:
                write += bp.tokens - upto
                if bp.ttl >= _ONE_HOUR:
                    write_1h += bp.tokens - upto
                upto = bp.tokens
        return CachePrediction(read, write, write_1h, tuple(touch))

    def _prune(self, now: float) -> None:
        if len(self._entries) <= self._max_entries:
            return
        for key in [k for k, e in self._entries.items() if e.expires_at <= now]:
            del self._entries[key]
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
