"""``RedisBackend``: one organization's limits shared by every process and machine, in Redis.

This module imports ``redis`` only when a backend is constructed, so
``import ratekeeper`` works without the extra. The scheduling logic that uses
the backend is in ``_remote.py``; this module is the transport: keys, the Lua
scripts (package data in ``ratekeeper/redis/lua``), EVALSHA with a reload on
NOSCRIPT, timeouts, error replies (one op's is its own), op ids (a change sent
twice applies once), the unavailability state and the outbox of changes that
synchronous permit methods leave for later.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import importlib.resources
import itertools
import logging
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, final
from urllib.parse import unquote

import anyio
import sniffio

from ratekeeper.errors import BackendUnavailable, ConfigurationError, MissingDependency

if TYPE_CHECKING:
    from ratekeeper.gate._limiter import Limiter
    from ratekeeper.redis._engine import RemoteEngine

__all__ = ["RedisBackend"]

log = logging.getLogger("ratekeeper")

_SCRIPTS: Final = ("reserve", "settle", "release", "resync", "control", "init")
#: Changes waiting to be sent are capped: during a long outage the oldest are dropped
#: (they only refund or correct; dropping them errs on the side of admitting less).
_OUTBOX_LIMIT: Final = 10_000
_POLICIES: Final = ("fail", "local")

Reply = list[str]


@final
class Op:
    """One script call: ``script`` with ``keys`` and ``args``; ``on_reply`` sees its reply.

    ``ident``: the op's id, for a change that must not apply twice (reserve, settle,
    release, a give-back). Its key (``RedisBackend.op_key``) goes last in ``KEYS``; the
    script records it for ``lease`` seconds, and a second run of the same op is a no-op
    (reply ``DUP``). ``sent``: when it first left in a round trip (monotonic; 0: never).
    """

    __slots__ = ("args", "ident", "keys", "on_reply", "script", "sent")

    def __init__(
        self,
        script: str,
        keys: Sequence[str],
        args: Sequence[str | int | float],
        on_reply: Callable[[Reply], None] | None = None,
        ident: str | None = None,
    ) -> None:
        self.script = script
        self.keys = tuple(keys)
        self.args = tuple(args)
        self.on_reply = on_reply
        self.ident = ident
        self.sent = 0.0


@final
class Refused(Exception):
    """Internal: Redis answered one op with an error reply (``error``); the others of its round trip stand.

    The script may have run in part (Redis does not undo a script's writes before an
    error), so the op is never sent again.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


#: What a round trip gives back per op: its reply, or the error Redis answered it with.
Result = Reply | Refused


class Down(Exception):
    """Internal: Redis did not answer (connection refused, reset, timed out)."""


def _load_scripts() -> dict[str, tuple[str, str]]:
    folder = importlib.resources.files("ratekeeper.redis") / "lua"
    common = (folder / "_common.lua").read_text(encoding="utf-8")
    out = {}
    for name in _SCRIPTS:
        text = common + "\n" + (folder / f"{name}.lua").read_text(encoding="utf-8")
        out[name] = (text, hashlib.sha1(text.encode()).hexdigest())
    return out


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(raw: object) -> Reply:
    if isinstance(raw, list):
        return [_text(v) for v in raw]
    return [_text(raw)]


@final
class RedisBackend:
    """Keeps an organization's rate-limit state in Redis, for ``Limiter(..., backend=...)``.

    Every process that uses the same API key creates its own backend (after
    forking) with the same ``url_or_client``, ``prefix`` and ``org``; their
    limiters then share buckets, pauses, the in-flight set and a fair line of
    waiters. ``url_or_client`` is a ``redis://`` URL or a ready ``redis.Redis`` /
    ``redis.RedisCluster`` client (its own timeouts then apply);
    ``async_client`` optionally adds a ``redis.asyncio`` client for asyncio code
    (with a URL one is made per event loop; under trio the synchronous client
    runs in a worker thread).

    ``on_unavailable``: ``"fail"`` raises ``BackendUnavailable`` while Redis
    cannot be reached; ``"local"`` admits through a process-local limiter
    holding ``fallback_fraction`` of each limit (e.g. ``1 / number_of_processes``).
    Redis is tried again ``retry_interval`` seconds after a failure; every call
    gives up after ``timeout`` seconds.

    ``lease``: seconds after which a reservation whose process never settled it
    leaves the in-flight set (its charge stands). ``ticket_ttl``: seconds after
    which a silent process loses its place in line. ``poll_interval``: the
    longest a waiting process goes without asking Redis again (others' refunds
    are noticed this fast).

    ``prefetch``: when a pool has plenty to spare (over half of every bucket,
    nobody else waiting), a round trip that admits a request also reserves up to
    this many more like it (at most 5% of any bucket) for this process's next
    requests, which are then admitted without a round trip; ``prefetch_ttl``
    seconds later, or as soon as this process has to queue, what is left goes
    back. ``prefetch=0`` sends every request to Redis. See ``docs/redis.md``.
    """

    def __init__(
        self,
        url_or_client: Any,
        *,
        prefix: str = "ratekeeper",
        org: str = "default",
        async_client: Any = None,
        on_unavailable: str = "fail",
        fallback_fraction: float = 0.5,
        timeout: float = 0.5,
        retry_interval: float = 1.0,
        lease: float = 600.0,
        ticket_ttl: float = 10.0,
        poll_interval: float = 0.25,
        key_ttl: float = 86_400.0,
        flush_delay: float = 0.002,
        prefetch: int = 16,
        prefetch_ttl: float = 0.1,
    ) -> None:
        try:
            import redis
        except ImportError:
            raise MissingDependency("redis", "redis") from None
        if on_unavailable not in _POLICIES:
            raise ConfigurationError(f"on_unavailable must be 'fail' or 'local', got {on_unavailable!r}")
        if not 0 < fallback_fraction <= 1:
            raise ConfigurationError(f"fallback_fraction must be in (0, 1], got {fallback_fraction!r}")
        for name, value in (
            ("timeout", timeout),
            ("retry_interval", retry_interval),
            ("lease", lease),
            ("ticket_ttl", ticket_ttl),
            ("poll_interval", poll_interval),
            ("key_ttl", key_ttl),
            ("prefetch_ttl", prefetch_ttl),
        ):
            if not value > 0:
                raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
        if not flush_delay >= 0:
            raise ConfigurationError(f"flush_delay must be >= 0, got {flush_delay!r}")
        if type(prefetch) is not int or not 0 <= prefetch <= 1_000:
            raise ConfigurationError(f"prefetch must be an int from 0 to 1,000 (requests), got {prefetch!r}")
        for name, text in (("prefix", prefix), ("org", org)):
            if not text or any(c in text for c in "{}"):
                raise ConfigurationError(f"{name} must be a non-empty string without braces, got {text!r}")
        self._redis = redis
        self.prefix = prefix
        self.org = org
        self.on_unavailable = on_unavailable
        self.fallback_fraction = float(fallback_fraction)
        self.timeout = float(timeout)
        self.retry_interval = float(retry_interval)
        self.lease = float(lease)
        self.ticket_ttl = float(ticket_ttl)
        self.poll_interval = float(poll_interval)
        self.key_ttl = float(key_ttl)
        self.flush_delay = float(flush_delay)
        self.prefetch = prefetch
        self.prefetch_ttl = float(prefetch_ttl)
        #: This process's name in the line of waiters (one ticket per pool).
        self.participant = uuid.uuid4().hex[:16]
        self._url: str | None = None
        self._async_given = async_client
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        # per event loop: the connection this backend keeps for its own round trips
        self._wires: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Wire] = weakref.WeakKeyDictionary()
        if isinstance(url_or_client, str):
            self._url = url_or_client
            self._sync = redis.Redis.from_url(url_or_client, **self._client_options())
            self.where = _redact(url_or_client)
        else:
            self._sync = url_or_client
            self.where = _describe(url_or_client)
        self._scripts = _load_scripts()
        # EVALSHA's constant part per (script, keys): everything but the arguments
        self._heads: dict[tuple[str, tuple[str, ...], bool], bytes] = {}
        # unavailability: when Redis failed last, until when not to try again
        self._down_until = 0.0
        self._down_error: BaseException | None = None
        # the outbox: changes made by synchronous permit methods, sent by the next
        # reserve (same round trip) or by the flusher thread shortly after
        self._outbox: deque[Op] = deque()
        self._out_lock = threading.Lock()
        self._out_ready = threading.Condition(self._out_lock)
        # held while flush() sends: a flush that finds the outbox empty because the flusher
        # thread has just taken it waits for that send, so "flushed" means "applied"
        self._flush_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._closed = False
        # (when, order, callback), run by the flusher thread: prefetches expire this way
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_order = itertools.count()
        self._idents = itertools.count()  # next() on a count is atomic: threads may share it
        self._closing: list[weakref.WeakMethod[Callable[[], None]]] = []

    # ------------------------------------------------------------------ keys

    @property
    def tag(self) -> str:
        """The hash tag every key of this organization carries: ``{prefix:org}``."""
        return "{" + f"{self.prefix}:{self.org}" + "}"

    def org_key(self) -> str:
        """The organization hash: reservation counter, spend cap, subscription holds."""
        return f"{self.tag}:org"

    def pool_keys(self, pool: str) -> tuple[str, str, str, str, str, str, str, str]:
        """``(org, pool, res, lease, q, qd, notes, unc)``: every key one pool's scripts touch."""
        t = self.tag
        return (
            f"{t}:org",
            f"{t}:pool:{pool}",
            f"{t}:res:{pool}",
            f"{t}:lease:{pool}",
            f"{t}:q:{pool}",
            f"{t}:qd:{pool}",
            f"{t}:notes:{pool}",
            f"{t}:unc:{pool}",
        )

    def op_key(self, ident: str) -> str:
        """The key an op's id is recorded under (``lease`` seconds): ``{prefix:org}:op:ID``."""
        return f"{self.tag}:op:{ident}"

    def new_ident(self) -> str:
        """A fresh op id, unique across processes (this participant's name and a counter)."""
        return f"{self.participant}{next(self._idents):x}"

    # ------------------------------------------------------------------ binding

    def _bind_limiter(self, limiter: Limiter) -> RemoteEngine:
        from ratekeeper.redis._engine import RemoteEngine

        return RemoteEngine(limiter, self)

    # ------------------------------------------------------------------ availability

    def available(self) -> bool:
        """False while a recent failure says not to try Redis yet."""
        return time.monotonic() >= self._down_until

    def mark_down(self, error: BaseException) -> None:
        """Redis failed: don't try again for ``retry_interval`` seconds."""
        if self._down_until == 0.0:
            log.warning("Redis at %s is unavailable (%s); policy %r", self.where, error, self.on_unavailable)
        self._down_until = time.monotonic() + self.retry_interval
        self._down_error = error

    def _mark_up(self) -> None:
        if self._down_until != 0.0:
            log.warning("Redis at %s is reachable again", self.where)
            self._down_until = 0.0
            self._down_error = None

    def unavailable_error(self) -> BackendUnavailable:
        """The error ``on_unavailable="fail"`` raises."""
        cause = self._down_error
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else "no answer"
        return BackendUnavailable(
            f"Redis at {self.where} is unavailable ({detail}); on_unavailable='fail' admits "
            f"nothing without it (next attempt in {self.retry_interval:g}s)"
        )

    # ------------------------------------------------------------------ calls

    def _client_options(self) -> dict[str, Any]:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "retry": Retry(NoBackoff(), 0),  # our own policy decides what a failure means
            "decode_responses": True,
        }

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

            options = self._client_options()
            options["retry"] = Retry(NoBackoff(), 0)
            client = redis.asyncio.Redis.from_url(self._url, **options)
            self._async_clients[loop] = client
        return client

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

    def _down(self, exc: BaseException) -> Down:
        # any failure of the round trip as a whole, an outage or not (an error reply to the
        # connection's own commands, a reply redis-py cannot parse): Redis cannot be used now
        self.mark_down(exc)
        return Down(str(exc))

    def _mark_sent(self, ops: Sequence[Op]) -> None:
        now = time.monotonic()
        for op in ops:
            if not op.sent:
                op.sent = now

    def run_sync(self, ops: Sequence[Op]) -> list[Result]:
        """Run ``ops`` in one round trip (a pipeline) with the synchronous client.

        Raises ``Down`` if the round trip failed (Redis did not answer, or answered the
        connection with an error): then any op may have run or not. An op Redis answered
        with an error reply gets a ``Refused`` in its place; the others' replies stand.
        """
        self._mark_sent(ops)
        try:
            results = self._execute_sync(ops)
        except Exception as exc:
            if not self._outage(exc) and not isinstance(exc, self._errors()):
                raise
            raise self._down(exc) from exc
        self._mark_up()
        return results

    async def run_async(self, ops: Sequence[Op]) -> list[Result]:
        """Run ``ops`` in one round trip from async code (asyncio natively, trio via a thread)."""
        client = None
        if sniffio.current_async_library() == "asyncio":
            wire = self._wire()
            if wire is not None and not wire.busy:
                return await self._run_wire(wire, ops)
            client = self._async_client()
        if client is None:
            return await anyio.to_thread.run_sync(self.run_sync, ops)
        self._mark_sent(ops)
        try:
            # even for a client without timeouts (asyncio's own scope: anyio's costs ~10 us more)
            async with asyncio.timeout(self.timeout * 2 + 0.1):
                results = await self._execute_async(client, ops)
        except Exception as exc:
            if not self._outage(exc) and not isinstance(exc, self._errors()):
                raise
            raise self._down(exc) from exc
        self._mark_up()
        return results

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

    async def _run_wire(self, wire: _Wire, ops: Sequence[Op]) -> list[Result]:
        """``run_async`` over the backend's own connection: commands packed here, replies read in order."""
        wire.busy = True
        self._mark_sent(ops)
        try:
            async with asyncio.timeout(self.timeout):
                raw = await wire.exchange(b"".join([self._pack(op) for op in ops]), len(ops))
                if any(isinstance(r, self._redis.exceptions.NoScriptError) for r in raw):
                    # Redis lost its scripts (a restart, SCRIPT FLUSH): load them, redo what failed
                    redo = [
                        i for i, r in enumerate(raw) if isinstance(r, self._redis.exceptions.NoScriptError)
                    ]
                    loads = [("SCRIPT", "LOAD", text) for text, _ in self._scripts.values()]
                    packed = b"".join(_pack_command(args) for args in loads)
                    again = await wire.exchange(
                        packed + b"".join([self._pack(ops[i]) for i in redo]), len(loads) + len(redo)
                    )
                    for i, reply in zip(redo, again[len(loads) :], strict=True):
                        raw[i] = reply
            results = self._results(raw)
        except TimeoutError as exc:
            error = TimeoutError(f"no answer within {self.timeout:g}s")
            self.mark_down(error)
            raise Down(str(error)) from exc
        except (*self._failures(), *self._errors()) as exc:
            raise self._down(exc) from exc
        finally:
            wire.busy = False
        self._mark_up()
        return results

    def _pack(self, op: Op) -> bytes:
        """``EVALSHA sha numkeys keys... [op key] args...`` in the Redis protocol."""
        ident = op.ident
        key = (op.script, op.keys, ident is not None)
        head = self._heads.get(key)
        if head is None:
            sha = self._scripts[op.script][1]
            count = len(op.keys) + (ident is not None)
            head = self._heads[key] = _pack_args(("EVALSHA", sha, count, *op.keys))
        if ident is None:
            return b"*%d\r\n%b%b" % (3 + len(op.keys) + len(op.args), head, _pack_args(op.args))
        tail = _pack_args((self.op_key(ident), *op.args))
        return b"*%d\r\n%b%b" % (4 + len(op.keys) + len(op.args), head, tail)

    def _args(self, op: Op) -> tuple[Any, ...]:
        if op.ident is None:
            return (self._scripts[op.script][1], len(op.keys), *op.keys, *op.args)
        return (self._scripts[op.script][1], len(op.keys) + 1, *op.keys, self.op_key(op.ident), *op.args)

    def _pipeline(self, client: Any, ops: Sequence[Op]) -> Any:
        """A pipeline of ``client`` (sync or async, single server or cluster) with ``ops`` queued.

        Not ``pipe.evalsha``: redis-py's cluster pipelines refuse it (EVALSHA is in their
        ``PIPELINE_BLOCKED_COMMANDS``, redis-py issue #2914), though the command needs
        nothing a pipeline lacks: every key here carries one hash tag, so the whole
        pipeline goes to the one node that owns the organization's slot, in order.
        """
        route = self._route(client)
        pipe = client.pipeline(transaction=False)
        for op in ops:
            pipe.execute_command("EVALSHA", *self._args(op), **route)
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
            return {"target_nodes": owner(self.tag)}
        except self._redis.exceptions.RedisClusterException:
            return {}  # no slot table yet or just now: the client finds the node, or says why not

    def _execute_sync(self, ops: Sequence[Op]) -> list[Result]:
        client = self._sync
        noscript = self._redis.exceptions.NoScriptError
        if len(ops) == 1:
            try:
                try:
                    return [_decode(client.evalsha(*self._args(ops[0])))]
                except noscript:
                    self._load_sync()
                    return [_decode(client.evalsha(*self._args(ops[0])))]
            except self._redis.exceptions.ResponseError as exc:
                return self._results([exc])
        pipe = self._pipeline(client, ops)
        raw = pipe.execute(raise_on_error=False)
        if any(isinstance(r, noscript) for r in raw):
            # Redis lost its scripts (a restart, SCRIPT FLUSH): load them, redo what failed
            self._load_sync()
            redo = [i for i, r in enumerate(raw) if isinstance(r, noscript)]
            again = self._execute_sync([ops[i] for i in redo])
            for i, reply in zip(redo, again, strict=True):
                raw[i] = reply
        return self._results(raw)

    async def _execute_async(self, client: Any, ops: Sequence[Op]) -> list[Result]:
        noscript = self._redis.exceptions.NoScriptError
        if len(ops) == 1:
            try:
                try:
                    return [_decode(await client.evalsha(*self._args(ops[0])))]
                except noscript:
                    await self._load_async(client)
                    return [_decode(await client.evalsha(*self._args(ops[0])))]
            except self._redis.exceptions.ResponseError as exc:
                return self._results([exc])
        pipe = self._pipeline(client, ops)
        raw = await pipe.execute(raise_on_error=False)
        if any(isinstance(r, noscript) for r in raw):
            await self._load_async(client)
            redo = [i for i, r in enumerate(raw) if isinstance(r, noscript)]
            again = await self._execute_async(client, [ops[i] for i in redo])
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

    # ------------------------------------------------------------------ the outbox

    def send(self, op: Op) -> None:
        """Queue a change for the next round trip; the flusher sends it if nothing else does."""
        with self._out_lock:
            if len(self._outbox) >= _OUTBOX_LIMIT:
                self._outbox.popleft()
            self._outbox.append(op)
            self._start_flusher()
            self._out_ready.notify()

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the flusher thread ``delay`` seconds from now (not after close)."""
        with self._out_lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_order), callback))
            self._start_flusher()
            self._out_ready.notify()

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run the bound method ``callback`` at ``close()``, before its last flush, if its object lives.

        A limiter's engine returns its prefetches this way.
        """
        self._closing.append(weakref.WeakMethod(callback))

    def _start_flusher(self) -> None:
        # under _out_lock
        if self._flusher is None and not self._closed:
            self._flusher = threading.Thread(target=self._flush_loop, name="ratekeeper-redis", daemon=True)
            self._flusher.start()

    def take_outbox(self) -> list[Op]:
        """Everything queued, in order, to go ahead of a reserve in the same pipeline.

        Sent again, an op with an id is a no-op if it had run; one whose id Redis may
        have forgotten by the time it arrives (first sent over ``lease`` seconds ago,
        less two timeouts and a second) is dropped instead, with a warning.
        """
        if not self._outbox:  # a racy peek is fine: an op added right now goes next time
            return []
        with self._out_lock:
            ops = list(self._outbox)
            self._outbox.clear()
        horizon = time.monotonic() - (self.lease - 2.0 * self.timeout - 1.0)
        keep = [op for op in ops if not (op.ident is not None and op.sent and op.sent < horizon)]
        if len(keep) < len(ops):
            log.warning(
                "ratekeeper: %d queued changes to Redis at %s are dropped: first sent over "
                "%gs ago, Redis may have forgotten whether it applied them",
                len(ops) - len(keep),
                self.where,
                self.lease,
            )
        return keep

    def put_back(self, ops: Sequence[Op]) -> None:
        """Ops a failed round trip may not have delivered go back to the front, in order."""
        if not ops:
            return
        with self._out_lock:
            self._outbox.extendleft(reversed(ops))
            while len(self._outbox) > _OUTBOX_LIMIT:
                self._outbox.popleft()
            self._out_ready.notify()

    def deliver(self, ops: Sequence[Op], results: Sequence[Result]) -> None:
        """Hand each reply to its op's callback (a broken callback must not lose the others).

        An op Redis refused is logged and dropped: it may have run in part.
        """
        for op, result in zip(ops, results, strict=True):
            if isinstance(result, Refused):
                log.error(
                    "ratekeeper: Redis at %s refused a %s change (%s); it is dropped",
                    self.where,
                    op.script,
                    result,
                )
            elif op.on_reply is not None:
                try:
                    op.on_reply(result)
                except Exception:
                    log.exception("ratekeeper: handling a Redis reply failed")

    def flush(self) -> bool:
        """Send every queued change now (blocking); False if Redis could not be reached.

        When it returns True, every change queued before the call has been applied
        (or refused by Redis with an error reply, which is logged: that change is
        dropped), including one the flusher thread was sending at that moment. When it
        returns False they stay queued, to be sent again: Redis may have applied some,
        and their ids make the second run a no-op.
        """
        with self._flush_lock:
            ops = self.take_outbox()
            if not ops:
                return True
            try:
                results = self.run_sync(ops)
            except Down:
                self.put_back(ops)
                return False
            self.deliver(ops, results)
            return True

    async def aflush(self) -> bool:
        """``flush`` for async code (in a worker thread, so that it waits like ``flush``)."""
        return await anyio.to_thread.run_sync(self.flush)

    def _flush_loop(self) -> None:
        while True:
            due: list[Callable[[], None]] = []
            with self._out_lock:
                while not self._outbox and not self._closed:
                    if not self._timers:
                        self._out_ready.wait()
                        continue
                    wait = self._timers[0][0] - time.monotonic()
                    if wait <= 0.0:
                        break
                    self._out_ready.wait(wait)
                if self._closed and not self._outbox:
                    return
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    due.append(heapq.heappop(self._timers)[2])
            for callback in due:
                try:
                    callback()
                except Exception:
                    log.exception("ratekeeper: a timed callback failed")
            if not self._outbox:
                continue
            # a short pause lets a reserve that is about to go carry these changes
            if self.flush_delay:
                time.sleep(self.flush_delay)
            wait = self._down_until - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, 1.0))
                if self._closed:
                    return
                continue
            try:
                self.flush()
            except Exception:
                # (the scripts flushed again between a reload and its retry, say): that batch
                # is lost, but this thread must live to send the next ones
                log.exception("ratekeeper: sending queued changes to Redis failed; they are dropped")

    def close(self) -> None:
        """Return prefetched capacity, send what is queued (best effort), stop the flusher thread."""
        for ref in self._closing:
            callback = ref()
            if callback is None:
                continue
            try:
                callback()
            except Exception:
                log.exception("ratekeeper: closing a limiter's prefetches failed")
        try:
            self.flush()
        except Exception:
            log.exception("ratekeeper: sending the last queued changes to Redis failed")
        with self._out_lock:
            self._closed = True
            self._out_ready.notify()
        flusher = self._flusher
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join(timeout=self.timeout * 2 + 1.0)

    async def aclose(self) -> None:
        """``close`` for async code (in a worker thread), then close the asyncio client made for this loop."""
        await anyio.to_thread.run_sync(self.close)
        if sniffio.current_async_library() == "asyncio":
            client = self._async_clients.pop(asyncio.get_running_loop(), None)
            if client is not None:
                await client.aclose()

    def __enter__(self) -> RedisBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> RedisBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "up" if self.available() else "down"
        return (
            f"<RedisBackend {self.where} keys {self.tag}:* on_unavailable={self.on_unavailable!r} "
            f"{state}, {len(self._outbox)} queued>"
        )


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


def _describe(client: Any) -> str:
    """``redis://host:port/db`` of a client, ``redis://host:port (cluster)`` of a cluster's, for messages."""
    try:
        kwargs = client.connection_pool.connection_kwargs
        return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
    except AttributeError:
        pass
    try:
        # a cluster client has no pool of its own: name the node it asks when no key decides
        node = client.get_default_node()
        return f"redis://{node.host}:{node.port} (cluster)"
    except AttributeError:
        return repr(client)


def _redact(url: str) -> str:
    """The URL without its credentials, for messages, logs and ``repr``.

    redis-py takes a password in the userinfo (``redis://user:pw@host``) and in
    the query (``?password=pw``); both are masked, the user name is kept.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, q, query = rest.partition("?")
    userinfo, at, host = rest.rpartition("@")
    if at:
        user = userinfo.split(":", 1)[0]
        rest = f"{user + ':***' if user else '***'}@{host}"
    if q:
        fields = []
        for field in query.split("&"):
            key, eq, _ = field.partition("=")
            fields.append(f"{key}=***" if eq and unquote(key).lower() == "password" else field)
        rest = f"{rest}?{'&'.join(fields)}"
    return f"{scheme}://{rest}"
