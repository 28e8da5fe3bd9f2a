"""A body's fields checked and measured: errors that name the field, lengths as the API reads them.

A malformed field raises ``ConfigurationError`` naming its path
(``messages[2].content[0].text``); text is measured in UTF-8 bytes, any other
value as the length of its compact JSON, without building the JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from ratekeeper.errors import BodyFieldError

__all__ = ["bad", "json_len", "not_json", "too_deep"]

_MAX_TOKENS_LIMIT: Final = 1_000_000_000
_MAX_DEPTH: Final = 200


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def bad(path: str, expected: str, value: object) -> BodyFieldError:
    """The error for a field at ``path`` that is not ``expected``: its kind is logged, never its value."""
    return BodyFieldError(path, type(value).__name__, f"{path} must be {expected}, got {_show(value)}")


def too_deep(path: str) -> BodyFieldError:
    return BodyFieldError(path, "nested too deep", f"{path} is nested more than {_MAX_DEPTH} levels deep")


def not_json(path: str, value: object) -> BodyFieldError:
    kind = type(value).__name__
    return BodyFieldError(path, kind, f"{path} holds a {kind}, which is not a JSON value")


_SEQUENCES: Final = (list, tuple)  # a tuple of types: isinstance with a union is slower


def _text_len(s: str) -> int:
    # UTF-8 bytes, not code points: non-Latin scripts take more tokens per
    # character, and their byte length tracks that better. isascii() is O(1).
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


def _int_len(v: int) -> int:
    if v.bit_length() <= 256:
        return len(str(v))
    return int(v.bit_length() * 0.30103) + 2  # str() of a huge int is quadratic, and capped


def json_len(value: object, path: str, depth: int = 0) -> int:
    """The length of ``value`` as compact JSON, without building the JSON."""
    kind = type(value)
    if kind is dict or kind is list:  # the common containers, their str items inline
        if depth >= _MAX_DEPTH:
            raise too_deep(path)
        items: Any = value
        if kind is dict:
            n = 2 * len(items) + 1 if items else 2  # braces, colons and commas
            for k, v in items.items():
                if type(k) is str:
                    n += (len(k) if k.isascii() else _text_len(k)) + 2
                else:
                    n += json_len(str(k), path, depth + 1)
                if type(v) is str:
                    n += (len(v) if v.isascii() else _text_len(v)) + 2
                else:
                    n += json_len(v, path, depth + 1)
            return n
        n = max(len(items) + 1, 2)
        for v in items:
            if type(v) is str:
                n += (len(v) if v.isascii() else _text_len(v)) + 2
            else:
                n += json_len(v, path, depth + 1)
        return n
    if isinstance(value, str):
        return _text_len(value) + 2
    if value is None or value is True:
        return 4
    if value is False:
        return 5
    if isinstance(value, int):
        return _int_len(value)
    if isinstance(value, float):
        return len(repr(value))
    if depth >= _MAX_DEPTH:
        raise too_deep(path)
    if type(value) is dict or (type(value) is not list and isinstance(value, Mapping)):  # ABCs are slow
        n = 2 * len(value) + 1 if value else 2  # braces, colons and commas
        for k, v in value.items():
            n += json_len(k if isinstance(k, str) else str(k), path, depth + 1)
            n += json_len(v, path, depth + 1)
        return n
    if isinstance(value, _SEQUENCES):
        return max(len(value) + 1, 2) + sum(json_len(v, path, depth + 1) for v in value)
    raise not_json(path, value)


def _as_mapping(value: object, path: str) -> Mapping[str, Any]:
    if type(value) is dict or isinstance(value, Mapping):
        return value
    # SDK content blocks (pydantic models) passed back as assistant content.
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        try:
            dumped = dump(mode="json", exclude_none=True)
        except Exception as exc:  # a foreign object: say which field it was in
            raise bad(path, "a mapping", value) from exc
        if isinstance(dumped, Mapping):
            return dumped
    raise bad(path, "a mapping", value)


def _str_field(obj: Mapping[str, Any], key: str, path: str, *, required: bool = True) -> str:
    value = obj.get(key)
    if isinstance(value, str):
        return value
    if value is None and not required:
        return ""
    raise bad(f"{path}.{key}", "a string", value)


def _positive_int(value: object, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise bad(path, "a positive integer", value)
    if value > _MAX_TOKENS_LIMIT:
        raise bad(path, f"at most {_MAX_TOKENS_LIMIT:,}", value)
    return value
