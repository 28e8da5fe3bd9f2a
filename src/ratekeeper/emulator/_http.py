"""The emulator as a real HTTP server (on loopback unless told otherwise), in wall-clock time."""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self, final

from ratekeeper.emulator._config import EmulatorConfig
from ratekeeper.emulator._server import EmulatedServer
from ratekeeper.emulator._wire import EmulatorRequest, Reply

__all__ = ["EmulatorHTTPServer", "serve"]

_SKIP = {"content-length", "transfer-encoding", "connection"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost``, ``127.x.x.x``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # a client that declares more body than it sends (or goes quiet) holds its thread this long
    timeout = 30.0
    server: _HTTPServer

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the request log is in ``EmulatedServer.log``."""

    def do_GET(self) -> None:
        """Answer a GET."""
        self._serve()

    def do_POST(self) -> None:
        """Answer a POST."""
        self._serve()

    def do_DELETE(self) -> None:
        """Answer a DELETE."""
        self._serve()

    def _serve(self) -> None:
        owner = self.server.owner
        length = self._declared_length()
        if length is None:
            return
        body = self.rfile.read(length) if length else b""
        host = self.headers.get("host") or f"{owner.host}:{owner.port}"
        with owner.lock:
            uplink = owner.server.uplink_delay()
        if uplink > 0:
            owner.sleep_until(owner.now() + uplink)
        req = EmulatorRequest(self.command, self.path, body, dict(self.headers.items()), f"http://{host}")
        arrival = owner.now()
        with owner.lock:
            reply = owner.server.handle(req, arrival)
        owner.sleep_until(arrival + reply.delay)
        if reply.late_headers is not None:
            with owner.lock:
                reply = owner.server.deliver(reply, owner.now())
        self.send_response_only(reply.status)
        for name, value in reply.headers:
            if name.lower() not in _SKIP:
                self.send_header(name, value)
        if reply.is_stream:
            self._stream(reply, arrival)
        else:
            data = reply.body_bytes()
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    def _declared_length(self) -> int | None:
        """The body's declared length, or ``None`` after refusing it unread.

        The body is read only once its length is known to be within the cap, so a
        huge or lying ``content-length`` never makes the server buffer it. A POST
        must declare it: chunked bodies are not read here, and a body of unknown
        length would be parsed as the next request.
        """
        cfg = self.server.owner.server.config
        cap = cfg.max_batch_bytes if "/batches" in self.path else cfg.max_request_bytes
        raw = self.headers.get("content-length")
        if self.headers.get("transfer-encoding") is not None or (raw is None and self.command == "POST"):
            self._refuse(411, "invalid_request_error", "A request body needs a content-length header.")
            return None
        try:
            length = int(raw or "0")
        except ValueError:
            length = -1
        if 0 <= length <= cap:
            return length
        message = f"Request exceeds the maximum allowed number of bytes ({cap}); content-length was {raw!r}."
        self._refuse(413, "request_too_large", message)
        return None

    def _refuse(self, status: int, kind: str, message: str) -> None:
        """Answer ``status`` and close: the unread body must not be parsed as the next request."""
        data = json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
        self.close_connection = True
        self.send_response_only(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, reply: Reply, arrival: float) -> None:
        owner = self.server.owner
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            for event in reply.events:
                owner.sleep_until(arrival + event.at)
                data = event.encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:  # the client went away: settle what it got
            with owner.lock:
                owner.server.abandon(reply.request_id, owner.now())
            self.close_connection = True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: a few dozen clients connecting at once
    # (workers starting together) would see connections reset instead of a slow answer
    request_queue_size = 1024
    owner: EmulatorHTTPServer


@final
class EmulatorHTTPServer:
    """A running HTTP server answering from an :class:`EmulatedServer`, on ``host`` (loopback by default).

    Any address can be named (``0.0.0.0`` for every interface, to reach it from
    a container or another machine): the emulator checks no API key, so
    ``loopback`` says whether only this machine can reach it.

    Server time is wall-clock seconds since the server started. ``url`` is
    the base URL to give the SDK; ``close()`` (or leaving the ``with`` block)
    stops it.
    """

    def __init__(self, server: EmulatedServer, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = server
        self.lock = threading.Lock()
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.owner = self
        self.host = host
        self.loopback = is_loopback(host)
        self.port = int(self._httpd.server_address[1])
        self._origin = time.monotonic()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"EmulatorHTTPServer(url={self.url!r})"

    @property
    def url(self) -> str:
        """``http://HOST:PORT``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def now(self) -> float:
        """Server time: seconds since start."""
        return time.monotonic() - self._origin

    def sleep_until(self, t: float) -> None:
        """Sleep until server time ``t``."""
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)

    def start(self) -> Self:
        """Serve in a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, name="ratekeeper-emulator", daemon=True
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until ``close()`` is called from another one, or an interrupt."""
        self._httpd.serve_forever()

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def serve(
    config: EmulatorConfig | EmulatedServer | None = None, host: str = "127.0.0.1", port: int = 0
) -> EmulatorHTTPServer:
    """Start the emulator on ``host:port`` in a background thread; port 0 picks a free one.

    ``host`` is loopback by default; any address you name is taken (see
    :class:`EmulatorHTTPServer`).

    >>> with serve(EmulatorConfig(preset="tier-2")) as http:  # doctest: +ELLIPSIS
    ...     http.url
    'http://127.0.0.1:...'
    """
    server = config if isinstance(config, EmulatedServer) else EmulatedServer(config or EmulatorConfig())
    return EmulatorHTTPServer(server, host, port).start()
