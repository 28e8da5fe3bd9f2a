"""The prepaid wallet of the credit-wallet proxy mode (seed 002)."""

from __future__ import annotations

import math

from ratekeeper.emulator._config import WalletConfig

__all__ = ["Wallet"]


class Wallet:
    """A balance that never refills, with holds for requests in flight.

    A request is admitted when its reservation (priced from ``max_tokens``)
    fits in ``available``. It is debited its actual cost at once and the rest
    of the reservation stays held until it ends: what is available at any
    moment equals "balance minus outstanding reservations".
    """

    def __init__(self, config: WalletConfig) -> None:
        self.config = config
        self.balance = float(config.balance)
        self.held = 0.0

    @property
    def available(self) -> float:
        """Credits not debited nor held."""
        return self.balance - self.held

    def credits(self, usd: float) -> int:
        """Credits charged for ``usd`` of list price (markup included, rounded up)."""
        return math.ceil(usd * self.config.credits_per_usd * self.config.markup - 1e-9)
