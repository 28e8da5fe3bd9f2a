"""What estimation knows of a model from its id: family, tokenizer ratio, cache minimum, tool prompt.

The model class (``core._model_ids``) names the calibration family; the version
picks the tokenizer, the minimum cacheable length and the tool-use system
prompt, which vary inside a class. The figures approximate the API's;
``docs/estimation.md`` says where each comes from.
"""

from __future__ import annotations

import re
from typing import Final, final

import attrs

from ratekeeper.core._model_ids import MAX_REMEMBERED_IDS, _normalize, resolve_model

__all__ = ["CLASSIC_CHARS_PER_TOKEN", "NEW_TOKENIZER_CHARS_PER_TOKEN", "Profile", "model_profile"]

#: The docs' rule of thumb for English text (spec section 9).
CLASSIC_CHARS_PER_TOKEN: Final = 3.5
#: Opus 4.7+, Sonnet 5 and Fable 5 tokenize the same text into ~30% more tokens.
NEW_TOKENIZER_CHARS_PER_TOKEN: Final = CLASSIC_CHARS_PER_TOKEN / 1.3


@attrs.frozen
class _Generation:
    tier: str
    since: tuple[int, int]
    min_cacheable: int
    new_tokenizer: bool
    #: The tool-use system prompt the API adds: (tool_choice auto/none, any/tool).
    tool_prompt: tuple[int, int] = (346, 313)
    #: A calibration family of its own inside the model class (a different tokenizer).
    family: str | None = None


# Newest first within a tier; a version belongs to the first row it reaches.
# Minimum cacheable lengths that are not published (the newer models) take the
# largest known value: predicting "not cached" only over-reserves.
_GENERATIONS: Final[tuple[_Generation, ...]] = (
    _Generation("opus", (4, 7), 4096, True, family="opus-4.7"),
    _Generation("opus", (4, 5), 4096, False),
    _Generation("opus", (4, 0), 1024, False),
    _Generation("opus", (3, 0), 1024, False, tool_prompt=(530, 281)),
    _Generation("sonnet", (5, 0), 4096, True),
    _Generation("sonnet", (4, 6), 2048, False),
    _Generation("sonnet", (3, 7), 1024, False),
    _Generation("haiku", (4, 5), 4096, False),
    _Generation("haiku", (3, 0), 2048, False, tool_prompt=(264, 340)),
    _Generation("fable", (5, 0), 4096, True),
)
_UNKNOWN_GENERATION: Final = _Generation("", (0, 0), 4096, True)

_NEW_FORM: Final = re.compile(r"(?:^|-)(opus|sonnet|haiku|fable)-(\d{1,2})(?:-(\d{1,2}))?(?=-|$)")
_OLD_FORM: Final = re.compile(r"(?:^|-)(\d{1,2})(?:-(\d{1,2}))?-(opus|sonnet|haiku)(?=-|$)")


@final
@attrs.frozen
class Profile:
    """What estimation needs to know about a model: family, tokenizer ratio, cache minimum, tool prompt."""

    family: str
    chars_per_token: float
    min_cacheable: int
    tool_prompt: tuple[int, int]


def _generation(model: str) -> _Generation:
    normalized = _normalize(model)
    m = _NEW_FORM.search(normalized)
    if m is not None:
        tier, major, minor = m[1], m[2], m[3]
    else:
        m = _OLD_FORM.search(normalized)
        if m is None:
            return _UNKNOWN_GENERATION
        major, minor, tier = m[1], m[2], m[3]
    version = (int(major), int(minor or 0))
    for gen in _GENERATIONS:
        if gen.tier == tier and version >= gen.since:
            return gen
    return _UNKNOWN_GENERATION


# model id -> (its model class when profiled, the profile); see model_profile
_profiles: dict[str, tuple[str, Profile]] = {}


def model_profile(model: str) -> Profile:
    # The model class (shared with the presets) names the family; the version
    # picks the tokenizer and the minimum cacheable length, which vary inside a class.
    model_class = resolve_model(model)  # memoized there, and follows register_model
    hit = _profiles.get(model)
    if hit is not None and hit[0] == model_class:
        return hit[1]
    gen = _generation(model)
    profile = Profile(
        family=gen.family or model_class,
        chars_per_token=NEW_TOKENIZER_CHARS_PER_TOKEN if gen.new_tokenizer else CLASSIC_CHARS_PER_TOKEN,
        min_cacheable=gen.min_cacheable,
        tool_prompt=gen.tool_prompt,
    )
    if len(_profiles) >= MAX_REMEMBERED_IDS:
        _profiles.clear()  # ids come from callers: bounded
    _profiles[model] = (model_class, profile)
    return profile
