"""Estimate what a Messages request will cost before it is sent (spec sections 2 and 9).

:class:`TokenEstimator` turns the counts of the body scan (``_body_scan``)
into tokens with a characters-per-token ratio per model family, corrected
online from the ``usage`` of real responses, splits them with the cache
predictor (``_cache_predict``) and returns a :class:`Estimate` holding the
``Demand`` the limiter reserves. Pure: time is an argument, nothing is read
from a clock or the network.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeAlias, final

import attrs

from ratekeeper.core._accounting import Demand, Usage
from ratekeeper.errors import ConfigurationError
from ratekeeper.estimate._body_fields import bad
from ratekeeper.estimate._body_scan import Layout, Scan, scan_body, token_counter
from ratekeeper.estimate._cache_predict import CachePrediction, PromptCachePredictor
from ratekeeper.estimate._profile import model_profile

__all__ = ["Calibration", "Estimate", "TokenCounter", "TokenEstimator"]

#: A user-supplied exact counter: takes the request body, returns its input tokens
#: (e.g. a wrapper around the API's ``count_tokens``, which ignores caching).
TokenCounter: TypeAlias = Callable[[Mapping[str, Any]], int]

# Calibration: factors outside [1/4, 4] mean a bug or a wrong family, not a tokenizer.
_MAX_LOG_FACTOR: Final = math.log(4.0)
# Before any observation a family's estimates are off by about this much (log scale, ~5%).
_COLD_LOG_ERROR: Final = 0.05
# The reservation's margin: this many typical errors.
_MARGIN_ERRORS: Final = 2.0
_NO_CACHE: Final = CachePrediction()


@final
@attrs.frozen
class Estimate:
    """What one request is expected to cost, and what calibration needs to learn from it.

    ``demand`` is the best estimate; ``reserved`` what the limiter reserves: the
    same with the uncached input raised by ``margin``, two typical calibration
    errors of the family, so that a request admitted the moment a bucket holds
    its estimate is not refused for the estimate's error (settlement gives the
    difference back). ``text_tokens`` is the raw character-based part
    (characters / the family's characters per token, before calibration);
    ``fixed_tokens`` the part not derived from characters (images, PDF pages,
    framing); ``factor`` the calibration factor applied to ``text_tokens``;
    ``counted_tokens`` the exact counter's answer, if one is set (then there is
    no margin).
    """

    demand: Demand
    model: str
    family: str
    text_tokens: float
    fixed_tokens: int
    factor: float
    counted_tokens: int | None
    thinking: bool
    cache: CachePrediction
    margin: float = 1.0
    # ``reserved`` when made by the estimator (attrs.evolve costs ~6 us a request)
    _reserved: Demand | None = attrs.field(default=None, eq=False, repr=False, alias="_reserved")

    @property
    def reserved(self) -> Demand:
        """``demand`` with its uncached input times ``margin`` (rounded up)."""
        if self._reserved is not None:
            return self._reserved
        d = self.demand
        if self.margin <= 1.0 or not d.input_tokens:
            return d
        return attrs.evolve(d, input_tokens=math.ceil(d.input_tokens * self.margin))

    @property
    def input_tokens(self) -> int:
        """Every predicted input token: uncached, cache reads and cache writes."""
        d = self.demand
        return d.input_tokens + d.cache_read_input_tokens + d.cache_creation_input_tokens


@final
@attrs.frozen
class Calibration:
    """A snapshot of what a :class:`TokenEstimator` has learned about one model family.

    ``factor`` multiplies the character-based token estimate (1.0 before any
    observation); ``output_ratio`` is the expected share of ``max_tokens``
    actually produced, without and with extended thinking.
    """

    family: str
    factor: float = 1.0
    observations: int = 0
    output_ratio: float = 1.0
    output_observations: int = 0
    thinking_output_ratio: float = 1.0
    thinking_output_observations: int = 0


@attrs.define
class _Learned:
    log_factor: float = 0.0
    observations: int = 0
    # the typical size of a calibration error (mean absolute log error), for the margin
    log_error: float = _COLD_LOG_ERROR
    # index 0: without thinking, 1: with thinking
    output_ratio: list[float] = attrs.Factory(lambda: [1.0, 1.0])
    output_observations: list[int] = attrs.Factory(lambda: [0, 0])


def _demand(
    fresh: int, max_tokens: int, read: int, write: int, write_1h: int, expected: int, priority: bool
) -> Demand:
    """``Demand(fresh, max_tokens, read, write, write_1h, expected, priority)``, built directly
    when every count is a plain ``int`` its converter would keep as it is.

    (The converters check each of seven fields, ~10 us a ``Demand``, two a request, for
    counts this module computed itself; anything else still goes through them.)
    """
    if (
        type(fresh) is int
        and type(expected) is int
        and 0 <= fresh <= _PLAIN_COUNT
        and 0 <= max_tokens <= _PLAIN_COUNT
        and 0 <= read <= _PLAIN_COUNT
        and 0 <= write <= _PLAIN_COUNT
        and 0 <= write_1h <= _PLAIN_COUNT
        and 0 <= expected <= _PLAIN_COUNT
        and type(max_tokens) is int
        and type(read) is int
        and type(write) is int
        and type(write_1h) is int
    ):
        demand: Demand = object.__new__(Demand)
        put = object.__setattr__  # how attrs itself fills a frozen instance
        put(demand, "input_tokens", fresh)
        put(demand, "max_tokens", max_tokens)
        put(demand, "cache_read_input_tokens", read)
        put(demand, "cache_creation_input_tokens", write)
        put(demand, "cache_creation_1h_input_tokens", write_1h)
        put(demand, "expected_output_tokens", expected)
        put(demand, "priority", priority)
        put(demand, "credits", 0.0)
        return demand
    return Demand(fresh, max_tokens, read, write, write_1h, expected, priority)


# Counts above this take ``Usage.from_any``, which says why a count too big for a float is wrong.
_PLAIN_COUNT: Final = 10**15
_USAGE_COUNTS: Final = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)
_SPLIT_COUNTS: Final = ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens")


def _plain_count(value: object) -> bool:
    return value is None or (type(value) is int and 0 <= value <= _PLAIN_COUNT)


def _plain_usage(usage: object) -> tuple[int, int] | None:
    """Total input and output of a usage dict of plain counts (what the API sends), as
    ``Usage.from_any`` reads them; None for anything else, which ``from_any`` then checks.

    (``from_any`` builds and validates six fields, ~10 us, for the two that calibration reads.)
    """
    if type(usage) is not dict:
        return None
    get = usage.get
    uncached, written, read, output = values = [get(name) for name in _USAGE_COUNTS]
    for value in values:  # _plain_count inlined: four calls a response
        if value is not None and (type(value) is not int or not 0 <= value <= _PLAIN_COUNT):
            return None
    split = get("cache_creation")
    if split is not None and (
        type(split) is not dict or not all(_plain_count(split.get(n)) for n in _SPLIT_COUNTS)
    ):
        return None
    return (uncached or 0) + (written or 0) + (read or 0), output or 0


def _counted(
    counter: TokenCounter, body: Mapping[str, Any], tokens: Callable[[int, int], int], estimated_total: int
) -> tuple[int, Callable[[int, int], int]]:
    """The exact counter's total for ``body``, and ``tokens`` scaled so the prefixes add up to it.

    Raises ``ConfigurationError`` when the counter answers anything but a non-negative integer.
    """
    counted = counter(body)
    if not isinstance(counted, int) or isinstance(counted, bool) or counted < 0:
        raise bad("the token counter's result", "a non-negative integer", counted)

    def layout_tokens(chars: int, fixed: int) -> int:
        # The counter knows only the total: prefixes keep their estimated share,
        # rounded down so a read is never predicted bigger than it is.
        return counted * tokens(chars, fixed) // estimated_total if estimated_total else 0

    return counted, layout_tokens


def _rate(observations: int, floor: float) -> float:
    # 1/(n+1) is the running mean, which converges fastest from a cold start;
    # the floor turns it into an EWMA that keeps following a drifting ratio.
    return max(1.0 / (observations + 1), floor)


@final
class TokenEstimator:
    """Estimates a Messages request body into a :class:`~ratekeeper.Demand`, and learns from usage.

    ``estimate(body, now)`` counts the body (``docs/estimation.md`` has the
    rules), converts characters to tokens with the model family's ratio times
    its learned correction factor, and splits the result with the cache
    predictor. ``observe(estimate, usage)`` compares the estimate with the
    response's actual usage and updates the family's factor and its expected
    output ratio.

    ``counter``, if given, is called with the body and its answer replaces the
    character estimate (the cache predictor still splits it). ``priority_tier``
    says the organization has Priority Tier capacity, so requests not sent with
    ``service_tier="standard_only"`` draw on it. ``learning_rate_floor`` is the
    weight of a new observation once the first ones are averaged in.

    >>> est = TokenEstimator()
    >>> e = est.estimate({"model": "claude-sonnet-4-5", "max_tokens": 1024,
    ...                   "messages": [{"role": "user", "content": "x" * 350}]}, now=0.0)
    >>> e.demand.input_tokens, e.demand.max_tokens, e.family
    (107, 1024, 'sonnet-4')
    """

    def __init__(
        self,
        *,
        counter: TokenCounter | None = None,
        predictor: PromptCachePredictor | None = None,
        priority_tier: bool = False,
        learning_rate_floor: float = 0.1,
    ) -> None:
        if not 0.0 < learning_rate_floor <= 1.0:
            raise bad("learning_rate_floor", "in (0, 1]", learning_rate_floor)
        self._counter = counter
        self._predictor = predictor if predictor is not None else PromptCachePredictor()
        self._priority_tier = priority_tier
        self._floor = learning_rate_floor
        self._learned: dict[str, _Learned] = {}
        self._lock = threading.Lock()

    @property
    def predictor(self) -> PromptCachePredictor:
        """The cache predictor; call its ``record`` when a response starts."""
        return self._predictor

    @staticmethod
    def family_of(model: str) -> str:
        """The calibration family of ``model``: its model class, split where the tokenizer differs.

        >>> TokenEstimator.family_of("claude-opus-4-1"), TokenEstimator.family_of("claude-opus-4-7")
        ('opus-4', 'opus-4.7')
        """
        return model_profile(model).family

    def estimate(self, body: Mapping[str, Any], now: float) -> Estimate:
        """Estimate ``body`` (the JSON the SDK sends) as if sent at ``now``.

        Raises ``ConfigurationError`` naming the field when the body is
        malformed, and ``UnknownModelError`` for a model no preset knows.
        """
        return self._from_scan(scan_body(body), body, now)

    def _from_scan(self, scan: Scan, body: Mapping[str, Any], now: float) -> Estimate:
        """``estimate`` of a body already scanned (the middleware scans a request once for all its attempts).

        Only the scan is reused: the calibration, the counter and the cache
        prediction are applied anew, since they change between attempts.
        """
        profile = scan.profile
        with self._lock:
            learned = self._learned.get(profile.family) or _Learned()
            factor = math.exp(learned.log_factor)
            margin = math.exp(_MARGIN_ERRORS * learned.log_error)
            ratio = learned.output_ratio[scan.thinking]
        tokens = token_counter(factor / profile.chars_per_token)
        total = tokens(scan.text_chars, scan.fixed_tokens)
        counted = None
        layout_tokens = tokens
        if self._counter is not None:  # opt-in: without a counter no call is added per request
            counted, layout_tokens = _counted(self._counter, body, tokens, total)
            total, margin = counted, 1.0  # exact: no margin for estimation errors
        if scan.breakpoints:
            cache = self._predictor._predict(Layout.of(scan, layout_tokens), now)
        else:
            cache = _NO_CACHE  # what _predict gives a layout without breakpoints
        expected = min(scan.max_tokens, math.ceil(ratio * scan.max_tokens))
        fresh = total - cache.read_tokens - cache.write_tokens
        priority = self._priority_tier and scan.priority_requested
        demand = _demand(
            fresh,
            scan.max_tokens,
            cache.read_tokens,
            cache.write_tokens,
            cache.write_1h_tokens,
            expected,
            priority,
        )
        reserved = demand
        if margin > 1.0 and fresh:
            reserved = _demand(
                math.ceil(fresh * margin),
                scan.max_tokens,
                cache.read_tokens,
                cache.write_tokens,
                cache.write_1h_tokens,
                expected,
                priority,
            )
        return Estimate(
            demand=demand,
            model=scan.model,
            family=profile.family,
            text_tokens=scan.text_chars / profile.chars_per_token,
            fixed_tokens=scan.fixed_tokens,
            factor=factor,
            counted_tokens=counted,
            thinking=scan.thinking,
            cache=cache,
            margin=margin,
            _reserved=reserved,
        )

    def observe(self, estimate: Estimate, usage: object) -> None:
        """Learn from the actual ``usage`` (an SDK ``Usage``, a mapping or a ``Usage``) of a request.

        The input correction is weighted by the text share of the estimate, so
        image- and PDF-heavy requests barely move a ratio they say little about.
        """
        counts = _plain_usage(usage)
        if counts is None:
            try:
                actual = Usage.from_any(usage)
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(f"usage is not a usage object or mapping: {exc}") from exc
            counts = actual.total_input_tokens, actual.output_tokens
        total, output = counts
        with self._lock:
            learned = self._learned.get(estimate.family)
            if learned is None:  # (not setdefault: it would build one for every response)
                learned = self._learned[estimate.family] = _Learned()
            text = estimate.text_tokens
            if total > 0 and text >= 1.0:
                seen = max(total - estimate.fixed_tokens, 1) / text
                target = min(max(math.log(seen), -_MAX_LOG_FACTOR), _MAX_LOG_FACTOR)
                weight = text / (text + estimate.fixed_tokens)
                rate = _rate(learned.observations, self._floor) * weight
                if learned.observations:
                    # this estimate's error, before learning from it; the first one (the
                    # uncalibrated ratio's) says nothing of how calibrated estimates miss
                    miss = abs(target - learned.log_factor)
                    error_rate = _rate(learned.observations - 1, self._floor) * weight
                    learned.log_error = (1.0 - error_rate) * learned.log_error + error_rate * miss
                # (1 - r) * x + r * t, not x + r * (t - x): exact at r = 1.
                learned.log_factor = (1.0 - rate) * learned.log_factor + rate * target
                learned.observations += 1
            max_tokens = estimate.demand.max_tokens
            if max_tokens > 0:
                i = int(estimate.thinking)
                share = min(output / max_tokens, 1.0)
                rate = _rate(learned.output_observations[i], self._floor)
                learned.output_ratio[i] = (1.0 - rate) * learned.output_ratio[i] + rate * share
                learned.output_observations[i] += 1

    def calibration(self, family: str) -> Calibration:
        """What has been learned about ``family`` so far (defaults if nothing)."""
        with self._lock:
            learned = self._learned.get(family)
            if learned is None:
                return Calibration(family)
            return Calibration(
                family,
                math.exp(learned.log_factor),
                learned.observations,
                learned.output_ratio[0],
                learned.output_observations[0],
                learned.output_ratio[1],
                learned.output_observations[1],
            )

    def __repr__(self) -> str:
        families = ", ".join(
            f"{name}: x{math.exp(learned.log_factor):.3f} ({learned.observations})"
            for name, learned in sorted(self._learned.items())
        )
        return f"<TokenEstimator counter={self._counter is not None} families={{{families}}}>"
