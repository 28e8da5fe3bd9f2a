"""The public face of the pure server model: ``EmulatedServer``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, final

import attrs

from ratekeeper.emulator._config import EmulatorConfig
from ratekeeper.emulator._endpoints import BatchBook, handle_count_tokens
from ratekeeper.emulator._log import RequestRecord
from ratekeeper.emulator._messages import abandon, handle_messages
from ratekeeper.emulator._state import ServerState
from ratekeeper.emulator._wire import EmulatorRequest, Reply, http_date
from ratekeeper.errors import ConfigurationError

__all__ = ["EmulatedServer"]


@final
class EmulatedServer:
    """A model of the Anthropic API's rate limiting, with time as an explicit argument.

    ``handle(request, now)`` answers one request at server time ``now``
    (seconds; ``config.epoch`` is t = 0). The server never reads a clock and
    does no I/O: a transport sleeps ``reply.delay`` and streams the events at
    their offsets, and calls ``abandon`` if the client goes away.

    >>> server = EmulatedServer(EmulatorConfig(preset="tier-1"))
    >>> req = EmulatorRequest.post("/v1/messages", {
    ...     "model": "claude-sonnet-4-5", "max_tokens": 100,
    ...     "messages": [{"role": "user", "content": "Hello"}]})
    >>> reply = server.handle(req, now=0.0)
    >>> reply.status, reply.header("anthropic-ratelimit-requests-remaining")
    (200, '49')
    """

    def __init__(self, config: EmulatorConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = EmulatorConfig(**overrides)
        elif overrides:
            raise ConfigurationError("give either a config or keyword overrides, not both")
        self.config = config
        self._st = ServerState(config)
        self._batches = BatchBook(self._st)
        #: Transport time that server time 0 corresponds to (set by the first transport that needs it).
        self.time_origin: float | None = None

    def __repr__(self) -> str:
        return (
            f"EmulatedServer(mode={self.config.mode!r}, preset={self.config.preset!r}, "
            f"now={self._st.now:.3f}, requests={len(self._st.records)})"
        )

    # ------------------------------------------------------------------ requests

    def handle(self, request: EmulatorRequest, now: float) -> Reply:
        """Answer ``request`` arriving at server time ``now``."""
        t = self._st.advance(now)
        route = request.route
        method = request.method.upper()
        if route == "/v1/messages" and method == "POST":
            return handle_messages(self._st, request, t)
        if route == "/v1/messages/count_tokens" and method == "POST":
            if self.config.mode == "wallet":
                return self._not_found(t)
            return handle_count_tokens(self._st, request, t)
        if route == "/v1/messages/batches" or route.startswith("/v1/messages/batches/"):
            if self.config.mode != "api":
                return self._not_found(t)
            return self._batches.handle(request, t)
        return self._not_found(t)

    def deliver(self, reply: Reply, now: float) -> Reply:
        """``reply`` as sent at server time ``now``, when its headers are taken then.

        Under ``report_moment="response"`` (or ``"mixed"``) a non-streamed answer's
        rate-limit headers describe the buckets when it is sent; transports call
        this once the reply's ``delay`` has passed. Other replies come back as they are.
        """
        if reply.late_headers is None:
            return reply
        return attrs.evolve(reply, headers=tuple(reply.late_headers(now)), late_headers=None)

    def _not_found(self, now: float) -> Reply:
        rid = self._st.ids.request_id()
        self._st.record(rid, now, "unknown", 404, error_type="not_found_error", settled_at=now)
        return self._st.error(404, "not_found_error", "Not Found", rid, now)

    def uplink_delay(self) -> float:
        """How long the next request takes to reach the server (``LatencyModel.uplink``).

        Transports wait this long between the client's send and :meth:`handle`.

        >>> from ratekeeper.emulator import LatencyModel
        >>> EmulatedServer(EmulatorConfig()).uplink_delay()
        0.0
        >>> 0.0 <= EmulatedServer(EmulatorConfig(latency=LatencyModel(uplink=2.0))).uplink_delay() <= 2.0
        True
        """
        top = self._st.config.latency.uplink
        return self._st.uplink_rng.uniform(0.0, top) if top > 0 else 0.0

    def abandon(self, request_id: str, now: float) -> bool:
        """The client stopped reading ``request_id`` at ``now``: settle what was produced by then.

        Returns False if the request had already finished (nothing to do).
        """
        t = self._st.advance(now)
        return abandon(self._st, request_id, t)

    def advance(self, now: float) -> None:
        """Apply everything due up to ``now`` (settlements, progressive charges, batch ends)."""
        self._st.advance(now)

    @property
    def now(self) -> float:
        """The latest server time seen."""
        return self._st.now

    def date_header(self, now: float) -> str:
        """The ``date`` header the server would send at ``now``."""
        return http_date(self.config.epoch, now)

    # ------------------------------------------------------------------ analysis

    @property
    def log(self) -> Sequence[RequestRecord]:
        """Every request in arrival order (records fill in as requests settle)."""
        return self._st.records

    def record(self, request_id: str) -> RequestRecord:
        """The log record of ``request_id`` (``KeyError`` if unknown)."""
        return self._st.by_id[request_id]

    def pools(self) -> tuple[str, ...]:
        """The pools that have seen traffic (model pools, ``count_tokens``, ``batches``, ``wallet``)."""
        return tuple(self._st.pools)

    def limits(self, pool: str) -> Mapping[str, int]:
        """Per-minute limits of ``pool`` by dimension (``requests``, ``input_tokens``, ``output_tokens``)."""
        return dict(self._st.pools[pool].limits)

    def capacity(self, pool: str, dimension: str) -> float:
        """Burst capacity of ``pool``'s ``dimension`` bucket (limit x interval / 60)."""
        return self._st.pools[pool].capacity(dimension)

    def level(self, pool: str, dimension: str, now: float) -> float:
        """The exact bucket level at ``now`` (advances the server)."""
        t = self._st.advance(now)
        return self._st.pools[pool].buckets[dimension].level_at(t)

    def admitted_in_window(self, pool: str, dimension: str, t0: float, t1: float) -> float:
        """Net charges (minus refunds) of the client's requests on ``pool``/``dimension`` in ``[t0, t1)``."""
        return self._st.ledger.total(pool, dimension, t0, t1)

    def allowed_in_window(self, pool: str, dimension: str, t0: float, t1: float) -> float:
        """The most the bucket can let through in ``[t0, t1)``: capacity + rate x duration.

        A request larger than a short-interval bucket may overshoot this by
        its excess (it is admitted on a full bucket and leaves debt).
        """
        b = self._st.pools[pool].buckets[dimension]
        return b.capacity + b.rate * max(0.0, t1 - t0)

    def goodput(self, t0: float, t1: float, pool: str | None = None) -> int:
        """Output tokens of Messages requests that completed (200, not abandoned) in ``[t0, t1)``."""
        return sum(
            r.output_tokens
            for r in self._st.records
            if r.endpoint == "messages"
            and r.status == 200
            and not r.abandoned
            and r.settled_at is not None
            and t0 <= r.settled_at < t1
            and (pool is None or r.pool == pool)
        )

    def foreign_taken(self, pool: str, dimension: str) -> float:
        """What foreign traffic has taken from ``pool``'s ``dimension`` so far."""
        return self._st.pools[pool].buckets[dimension].foreign_taken

    def spend_usd(self, now: float) -> float:
        """The organization's spend this calendar month (settled requests)."""
        return self._st.spend.spent(self._st.advance(now))

    @property
    def wallet_balance(self) -> float:
        """Credits left in the wallet (wallet mode), not counting holds."""
        return self._st.wallet.balance

    def batch_queue(self) -> int:
        """Batch requests still in the processing queue."""
        return self._batches.queued()

    def cache_entries(self) -> int:
        """Prompt-cache entries held (live or not yet swept)."""
        return len(self._st.cache)
