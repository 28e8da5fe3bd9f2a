"""What the emulated server's answers look like on the wire: ids, dates, bodies, SSE framing."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import math
import random
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, Final, final

import attrs

__all__ = [
    "EmulatorRequest",
    "IdSource",
    "Reply",
    "SseEvent",
    "error_body",
    "http_date",
    "iso_time",
    "rfc3339",
    "round_thousand",
]

_ALPHABET: Final = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


class IdSource:
    """Seeded ids in the real API's shapes (``req_011C...``, ``msg_01...``)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(f"ids-{seed}")

    def _tail(self, n: int) -> str:
        return "".join(self._rng.choice(_ALPHABET) for _ in range(n))

    def request_id(self) -> str:
        """A ``request-id`` value."""
        return "req_011C" + self._tail(20)

    def message_id(self) -> str:
        """A message id."""
        return "msg_01" + self._tail(22)

    def batch_id(self) -> str:
        """A Message Batch id."""
        return "msgbatch_01" + self._tail(22)

    def ledger_id(self) -> str:
        """A wallet ledger entry id."""
        return "led_" + self._tail(20)


def _at(epoch: dt.datetime, t: float) -> dt.datetime:
    return epoch + dt.timedelta(seconds=t)


def http_date(epoch: dt.datetime, t: float) -> str:
    """The ``date`` header for server time ``t``: ``Mon, 05 Jan 2026 00:00:00 GMT``."""
    return email.utils.format_datetime(_at(epoch, math.floor(t)).astimezone(dt.UTC), usegmt=True)


def rfc3339(epoch: dt.datetime, t: float) -> str:
    """An RFC 3339 UTC timestamp, rounded up to the second: ``2026-01-05T00:00:07Z``."""
    return _at(epoch, math.ceil(t - 1e-9)).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_time(epoch: dt.datetime, t: float) -> str:
    """A timestamp as the Batches API writes them (``...T00:00:07.250000Z``)."""
    return _at(epoch, t).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def round_thousand(x: float) -> int:
    """Token ``-remaining`` values: the nearest thousand, never below zero.

    >>> round_thousand(1499.9), round_thousand(1500), round_thousand(-20)
    (1000, 2000, 0)
    """
    return max(0, math.floor(x / 1000 + 0.5) * 1000)


def error_body(kind: str, message: str, request_id: str, **extra: Any) -> dict[str, Any]:
    """The error envelope of spec section 6; ``extra`` goes inside ``error``."""
    return {"type": "error", "error": {"type": kind, "message": message, **extra}, "request_id": request_id}


def _lower_keys(headers: Mapping[str, str]) -> Mapping[str, str]:
    return {k.lower(): v for k, v in headers.items()}


@final
@attrs.frozen
class EmulatorRequest:
    """One HTTP request as the emulated server receives it.

    ``path`` may carry a query string; header names are compared
    case-insensitively; ``base_url`` is where the client reached the server
    (used to build a batch's ``results_url``).
    """

    method: str
    path: str
    body: bytes = b""
    headers: Mapping[str, str] = attrs.field(factory=dict, converter=_lower_keys)
    base_url: str = "https://api.anthropic.com"

    @classmethod
    def post(cls, path: str, payload: object, headers: Mapping[str, str] | None = None) -> EmulatorRequest:
        """A POST with a JSON body."""
        return cls("POST", path, json.dumps(payload).encode(), headers or {})

    @property
    def route(self) -> str:
        """The path without its query string or trailing slash."""
        return urllib.parse.urlsplit(self.path).path.rstrip("/") or "/"

    @property
    def query(self) -> dict[str, str]:
        """The query parameters (last value wins)."""
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))

    def header(self, name: str) -> str | None:
        """A request header, or None."""
        return self.headers.get(name.lower())


@final
@attrs.frozen
class SseEvent:
    """One server-sent event of a stream, ``at`` seconds after the request arrived."""

    at: float
    event: str
    data: Mapping[str, Any]

    def encode(self) -> bytes:
        """The event exactly as the real API frames it: ``event:`` line, ``data:`` line, blank line."""
        payload = json.dumps(self.data, separators=(",", ":"), ensure_ascii=False)
        return f"event: {self.event}\ndata: {payload}\n\n".encode()


@final
@attrs.frozen
class Reply:
    """The server's answer to one request.

    ``delay`` is how long after arrival the status and headers are sent (for a
    plain response, the body too); a stream's ``events`` follow at their own
    offsets. ``body`` is the JSON body (``None`` for a stream, or raw
    ``content`` for JSONL results). ``ends_at`` is the offset at which the
    request is complete and settled.
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    request_id: str
    delay: float
    body: Mapping[str, Any] | None = None
    content: bytes | None = None
    events: tuple[SseEvent, ...] = ()
    ends_at: float = 0.0
    #: For a report taken when the answer is sent (``report_moment``): the rate-limit headers
    #: at server time ``t``; ``EmulatedServer.deliver`` swaps them in at delivery.
    late_headers: Callable[[float], list[tuple[str, str]]] | None = attrs.field(default=None, eq=False)

    @property
    def is_stream(self) -> bool:
        """True for a server-sent-event stream."""
        return self.content is None and self.body is None

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (case-insensitive), or None."""
        low = name.lower()
        return next((v for k, v in self.headers if k.lower() == low), None)

    def body_bytes(self) -> bytes:
        """The body as sent: JSON, raw content, or the whole stream's SSE bytes."""
        if self.content is not None:
            return self.content
        if self.body is not None:
            return json.dumps(self.body, separators=(",", ":"), ensure_ascii=False).encode()
        return b"".join(e.encode() for e in self.events)
