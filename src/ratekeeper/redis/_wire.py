"""The wire to Redis: EVALSHA with a reload on NOSCRIPT, pipelines, cluster routing, availability.

``Transport`` runs a batch of ``ScriptCall`` in one round trip, with the synchronous
client, an asyncio client, or (asyncio with a single server) a connection of its own
whose commands it packs itself (``_Wire``). It tells a failure of the whole round trip
(``RedisDown``, and Redis is then not tried again for ``retry_interval`` seconds) from
an error reply to one call (``Refused`` in that call's place).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import logging
import time
import weakref
from collections.abc import Sequence
from typing import Any, Final, final

import anyio
import sniffio

from ratekeeper.errors import BackendUnavailable
from ratekeeper.redis._config import client_options
from ratekeeper.redis._ops import RawReply, RedisDown, Refused, Result, ScriptCall

__all__ = ["Transport"]

log = logging.getLogger("ratekeeper")

SCRIPTS: Final = ("reserve", "settle", "release", "resync", "control", "init", "sent")


def load_scripts() -> dict[str, tuple[str, str]]:
    """Each script's text (``_common.lua`` first) and its SHA1, by name."""
    folder = importlib.resources.files("ratekeeper.redis") / "lua"
    common = (folder / "_common.lua").read_text(encoding="utf-8")
    out = {}
    for name in SCRIPTS:
        text = common + "\n" + (folder / f"{name}.lua").read_text(encoding="utf-8")
        out[name] = (text, hashlib.sha1(text.encode()).hexdigest())
    return out


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(raw: object) -> RawReply:
    if isinstance(raw, list):
        return [_text(v) for v in raw]
    return [_text(raw)]


@final
class Transport:
    """Round trips to one Redis (or cluster) for a backend, and whether Redis is up.

    ``tag`` is the hash tag of every key (a cluster routes by it); ``where`` names the
    server in messages; ``on_unavailable`` is only said in them.
    """

    def __init__(
        self,
        redis: Any,
        sync: Any,
        *,
        url: str | None,
        async_client: Any,
        tag: str,
        where: str,
        timeout: float,
        retry_interval: float,
        on_unavailable: str,
    ) -> None:
        self._redis = redis  # the redis-py module, imported when the backend was made
        self._sync = sync
        self._url = url
        self._async_given = async_client
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        # per event loop: the connection this backend keeps for its own round trips
        self._wires: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Wire] = weakref.WeakKeyDictionary()
        self._tag = tag
        self._where = where
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._on_unavailable = on_unavailable
        self._scripts = load_scripts()
        # EVALSHA's constant part per (script, keys): everything but the arguments
        self._heads: dict[tuple[str, tuple[str, ...], bool], bytes] = {}
        # unavailability: when Redis failed last, until when not to try again
        self.down_until = 0.0
        self._down_error: BaseException | None = None

    # ------------------------------------------------------------------ availability

    def available(self) -> bool:
        """False while a recent failure says not to try Redis yet."""
        return time.monotonic() >= self.down_until

    def mark_down(self, error: BaseException) -> None:
        """Redis failed: don't try again for ``retry_interval`` seconds."""
        if self.down_until == 0.0:
            policy = self._on_unavailable
            log.warning("Redis at %s is unavailable (%s); policy %r", self._where, error, policy)
        self.down_until = time.monotonic() + self._retry_interval
        self._down_error = error

    def _mark_up(self) -> None:
        if self.down_until != 0.0:
            log.warning("Redis at %s is reachable again", self._where)
            self.down_until = 0.0
            self._down_error = None

    def unavailable_error(self) -> BackendUnavailable:
        """The error ``on_unavailable="fail"`` raises."""
        cause = self._down_error
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else "no answer"
        return BackendUnavailable(
            f"Redis at {self._where} is unavailable ({detail}); on_unavailable='fail' admits "
            f"nothing without it (next attempt in {self._retry_interval:g}s)"
        )

    # ------------------------------------------------------------------ failures

    def _failures(self) -> tuple[type[BaseException], ...]:
        errors = self._redis.exceptions
        return (errors.ConnectionError, errors.TimeoutError, errors.BusyLoadingError, OSError, TimeoutError)

    def _outage(self, exc: BaseException) -> bool:
        """True if ``exc`` means Redis could not be reached, not that a script or a call was wrong.

        A cluster client adds its own: the cluster says it is down, the slot has no node,
        or no node it knows answers (an exception raised from a connection error).
        """
        errors = self._redis.exceptions
        if isinstance(exc, (*self._failures(), errors.ClusterDownError, errors.SlotNotCoveredError)):
            return True
        return isinstance(exc, errors.RedisClusterException) and isinstance(exc.__cause__, self._failures())

    def _errors(self) -> tuple[type[BaseException], ...]:
        """What redis-py raises for a round trip that failed as a whole (after ``_outage``)."""
        errors = self._redis.exceptions
        return (errors.RedisError, errors.RedisClusterException)

    def _down(self, exc: BaseException) -> RedisDown:
        # any failure of the round trip as a whole, an outage or not (an error reply to the
        # connection's own commands, a reply redis-py cannot parse): Redis cannot be used now
        self.mark_down(exc)
        return RedisDown(str(exc))

    @staticmethod
    def _mark_sent(calls: Sequence[ScriptCall]) -> None:
        now = time.monotonic()
        for call in calls:
            if not call.sent:
                call.sent = now

    # ------------------------------------------------------------------ round trips

    def run_sync(self, calls: Sequence[ScriptCall]) -> list[Result]:
        """Run ``calls`` in one round trip (a pipeline) with the synchronous client.

        Raises ``RedisDown`` if the round trip failed (Redis did not answer, or answered the
        connection with an error): then any call may have run or not. A call Redis answered
        with an error reply gets a ``Refused`` in its place; the others' replies stand.
        """
        self._mark_sent(calls)
        try:
            results = self._execute_sync(calls)
        except Exception as exc:
            if not self._outage(exc) and not isinstance(exc, self._errors()):
                raise
            raise self._down(exc) from exc
        self._mark_up()
        return results

    async def run_async(self, calls: Sequence[ScriptCall]) -> list[Result]:
        """Run ``calls`` in one round trip from async code (asyncio natively, trio via a thread)."""
        client = None
        if sniffio.current_async_library() == "asyncio":
            wire = self._wire()
            if wire is not None and not wire.busy:
                return await self._run_wire(wire, calls)
            client = self._async_client()
        if client is None:
            return await anyio.to_thread.run_sync(self.run_sync, calls)
        self._mark_sent(calls)
        try:
            # even for a client without timeouts (asyncio's own scope: anyio's costs ~10 us more)
            async with asyncio.timeout(self._timeout * 2 + 0.1):
                results = await self._execute_async(client, calls)
        except Exception as exc:
            if not self._outage(exc) and not isinstance(exc, self._errors()):
                raise
            raise self._down(exc) from exc
        self._mark_up()
        return results

    def _async_client(self) -> Any:
        if self._async_given is not None:
            return self._async_given
        if self._url is None:
            return None
        loop = asyncio.get_running_loop()
        client = self._async_clients.get(loop)
        if client is None:
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            options = client_options(self._timeout)
            options["retry"] = Retry(NoBackoff(), 0)
            client = redis.asyncio.Redis.from_url(self._url, **options)
            self._async_clients[loop] = client
        return client

    async def close_async_client(self) -> None:
        """Close the asyncio client made for the running loop, if any (not one given by the caller)."""
        client = self._async_clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    # ------------------------------------------------------------------ the backend's own connection

    def _wire(self) -> _Wire | None:
        """This event loop's own connection (made on first use), or None for clients without a pool."""
        loop = asyncio.get_running_loop()
        wire = self._wires.get(loop)
        if wire is None:
            client = self._async_client()
            pool = getattr(client, "connection_pool", None)
            if pool is None or not hasattr(pool, "connection_class"):
                return None  # a cluster client: its own pipelines route the commands
            # Not from the pool's free list: a connection of its own, with the pool's settings,
            # so nothing else ever reads from it. No socket timeout: one deadline per round
            # trip (below) replaces redis-py's per-read and per-write timers.
            options = dict(pool.connection_kwargs)
            options["socket_timeout"] = None
            wire = self._wires[loop] = _Wire(
                pool.connection_class(**options), self._redis.exceptions.ResponseError
            )
        return wire

    async def _run_wire(self, wire: _Wire, calls: Sequence[ScriptCall]) -> list[Result]:
        """``run_async`` over the backend's own connection: commands packed here, replies read in order."""
        wire.busy = True
        self._mark_sent(calls)
        try:
            async with asyncio.timeout(self._timeout):
                raw = await wire.exchange(b"".join([self._pack(call) for call in calls]), len(calls))
                if any(isinstance(r, self._redis.exceptions.NoScriptError) for r in raw):
                    await self._reload_and_redo(wire, calls, raw)
            results = self._results(raw)
        except TimeoutError as exc:
            error = TimeoutError(f"no answer within {self._timeout:g}s")
            self.mark_down(error)
            raise RedisDown(str(error)) from exc
        except (*self._failures(), *self._errors()) as exc:
            raise self._down(exc) from exc
        finally:
            wire.busy = False
        self._mark_up()
        return results

    async def _reload_and_redo(self, wire: _Wire, calls: Sequence[ScriptCall], raw: list[object]) -> None:
        """Redis lost its scripts (a restart, SCRIPT FLUSH): load them, redo what failed, in ``raw``."""
        noscript = self._redis.exceptions.NoScriptError
        redo = [i for i, r in enumerate(raw) if isinstance(r, noscript)]
        loads = [("SCRIPT", "LOAD", text) for text, _ in self._scripts.values()]
        packed = b"".join(_pack_command(args) for args in loads)
        again = await wire.exchange(
            packed + b"".join([self._pack(calls[i]) for i in redo]), len(loads) + len(redo)
        )
        for i, reply in zip(redo, again[len(loads) :], strict=True):
            raw[i] = reply

    def _pack(self, call: ScriptCall) -> bytes:
        """``EVALSHA sha numkeys keys... [op key] args...`` in the Redis protocol."""
        ident = call.ident
        key = (call.script, call.keys, ident is not None)
        head = self._heads.get(key)
        if head is None:
            sha = self._scripts[call.script][1]
            count = len(call.keys) + (ident is not None)
            head = self._heads[key] = _pack_args(("EVALSHA", sha, count, *call.keys))
        if ident is None:
            return b"*%d\r\n%b%b" % (3 + len(call.keys) + len(call.args), head, _pack_args(call.args))
        tail = _pack_args((self._op_key(ident), *call.args))
        return b"*%d\r\n%b%b" % (4 + len(call.keys) + len(call.args), head, tail)

    def _op_key(self, ident: str) -> str:
        return f"{self._tag}:op:{ident}"

    # ------------------------------------------------------------------ through redis-py

    def _args(self, call: ScriptCall) -> tuple[Any, ...]:
        sha = self._scripts[call.script][1]
        if call.ident is None:
            return (sha, len(call.keys), *call.keys, *call.args)
        return (sha, len(call.keys) + 1, *call.keys, self._op_key(call.ident), *call.args)

    def _pipeline(self, client: Any, calls: Sequence[ScriptCall]) -> Any:
        """A pipeline of ``client`` (sync or async, single server or cluster) with ``calls`` queued.

        Not ``pipe.evalsha``: redis-py's cluster pipelines refuse it (EVALSHA is in their
        ``PIPELINE_BLOCKED_COMMANDS``, redis-py issue #2914), though the command needs
        nothing a pipeline lacks: every key here carries one hash tag, so the whole
        pipeline goes to the one node that owns the organization's slot, in order.
        """
        route = self._route(client)
        pipe = client.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command("EVALSHA", *self._args(call), **route)
        return pipe

    def _route(self, client: Any) -> dict[str, Any]:
        """For a cluster client, ``target_nodes``: the node that owns this organization's slot.

        Named, it spares a round trip per pipelined EVALSHA (redis-py's synchronous
        cluster pipeline otherwise asks a node for each one's keys: COMMAND GETKEYS),
        and SCRIPT LOAD goes there alone, not to every primary (one of which may be
        down). The node comes from the client's slot table; a MOVED reply still redirects.
        """
        owner = getattr(client, "get_node_from_key", None)
        if owner is None:
            return {}
        try:
            return {"target_nodes": owner(self._tag)}
        except self._redis.exceptions.RedisClusterException:
            return {}  # no slot table yet or just now: the client finds the node, or says why not

    def _execute_sync(self, calls: Sequence[ScriptCall]) -> list[Result]:
        client = self._sync
        noscript = self._redis.exceptions.NoScriptError
        if len(calls) == 1:
            try:
                try:
                    return [_decode(client.evalsha(*self._args(calls[0])))]
                except noscript:
                    self._load_sync()
                    return [_decode(client.evalsha(*self._args(calls[0])))]
            except self._redis.exceptions.ResponseError as exc:
                return self._results([exc])
        pipe = self._pipeline(client, calls)
        raw = pipe.execute(raise_on_error=False)
        if any(isinstance(r, noscript) for r in raw):
            # Redis lost its scripts (a restart, SCRIPT FLUSH): load them, redo what failed
            self._load_sync()
            redo = [i for i, r in enumerate(raw) if isinstance(r, noscript)]
            again = self._execute_sync([calls[i] for i in redo])
            for i, reply in zip(redo, again, strict=True):
                raw[i] = reply
        return self._results(raw)

    async def _execute_async(self, client: Any, calls: Sequence[ScriptCall]) -> list[Result]:
        noscript = self._redis.exceptions.NoScriptError
        if len(calls) == 1:
            try:
                try:
                    return [_decode(await client.evalsha(*self._args(calls[0])))]
                except noscript:
                    await self._load_async(client)
                    return [_decode(await client.evalsha(*self._args(calls[0])))]
            except self._redis.exceptions.ResponseError as exc:
                return self._results([exc])
        pipe = self._pipeline(client, calls)
        raw = await pipe.execute(raise_on_error=False)
        if any(isinstance(r, noscript) for r in raw):
            await self._load_async(client)
            redo = [i for i, r in enumerate(raw) if isinstance(r, noscript)]
            again = await self._execute_async(client, [calls[i] for i in redo])
            for i, reply in zip(redo, again, strict=True):
                raw[i] = reply
        return self._results(raw)

    def _results(self, raw: Sequence[object]) -> list[Result]:
        """Replies decoded, error replies as ``Refused``; one that says the server is down raises.

        (A cluster's CLUSTERDOWN or TRYAGAIN, or redis-py's connection errors in a
        pipeline's replies: then no reply of the round trip can be trusted to be all.)
        """
        out: list[Result] = []
        for r in raw:
            if isinstance(r, Refused):
                out.append(r)
            elif isinstance(r, BaseException):
                if self._outage(r):
                    raise r
                out.append(Refused(r))
            elif isinstance(r, list) and r and all(isinstance(v, str) for v in r):
                out.append(r)
            else:
                out.append(_decode(r))
        return out

    def _load_sync(self) -> None:
        client: Any = self._sync  # redis.Redis or redis.RedisCluster
        route = self._route(client)
        for text, _ in self._scripts.values():
            client.execute_command("SCRIPT LOAD", text, **route)

    async def _load_async(self, client: Any) -> None:
        route = self._route(client)
        for text, _ in self._scripts.values():
            await client.execute_command("SCRIPT LOAD", text, **route)


@final
class _Wire:
    """A connection of the backend's own on one event loop; ``busy`` while a round trip is out."""

    __slots__ = ("busy", "conn", "error")

    def __init__(self, conn: Any, error: type[Exception]) -> None:
        self.conn = conn
        self.error = error  # redis-py's ResponseError: an error reply, the connection still good
        self.busy = False

    async def exchange(self, packed: bytes, replies: int) -> list[object]:
        """Send ``packed`` (``replies`` commands) and read every reply; errors are returned, not raised.

        Every reply is read even after an error reply, so the connection stays in step.
        A failure mid-way (timeout, reset, cancellation) makes redis-py drop the
        connection; the next exchange connects again.
        """
        conn = self.conn
        await conn.send_packed_command(packed, check_health=False)
        out: list[object] = []
        for _ in range(replies):
            try:
                out.append(await conn.read_response())
            except self.error as exc:
                out.append(exc)
        return out


def _pack_args(args: Sequence[str | int | float]) -> bytes:
    """Bulk strings of the Redis protocol, without the array header."""
    out = []
    for arg in args:
        text = arg if isinstance(arg, str) else repr(arg)
        # one encode for the whole command; a length counts bytes, so only ASCII is measured as text
        size = len(text) if text.isascii() else len(text.encode())
        out.append(f"${size}\r\n{text}\r\n")
    return "".join(out).encode()


def _pack_command(args: Sequence[str | int | float]) -> bytes:
    return b"*%d\r\n%b" % (len(args), _pack_args(args))
