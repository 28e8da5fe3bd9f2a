"""What a Messages request says and what its answer looks like: validation, output size, bodies."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ratekeeper.emulator._cache import CachePlan
from ratekeeper.emulator._state import ServerState
from ratekeeper.emulator._wire import EmulatorRequest

__all__ = ["OUTPUT_HEADER", "decide_output", "message_body", "parse_json", "usage_fields", "validate"]

OUTPUT_HEADER = "x-emulator-output-tokens"
_MAX_BREAKPOINTS = 4


def parse_json(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """The JSON object in ``raw``, or None and why not."""
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"The request body is not valid JSON: {exc}"
    if not isinstance(body, dict):
        return None, "The request body must be a JSON object."
    return body, ""


def _count_breakpoints(value: object) -> int:
    if isinstance(value, dict):
        return ("cache_control" in value and value["cache_control"] is not None) + sum(
            _count_breakpoints(v) for k, v in value.items() if k != "cache_control"
        )
    if isinstance(value, list):
        return sum(_count_breakpoints(v) for v in value)
    return 0


def validate(body: Mapping[str, Any], *, messages_endpoint: bool = True) -> str:
    """Why ``body`` is not a valid Messages request (empty string if it is)."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required"
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "messages: Field required" if msgs is None else "messages: at least one message is required"
    if messages_endpoint:
        mt = body.get("max_tokens")
        if isinstance(mt, bool) or not isinstance(mt, int):
            return (
                "max_tokens: Field required" if mt is None else "max_tokens: Input should be a valid integer"
            )
        if mt < 1:
            return "max_tokens: Input should be greater than or equal to 1"
    if _count_breakpoints({k: body.get(k) for k in ("tools", "system", "messages")}) > _MAX_BREAKPOINTS:
        return f"A maximum of {_MAX_BREAKPOINTS} blocks with cache_control may be provided."
    return ""


def usage_fields(plan: CachePlan, output_tokens: int) -> dict[str, Any]:
    """The ``usage`` object of a message."""
    return {
        "input_tokens": plan.input,
        "cache_creation_input_tokens": plan.creation,
        "cache_read_input_tokens": plan.read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": plan.write_5m,
            "ephemeral_1h_input_tokens": plan.write_1h,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def message_body(
    message_id: str, model: str, text: str, plan: CachePlan, output: int, stop_reason: str | None
) -> dict[str, Any]:
    """A message object; a ``stop_reason`` of None gives the empty one of ``message_start``."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}] if stop_reason is not None else [],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage_fields(plan, output),
    }


def decide_output(
    st: ServerState, req: EmulatorRequest | None, body: Mapping[str, Any], max_tokens: int
) -> int:
    """How many tokens a request produces: the test header, the configured function, or a seeded fraction."""
    forced = req.header(OUTPUT_HEADER) if req is not None else None
    if forced is not None and forced.strip().isdigit():
        n = int(forced)
    elif st.config.output_tokens is not None:
        n = st.config.output_tokens(body, st.rng)
    else:
        lo, hi = st.config.output_fraction
        n = round(max_tokens * st.rng.uniform(lo, hi))
    return max(1, min(max_tokens, n))
