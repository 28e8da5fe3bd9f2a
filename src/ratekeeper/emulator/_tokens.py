"""The emulated server's own token counter: the "truth" a client's estimate is measured against.

Text is split into words, numbers, punctuation and line breaks. A word of
letters costs one token up to five letters and one more per further four; a
number one token per three digits; every punctuation mark, line break and
non-Latin letter one token; a run of spaces one token per four. The base count
is then multiplied per model family (1.3 for the newer tokenizer). English
prose comes out near 4 characters per token, code and numbers well below: a
fixed characters-per-token guess has real, content-dependent error.

A request is counted as a sequence of *segments* in the order the server
reads it: tools, then system, then messages. Each segment carries the running
hash of everything up to it (the prompt-cache key of a breakpoint placed
there) and its ``cache_control``, if any.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

__all__ = ["CountedRequest", "Segment", "count_request", "count_text", "output_words"]

_PIECE: Final = re.compile(r"[A-Za-z]+|[0-9]+|\n| {2,}|[^\W\d_]|[^\w\s]|_")
_LONG_WORD: Final = re.compile(r"[A-Za-z]{6,}")
_LONG_NUMBER: Final = re.compile(r"[0-9]{4,}")
_LONG_SPACES: Final = re.compile(r" {5,}")
_TOOL_PROMPT_TOKENS: Final = 300  # the tool-use system prompt added once when tools are present
_TOOL_OVERHEAD: Final = 12
_MESSAGE_OVERHEAD: Final = 4
_REQUEST_OVERHEAD: Final = 3
_BLOCK_OVERHEAD: Final = 10  # tool_use / tool_result framing
_IMAGE_UNKNOWN: Final = 1600
_DOCUMENT_URL: Final = 3000
_PDF_PAGE: Final = 1500


def count_text(text: str) -> int:
    """Base token count of ``text`` (before the model family's factor).

    >>> count_text("Hello, world!")
    4
    >>> count_text("internationalization")
    5
    """
    return _count_text(text) if len(text) > 64 else _count_uncached(text)


def _count_uncached(text: str) -> int:
    # every piece costs one token; long words, long numbers and long runs of spaces cost more
    n = len(_PIECE.findall(text))
    n += sum((len(w) - 2) // 4 for w in _LONG_WORD.findall(text))  # 1 + ceil((len - 5) / 4) in all
    n += sum((len(d) - 1) // 3 for d in _LONG_NUMBER.findall(text))  # ceil(len / 3) in all
    n += sum((len(sp) - 1) // 4 for sp in _LONG_SPACES.findall(text))  # ceil(len / 4) in all
    return n


_count_text = functools.lru_cache(maxsize=4096)(_count_uncached)


@attrs.frozen
class Segment:
    """One countable piece of a request.

    ``tokens`` is the count after the family factor; ``key`` the hash of the
    request up to and including this piece; ``cache_control`` the breakpoint
    marker found on it (``None`` if there is none).
    """

    tokens: int
    key: str
    cache_control: Mapping[str, Any] | None


@attrs.frozen
class CountedRequest:
    """A request body as the server counts it: its segments and their total."""

    segments: tuple[Segment, ...]
    total: int


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _image_dims(data: bytes) -> tuple[int, int] | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
        return int(w), int(h)
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            length = int.from_bytes(data[i + 2 : i + 4], "big")
            if marker in (0xC0, 0xC1, 0xC2):
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                return int(w), int(h)
            i += 2 + length
    return None


def _image_tokens(source: Mapping[str, Any]) -> int:
    if source.get("type") != "base64":
        return _IMAGE_UNKNOWN
    try:
        raw = base64.b64decode(str(source.get("data", ""))[:4096] + "==", validate=False)
    except (binascii.Error, ValueError):
        return _IMAGE_UNKNOWN
    dims = _image_dims(raw)
    if dims is None:
        return _IMAGE_UNKNOWN
    w, h = dims
    scale = min(1.0, 1568 / max(w, h, 1), math.sqrt(1_150_000 / max(w * h, 1)))
    return max(1, math.ceil(w * scale * h * scale / 750))


def _document_tokens(block: Mapping[str, Any]) -> int:
    source = block.get("source") or {}
    kind = source.get("type")
    extra = count_text(str(block.get("title", ""))) + count_text(str(block.get("context", "")))
    if kind == "text":
        return extra + count_text(str(source.get("data", "")))
    if kind == "content":
        content = source.get("content", "")
        return extra + _content_tokens(content)
    if kind == "base64":
        try:
            raw = base64.b64decode(str(source.get("data", "")), validate=False)
        except (binascii.Error, ValueError):
            raw = b""
        pages = max(1, len(re.findall(rb"/Type\s*/Page(?!s)", raw)))
        return extra + pages * _PDF_PAGE
    return extra + _DOCUMENT_URL


def _content_tokens(content: object) -> int:
    if isinstance(content, str):
        return count_text(content)
    if isinstance(content, list):
        return sum(_block_tokens(b) for b in content if isinstance(b, Mapping))
    return 0


def _block_tokens(block: Mapping[str, Any]) -> int:
    kind = block.get("type")
    if kind == "text":
        return count_text(str(block.get("text", "")))
    if kind == "image":
        return _image_tokens(block.get("source") or {})
    if kind == "document":
        return _document_tokens(block)
    if kind in ("tool_use", "server_tool_use"):
        return (
            _BLOCK_OVERHEAD
            + count_text(str(block.get("name", "")))
            + count_text(_json(block.get("input", {})))
        )
    if kind == "tool_result":
        return _BLOCK_OVERHEAD + _content_tokens(block.get("content", ""))
    if kind == "thinking":
        return count_text(str(block.get("thinking", "")))
    if kind == "redacted_thinking":
        return len(str(block.get("data", ""))) // 8
    rest = {k: v for k, v in block.items() if k != "cache_control"}
    return count_text(_json(rest))


def _tool_tokens(tool: Mapping[str, Any]) -> int:
    if "input_schema" not in tool:  # a server tool such as web search: a fixed definition
        return 200
    return (
        _TOOL_OVERHEAD
        + count_text(str(tool.get("name", "")))
        + count_text(str(tool.get("description", "")))
        + count_text(_json(tool.get("input_schema", {})))
    )


class _Builder:
    def __init__(self, model: str, factor: float) -> None:
        self._hash = hashlib.sha256(model.encode())
        self._factor = factor
        self.segments: list[Segment] = []

    def add(self, label: str, block: object, base: int) -> None:
        cache_control = block.get("cache_control") if isinstance(block, Mapping) else None
        shown = (
            {k: v for k, v in block.items() if k != "cache_control"} if isinstance(block, Mapping) else block
        )
        self._hash.update(f"\x00{label}\x00{_json(shown)}".encode())
        tokens = math.ceil(base * self._factor)
        cc = cache_control if isinstance(cache_control, Mapping) else None
        self.segments.append(Segment(tokens=tokens, key=self._hash.hexdigest(), cache_control=cc))


def _blocks(content: object) -> Sequence[object]:
    if isinstance(content, list):
        return content
    return [content]


def count_request(body: Mapping[str, Any], model: str, factor: float) -> CountedRequest:
    """Count a Messages request body for ``model`` with the family ``factor``.

    >>> body = {"messages": [{"role": "user", "content": "quota"}]}
    >>> count_request(body, "claude-3-5-haiku-20241022", 1.0).total
    8
    """
    b = _Builder(model, factor)
    tools = body.get("tools") or []
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        if isinstance(tool, Mapping):
            b.add("tool", tool, _tool_tokens(tool) + (_TOOL_PROMPT_TOKENS if i == 0 else 0))
    system = body.get("system")
    if system:
        for block in _blocks(system):
            base = _content_tokens(block) if isinstance(block, str) else _block_tokens(_as_map(block))
            b.add("system", block, base)
    for msg in body.get("messages") or []:
        if not isinstance(msg, Mapping):
            continue
        role = str(msg.get("role", "user"))
        for j, block in enumerate(_blocks(msg.get("content", ""))):
            base = _content_tokens(block) if isinstance(block, str) else _block_tokens(_as_map(block))
            b.add(role if j == 0 else "+", block, base + (_MESSAGE_OVERHEAD if j == 0 else 0))
    total = sum(s.tokens for s in b.segments) + _REQUEST_OVERHEAD
    return CountedRequest(segments=tuple(b.segments), total=total)


def _as_map(block: object) -> Mapping[str, Any]:
    return block if isinstance(block, Mapping) else {}


_TEXT: Final = (
    "the quiet river runs past stone and reed while a model adds words to its reply about rate and time"
)
_WORDS: Final = tuple(_TEXT.split())


def output_words(start: int, count: int) -> str:
    """``count`` words of generated text (one token each), starting at word ``start``."""
    return "".join((" " if start + i else "") + _WORDS[(start + i) % len(_WORDS)] for i in range(count))
