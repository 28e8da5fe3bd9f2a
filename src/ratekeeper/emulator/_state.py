"""The emulated server's state, shared by the endpoint handlers."""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from ratekeeper.core import _model_ids, _presets
from ratekeeper.emulator._cache import PromptCache
from ratekeeper.emulator._config import EmulatorConfig, PoolLimits
from ratekeeper.emulator._generation import Timeline
from ratekeeper.emulator._log import Ledger, RequestRecord
from ratekeeper.emulator._models import DEFAULT_PRICES, Price
from ratekeeper.emulator._pools import Pool
from ratekeeper.emulator._scheduler import Scheduler
from ratekeeper.emulator._spend import SpendMeter
from ratekeeper.emulator._unified import UnifiedWindows
from ratekeeper.emulator._wallet import Wallet
from ratekeeper.emulator._wire import IdSource, Reply, error_body, http_date
from ratekeeper.errors import ConfigurationError, UnknownModelError

__all__ = ["LiveRequest", "ModelInfo", "ServerState"]

_COUNT_TOKENS_RPM_FALLBACK = 1000
_BATCH_FALLBACK = (1000, 200_000)
_UNLIMITED = PoolLimits(10**9, 10**12, 10**12)


@attrs.define
class LiveRequest:
    """A request still producing output: what an early stop needs to settle it."""

    arrival: float
    timeline: Timeline
    settle: Callable[[int, float], None]


class ModelInfo:
    """A model as the server resolves it: class, pool and the † rule."""

    __slots__ = ("cache_reads_count", "model_class", "pool")

    def __init__(self, model_class: str, pool: Pool, cache_reads_count: bool) -> None:
        self.model_class = model_class
        self.pool = pool
        self.cache_reads_count = cache_reads_count


class ServerState:
    """Everything the endpoints share: buckets, cache, ledger, log, scheduler, wallets."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        # its own stream, so a mixed report moment leaves every other draw as it was
        self.moment_rng = random.Random(f"moment-{config.seed}")
        self.uplink_rng = random.Random(f"uplink-{config.seed}")
        self.ids = IdSource(config.seed)
        self.org_id = str(uuid.UUID(int=random.Random(f"org-{config.seed}").getrandbits(128), version=4))
        self.ledger = Ledger()
        self.scheduler = Scheduler()
        self.cache = PromptCache()
        self.records: list[RequestRecord] = []
        self.by_id: dict[str, RequestRecord] = {}
        self.pools: dict[str, Pool] = {}
        self.now = 0.0
        self.spend = SpendMeter(self._spend_cap(), config.initial_spend_usd, config.epoch)
        self.unified = UnifiedWindows(config.unified)
        self.wallet = Wallet(config.wallet)
        self.live: dict[str, LiveRequest] = {}

    # ------------------------------------------------------------------ time

    def advance(self, now: float) -> float:
        """Run what is due up to ``now``; time never goes back (an earlier ``now`` counts as the latest)."""
        t = max(float(now), self.now)
        self.scheduler.run_until(t)
        self.now = t
        return t

    # ------------------------------------------------------------------ limits

    def _spend_cap(self) -> float:
        if self.config.monthly_spend_cap_usd is not None:
            return self.config.monthly_spend_cap_usd
        if self.config.preset is not None and self.config.mode == "api":
            return float(_presets.spend_cap(self.config.preset).monthly_usd)
        return math.inf

    def _make_pool(self, name: str, limits: Mapping[str, int], aliases: Iterable[str] = ()) -> Pool:
        req = 60.0 if name == "wallet" else self.config.enforcement_interval  # the proxy has its own limiter
        tok = self.config.token_enforcement_interval or req
        drain: dict[str, float] = {}
        for f in self.config.foreign:
            if f.pool == name or f.pool in aliases:
                drain = {"requests": f.rpm, "input_tokens": f.itpm, "output_tokens": f.otpm}
        interval = {"requests": req, "input_tokens": tok, "output_tokens": tok}
        return Pool(name, limits, interval, self.now, self.ledger, drain)

    def model_info(self, model: str) -> ModelInfo:
        """Resolve ``model`` to its pool (created on first use); raises ``UnknownModelError``."""
        cfg = self.config
        cls = _model_ids.resolve_model(model)
        preset_limits = None
        if cfg.preset is not None:
            try:
                preset_limits = _presets.limits_for(cfg.preset, model)
            except UnknownModelError:
                preset_limits = None
        pool_name = preset_limits.pool if preset_limits is not None else _presets.pool_for(model)
        explicit = cfg.limits.get(pool_name) or cfg.limits.get(cls) or cfg.default_limits
        if explicit is None and preset_limits is None and cfg.mode != "api":
            explicit = _UNLIMITED  # the proxy and subscriptions do not enforce per-model API limits here
        if explicit is None and preset_limits is None:
            raise UnknownModelError(
                model, tuple(sorted(cfg.limits)), f"no limits for it under {cfg.preset!r}"
            )
        lim = explicit or PoolLimits(preset_limits.rpm, preset_limits.itpm, preset_limits.otpm)  # type: ignore[union-attr]
        pool = self.pools.get(pool_name)
        if pool is None:
            pool = self._make_pool(
                pool_name, {"requests": lim.rpm, "input_tokens": lim.itpm, "output_tokens": lim.otpm}, (cls,)
            )
            self.pools[pool_name] = pool
        if cfg.cache_reads_count is not None:
            reads = cfg.cache_reads_count
        elif preset_limits is not None:
            reads = preset_limits.cache_reads_count
        else:
            reads = _presets.cache_reads_count(model)
        return ModelInfo(cls, pool, reads)

    def endpoint_pool(self, name: str) -> Pool:
        """The requests-only pool of ``count_tokens``, ``batches`` or the wallet proxy."""
        pool = self.pools.get(name)
        if pool is None:
            pool = self._make_pool(name, {"requests": self._endpoint_rpm(name)})
            self.pools[name] = pool
        return pool

    def _endpoint_rpm(self, name: str) -> int:
        cfg = self.config
        if name == "wallet":
            return cfg.wallet.rpm
        if name == "count_tokens":
            if cfg.count_tokens_rpm is not None:
                return cfg.count_tokens_rpm
            found = _presets.count_tokens_rpm(cfg.preset) if cfg.preset else None
            return found or _COUNT_TOKENS_RPM_FALLBACK
        if name == "batches":
            if cfg.batch_rpm is not None:
                return cfg.batch_rpm
            return _presets.batch_limits(cfg.preset).rpm if cfg.preset else _BATCH_FALLBACK[0]
        raise ConfigurationError(f"unknown endpoint pool {name!r}")

    def batch_queue_cap(self) -> int:
        """How many batch requests may wait in the processing queue."""
        cfg = self.config
        if cfg.batch_queue_cap is not None:
            return cfg.batch_queue_cap
        return _presets.batch_limits(cfg.preset).max_queued_requests if cfg.preset else _BATCH_FALLBACK[1]

    def price(self, model_class: str) -> Price:
        """The list price of ``model_class``."""
        return self.config.prices.get(model_class) or DEFAULT_PRICES.get(model_class) or Price(3.0, 15.0)

    # ------------------------------------------------------------------ log and replies

    def record(self, rid: str, now: float, endpoint: str, status: int, **fields: Any) -> RequestRecord:
        """Append a record to the request log."""
        rec = RequestRecord(request_id=rid, arrival=now, endpoint=endpoint, status=status, **fields)
        self.records.append(rec)
        self.by_id[rid] = rec
        return rec

    def base_headers(
        self, rid: str, at: float, content_type: str = "application/json"
    ) -> list[tuple[str, str]]:
        """Headers every answer has: ``date``, ``request-id``, the content type, the organization."""
        return [
            ("date", http_date(self.config.epoch, at)),
            ("content-type", content_type),
            ("request-id", rid),
            ("anthropic-organization-id", self.org_id),
        ]

    def error(
        self,
        status: int,
        kind: str,
        message: str,
        rid: str,
        now: float,
        *,
        headers: Iterable[tuple[str, str]] = (),
        retry_after: int | None = None,
        details: Mapping[str, Any] | None = None,
        envelope_extra: Mapping[str, Any] | None = None,
    ) -> Reply:
        """An error reply in the envelope of spec section 6."""
        delay = self.config.latency.error_delay
        hdrs = self.base_headers(rid, now + delay)
        if retry_after is not None:
            hdrs.append(("retry-after", str(retry_after)))
        hdrs += list(headers)
        extra: dict[str, Any] = dict(envelope_extra or {})
        if details is not None:
            extra["details"] = dict(details)
        body = error_body(kind, message, rid, **extra)
        return Reply(
            status=status, headers=tuple(hdrs), request_id=rid, delay=delay, body=body, ends_at=delay
        )
