"""The prefix encoding behind cache-prediction keys: one canonical text for each unit of a body's prefix.

The scan hashes the units' encodings, chained, into a key at each block
boundary a breakpoint can use (``_Scanner.breakpoints``). Plain JSON goes
through the C encoder and its strings through a memo (``_StringTokens``), so
the strings a conversation sends again every turn are not escaped again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, Final

from ratekeeper.estimate._body_fields import _MAX_DEPTH, _SEQUENCES, not_json, too_deep

# Built once: json.dumps with non-default arguments builds an encoder per call.
_CANONICAL_JSON: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"))

# Strings up to this long go into the prefix hash as their JSON; longer ones as their length
# and Python's hash (see _StringTokens).
_SHORT_STRING: Final = 48
# The tokens remembered: at most this many, holding at most this many characters of long
# strings (a conversation's strings come back every turn; the memo keeps them alive, so bounded).
_MAX_SHORT_TOKENS: Final = 4096
_MAX_LONG_CHARS: Final = 4 * 1024 * 1024


class _StringTokens(dict[str, str]):
    """What the prefix encoding writes for a string: its JSON if short, else its size and hash.

    Escaping a prompt's text into JSON and hashing it costs ~5 ns a character
    (a 27 KB conversation: ~120 us, every request); a ``str`` computes its
    ``hash()`` once in its life and keeps it, and a conversation sends the
    same string objects turn after turn. The hash is SipHash, keyed per
    process (the predictor lives in one process), 64 bits: with the length,
    two different strings share a token with odds of about 2**-64, and then
    a cache read is mispredicted, which settlement corrects. The token holds
    NUL characters, which JSON output never does, so it is never mistaken
    for a short string's JSON. Tokens are remembered (strings of up to a
    sixteenth of ``_MAX_LONG_CHARS``), so the C encoder finds them with a
    dict lookup instead of a call into Python.
    """

    long_chars = 0  # the characters of the long strings remembered

    def __missing__(self, text: str) -> str:
        size = len(text)
        if size > _SHORT_STRING:
            token = "\x00%x:%x\x00" % (size, str.__hash__(text))  # noqa: UP031 - the fastest here
            if size > _MAX_LONG_CHARS // 16:
                return token  # too big to keep
            self.long_chars += size
        else:
            # (the separator too, should another thread look it up between a clear and its re-entry)
            token = "\x01" if text == _SEPARATOR else _JSON_STRING(text)
        if len(self) >= _MAX_SHORT_TOKENS or self.long_chars > _MAX_LONG_CHARS:
            self.clear()  # bounded: strings come from callers
            self.long_chars = size if size > _SHORT_STRING else 0
            self[_SEPARATOR] = "\x01"
        self[text] = token
        return token


# Between units when a body's units are encoded in one call (see _encode_units): its token is
# a control character, which neither JSON output nor a token holds; random, so that no body
# holds this string (and if one did, the count of pieces would not match: see there).
_SEPARATOR: Final = "\x01" + os.urandom(16).hex()


_JSON_STRING: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii
_STRING_TOKENS: Final = _StringTokens({_SEPARATOR: "\x01"})
# One C encoder for every unit (JSONEncoder.encode makes one per call, ~3 us), its strings
# through _STRING_TOKENS; sorted keys, no circular check (a cycle ends in RecursionError).
_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_PREFIX_ENCODER: Final[Callable[[object, int], list[str]] | None] = (
    _c_make_encoder(
        None, _CANONICAL_JSON.default, _STRING_TOKENS.__getitem__, None, ":", ",", True, False, True
    )
    if _c_make_encoder is not None
    else None
)


def _encode_unit(value: object) -> str:
    if _PREFIX_ENCODER is None:  # no C accelerator (not CPython): the plain JSON
        return _CANONICAL_JSON.encode(value)
    return "".join(_PREFIX_ENCODER(value, 0))


def _encode_units(values: list[object]) -> list[str] | None:
    """``_encode_unit`` of each value, in one call of the C encoder (~1 us saved a unit).

    None if the C encoder refuses one of them (each is then encoded alone).
    """
    if _PREFIX_ENCODER is None:
        return None
    items: list[object] = []
    for value in values:
        items.append(_SEPARATOR)
        items.append(value)
    try:
        text = "".join(_PREFIX_ENCODER(items, 0))
    except (TypeError, ValueError, RecursionError):
        return None
    # "[\x01,e0,\x01,e1]": the pieces between the separators are the units' own encodings
    pieces = text[3:-1].split(",\x01,")
    return pieces if len(pieces) == len(values) else None


def _framed(value: object, path: str, *, strip_cache_control: bool = False) -> str:
    """A canonical, unambiguous encoding of ``value``, for a prefix hash (one unit of its chain).

    Plain JSON goes through the C encoder (sorted keys, long strings as
    tokens: see ``_StringTokens``): a 10 MB image costs one hash of it.
    Anything it refuses (non-string keys, foreign objects, deep nesting)
    takes the checked Python walk, which either encodes it or raises
    ``ConfigurationError``; a given body always takes the same path, so its
    keys are stable.
    """
    if strip_cache_control:
        value = _without_cache_control(value)
    try:
        data = _encode_unit(value)
    except (TypeError, ValueError, RecursionError):
        slow = hashlib.blake2b(digest_size=16)
        _feed_checked(slow, value, path)
        data = "\x00" + slow.hexdigest()  # no colon: never a long string's token
    return data


def _framed_plain(value: object) -> str | None:
    """``_framed(value, path, strip_cache_control=True)`` of the commonest units, built directly.

    A string, a text block, a tool result holding a string: what the C
    encoder would write for them (sorted keys), without a call into it.
    None for any other unit.
    """
    kind = type(value)
    if kind is str:
        data = _STRING_TOKENS[value]  # type: ignore[index]
    elif kind is dict:
        get = value.get  # type: ignore[attr-defined]
        size = len(value) - ("cache_control" in value)  # type: ignore[arg-type,operator]
        block = get("type")
        if block == "text" and size == 2:
            text = get("text")
            if type(text) is not str:
                return None
            data = '{"text":%s,"type":"text"}' % _STRING_TOKENS[text]  # noqa: UP031
        elif block == "tool_result" and size == 3:
            content, ident = get("content"), get("tool_use_id")
            if type(content) is not str or type(ident) is not str:
                return None
            data = '{"content":%s,"tool_use_id":%s,"type":"tool_result"}' % (  # noqa: UP031
                _STRING_TOKENS[content],
                _STRING_TOKENS[ident],
            )
        else:
            return None
    else:
        return None
    return data


def _without_cache_control(value: object) -> object:
    if (type(value) is dict or isinstance(value, Mapping)) and "cache_control" in value:
        # The breakpoint marker is not content: moving it must not change the prefix.
        return {k: v for k, v in value.items() if k != "cache_control"}
    return value


def _feed_checked(h: Any, value: object, path: str, depth: int = 0) -> None:
    # Type-tagged and length-prefixed, so different values never share an encoding.
    if isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(data))
        h.update(data)
    elif value is None or isinstance(value, bool | int | float):
        h.update(b"v" + repr(value).encode() + b";")
    elif depth >= _MAX_DEPTH:
        raise too_deep(path)
    elif isinstance(value, Mapping):
        items = sorted(((str(k), v) for k, v in value.items()), key=lambda kv: kv[0])
        h.update(b"{%d:" % len(items))
        for k, v in items:
            _feed_checked(h, k, path, depth + 1)
            _feed_checked(h, v, path, depth + 1)
        h.update(b"}")
    elif isinstance(value, _SEQUENCES):
        h.update(b"[%d:" % len(value))
        for v in value:
            _feed_checked(h, v, path, depth + 1)
        h.update(b"]")
    else:
        raise not_json(path, value)
