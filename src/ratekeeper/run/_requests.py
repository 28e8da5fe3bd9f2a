"""Requests in the Message Batches API's request format: ``{"custom_id": ..., "params": {...}}``.

Pure: JSON in, ``BatchRequest`` (or the reason it is not one) out. The same
file can go to ``ratekeeper run`` or to the Batches API, so the checks are the
Batches API's own: a ``custom_id`` of 1 to 64 letters, digits, ``_`` or ``-``,
and ``params`` with at least ``model``, ``max_tokens`` and ``messages``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, final

import attrs

from ratekeeper.errors import ConfigurationError

__all__ = ["BadLine", "BatchRequest", "parse_request", "read_requests"]

_CUSTOM_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


@final
@attrs.frozen
class BatchRequest:
    """One request: its ``custom_id``, the Messages ``params``, and the line it came from (if a file).

    The Message Batches API's request (``{"custom_id": ..., "params": {...}}``)
    as ``run_requests`` takes it; a dict in that format is turned into one by
    ``ratekeeper.run.parse_request``, which checks it as the Batches API
    would. Built directly, it is taken as it is.

    >>> BatchRequest("q1", {"model": "claude-sonnet-4-5", "max_tokens": 100,
    ...                     "messages": [{"role": "user", "content": "Hi"}]}).custom_id
    'q1'
    """

    custom_id: str
    params: Mapping[str, Any]
    line: int | None = None


@final
@attrs.frozen
class BadLine:
    """A line of a requests file that is not a request, and why.

    ``duplicate``: the line repeats an earlier line's ``custom_id``; results
    are keyed by it, so such a file cannot run even when bad lines are skipped.
    """

    line: int
    problem: str
    duplicate: bool = False

    def __str__(self) -> str:
        return f"line {self.line}: {self.problem}"


def parse_request(obj: object, line: int | None = None) -> BatchRequest:
    """``obj`` as a :class:`BatchRequest`; ``ConfigurationError`` naming the first problem otherwise."""
    if not isinstance(obj, Mapping):
        raise ConfigurationError(f"a request is an object with custom_id and params, got {_kind(obj)}")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str):
        raise ConfigurationError(f"custom_id must be a string, got {_kind(custom_id)}")
    if _CUSTOM_ID.fullmatch(custom_id) is None:
        raise ConfigurationError(
            f"custom_id {custom_id[:70]!r} must be 1 to 64 letters, digits, '_' or '-' "
            "(as the Batches API asks)"
        )
    extra = sorted(set(obj) - {"custom_id", "params"})
    if extra:
        raise ConfigurationError(f"{custom_id}: unknown field {extra[0]!r} (only custom_id and params)")
    params = obj.get("params")
    if not isinstance(params, Mapping):
        raise ConfigurationError(f"{custom_id}: params must be an object, got {_kind(params)}")
    model = params.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigurationError(f"{custom_id}: params.model must be a non-empty string, got {_kind(model)}")
    max_tokens = params.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ConfigurationError(
            f"{custom_id}: params.max_tokens must be a positive integer, got {_kind(max_tokens)}"
        )
    messages = params.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ConfigurationError(
            f"{custom_id}: params.messages must be a non-empty list, got {_kind(messages)}"
        )
    if "stream" in params:
        # the result is one whole message, as in a batch; streaming is the runner's choice
        raise ConfigurationError(
            f"{custom_id}: params.stream is not allowed (the Batches API refuses it too)"
        )
    return BatchRequest(custom_id, dict(params), line)


def read_requests(lines: Iterable[str]) -> Iterator[BatchRequest | BadLine]:
    """Each non-blank line of ``lines`` as a request, or a :class:`BadLine` saying why it is not one.

    Line numbers count from 1 and include blank lines, as an editor shows them.
    A ``custom_id`` seen on an earlier line is a ``BadLine`` naming that line.

    >>> good = '{"custom_id": "a", "params": {"model": "m", "max_tokens": 5, "messages": ["hi"]}}'
    >>> for item in read_requests([good, "", "oops", good]):
    ...     print(item.custom_id if isinstance(item, BatchRequest) else item)
    a
    line 3: not JSON: Expecting value at column 1
    line 4: custom_id 'a' is already on line 1
    """
    seen: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield BadLine(number, f"not JSON: {exc.msg} at column {exc.colno}")
            continue
        try:
            request = parse_request(obj, number)
        except ConfigurationError as exc:
            yield BadLine(number, str(exc))
            continue
        first = seen.setdefault(request.custom_id, number)
        if first != number:
            yield BadLine(
                number, f"custom_id {request.custom_id!r} is already on line {first}", duplicate=True
            )
            continue
        yield request


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool | int | float):
        return repr(value)
    return type(value).__name__
