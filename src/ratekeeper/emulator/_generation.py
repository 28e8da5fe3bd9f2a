"""When output appears: time to first token, then tokens at a steady, jittered rate."""

from __future__ import annotations

import bisect
import random

import attrs

from ratekeeper.emulator._config import LatencyModel

__all__ = ["Timeline", "make_timeline"]


@attrs.frozen
class Timeline:
    """Offsets (seconds after arrival) of one request's output.

    ``start`` is when the response begins (headers, ``message_start``);
    ``chunks`` lists ``(offset, cumulative tokens)`` at each content delta;
    ``end`` is when the last token is out.
    """

    start: float
    chunks: tuple[tuple[float, int], ...]
    end: float

    @property
    def output_tokens(self) -> int:
        """Tokens produced by the end."""
        return self.chunks[-1][1] if self.chunks else 0

    def produced_by(self, offset: float) -> int:
        """Tokens delivered at or before ``offset`` (whole chunks only)."""
        i = bisect.bisect_right([c[0] for c in self.chunks], offset + 1e-12)
        return self.chunks[i - 1][1] if i else 0

    def cut(self, n_chunks: int) -> Timeline:
        """The timeline stopped after ``n_chunks`` deltas (a stream that broke off)."""
        kept = self.chunks[:n_chunks]
        return Timeline(self.start, kept, kept[-1][0] if kept else self.start)


def _jittered(value: float, jitter: float, rng: random.Random) -> float:
    return value * (1.0 + jitter * (2.0 * rng.random() - 1.0)) if jitter else value


def make_timeline(output_tokens: int, latency: LatencyModel, rng: random.Random) -> Timeline:
    """A seeded timeline for ``output_tokens`` tokens under ``latency``."""
    ttft = _jittered(latency.ttft, latency.jitter, rng)
    tps = _jittered(latency.tokens_per_second, latency.jitter, rng)
    n = max(1, min(latency.max_delta_events, output_tokens))
    chunks: list[tuple[float, int]] = []
    for k in range(1, n + 1):
        cum = output_tokens * k // n
        if cum > (chunks[-1][1] if chunks else 0):
            chunks.append((ttft + cum / tps, cum))
    end = chunks[-1][0] if chunks else ttft
    return Timeline(ttft, tuple(chunks), end)
