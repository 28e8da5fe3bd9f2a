"""The limits of the whole account, beside the pools: a prepaid wallet, the spend cap, a subscription.

``Account`` holds what a report can say of the organization as a whole and what
follows from it: the wallet's balance (a proxy's ``x-quota-*`` headers), the
monthly spend limit (every waiter fails until it resets), and subscription
("unified") holds and warnings. The limiter owns one; both engines feed it under
the limiter's lock.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, final

from ratekeeper.core._bucket import TokenBucket
from ratekeeper.core._reading import first_of_next_month, unified_wait
from ratekeeper.core._snapshot import RateLimitSnapshot
from ratekeeper.core._stats import LimiterEvent
from ratekeeper.errors import ConfigurationError, InsufficientCredits, SpendLimitReached
from ratekeeper.gate._state import Permit, PoolRuntime

if TYPE_CHECKING:
    from ratekeeper.gate._engine import Engine

__all__ = ["MAX_REMEMBERED", "Account", "AccountHost", "unified_targets"]

log = logging.getLogger("ratekeeper")

#: How many entries a map keyed by caller or server input (model ids, subscription claims,
#: warned resets) holds before it is emptied, so hostile input cannot grow it without bound.
MAX_REMEMBERED: Final = 1024


class AccountHost(Protocol):
    """What ``Account`` uses of its limiter (``Limiter`` meets it; see ``gate._host``)."""

    _pools: dict[str, PoolRuntime]

    @property
    def _engine(self) -> Engine: ...

    def _emit(self, kind: str, runtime: PoolRuntime, now: float, detail: Mapping[str, Any]) -> None: ...

    def _hook(self, event: LimiterEvent) -> None: ...

    @property
    def _table(self) -> _Waiters: ...


class _Waiters(Protocol):
    def fail_waiters(self, error_for: Callable[[], BaseException]) -> None: ...


@final
class Account:
    """The account-wide limits one limiter knows of (used under the limiter's lock).

    ``wallet``: the prepaid balance (``None``: no wallet seen or given);
    ``spend_until``/``spend_resets_at``: the monthly spend limit holds until then;
    ``unified_holds``: subscription rejections by claim, so pools made later are held too.
    """

    __slots__ = ("_host", "spend_resets_at", "spend_until", "unified_holds", "unified_warned", "wallet")

    def __init__(self, host: AccountHost, wallet_balance: float | None) -> None:
        self._host = host
        self.wallet: TokenBucket | None = None
        if wallet_balance is not None:
            self.wallet = wallet_bucket(wallet_balance)
        self.spend_until: float | None = None
        self.spend_resets_at: _dt.datetime | None = None
        self.unified_warned: set[tuple[str | None, str | None]] = set()
        self.unified_holds: dict[str | None, float] = {}

    def on_unified(
        self,
        snap: RateLimitSnapshot,
        now: float,
        skew: float,
        status: int,
        runtime: PoolRuntime | None,
    ) -> None:
        """A subscription report: a rejection holds the pools it covers, a warning is said once."""
        unified = snap.unified
        assert unified is not None
        host = self._host
        if unified.status == "rejected" or (status == 429 and unified.status is not None):
            wait = unified_wait(snap, skew)
            claim = unified.representative_claim
            holds = self.unified_holds
            if len(holds) >= MAX_REMEMBERED:  # server-sent claims: keep the live ones
                for stale in [c for c, u in holds.items() if u <= now]:
                    del holds[stale]
                if len(holds) >= MAX_REMEMBERED:
                    holds.clear()
            holds[claim] = max(holds.get(claim, -math.inf), now + wait)
            for held in unified_targets(claim, host._pools, runtime):
                if held.pool.pause(now + wait, f"subscription limit ({unified.representative_claim})"):
                    host._emit("pause", held, now, {"seconds": wait, "reason": "unified rejected"})
                host._engine.wake(held, now)
        elif unified.status == "allowed_warning":
            key = (unified.representative_claim, unified.reset.isoformat() if unified.reset else None)
            if key not in self.unified_warned:
                if len(self.unified_warned) >= MAX_REMEMBERED:  # server-sent: bounded
                    self.unified_warned.clear()
                self.unified_warned.add(key)
                name = runtime.pool.name if runtime is not None else "*"
                log.warning(
                    "subscription usage warning: %s window, resets %s",
                    unified.representative_claim,
                    unified.reset,
                )
                detail = {"claim": unified.representative_claim, "reset": unified.reset}
                host._hook(LimiterEvent("unified_warning", name, now, detail))

    def on_quota(self, snap: RateLimitSnapshot, permit: Permit | None, now: float) -> None:
        """A wallet proxy's balance report: the wallet follows it, less what is in flight after it."""
        quota = snap.quota
        assert quota is not None
        balance = quota.balance if quota.balance is not None else quota.balance_reserved
        if balance is None:
            return
        if self.wallet is None:
            self.wallet = wallet_bucket(max(balance, 0.0))
            self.wallet.set_level(balance, now)
        since = permit.seq if permit is not None else -1
        unseen = sum(
            p.credits
            for runtime in self._host._pools.values()
            for p in runtime.in_flight.values()
            if p.seq > since and p.active
        )
        wallet = self.wallet
        if balance > wallet.capacity:
            wallet.set_limits(now, capacity=balance)
        wallet.resync(balance - unseen, now, allow_increase=True)
        if permit is not None:
            # The reported balance already holds this request: settle() must not move it again
            # by our own estimate, only from the proxy's reservation (on a stream) to the charge.
            if quota.balance is not None:
                permit.credits = 0.0
            elif quota.credits_reserved is not None:
                permit.credits = quota.credits_reserved

    def check_wallet(self, credit: float, now: float) -> None:
        """Raise ``InsufficientCredits`` if the wallet cannot hold ``credit`` now."""
        wallet = self.wallet
        if wallet is not None and wallet.level_at(now) < credit:
            raise InsufficientCredits(credit, max(wallet.level_at(now), 0.0))

    def settle_credits(self, reserved: float, actual: float | None, now: float) -> None:
        """A request reserved ``reserved`` credits and cost ``actual``: the wallet takes the difference."""
        wallet = self.wallet
        if wallet is not None and reserved and actual is not None:
            if reserved >= actual:
                wallet.give_back(reserved - actual, now)
            else:
                wallet.charge(actual - reserved, now)

    def spend_limit(self, snap: RateLimitSnapshot, now: float, message: str) -> None:
        """The monthly spend limit was reached: every waiter fails, and new ones until it resets."""
        base = snap.server_date or _dt.datetime.now(_dt.UTC)
        resets = first_of_next_month(base)
        self.spend_resets_at = resets
        self.spend_until = now + (resets - base).total_seconds()
        log.error("monthly spend limit reached; usage resumes at %s", resets.isoformat())
        self._host._hook(LimiterEvent("spend_limit", "*", now, {"resets_at": resets}))
        self._host._table.fail_waiters(lambda: SpendLimitReached(resets, message))

    def check_spend(self, now: float) -> None:
        """Raise ``SpendLimitReached`` while the spend limit holds; forget it once it reset."""
        if self.spend_until is not None:
            if now < self.spend_until:
                assert self.spend_resets_at is not None
                raise SpendLimitReached(self.spend_resets_at)
            self.spend_until = None


def wallet_bucket(balance: float) -> TokenBucket:
    """A wallet of ``balance`` credits: it does not refill and may not go into debt."""
    if not balance >= 0:
        raise ConfigurationError(f"wallet_balance must be a non-negative number, got {balance!r}")
    return TokenBucket(max(balance, 1.0), 0.0, level=balance, debt_limit=0.0)


def unified_targets(
    claim: str | None, pools: Mapping[str, PoolRuntime], runtime: PoolRuntime | None
) -> list[PoolRuntime]:
    """The pools a subscription rejection holds: model-specific claims hold only that family."""
    if claim in ("seven_day_opus", "seven_day_sonnet"):
        family = claim.rsplit("_", 1)[1]
        chosen = [pool for name, pool in pools.items() if name.startswith(family)]
    else:
        chosen = [pool for name, pool in pools.items() if name not in ("count_tokens", "batches")]
    if runtime is not None and runtime not in chosen:
        chosen.append(runtime)
    return chosen
