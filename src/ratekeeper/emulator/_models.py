"""What the emulated server knows about a model id: its tokenizer, cache threshold and price.

These are server-side facts (spec sections 8 and 9), kept apart from the
client's estimators on purpose: the emulator is the truth a client is
measured against.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, final

import attrs

__all__ = ["DEFAULT_PRICES", "ModelTraits", "Price", "display_model_id", "model_traits"]


@final
@attrs.frozen
class Price:
    """List price of a model class in USD per million tokens.

    Cache writes cost 1.25x (5 minutes) or 2x (1 hour) the input price and
    cache reads 0.1x, as on the real price list.
    """

    input: float
    output: float

    def cost_usd(
        self,
        *,
        input_tokens: int,
        cache_write_5m: int,
        cache_write_1h: int,
        cache_read: int,
        output_tokens: int,
    ) -> float:
        """The price of one request's usage, in USD."""
        weighted_in = input_tokens + 1.25 * cache_write_5m + 2.0 * cache_write_1h + 0.1 * cache_read
        return (weighted_in * self.input + output_tokens * self.output) / 1e6


#: Plausible list prices per model class (USD per million input / output tokens).
DEFAULT_PRICES: Final[Mapping[str, Price]] = {
    "opus-4": Price(15.0, 75.0),
    "opus-3": Price(15.0, 75.0),
    "sonnet-5": Price(3.0, 15.0),
    "sonnet-4": Price(3.0, 15.0),
    "sonnet-3.7": Price(3.0, 15.0),
    "haiku-4.5": Price(1.0, 5.0),
    "haiku-3.5": Price(0.8, 4.0),
    "haiku-3": Price(0.25, 1.25),
    "fable-5": Price(5.0, 25.0),
}


@attrs.frozen
class ModelTraits:
    """Server-side facts about one model id.

    ``token_factor`` multiplies the base token count (1.3 for the newer
    tokenizer of Opus 4.7+, Sonnet 5 and Fable 5); ``min_cache_tokens`` is the
    shortest prefix a ``cache_control`` breakpoint can cache.
    """

    family: str
    version: tuple[int, int]
    token_factor: float
    min_cache_tokens: int


_NEW_FORM: Final = re.compile(r"claude-(opus|sonnet|haiku|fable)-(\d{1,2})(?:-(\d{1,2}))?(?:-.*)?")
_OLD_FORM: Final = re.compile(r"claude-(\d{1,2})(?:-(\d{1,2}))?-(opus|sonnet|haiku|fable)(?:-.*)?")


def display_model_id(model: str) -> str:
    """The id the server echoes: provider prefix dropped, dots as dashes.

    >>> display_model_id("anthropic/claude-sonnet-4.6")
    'claude-sonnet-4-6'
    """
    return model.strip().rsplit("/", 1)[-1].replace(".", "-")


def _parse(model: str) -> tuple[str, tuple[int, int]]:
    s = display_model_id(model).lower()
    m = _NEW_FORM.fullmatch(s)
    if m is not None:
        minor = m[3] if m[3] is not None and len(m[3]) <= 2 else "0"
        return m[1], (int(m[2]), int(minor))
    m = _OLD_FORM.fullmatch(s)
    if m is not None:
        return m[3], (int(m[1]), int(m[2] or 0))
    return "unknown", (0, 0)


def _min_cache_tokens(family: str, version: tuple[int, int]) -> int:
    if family == "haiku":
        return 4096 if version >= (4, 5) else 2048
    if family == "opus" and version >= (4, 5):
        return 4096
    if family == "sonnet" and version >= (4, 6):
        return 2048
    if family == "fable":
        return 2048
    return 1024


def _new_tokenizer(family: str, version: tuple[int, int]) -> bool:
    return (family == "opus" and version >= (4, 7)) or (family in ("sonnet", "fable") and version >= (5, 0))


def model_traits(model: str, min_cache_overrides: Mapping[str, int] | None = None) -> ModelTraits:
    """The traits of ``model``; ``min_cache_overrides`` maps model ids to a cache threshold.

    >>> model_traits("claude-opus-4-7").token_factor
    1.3
    >>> model_traits("claude-3-5-haiku-20241022").min_cache_tokens
    2048
    """
    family, version = _parse(model)
    min_cache = _min_cache_tokens(family, version)
    if min_cache_overrides:
        min_cache = min_cache_overrides.get(display_model_id(model), min_cache)
    factor = 1.3 if _new_tokenizer(family, version) else 1.0
    return ModelTraits(family=family, version=version, token_factor=factor, min_cache_tokens=min_cache)
