"""The prefix encoding behind cache-prediction keys: its shortcuts give the general path's bytes."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ratekeeper import PromptCachePredictor
from ratekeeper.estimate._body_scan import scan_body
from ratekeeper.estimate._prefix_encoding import (
    _MAX_SHORT_TOKENS,
    _SEPARATOR,
    _STRING_TOKENS,
    _encode_unit,
    _encode_units,
    _framed,
    _framed_plain,
)

texts = st.text(max_size=120) | st.sampled_from(["", "\x00", "\x01", ",\x01,", '"', "\\", "é" * 60, "x" * 49])
leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts
values = st.recursive(
    leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(texts, c, max_size=3), max_leaves=12
)
units = (
    texts
    | st.fixed_dictionaries({"type": st.just("text"), "text": texts | values})
    | st.fixed_dictionaries(
        {"type": st.just("tool_result"), "tool_use_id": texts | values, "content": texts | values},
        optional={"cache_control": st.just({"type": "ephemeral"}), "is_error": st.booleans()},
    )
    | st.fixed_dictionaries(
        {"type": st.just("text"), "text": texts},
        optional={"citations": values, "cache_control": st.just({"type": "ephemeral"}) | values},
    )
    | st.dictionaries(texts, values, max_size=3)
    | values
)


@given(units)
def test_the_direct_encoding_of_common_units_is_the_encoders(unit: Any) -> None:
    direct = _framed_plain(unit)
    if direct is not None:
        assert direct == _framed(unit, "u", strip_cache_control=True)


@given(st.lists(units, max_size=6))
def test_units_encoded_in_one_call_are_each_units_encoding(batch: list[Any]) -> None:
    together = _encode_units(batch)
    if together is None:  # only when a unit needs the checked walk, or holds the separator
        return
    assert together == [_encode_unit(unit) for unit in batch]


def test_long_strings_are_keyed_by_content_not_identity() -> None:
    prompt = "You are a careful assistant. " * 200
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 10,
        "system": [{"type": "text", "text": prompt, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "hi"}],
    }
    fresh = json.loads(json.dumps(body))  # equal text in new string objects
    assert fresh["system"][0]["text"] is not prompt
    assert scan_body(fresh).breakpoints == scan_body(body).breakpoints
    predictor = PromptCachePredictor()
    predictor.record(body, now=0.0)
    assert predictor.predict(fresh, now=1.0).read_tokens > 0
    changed = json.loads(json.dumps(body).replace("careful assistant. Y", "careful assistant! Y", 1))
    assert predictor.predict(changed, now=1.0).read_tokens == 0


def test_remembered_short_strings_are_bounded() -> None:
    for i in range(3 * _MAX_SHORT_TOKENS):
        assert _STRING_TOKENS[f"s{i}"] == f'"s{i}"'
    assert len(_STRING_TOKENS) <= _MAX_SHORT_TOKENS + 1
    assert _STRING_TOKENS[_SEPARATOR] == "\x01"


def test_the_separator_keeps_its_token_after_the_memo_is_emptied() -> None:
    _STRING_TOKENS.clear()  # as another thread might leave it, before the separator is put back
    assert _STRING_TOKENS[_SEPARATOR] == "\x01"
    assert _encode_units(["a" * 100, {"type": "text", "text": "b"}]) == [
        _encode_unit("a" * 100),
        _encode_unit({"type": "text", "text": "b"}),
    ]


def test_remembered_long_strings_are_bounded_by_their_characters() -> None:
    from ratekeeper.estimate._prefix_encoding import _MAX_LONG_CHARS

    piece = _MAX_LONG_CHARS // 64
    for i in range(200):  # 200 strings of 1/64 of the bound: over three times what is kept
        text = str(i) + "x" * piece
        assert _STRING_TOKENS[text] == "\x00%x:%x\x00" % (len(text), hash(text))  # noqa: UP031
    assert _STRING_TOKENS.long_chars <= _MAX_LONG_CHARS + piece + 3
    kept = sum(len(k) for k in _STRING_TOKENS if len(k) > 48)
    assert kept == _STRING_TOKENS.long_chars
    huge = "y" * (_MAX_LONG_CHARS // 8)  # bigger than any kept string: answered, not kept
    assert _STRING_TOKENS[huge].startswith("\x00")
    assert huge not in _STRING_TOKENS
    assert _STRING_TOKENS[_SEPARATOR] == "\x01"


def test_markers_made_once_are_what_the_encoder_gives() -> None:
    from ratekeeper.estimate._body_scan import _NO_THINKING, _NO_TOOL_CHOICE, _ROLE_MARKERS

    assert _framed(("tool_choice", None), "p") == _NO_TOOL_CHOICE
    assert _framed(("thinking", None), "p") == _NO_THINKING
    assert {role: _framed(("message", role), "p") for role in ("user", "assistant")} == _ROLE_MARKERS
