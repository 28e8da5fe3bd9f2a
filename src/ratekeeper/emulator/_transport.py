"""An in-process httpx2 transport that answers from an ``EmulatedServer``.

Async requests take their time from ``anyio.current_time()`` and wait with
``anyio.sleep_until``, so under trio's ``MockClock(autojump_threshold=0)``
minutes of traffic run in milliseconds. Sync requests use an injectable
:class:`Clock` (``VirtualClock`` advances instantly; the default is real time).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import final

import anyio
import httpx2

from ratekeeper.emulator._clock import Clock, RealClock
from ratekeeper.emulator._server import EmulatedServer
from ratekeeper.emulator._wire import EmulatorRequest, Reply

__all__ = ["EmulatorTransport"]


def _convert(request: httpx2.Request, body: bytes) -> EmulatorRequest:
    url = request.url
    path = url.raw_path.decode("ascii", "replace")
    base = f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers.raw}
    return EmulatorRequest(request.method, path, body, headers, base)


def _response(
    reply: Reply, stream: httpx2.SyncByteStream | httpx2.AsyncByteStream | None = None
) -> httpx2.Response:
    if stream is None:
        return httpx2.Response(reply.status, headers=list(reply.headers), content=reply.body_bytes())
    return httpx2.Response(reply.status, headers=list(reply.headers), stream=stream)


@final
class EmulatorTransport(httpx2.AsyncBaseTransport, httpx2.BaseTransport):
    """Serve httpx2 requests (sync or async) from ``server``.

    ``origin`` is the transport time that is server time 0; by default the
    time of the first request through any transport of ``server``. ``clock``
    drives the sync path only (default: real time).

    >>> server = EmulatedServer(EmulatorConfig())                    # doctest: +SKIP
    >>> http = httpx2.AsyncClient(transport=EmulatorTransport(server))  # doctest: +SKIP
    >>> client = anthropic.AsyncAnthropic(api_key="test", http_client=http,
    ...                                   base_url="http://emulator")  # doctest: +SKIP
    """

    def __init__(
        self, server: EmulatedServer, *, clock: Clock | None = None, origin: float | None = None
    ) -> None:
        self.server = server
        self.clock: Clock = clock if clock is not None else RealClock()
        self._origin = origin
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EmulatorTransport({self.server!r})"

    def _server_time(self, t: float) -> float:
        if self._origin is None:
            if self.server.time_origin is None:
                self.server.time_origin = t
            self._origin = self.server.time_origin
        return t - self._origin

    def _local_time(self, server_time: float) -> float:
        assert self._origin is not None
        return server_time + self._origin

    def _handle(self, request: httpx2.Request, body: bytes, t: float) -> tuple[Reply, float]:
        now = self._server_time(t)
        with self._lock:
            return self.server.handle(_convert(request, body), now), now

    def _deliver(self, reply: Reply, t: float) -> Reply:
        if reply.late_headers is None:
            return reply
        with self._lock:
            return self.server.deliver(reply, self._server_time(t))

    def _abandon(self, request_id: str, t: float) -> None:
        with self._lock:
            self.server.abandon(request_id, self._server_time(t))

    # ------------------------------------------------------------------ async

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Answer ``request`` after the emulated latency, with ``anyio`` time."""
        body = await request.aread()
        with self._lock:
            uplink = self.server.uplink_delay()
        if uplink > 0:
            await anyio.sleep(uplink)
        reply, arrival = self._handle(request, body, anyio.current_time())
        try:
            await anyio.sleep_until(self._local_time(arrival + reply.delay))
        except BaseException:
            self._abandon(reply.request_id, anyio.current_time())
            raise
        reply = self._deliver(reply, anyio.current_time())
        if not reply.is_stream:
            return _response(reply)
        return _response(reply, _AsyncEvents(self, reply, arrival))

    # ------------------------------------------------------------------ sync

    def _sleep_until(self, t: float) -> None:
        self.clock.sleep(t - self.clock.now())

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        """Answer ``request`` after the emulated latency, with ``self.clock`` time."""
        body = request.read()
        with self._lock:
            uplink = self.server.uplink_delay()
        if uplink > 0:
            self.clock.sleep(uplink)
        reply, arrival = self._handle(request, body, self.clock.now())
        try:
            self._sleep_until(self._local_time(arrival + reply.delay))
        except BaseException:
            self._abandon(reply.request_id, self.clock.now())
            raise
        reply = self._deliver(reply, self.clock.now())
        if not reply.is_stream:
            return _response(reply)
        return _response(reply, _SyncEvents(self, reply, arrival))


class _Events:
    def __init__(self, transport: EmulatorTransport, reply: Reply, arrival: float) -> None:
        self._transport = transport
        self._reply = reply
        self._arrival = arrival
        self._done = False

    def _target(self, offset: float) -> float:
        return self._transport._local_time(self._arrival + offset)

    def _stop(self, t: float) -> None:
        if not self._done:
            self._done = True
            self._transport._abandon(self._reply.request_id, t)


class _AsyncEvents(_Events, httpx2.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            for event in self._reply.events:
                await anyio.sleep_until(self._target(event.at))
                yield event.encode()
            self._done = True
        finally:
            if not self._done:
                try:
                    now = anyio.current_time()
                except Exception:  # finalized outside the event loop: settle at the server's latest time
                    now = self._transport._local_time(self._transport.server.now)
                self._stop(now)

    async def aclose(self) -> None:
        self._stop(anyio.current_time())


class _SyncEvents(_Events, httpx2.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        clock = self._transport.clock
        try:
            for event in self._reply.events:
                self._transport._sleep_until(self._target(event.at))
                yield event.encode()
            self._done = True
        finally:
            self._stop(clock.now())

    def close(self) -> None:
        self._stop(self._transport.clock.now())
