"""Model ids to model classes: the built-in table, ``register_model``'s additions, and a memo.

A model class is what the presets give limits to and what picks a model's pool;
every spelling of a model id (dated, ``-latest``, dotted, provider-prefixed,
Bedrock, Vertex) comes down to one.

>>> resolve_model("anthropic/claude-opus-4.6")
'opus-4'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from ratekeeper.errors import ConfigurationError, UnknownModelError

__all__ = [
    "MAX_REMEMBERED_IDS",
    "model_classes",
    "register_model",
    "resolve_model",
]

# (family, version) -> model class. A minor version 0 is written without it.
_BUILTIN: Final[Mapping[tuple[str, str], str]] = {
    ("opus", "4"): "opus-4",
    ("opus", "4.1"): "opus-4",
    ("opus", "4.5"): "opus-4",
    ("opus", "4.6"): "opus-4",
    ("opus", "4.7"): "opus-4",
    ("opus", "4.8"): "opus-4",
    ("sonnet", "4"): "sonnet-4",
    ("sonnet", "4.5"): "sonnet-4",
    ("sonnet", "4.6"): "sonnet-4",
    ("sonnet", "5"): "sonnet-5",
    ("sonnet", "3.7"): "sonnet-3.7",
    ("haiku", "4.5"): "haiku-4.5",
    ("haiku", "3.5"): "haiku-3.5",
    ("haiku", "3"): "haiku-3",
    ("opus", "3"): "opus-3",
    ("fable", "5"): "fable-5",
}
_BUILTIN_CLASSES: Final = tuple(sorted(set(_BUILTIN.values())))

_FAMILY: Final = r"(?P<family>opus|sonnet|haiku|fable)"
_MAJOR_MINOR: Final = r"(?P<major>[0-9]{1,2})(?:-(?P<minor>[0-9]{1,2}))?"
_NEW_FORM: Final = re.compile(rf"claude-{_FAMILY}-{_MAJOR_MINOR}")
_OLD_FORM: Final = re.compile(rf"claude-{_MAJOR_MINOR}-{_FAMILY}")

_registered_ids: dict[str, str] = {}
_registered_patterns: list[tuple[re.Pattern[str], str]] = []
# bumped by register_model (after it changes the registry), so the memo below is rebuilt
_registrations = 0

#: The most ids a memo of answers about model ids holds: the ids come from callers, so
#: each such memo is emptied when full (as the Limiter's maps are at its MAX_REMEMBERED).
MAX_REMEMBERED_IDS: Final = 1024

# resolve_model's answers (~10 us each: normalizing, the registry, the class list), valid for
# the registry they were made with; kept with it, so a registry put back (tests swap them)
# is never mistaken for the one the answers came from
_resolved: dict[str, str] = {}
_resolved_for: tuple[object, object, int] = (_registered_ids, _registered_patterns, _registrations)


def _normalize(model: str) -> str:
    """Strip prefixes, suffixes and dots: ``anthropic/claude-3.7-sonnet`` -> ``claude-3-7-sonnet``."""
    s = model.strip().lower().rsplit("/", 1)[-1]  # anthropic/..., openrouter-style prefixes
    s = re.sub(r"^(?:[a-z0-9_-]+\.)*(?=claude)", "", s)  # Bedrock: us.anthropic.claude-...
    s = re.sub(r"@[0-9]{8}$", "", s)  # Vertex: claude-opus-4@20250514
    s = re.sub(r"-v[0-9]+(?::[0-9]+)?$", "", s)  # Bedrock: ...-v1:0
    s = s.replace(".", "-")
    return re.sub(r"-(?:latest|[0-9]{8})$", "", s)  # an 8-digit date is never a minor version


def _registered(lowered: str, normalized: str) -> str | None:
    for candidate in (lowered, normalized):
        if candidate in _registered_ids:
            return _registered_ids[candidate]
    for pattern, cls in reversed(_registered_patterns):
        if pattern.fullmatch(lowered) or pattern.fullmatch(normalized):
            return cls
    return None


def model_classes() -> tuple[str, ...]:
    """Every known model class id, sorted, including classes added by :func:`register_model`.

    >>> model_classes()[:3]
    ('fable-5', 'haiku-3', 'haiku-3.5')
    """
    extra = set(_registered_ids.values()) | {cls for _, cls in _registered_patterns}
    return tuple(sorted(set(_BUILTIN_CLASSES) | extra))


def resolve_model(model: str) -> str:
    """The model class id of ``model``, e.g. ``"sonnet-4"`` for ``"claude-sonnet-4-5-20250929"``.

    Accepts bare, dated and ``-latest`` ids, the older version-first form
    (``claude-3-5-haiku-20241022``), dotted and provider-prefixed ids
    (``anthropic/claude-sonnet-4.6``), Bedrock and Vertex spellings, and a class
    id itself, case-insensitively. Ids added by :func:`register_model` are tried
    first. Anything else raises ``UnknownModelError``.

    >>> resolve_model("claude-3-7-sonnet-latest"), resolve_model("CLAUDE-OPUS-4-20250514")
    ('sonnet-3.7', 'opus-4')
    """
    global _resolved, _resolved_for
    owner = _resolved_for
    if owner[0] is not _registered_ids or owner[1] is not _registered_patterns or owner[2] != _registrations:
        # a registration since: answer anew (a thread still holding the old memo fills only that)
        _resolved_for = (_registered_ids, _registered_patterns, _registrations)
        _resolved = {}
    memo = _resolved
    cls = memo.get(model)
    if cls is None:
        cls = _resolve(model)  # an unknown id raises, and is not remembered
        if len(memo) >= MAX_REMEMBERED_IDS:
            memo.clear()
        memo[model] = cls
    return cls


def _resolve(model: str) -> str:
    lowered = model.strip().lower()
    normalized = _normalize(model)
    found = _registered(lowered, normalized)
    if found is not None:
        return found
    if lowered in model_classes():
        return lowered
    m = _NEW_FORM.fullmatch(normalized) or _OLD_FORM.fullmatch(normalized)
    if m is None:
        raise UnknownModelError(model, model_classes())
    minor = m["minor"]
    version = str(int(m["major"])) + (f".{int(minor)}" if minor and int(minor) else "")
    cls = _BUILTIN.get((m["family"], version))
    if cls is None:
        name = f"Claude {m['family'].capitalize()} {version}"
        raise UnknownModelError(model, model_classes(), f"{name} has no model class; see register_model()")
    return cls


def register_model(pattern_or_id: str | re.Pattern[str], model_class: str) -> None:
    """Map more model ids to a model class, at run time; later registrations win.

    A string is an exact id, compared case-insensitively both with the id as
    given and with its normalized form (provider prefix, ``-latest`` and date
    suffixes stripped, dots written as dashes), so registering
    ``"claude-sonnet-4-7"`` also covers ``anthropic/claude-sonnet-4.7`` and
    ``claude-sonnet-4-7-20270101``. A compiled pattern must match the whole
    lower-cased id or its normalized form. ``model_class`` may be a new class: it then has its own pool, named
    after it, and no preset has limits for it (take them from response headers).

    >>> register_model("claude-sonnet-4-7", "sonnet-4")
    >>> resolve_model("anthropic/claude-sonnet-4.7")
    'sonnet-4'
    """
    global _registrations
    cls = model_class.strip().lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", cls):
        raise ConfigurationError(
            f"invalid model class {model_class!r}: use lower-case letters, digits, '.', '-' and '_'"
        )
    if isinstance(pattern_or_id, re.Pattern):
        _registered_patterns.append((pattern_or_id, cls))
    else:
        key = pattern_or_id.strip().lower()
        if not key:
            raise ConfigurationError("register_model needs a non-empty model id")
        _registered_ids[key] = cls
        _registered_ids[_normalize(key)] = cls
    _registrations += 1  # after the change: a memo made from here on sees it
