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

What the walk leans on sits beside it: the field checks and lengths
(``_body_fields``), images and PDFs (``_media``), the model's profile
(``_profile``) and the prefix encoding (``_prefix_encoding``). Their names are
imported one by one, so the loops here read them as this module's globals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Final, final

import attrs

from ratekeeper.errors import ConfigurationError
from ratekeeper.estimate._body_fields import (
    _MAX_DEPTH,
    _SEQUENCES,
    _as_mapping,
    _positive_int,
    _str_field,
    _text_len,
    bad,
    json_len,
    too_deep,
)
from ratekeeper.estimate._media import (
    _PDF_PAGE_TOKENS,
    DOCUMENT_DEFAULT_TOKENS,
    IMAGE_DEFAULT_TOKENS,
    _pdf_pages,
    image_size,
    image_tokens,
)
from ratekeeper.estimate._prefix_encoding import _encode_units, _framed, _framed_plain, _without_cache_control
from ratekeeper.estimate._profile import Profile, model_profile

__all__ = [
    "TTL_SECONDS",
    "LaidOutBreakpoint",
    "Layout",
    "Scan",
    "scan_body",
    "token_counter",
]

# --------------------------------------------------------------------------- constants

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

_MAX_BREAKPOINTS: Final = 4
# The API looks for an earlier cached prefix up to ~20 blocks before each breakpoint.
_LOOKBACK_BLOCKS: Final = 20
TTL_SECONDS: Final[Mapping[str, float]] = {"5m": 300.0, "1h": 3600.0}


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
            raise too_deep(path)
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
