"""The simulated workload: what each request looks like, decided by the seed alone.

Every strategy of a run replays the same numbered requests: request ``i``'s
prompt, its size and how many output tokens the emulated model will produce
are a function of ``(seed, i)`` only, so strategies differ in when they send,
never in what they send.

Prompts are English-like prose sized under the emulator's own tokenizer (the
server's truth, not the client's estimate), so a client-side estimator has the
real, content-dependent error it would have in production. A cache-hit ratio
is made with a shared system prefix marked ``cache_control``: once the first
response that wrote it begins, every request reads it from the cache.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Mapping
from typing import Any, Final, final

import attrs

from ratekeeper.emulator._models import model_traits
from ratekeeper.emulator._tokens import count_request, count_text
from ratekeeper.errors import ConfigurationError

__all__ = ["OUTPUT_TOKENS_HEADER", "SIM_ID_HEADER", "RequestPlan", "Workload", "WorkloadGenerator"]

#: Per-request header the emulator reads to decide how many output tokens to produce.
OUTPUT_TOKENS_HEADER: Final = "x-emulator-output-tokens"
#: Per-request header naming the simulated request, to join attempts to the request they serve.
SIM_ID_HEADER: Final = "x-simulate-request"

_WORDS: Final = (
    "the a of and to in is that for it as with on be by this are from at or an not have which one all "
    "but can more will their has its they been when there use time may other these some than into only "
    "would each like also should first most over must such where both before while between through "
    "request limit token bucket server client minute second window answer header model prompt output "
    "input cache budget traffic program worker queue retry latency capacity refill reservation "
    "organization throughput estimate measure settlement admission enforcement interval response "
    "steady burst shared pool measured quickly carefully usually although however therefore because "
    "system message content stream result failure success deadline schedule"
)
_VOCABULARY: Final = tuple(_WORDS.split())
_CORPUS_WORDS: Final = 40_000


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(message)


@final
@attrs.frozen(kw_only=True)
class Workload:
    """What the simulated program sends.

    ``concurrency`` workers each send requests back to back (a closed loop);
    ``arrival_rate`` adds an open-loop stream of that many requests per minute
    (Poisson arrivals), each served by its own task. ``prompt_tokens`` is the
    mean total input; ``cache_hit_ratio`` of it is a shared system prefix that
    is read from the prompt cache once written (it must reach the model's
    minimum cacheable length); the rest is drawn uniformly within
    ``+/- prompt_spread`` of its mean (relative). The model produces ``max_tokens * output_ratio`` tokens
    on average, drawn uniformly within ``+/- output_spread`` of that (relative)
    and capped at ``max_tokens``.
    """

    model: str = "claude-sonnet-4-5"
    concurrency: int = 8
    arrival_rate: float = 0.0
    prompt_tokens: int = 2000
    prompt_spread: float = 0.5
    max_tokens: int = 1024
    output_ratio: float = 0.5
    output_spread: float = 0.25
    cache_hit_ratio: float = 0.0
    stream: bool = False
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        _check(self.concurrency >= 0, f"concurrency must be >= 0, got {self.concurrency!r}")
        _check(self.arrival_rate >= 0, f"arrival_rate must be >= 0, got {self.arrival_rate!r}")
        _check(
            self.concurrency > 0 or self.arrival_rate > 0,
            "the workload sends nothing: give concurrency > 0 or arrival_rate > 0",
        )
        _check(self.prompt_tokens >= 16, f"prompt_tokens must be >= 16, got {self.prompt_tokens!r}")
        _check(0 <= self.prompt_spread < 1, f"prompt_spread must be in [0, 1), got {self.prompt_spread!r}")
        _check(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens!r}")
        _check(0 < self.output_ratio <= 1, f"output_ratio must be in (0, 1], got {self.output_ratio!r}")
        _check(0 <= self.output_spread < 1, f"output_spread must be in [0, 1), got {self.output_spread!r}")
        _check(
            0 <= self.cache_hit_ratio < 1, f"cache_hit_ratio must be in [0, 1), got {self.cache_hit_ratio!r}"
        )
        if self.cache_hit_ratio > 0:
            minimum = model_traits(self.model).min_cache_tokens
            prefix = self.cached_prefix_tokens
            _check(
                prefix >= minimum,
                f"a cache_hit_ratio of {self.cache_hit_ratio:g} of {self.prompt_tokens} prompt tokens is a "
                f"{prefix}-token prefix, below {self.model}'s minimum cacheable {minimum}; "
                "raise prompt_tokens or cache_hit_ratio",
            )
            _check(
                self.prompt_tokens - prefix >= 16,
                f"a cache_hit_ratio of {self.cache_hit_ratio:g} leaves under 16 uncached tokens per prompt",
            )

    @property
    def cached_prefix_tokens(self) -> int:
        """Tokens of the shared, cached system prefix (0 without caching)."""
        return round(self.prompt_tokens * self.cache_hit_ratio)


@final
@attrs.frozen
class RequestPlan:
    """One numbered request: its body, and the counts the emulator will find for it.

    ``input_tokens`` is the server's count of the whole input (cached prefix
    included); ``prefix_tokens`` the part the cache can serve;
    ``output_tokens`` what the model will produce.
    """

    index: int
    body: Mapping[str, Any]
    input_tokens: int
    prefix_tokens: int
    output_tokens: int
    stream: bool

    def headers(self) -> dict[str, str]:
        """The per-request headers: the output the emulator produces, and the request's number."""
        return {OUTPUT_TOKENS_HEADER: str(self.output_tokens), SIM_ID_HEADER: str(self.index)}


@functools.cache
def _corpus(seed: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Seeded prose: words with their punctuation, and the running token count before each."""
    rng = random.Random(f"corpus-{seed}")
    words: list[str] = []
    sentence = 0
    for _ in range(_CORPUS_WORDS):
        word = rng.choice(_VOCABULARY)
        if sentence == 0:
            word = word.capitalize()
        sentence += 1
        if sentence >= 6 and rng.random() < 0.12:
            word += "."
            sentence = 0
        elif sentence >= 3 and rng.random() < 0.06:
            word += ","
        words.append(word)
    running = [0]
    for word in words:
        running.append(running[-1] + count_text(word))
    return tuple(words), tuple(running)


def _prose(seed: int, start: int, tokens: int, lead: str) -> str:
    """``lead`` followed by prose from the corpus, exactly ``tokens`` base tokens in all.

    Words are joined by single spaces, which the tokenizer does not count, so
    the count is additive and can be hit exactly (padding with one-token words).
    """
    words, running = _corpus(seed)
    need = tokens - count_text(lead)
    parts = [lead] if lead else []
    if need > 0:
        n = len(words)
        # the corpus wraps around for very long prompts
        got = 0
        i = start % n
        while got < need:
            word = words[i]
            cost = running[i + 1] - running[i]
            if got + cost > need:
                break
            parts.append(word)
            got += cost
            i += 1
            if i == n:
                i = 0
        parts.extend(["a"] * (need - got))
    return " ".join(parts)


@final
class WorkloadGenerator:
    """Builds (and remembers) the numbered requests of a ``Workload``.

    >>> gen = WorkloadGenerator(Workload(prompt_tokens=500, max_tokens=200, seed=1))
    >>> plan = gen.request(0)
    >>> 250 <= plan.input_tokens <= 750, 1 <= plan.output_tokens <= 200
    (True, True)
    """

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self._factor = model_traits(workload.model).token_factor
        self._plans: dict[int, RequestPlan] = {}
        self._system = self._build_system()

    def _base(self, tokens: float) -> int:
        # the server multiplies a segment's base count by the family factor and rounds up
        return max(1, math.floor(tokens / self._factor))

    def _build_system(self) -> list[dict[str, Any]] | None:
        prefix = self.workload.cached_prefix_tokens
        if prefix <= 0:
            return None
        text = _prose(self.workload.seed, 0, self._base(prefix), "Shared instructions.")
        return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]

    def request(self, index: int) -> RequestPlan:
        """Request number ``index`` (the same for every strategy of a run)."""
        plan = self._plans.get(index)
        if plan is None:
            plan = self._plans[index] = self._build(index)
        return plan

    def _build(self, index: int) -> RequestPlan:
        w = self.workload
        rng = random.Random(f"request-{w.seed}-{index}")
        prefix = w.cached_prefix_tokens
        uncached = (w.prompt_tokens - prefix) * (1 + w.prompt_spread * (2 * rng.random() - 1))
        mean_out = w.max_tokens * w.output_ratio
        out = mean_out * (1 + w.output_spread * (2 * rng.random() - 1))
        output_tokens = max(1, min(w.max_tokens, round(out)))
        # the user message carries the uncached part, less the framing tokens
        user = self._base(uncached - 7)
        text = _prose(w.seed, rng.randrange(_CORPUS_WORDS), user, f"Task {index}:")
        body: dict[str, Any] = {
            "model": w.model,
            "max_tokens": w.max_tokens,
            "messages": [{"role": "user", "content": text}],
        }
        if self._system is not None:
            body["system"] = self._system
        counted = count_request(body, w.model, self._factor)
        prefix_tokens = counted.segments[0].tokens if self._system is not None else 0
        return RequestPlan(
            index=index,
            body=body,
            input_tokens=counted.total,
            prefix_tokens=prefix_tokens,
            output_tokens=output_tokens,
            stream=w.stream,
        )
