"""``RedisBackend``: one organization's limits shared by every process and machine, in Redis.

This module imports ``redis`` only when a backend is constructed, so ``import ratekeeper``
works without the extra. ``RedisBackend`` is the face of the package: its options
(``_config.py``), the keys of an organization and its pools, and the two parts it is
made of, the wire to Redis (``_wire.py``: EVALSHA, pipelines, cluster routing, whether
Redis is up) and the outbox of changes left for later (``_outbox.py``). It hands a
``Limiter`` the remote engine (``_engine.py``), which schedules through it.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, final

import anyio
import sniffio

from ratekeeper.errors import BackendUnavailable, MissingDependency
from ratekeeper.redis._config import check_options, client_options, describe, redact
from ratekeeper.redis._ops import PoolKeys, Result, ScriptCall
from ratekeeper.redis._outbox import Outbox
from ratekeeper.redis._wire import Transport

if TYPE_CHECKING:
    from ratekeeper.gate._limiter import Limiter
    from ratekeeper.redis._engine import RemoteEngine

__all__ = ["RedisBackend"]


def _import_redis() -> Any:
    """The ``redis`` module, imported only when a backend is made (see the module docs)."""
    try:
        import redis
    except ImportError:
        raise MissingDependency("redis", "redis") from None
    return redis


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
        redis = _import_redis()
        check_options(
            prefix=prefix,
            org=org,
            on_unavailable=on_unavailable,
            fallback_fraction=fallback_fraction,
            flush_delay=flush_delay,
            prefetch=prefetch,
            # the durations, in the signature's order: the first one not > 0 is the one reported
            timeout=timeout,
            retry_interval=retry_interval,
            lease=lease,
            ticket_ttl=ticket_ttl,
            poll_interval=poll_interval,
            key_ttl=key_ttl,
            prefetch_ttl=prefetch_ttl,
        )
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
        self._idents = itertools.count()  # next() on a count is atomic: threads may share it
        self._transport = self._connect(redis, url_or_client, async_client)
        self._outbox = Outbox(
            self._transport,
            where=self.where,
            lease=self.lease,
            timeout=self.timeout,
            flush_delay=self.flush_delay,
        )

    def _connect(self, redis: Any, url_or_client: Any, async_client: Any) -> Transport:
        """The wire to ``url_or_client`` (a client is made from a URL); sets ``where``."""
        url = url_or_client if isinstance(url_or_client, str) else None
        if url is not None:
            sync = redis.Redis.from_url(url, **client_options(self.timeout))
            self.where = redact(url)
        else:
            sync = url_or_client
            self.where = describe(url_or_client)
        return Transport(
            redis,
            sync,
            url=url,
            async_client=async_client,
            tag=self.tag,
            where=self.where,
            timeout=self.timeout,
            retry_interval=self.retry_interval,
            on_unavailable=self.on_unavailable,
        )

    # ------------------------------------------------------------------ keys

    @property
    def tag(self) -> str:
        """The hash tag every key of this organization carries: ``{prefix:org}``."""
        return "{" + f"{self.prefix}:{self.org}" + "}"

    def org_key(self) -> str:
        """The organization hash: reservation counter, spend cap, subscription holds."""
        return f"{self.tag}:org"

    def pool_keys(self, pool: str) -> PoolKeys:
        """Every key one pool's scripts touch (org, pool, res, lease, q, qd, notes, unc, sent)."""
        t = self.tag
        return PoolKeys(
            org=f"{t}:org",
            pool=f"{t}:pool:{pool}",
            reservations=f"{t}:res:{pool}",
            leases=f"{t}:lease:{pool}",
            line=f"{t}:q:{pool}",
            line_needs=f"{t}:qd:{pool}",
            notes=f"{t}:notes:{pool}",
            uncounted=f"{t}:unc:{pool}",
            sends=f"{t}:sent:{pool}",
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
        return self._transport.available()

    def mark_down(self, error: BaseException) -> None:
        """Redis failed: don't try again for ``retry_interval`` seconds."""
        self._transport.mark_down(error)

    def unavailable_error(self) -> BackendUnavailable:
        """The error ``on_unavailable="fail"`` raises."""
        return self._transport.unavailable_error()

    # ------------------------------------------------------------------ calls

    def run_sync(self, ops: Sequence[ScriptCall]) -> list[Result]:
        """Run ``ops`` in one round trip (a pipeline) with the synchronous client.

        Raises ``RedisDown`` if the round trip failed (Redis did not answer, or answered the
        connection with an error): then any op may have run or not. An op Redis answered
        with an error reply gets a ``Refused`` in its place; the others' replies stand.
        """
        return self._transport.run_sync(ops)

    async def run_async(self, ops: Sequence[ScriptCall]) -> list[Result]:
        """Run ``ops`` in one round trip from async code (asyncio natively, trio via a thread)."""
        return await self._transport.run_async(ops)

    # ------------------------------------------------------------------ the outbox

    def send(self, op: ScriptCall) -> None:
        """Queue a change for the next round trip; the flusher sends it if nothing else does."""
        self._outbox.send(op)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the flusher thread ``delay`` seconds from now (not after close)."""
        self._outbox.call_later(delay, callback)

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run the bound method ``callback`` at ``close()``, before its last flush, if its object lives.

        A limiter's engine returns its prefetches this way.
        """
        self._outbox.on_close(callback)

    def take_outbox(self) -> list[ScriptCall]:
        """Everything queued, in order, to go ahead of a reserve in the same pipeline.

        Sent again, an op with an id is a no-op if it had run; one whose id Redis may
        have forgotten by the time it arrives (first sent over ``lease`` seconds ago,
        less two timeouts and a second) is dropped instead, with a warning.
        """
        return self._outbox.take()

    def put_back(self, ops: Sequence[ScriptCall]) -> None:
        """Ops a failed round trip may not have delivered go back to the front, in order."""
        self._outbox.put_back(ops)

    def deliver(self, ops: Sequence[ScriptCall], results: Sequence[Result]) -> None:
        """Hand each reply to its op's callback (a broken callback must not lose the others).

        An op Redis refused is logged and dropped: it may have run in part.
        """
        self._outbox.deliver(ops, results)

    def flush(self) -> bool:
        """Send every queued change now (blocking); False if Redis could not be reached.

        When it returns True, every change queued before the call has been applied
        (or refused by Redis with an error reply, which is logged: that change is
        dropped), including one the flusher thread was sending at that moment. When it
        returns False they stay queued, to be sent again: Redis may have applied some,
        and their ids make the second run a no-op.
        """
        return self._outbox.flush()

    async def aflush(self) -> bool:
        """``flush`` for async code (in a worker thread, so that it waits like ``flush``)."""
        return await anyio.to_thread.run_sync(self.flush)

    def close(self) -> None:
        """Return prefetched capacity, send what is queued (best effort), stop the flusher thread."""
        self._outbox.close()

    async def aclose(self) -> None:
        """``close`` for async code (in a worker thread), then close the asyncio client made for this loop."""
        await anyio.to_thread.run_sync(self.close)
        if sniffio.current_async_library() == "asyncio":
            await self._transport.close_async_client()

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
