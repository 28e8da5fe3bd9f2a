"""Watching a response body as it passes, to settle its permit when the body ends.

Where: the body of the ``httpx2.Response`` behind an SDK response
(``response.stream``, a ``SyncByteStream`` or ``AsyncByteStream``) is swapped
for a wrapper before the SDK builds its ``Stream`` on it, the way the SDK's own
tracing wraps it (``anthropic._tracing.SpanEndingStream``). Every way a body
can end goes through the wrapper: read to the end, ``close()`` (the SDK calls
it when a ``Stream`` is closed, left early or fails, ``error`` events
included), an exception from the network, or the wrapper being garbage
collected unread. So the SDK's ``Stream``, ``MessageStream``,
``with_streaming_response`` and a raw ``iter_lines()`` are all covered.

A :class:`Meter` reads the bytes: :class:`SseMeter` the events of a stream
(``message_start`` and the cumulative ``message_delta`` usage, text deltas for
a running output estimate, ``error``, the wallet proxy's ``quota_usage``),
:class:`JsonMeter` a JSON body read lazily. When the body ends it hands a
:class:`BodyOutcome` to its :class:`BodyObserver` exactly once.

An outcome reached inside the cyclic garbage collector is not settled there:
the collector can run in the middle of the limiter's locked code, on the same
thread, and the lock is not reentrant. It is queued instead and settled by
:func:`run_deferred`, which the middleware calls before every request.
"""

from __future__ import annotations

import collections
import gc
import json
import logging
import math
import sys
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Final, Protocol

import attrs
import httpx2

__all__ = [
    "BodyObserver",
    "BodyOutcome",
    "JsonMeter",
    "Meter",
    "MeteredAsyncStream",
    "MeteredSyncStream",
    "SseMeter",
    "run_deferred",
]

log = logging.getLogger("ratekeeper.anthropic")

#: A line longer than this is not an SSE line the meter needs; metering stops, the body still flows.
_MAX_LINE: Final = 4 * 1024 * 1024
#: A JSON body longer than this is not a Messages response; it is not parsed.
_MAX_JSON: Final = 16 * 1024 * 1024
#: Output between two progressive charges, in estimated tokens (each charge takes the limiter's lock).
_PROGRESS_STEP: Final = 32

# ---------------------------------------------------------------------- deferral

_deferred: collections.deque[Callable[[], None]] = collections.deque()
_collecting = False


def _gc_phase(phase: str, info: Mapping[str, int]) -> None:
    global _collecting
    _collecting = phase == "start"


gc.callbacks.append(_gc_phase)


def run_deferred() -> None:
    """Settle the bodies that ended inside the garbage collector (see the module docs)."""
    while _deferred:  # (most requests find it empty: a test, not an IndexError raised each time)
        try:
            settle = _deferred.popleft()
        except IndexError:  # another thread took the last one meanwhile
            return
        try:
            settle()
        except Exception:  # one broken settlement must not stop the others or the request
            log.exception("settling a collected response body failed")


# ---------------------------------------------------------------------- outcome


@attrs.define
class BodyOutcome:
    """What a body showed by the time it ended.

    ``usage`` merges the usage of ``message_start`` and of every
    ``message_delta`` (cumulative: later non-null values win).
    ``output_estimate`` counts output from the text deltas seen, for a stream
    cut before its final usage. ``how`` is ``"read"``, ``"closed"``,
    ``"failed"`` or ``"dropped"`` (collected without being closed).
    """

    usage: dict[str, Any] = attrs.Factory(dict)
    started: bool = False
    #: A ``message_delta`` with usage came: the output count is final.
    final_usage: bool = False
    completed: bool = False
    output_estimate: int = 0
    #: Characters of output text seen in content deltas.
    output_chars: int = 0
    error: Mapping[str, Any] | None = None
    quota: Mapping[str, Any] | None = None
    json_body: object = None
    how: str = ""


class BodyObserver(Protocol):
    """The side that owns the permit: charged as output arrives, settled when the body ends."""

    def progress(self, output_tokens: int) -> None:
        """Output produced so far (cumulative, estimated or reported)."""

    def finish(self, outcome: BodyOutcome) -> None:
        """The body ended; called exactly once."""


# ---------------------------------------------------------------------- decoding


def _decoder(content_encoding: str) -> Callable[[bytes], bytes] | None:
    """Undo ``gzip``/``deflate`` so the meter sees what the SDK sees; None for anything else."""
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return lambda data: data
    steps: list[Any] = []
    for coding in reversed(codings):
        if coding in ("gzip", "x-gzip"):
            steps.append(zlib.decompressobj(16 + zlib.MAX_WBITS))
        elif coding == "deflate":
            steps.append(_Deflate())
        else:
            return None

    def decode(data: bytes) -> bytes:
        for step in steps:
            data = step.decompress(data)
        return data

    return decode


class _Deflate:
    """``deflate`` as servers send it: zlib-wrapped, or raw (a common mistake) as a fallback."""

    def __init__(self) -> None:
        self._inner = zlib.decompressobj()
        self._first = True

    def decompress(self, data: bytes) -> bytes:
        if self._first:
            self._first = False
            try:
                return self._inner.decompress(data)
            except zlib.error:
                self._inner = zlib.decompressobj(-zlib.MAX_WBITS)
        return self._inner.decompress(data)


# ---------------------------------------------------------------------- meters


class Meter:
    """Reads a body chunk by chunk; reports its outcome to ``observer`` once, when it ends."""

    def __init__(self, observer: BodyObserver, *, content_encoding: str = "") -> None:
        self._observer = observer
        self._decode = _decoder(content_encoding)
        self._broken = self._decode is None
        self._finished = False
        self.outcome = BodyOutcome()

    def feed(self, chunk: bytes) -> None:
        """Look at one raw chunk. Never raises: a meter that can't read the body stops reading it."""
        if self._broken or self._finished:
            return
        try:
            assert self._decode is not None
            self._read(self._decode(chunk))
        except Exception:
            log.warning("cannot meter this response body; its permit settles on what was seen", exc_info=True)
            self._broken = True

    def _read(self, data: bytes) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        """The body ended: complete the outcome from what is buffered."""

    def finish(self, how: str) -> None:
        """The body ended (``how``: read, closed, failed, dropped). Only the first call counts."""
        if self._finished:
            return
        if not self._broken:
            try:
                self._close()
            except Exception:
                log.warning("cannot read the end of this response body", exc_info=True)
        self._finished = True
        self.outcome.how = how
        settle = _Settle(self._observer, self.outcome)
        if _collecting:
            _deferred.append(settle)
        else:
            settle()


@attrs.frozen
class _Settle:
    observer: BodyObserver
    outcome: BodyOutcome

    def __call__(self) -> None:
        try:
            self.observer.finish(self.outcome)
        except Exception:  # closing a body must not raise because its settlement failed
            log.exception("settling a response body failed")


class SseMeter(Meter):
    """Follows the events of a Messages stream.

    ``chars_per_token`` turns the text of content deltas into a running output
    estimate, charged every few tokens through ``observer.progress``, so the
    limiter sees output as it is produced (the real-time OTPM rule) even though
    the API reports usage only at the start and the end. ``max_tokens`` caps it.
    """

    def __init__(
        self,
        observer: BodyObserver,
        *,
        content_encoding: str = "",
        max_tokens: int = 0,
        chars_per_token: float = 3.5,
    ) -> None:
        super().__init__(observer, content_encoding=content_encoding)
        self._buffer = bytearray()
        self._event: str | None = None
        self._data: list[str] = []
        self._max_tokens = max_tokens if max_tokens > 0 else math.inf
        self._chars_per_token = chars_per_token
        self._reported = 0
        self._charged = 0

    def _read(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buffer[start:end])
            start = end + 1
            self._line(line[:-1] if line.endswith(b"\r") else line)
        del buffer[:start]
        if len(buffer) > _MAX_LINE:
            raise ValueError(f"an SSE line longer than {_MAX_LINE} bytes")

    def _line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
            return
        if line.startswith(b":"):
            return
        field, _, value = line.decode("utf-8").partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)

    def _close(self) -> None:
        if self._buffer:
            self._line(bytes(self._buffer))
            self._buffer.clear()
        self._dispatch()

    def _dispatch(self) -> None:
        name, data = self._event, "\n".join(self._data)
        self._event, self._data = None, []
        if not data or name == "ping":
            return
        payload = json.loads(data)
        if not isinstance(payload, dict):
            return
        kind = name or payload.get("type")
        outcome = self.outcome
        if kind == "content_block_delta":
            delta = payload.get("delta")
            if isinstance(delta, dict):
                for key in ("text", "thinking", "partial_json"):
                    text = delta.get(key)
                    if isinstance(text, str):
                        outcome.output_chars += len(text)
                self._progress()
        elif kind == "message_start":
            message = payload.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            outcome.started = True
            self._merge(usage)
        elif kind == "message_delta":
            if isinstance(payload.get("usage"), dict):
                outcome.final_usage = True
            self._merge(payload.get("usage"))
        elif kind == "message_stop":
            outcome.completed = True
        elif kind == "error":
            outcome.error = payload
        elif kind == "quota_usage":
            quota = payload.get("quota")
            if isinstance(quota, dict):
                outcome.quota = quota

    def _merge(self, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        merged = self.outcome.usage
        for key, value in usage.items():
            if value is not None:
                merged[key] = value
        output = merged.get("output_tokens")
        if isinstance(output, int) and output > self._reported:
            self._reported = output
        self._progress(exact=True)

    def _progress(self, *, exact: bool = False) -> None:
        estimate = max(self._reported, math.ceil(self.outcome.output_chars / self._chars_per_token))
        estimate = int(min(estimate, self._max_tokens))
        self.outcome.output_estimate = estimate
        if estimate > self._charged and (exact or estimate - self._charged >= _PROGRESS_STEP):
            self._charged = estimate
            self._observer.progress(estimate)


class JsonMeter(Meter):
    """Keeps a JSON body that is read lazily (``with_streaming_response``) and parses it at the end."""

    def __init__(self, observer: BodyObserver, *, content_encoding: str = "") -> None:
        super().__init__(observer, content_encoding=content_encoding)
        self._body = bytearray()
        self._complete = False

    def _read(self, data: bytes) -> None:
        self._body += data
        if len(self._body) > _MAX_JSON:
            raise ValueError(f"a JSON body longer than {_MAX_JSON} bytes")

    def completed(self) -> None:
        """The body was read to its end, so it is whole and can be parsed."""
        self._complete = True

    def _close(self) -> None:
        if self._complete and self._body:
            self.outcome.json_body = json.loads(bytes(self._body))
            self.outcome.completed = True


# ---------------------------------------------------------------------- body wrappers


class _Forwarding:
    """What a wrapper must still show of the body it wraps."""

    _body: Any

    @property
    def elapsed(self) -> Any:
        """The wrapped body's ``elapsed`` (``httpx2.Response.elapsed`` reads it here)."""
        return getattr(self._body, "elapsed", None)

    @property
    def stream_observer(self) -> Any:
        """The SDK's tracing observer of the wrapped body, so SDK tracing keeps working."""
        return getattr(self._body, "stream_observer", None)


class MeteredSyncStream(_Forwarding, httpx2.SyncByteStream):
    """A response body that shows every chunk to a meter and tells it how the body ended."""

    def __init__(self, body: httpx2.SyncByteStream, meter: Meter) -> None:
        self._body = body
        self._meter = meter

    def __iter__(self) -> Iterator[bytes]:
        how = "failed"
        try:
            for chunk in self._body:
                self._meter.feed(chunk)
                yield chunk
            how = "read"
            if isinstance(self._meter, JsonMeter):
                self._meter.completed()
        except GeneratorExit:
            how = "closed"
            raise
        finally:
            self._meter.finish(how)

    def close(self) -> None:
        """Close the wrapped body, then settle."""
        try:
            self._body.close()
        finally:
            self._meter.finish("closed")

    def __del__(self) -> None:
        # dropped without being read or closed (e.g. a Stream never iterated)
        if not sys.is_finalizing():
            self._meter.finish("dropped")


class MeteredAsyncStream(_Forwarding, httpx2.AsyncByteStream):
    """The async twin of :class:`MeteredSyncStream`."""

    def __init__(self, body: httpx2.AsyncByteStream, meter: Meter) -> None:
        self._body = body
        self._meter = meter

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = self._body.__aiter__()
        how = "failed"
        try:
            async for chunk in chunks:
                self._meter.feed(chunk)
                yield chunk
            how = "read"
            if isinstance(self._meter, JsonMeter):
                self._meter.completed()
        except GeneratorExit:
            how = "closed"
            raise
        finally:
            # settle first: nothing after an await is sure to run once the task is cancelled
            self._meter.finish(how)
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                # closes a body read in part in the task that read it (as the SDK's tracing does)
                await aclose()

    async def aclose(self) -> None:
        """Close the wrapped body, then settle."""
        try:
            await self._body.aclose()
        finally:
            self._meter.finish("closed")

    def __del__(self) -> None:
        if not sys.is_finalizing():
            self._meter.finish("dropped")
