"""Read a Messages request body once: validate it, count it, and hash its cacheable prefixes.

What the API reads is counted as text (UTF-8 bytes of the strings) plus fixed
tokens (images, PDF pages, the per-request, per-message and per-tool framing
the API adds); when the body has ``cache_control`` breakpoints, the prefix
(tools, then system, then messages) is hashed at each block boundary a
breakpoint can use. Turning characters into tokens is the estimator's job
(``_estimate``); deciding reads and writes is the cache predictor's
(``_cache_predict``).

Every constant here approximates what the API adds or how it tokenizes;
``docs/estimation.md`` says where each comes from. Malformed bodies raise
``ConfigurationError`` naming the field.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, final

import attrs

from ratekeeper.core._model_ids import MAX_REMEMBERED_IDS, _normalize, resolve_model
from ratekeeper.errors import ConfigurationError

__all__ = [
    "CLASSIC_CHARS_PER_TOKEN",
    "DOCUMENT_DEFAULT_TOKENS",
    "IMAGE_DEFAULT_TOKENS",
    "NEW_TOKENIZER_CHARS_PER_TOKEN",
    "TTL_SECONDS",
    "LaidOutBreakpoint",
    "Layout",
    "Profile",
    "Scan",
    "bad",
    "image_size",
    "image_tokens",
    "json_len",
    "model_profile",
    "scan_body",
    "token_counter",
]

# --------------------------------------------------------------------------- constants

#: The docs' rule of thumb for English text (spec section 9).
CLASSIC_CHARS_PER_TOKEN: Final = 3.5
#: Opus 4.7+, Sonnet 5 and Fable 5 tokenize the same text into ~30% more tokens.
NEW_TOKENIZER_CHARS_PER_TOKEN: Final = CLASSIC_CHARS_PER_TOKEN / 1.3

# Framing the API adds around the content. Not published; small guesses of the
# right order, which calibration absorbs together with the text ratio.
_REQUEST_OVERHEAD: Final = 4
_MESSAGE_OVERHEAD: Final = 3
_TOOL_OVERHEAD: Final = 8

# Server tools whose definitions the API expands itself (published figures where
# there are any: bash 245, text editor 700, computer use 735 plus its ~500-token
# system prompt); any other server tool gets the default.
_SERVER_TOOL_TOKENS: Final[tuple[tuple[str, int], ...]] = (
    ("bash_", 245),
    ("text_editor_", 700),
    ("computer_", 1_235),
)
_SERVER_TOOL_DEFAULT_TOKENS: Final = 300

# Images: the API scales an image to fit a 1568 px long edge and ~1,600 tokens
# (~1.15-1.2 MP), then charges width * height / 750 tokens.
_IMAGE_MAX_EDGE: Final = 1568
_IMAGE_MAX_TOKENS: Final = 1600
_IMAGE_PIXELS_PER_TOKEN: Final = 750
#: An image whose size can't be read (URL, Files API, unknown format) is charged the maximum.
IMAGE_DEFAULT_TOKENS: Final = _IMAGE_MAX_TOKENS
# Enough base64 to reach a JPEG's SOF marker past a typical EXIF block.
_IMAGE_HEADER_CHARS: Final = 128 * 1024

# PDFs: every page is sent as text (1,500-3,000 tokens a page) plus an image of the page.
_PDF_PAGE_TOKENS: Final = 1_500 + _IMAGE_MAX_TOKENS
# When no page objects are visible (compressed object streams): pages from the size.
_PDF_BYTES_PER_PAGE: Final = 25_000
_PDF_MAX_PAGES: Final = 100
# Bodies are at most 32 MB; this bounds the decode of one PDF whatever the caller sends.
_PDF_SCAN_CHARS: Final = 48 * 1024 * 1024
_PDF_PAGE_OBJECT: Final = re.compile(rb"/Type\s*/Page\b")
#: A PDF given by URL or file id: five pages' worth.
DOCUMENT_DEFAULT_TOKENS: Final = 5 * _PDF_PAGE_TOKENS

_MAX_TOKENS_LIMIT: Final = 1_000_000_000
_MAX_DEPTH: Final = 200
_MAX_BREAKPOINTS: Final = 4
# The API looks for an earlier cached prefix up to ~20 blocks before each breakpoint.
_LOOKBACK_BLOCKS: Final = 20
TTL_SECONDS: Final[Mapping[str, float]] = {"5m": 300.0, "1h": 3600.0}


# --------------------------------------------------------------------------- model families


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


# --------------------------------------------------------------------------- small helpers


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def bad(path: str, expected: str, value: object) -> ConfigurationError:
    return ConfigurationError(f"{path} must be {expected}, got {_show(value)}")


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
            raise ConfigurationError(f"{path} is nested more than {_MAX_DEPTH} levels deep")
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
        raise ConfigurationError(f"{path} is nested more than {_MAX_DEPTH} levels deep")
    if type(value) is dict or (type(value) is not list and isinstance(value, Mapping)):  # ABCs are slow
        n = 2 * len(value) + 1 if value else 2  # braces, colons and commas
        for k, v in value.items():
            n += json_len(k if isinstance(k, str) else str(k), path, depth + 1)
            n += json_len(v, path, depth + 1)
        return n
    if isinstance(value, _SEQUENCES):
        return max(len(value) + 1, 2) + sum(json_len(v, path, depth + 1) for v in value)
    raise ConfigurationError(f"{path} holds a {type(value).__name__}, which is not a JSON value")


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
        raise ConfigurationError(f"{path} is nested more than {_MAX_DEPTH} levels deep")
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
        raise ConfigurationError(f"{path} holds a {type(value).__name__}, which is not a JSON value")


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


# --------------------------------------------------------------------------- images and PDFs


def _b64_head(data: str, chars: int) -> bytes:
    head = data[:chars]
    head = head[: len(head) - len(head) % 4]
    try:
        return binascii.a2b_base64(head)
    except ValueError:  # binascii.Error, or non-ASCII text
        return b""


def _jpeg_size(b: bytes) -> tuple[int, int] | None:
    i, n = 2, len(b)
    while i + 9 <= n:
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            return int.from_bytes(b[i + 7 : i + 9], "big"), int.from_bytes(b[i + 5 : i + 7], "big")
        length = int.from_bytes(b[i + 2 : i + 4], "big")
        if length < 2:
            return None
        i += 2 + length
    return None


def _webp_size(b: bytes) -> tuple[int, int] | None:
    chunk = b[12:16]
    if chunk == b"VP8 " and len(b) >= 30 and b[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(b[26:28], "little") & 0x3FFF, int.from_bytes(b[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(b) >= 25 and b[20] == 0x2F:
        bits = int.from_bytes(b[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(b) >= 30:
        return int.from_bytes(b[24:27], "little") + 1, int.from_bytes(b[27:30], "little") + 1
    return None


def image_size(data: str) -> tuple[int, int] | None:
    """Width and height from a base64 PNG, GIF, WebP or JPEG header; None if unreadable."""
    b = _b64_head(data, _IMAGE_HEADER_CHARS)
    size: tuple[int, int] | None = None
    if b.startswith(b"\x89PNG\r\n\x1a\n") and len(b) >= 24:
        size = int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")
    elif b[:6] in (b"GIF87a", b"GIF89a") and len(b) >= 10:
        size = int.from_bytes(b[6:8], "little"), int.from_bytes(b[8:10], "little")
    elif b[:4] == b"RIFF" and b[8:12] == b"WEBP":
        size = _webp_size(b)
    elif b[:2] == b"\xff\xd8":
        size = _jpeg_size(b)
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    return size


def image_tokens(width: int, height: int) -> int:
    """Tokens for an image of ``width`` x ``height`` pixels, after the API's downscaling.

    >>> image_tokens(200, 200), image_tokens(1000, 1000), image_tokens(4000, 3000)
    (54, 1334, 1600)
    """
    scale = min(1.0, _IMAGE_MAX_EDGE / max(width, height))
    pixels = (width * scale) * (height * scale)
    return max(1, min(_IMAGE_MAX_TOKENS, math.ceil(pixels / _IMAGE_PIXELS_PER_TOKEN)))


def _pdf_pages(data: str) -> int:
    size = len(data) * 3 // 4
    pages = 0
    if len(data) <= _PDF_SCAN_CHARS:
        try:
            pages = len(_PDF_PAGE_OBJECT.findall(binascii.a2b_base64(data)))
        except ValueError:
            pages = 0
    if pages == 0:
        pages = math.ceil(size / _PDF_BYTES_PER_PAGE)
    return max(1, min(_PDF_MAX_PAGES, pages))


# --------------------------------------------------------------------------- the scan


@attrs.frozen
class _Breakpoint:
    position: int
    ttl: float
    #: (prefix key, cumulative text chars, cumulative fixed tokens), the
    #: breakpoint's own position first, then up to 20 earlier block boundaries.
    candidates: tuple[tuple[int, int, int], ...]


@final
@attrs.frozen
class Scan:
    """What one pass over a body found: its counts, and its breakpoints with their prefix keys."""

    model: str
    profile: Profile
    max_tokens: int
    thinking: bool
    priority_requested: bool
    text_chars: int
    fixed_tokens: int
    breakpoints: tuple[_Breakpoint, ...]


def token_counter(per_char: float) -> Callable[[int, int], int]:
    """Characters and fixed tokens to tokens, at ``per_char`` tokens a character."""

    def tokens(chars: int, fixed: int) -> int:
        # The epsilon keeps float noise from rounding an exact count up by one.
        return math.ceil(chars * per_char - 1e-9) + fixed

    return tokens


@final
@attrs.frozen
class LaidOutBreakpoint:
    """A breakpoint in tokens: its prefix, its TTL, and the prefixes the API would look up for it."""

    tokens: int
    ttl: float
    #: (prefix key, tokens up to there), nearest (the breakpoint itself) first.
    candidates: tuple[tuple[int, int], ...]


@final
@attrs.frozen
class Layout:
    """The cache-relevant shape of a request, in tokens."""

    min_cacheable: int
    breakpoints: tuple[LaidOutBreakpoint, ...]

    @classmethod
    def of(cls, scan: Scan, tokens: Callable[[int, int], int]) -> Layout:
        return cls(
            scan.profile.min_cacheable,
            tuple(
                LaidOutBreakpoint(
                    tokens(bp.candidates[0][1], bp.candidates[0][2]),
                    bp.ttl,
                    tuple((key, tokens(chars, fixed)) for key, chars, fixed in bp.candidates),
                )
                for bp in scan.breakpoints
            ),
        )


class _Scanner:
    """One pass over a body: validates it, counts it, and notes where the breakpoints are."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.chars = 0
        self.fixed = _REQUEST_OVERHEAD
        # Per top-level block: what the prefix hash reads, and the running totals after it.
        self.units: list[tuple[tuple[object, ...], object, str]] = []
        self.totals: list[tuple[int, int]] = []
        self.marks: list[tuple[int, float]] = []
        self.pending: list[object] = []

    def add(self, unit: object, path: str, chars: int, fixed: int, ttl: float | None) -> None:
        self.chars += chars
        self.fixed += fixed
        pending = self.pending
        if pending:
            self.units.append((tuple(pending), unit, path))
            self.pending = []
        else:
            self.units.append(((), unit, path))
        self.totals.append((self.chars, self.fixed))
        if ttl is not None:
            self.marks.append((len(self.totals) - 1, ttl))

    # -- sections, in the order the API builds the prompt (and the cache prefix)

    def tools(self, tools: object, tool_choice: object) -> None:
        if tools is None:
            return
        if not isinstance(tools, _SEQUENCES):
            raise bad("tools", "a list", tools)
        auto, forced = self.profile.tool_prompt
        kind = tool_choice.get("type") if isinstance(tool_choice, Mapping) else None
        prompt = forced if kind in ("any", "tool") else auto
        for i, item in enumerate(tools):
            path = f"tools[{i}]"
            tool = _as_mapping(item, path)
            chars, fixed = self.tool(tool, path)
            self.add(tool, path, chars, fixed + (prompt if i == 0 else 0), _cache_ttl(tool, path))

    def tool(self, tool: Mapping[str, Any], path: str) -> tuple[int, int]:
        kind = tool.get("type")
        if kind is not None and not isinstance(kind, str):
            raise bad(f"{path}.type", "a string", kind)
        if kind in (None, "custom") or "input_schema" in tool:
            name = _str_field(tool, "name", path)
            description = _str_field(tool, "description", path, required=False)
            schema = tool.get("input_schema")
            if not isinstance(schema, Mapping):
                raise bad(f"{path}.input_schema", "a mapping", schema)
            chars = _text_len(name) + _text_len(description) + json_len(schema, f"{path}.input_schema")
            return chars, _TOOL_OVERHEAD
        assert isinstance(kind, str)
        for prefix, tokens in _SERVER_TOOL_TOKENS:
            if kind.startswith(prefix):
                return 0, tokens
        return 0, _SERVER_TOOL_DEFAULT_TOKENS

    def system(self, system: object) -> None:
        if system is None:
            return
        if isinstance(system, str):
            self.add(system, "system", _text_len(system), 0, None)
            return
        if not isinstance(system, _SEQUENCES):
            raise bad("system", "a string or a list of blocks", system)
        for i, item in enumerate(system):
            path = f"system[{i}]"
            block = _as_mapping(item, path)
            chars, fixed = self.block(block, path, 0)
            self.add(block, path, chars, fixed, _cache_ttl(block, path))

    def messages(self, messages: object) -> None:
        if not isinstance(messages, _SEQUENCES):
            raise bad("messages", "a list", messages)
        for i, item in enumerate(messages):
            path = f"messages[{i}]"
            message = _as_mapping(item, path)
            role = message.get("role")
            if role not in ("user", "assistant"):
                raise bad(f"{path}.role", "'user' or 'assistant'", role)
            self.pending.append(_ROLE_MARKERS[role])
            self.fixed += _MESSAGE_OVERHEAD
            content = message.get("content")
            if isinstance(content, str):
                self.add(content, f"{path}.content", _text_len(content), 0, None)
            elif isinstance(content, _SEQUENCES):
                for j, part in enumerate(content):
                    bpath = f"{path}.content[{j}]"
                    if (
                        type(part) is dict
                        and part.get("type") == "text"
                        and type(text := part.get("text")) is str
                    ):
                        # the commonest block, what block() and _cache_ttl() make of it, without the calls
                        ttl = None if part.get("cache_control") is None else _cache_ttl(part, bpath)
                        self.add(part, bpath, len(text) if text.isascii() else _text_len(text), 0, ttl)
                        continue
                    block = _as_mapping(part, bpath)
                    chars, fixed = self.block(block, bpath, 0)
                    self.add(block, bpath, chars, fixed, _cache_ttl(block, bpath))
            else:
                raise bad(f"{path}.content", "a string or a list of blocks", content)

    # -- blocks

    def content(self, content: object, path: str, depth: int) -> tuple[int, int]:
        """Nested content (tool results, documents, search results): a string or blocks."""
        if content is None:
            return 0, 0
        if isinstance(content, str):
            return _text_len(content), 0
        if not isinstance(content, _SEQUENCES):
            raise bad(path, "a string or a list of blocks", content)
        if depth >= _MAX_DEPTH:
            raise ConfigurationError(f"{path} is nested more than {_MAX_DEPTH} levels deep")
        chars = fixed = 0
        for j, part in enumerate(content):
            bpath = f"{path}[{j}]"
            c, f = self.block(_as_mapping(part, bpath), bpath, depth + 1)
            chars += c
            fixed += f
        return chars, fixed

    def block(self, block: Mapping[str, Any], path: str, depth: int) -> tuple[int, int]:
        kind = block.get("type")
        if not isinstance(kind, str):
            raise bad(f"{path}.type", "a string", kind)
        if kind == "text":
            return _text_len(_str_field(block, "text", path)), 0
        if kind == "image":
            return 0, _image(block.get("source"), f"{path}.source")
        if kind == "document":
            chars, fixed = self.document(block.get("source"), f"{path}.source", depth)
            extra = _text_len(_str_field(block, "title", path, required=False))
            extra += _text_len(_str_field(block, "context", path, required=False))
            return chars + extra, fixed
        if kind in ("tool_use", "server_tool_use"):
            name = _str_field(block, "name", path)
            ident = _str_field(block, "id", path, required=False)
            return _text_len(name) + _text_len(ident) + json_len(block.get("input"), f"{path}.input"), 0
        if kind == "tool_result":
            ident = _str_field(block, "tool_use_id", path, required=False)
            chars, fixed = self.content(block.get("content"), f"{path}.content", depth)
            return chars + _text_len(ident), fixed
        if kind == "thinking":
            return _text_len(_str_field(block, "thinking", path)), 0
        if kind == "redacted_thinking":
            # Encrypted and base64-encoded: about 4/3 the bytes of the text it hides.
            return _text_len(_str_field(block, "data", path)) * 3 // 4, 0
        if kind == "search_result":
            chars, fixed = self.content(block.get("content"), f"{path}.content", depth)
            chars += _text_len(_str_field(block, "source", path, required=False))
            chars += _text_len(_str_field(block, "title", path, required=False))
            return chars, fixed
        # Server tool results and blocks this version does not know: their JSON.
        return json_len(block, path), 0

    def document(self, source: object, path: str, depth: int) -> tuple[int, int]:
        src = _as_mapping(source, path)
        kind = src.get("type")
        if kind == "base64":
            data = _str_field(src, "data", path)
            media = src.get("media_type")
            if media in (None, "application/pdf"):
                return 0, _pdf_pages(data) * _PDF_PAGE_TOKENS
            return len(data) * 3 // 4, 0  # some other media type: its bytes as text
        if kind == "text":
            return _text_len(_str_field(src, "data", path)), 0
        if kind == "content":
            return self.content(src.get("content"), f"{path}.content", depth + 1)
        return 0, DOCUMENT_DEFAULT_TOKENS

    # -- the prefix hashes, only where a breakpoint can use them

    def breakpoints(self, model: str) -> tuple[_Breakpoint, ...]:
        if not self.marks:
            return ()
        if len(self.marks) > _MAX_BREAKPOINTS:
            raise ConfigurationError(
                f"at most {_MAX_BREAKPOINTS} cache_control breakpoints are allowed, got {len(self.marks)}"
            )
        wanted = {
            p for position, _ in self.marks for p in range(max(0, position - _LOOKBACK_BLOCKS), position + 1)
        }
        keys: dict[int, int] = {}
        # Each prefix's key is the hash of the previous key and this unit's encoding (its
        # markers, then itself): tuple hashing over the strings' hashes (SipHash, keyed per
        # process), which never maps two encodings after one key to one key unless their
        # SipHash collides (64 bits); a tenth of a blake2b copy and digest per unit.
        key = hash(("prefix", model))
        last = self.marks[-1][0]
        units = self.units[: last + 1]
        framed = [_framed_plain(unit) for _, unit, _ in units]
        others = [i for i, data in enumerate(framed) if data is None]
        if others:
            values = [_without_cache_control(units[i][1]) for i in others]
            encoded = _encode_units(values)
            for n, position in enumerate(others):
                framed[position] = _framed(values[n], units[position][2]) if encoded is None else encoded[n]
        for position, (markers, _, path) in enumerate(units):
            if markers:
                if len(markers) != 1 or type(markers[0]) is not str:
                    markers = tuple(m if type(m) is str else _framed(m, path) for m in markers)
                # (else a message's role marker alone, already its encoding: the same tuple)
                key = hash((key, markers))
            key = hash((key, framed[position]))
            if position in wanted:
                keys[position] = key
        return tuple(
            _Breakpoint(
                position,
                ttl,
                tuple(
                    (keys[p], *self.totals[p])
                    for p in range(position, max(-1, position - _LOOKBACK_BLOCKS - 1), -1)
                ),
            )
            for position, ttl in self.marks
        )


# A message's start in the prefix encoding, made once: what _framed gives it.
_ROLE_MARKERS: Final = {role: _framed(("message", role), "") for role in ("user", "assistant")}
# The same for the usual tool_choice and thinking: none given.
_NO_TOOL_CHOICE: Final = _framed(("tool_choice", None), "")
_NO_THINKING: Final = _framed(("thinking", None), "")


def _cache_ttl(block: Mapping[str, Any], path: str) -> float | None:
    control = block.get("cache_control")
    if control is None:
        return None
    if not isinstance(control, Mapping):
        raise bad(f"{path}.cache_control", "a mapping", control)
    ttl = control.get("ttl", "5m")
    if not isinstance(ttl, str) or ttl not in TTL_SECONDS:  # a list would not even hash
        raise bad(f"{path}.cache_control.ttl", "'5m' or '1h'", ttl)
    return TTL_SECONDS[ttl]


def _image(source: object, path: str) -> int:
    src = _as_mapping(source, path)
    if src.get("type") != "base64":
        return IMAGE_DEFAULT_TOKENS  # URL, Files API: the size is not known here
    size = image_size(_str_field(src, "data", path))
    return IMAGE_DEFAULT_TOKENS if size is None else image_tokens(*size)


def scan_body(body: object) -> Scan:
    if not isinstance(body, Mapping):
        raise ConfigurationError(f"the request body must be a mapping, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad("model", "a non-empty string", model)
    max_tokens = _positive_int(body.get("max_tokens"), "max_tokens")
    profile = model_profile(model)

    tool_choice = body.get("tool_choice")
    if tool_choice is not None:
        if not isinstance(tool_choice, Mapping):
            raise bad("tool_choice", "a mapping", tool_choice)
        if not isinstance(tool_choice.get("type"), str):
            raise bad("tool_choice.type", "a string", tool_choice.get("type"))
    thinking = body.get("thinking")
    thinking_on = False
    if thinking is not None:
        if not isinstance(thinking, Mapping):
            raise bad("thinking", "a mapping", thinking)
        kind = thinking.get("type")
        if not isinstance(kind, str):
            raise bad("thinking.type", "a string", kind)
        if kind == "enabled":
            _positive_int(thinking.get("budget_tokens"), "thinking.budget_tokens")
        thinking_on = kind != "disabled"
    tier = body.get("service_tier")
    if tier is not None and not isinstance(tier, str):
        raise bad("service_tier", "a string", tier)

    scanner = _Scanner(profile)
    scanner.tools(body.get("tools"), tool_choice)
    # Changing tool_choice invalidates the system and message caches, changing
    # thinking the message caches: fold them into the prefix where they start to matter.
    scanner.pending.append(_NO_TOOL_CHOICE if tool_choice is None else ("tool_choice", tool_choice))
    scanner.system(body.get("system"))
    scanner.pending.append(_NO_THINKING if thinking is None else ("thinking", thinking))
    scanner.messages(body.get("messages"))
    return Scan(
        model=model,
        profile=profile,
        max_tokens=max_tokens,
        thinking=thinking_on,
        priority_requested=tier != "standard_only",
        text_chars=scanner.chars,
        fixed_tokens=scanner.fixed,
        breakpoints=scanner.breakpoints(model),
    )
