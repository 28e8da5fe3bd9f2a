"""What a request is expected to cost in a credit wallet (seed 002), before it is sent.

A wallet proxy reserves credits from ``max_tokens`` before the call and
settles after it, so the middleware reserves the same way: input at the input
price, ``max_tokens`` at the output price. The limiter then refuses, before
sending, a request the balance it knows can't cover.
"""

from __future__ import annotations

import math
import threading
from typing import Any, final

import attrs

from ratekeeper.core._accounting import Demand, Usage
from ratekeeper.errors import ConfigurationError

__all__ = ["CreditPrice", "WalletPricing"]


def _price(_inst: object, attr: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not (0 <= value < math.inf):
        raise ConfigurationError(f"{attr.name} must be a non-negative finite number, got {value!r}")


@final
@attrs.frozen
class CreditPrice:
    """Credits a wallet charges per token.

    ``cache_write`` defaults to 1.25x ``input`` and ``cache_read`` to 0.1x,
    as the API's list prices go.

    >>> price = CreditPrice(input=3.0, output=15.0)
    >>> price.reservation(Demand(input_tokens=1000, max_tokens=100))
    4500.0
    """

    input: float = attrs.field(validator=_price)
    output: float = attrs.field(validator=_price)
    cache_write: float | None = attrs.field(default=None, validator=_price)
    cache_read: float | None = attrs.field(default=None, validator=_price)

    def reservation(self, demand: Demand) -> float:
        """Credits reserved for ``demand``: its input, and ``max_tokens`` of output."""
        write = self.cache_write if self.cache_write is not None else 1.25 * self.input
        read = self.cache_read if self.cache_read is not None else 0.1 * self.input
        return (
            self.input * demand.input_tokens
            + write * demand.cache_creation_input_tokens
            + read * demand.cache_read_input_tokens
            + self.output * demand.max_tokens
        )


@final
class WalletPricing:
    """A fixed ``CreditPrice``, or one price per token learned from what responses cost.

    The learned price is a running mean of credits per token over every
    token (input and output alike). Until a response has been seen it is
    unknown and nothing is reserved: the first request can only be refused by
    the proxy itself (402, raised as ``InsufficientCredits``).
    """

    def __init__(self, price: CreditPrice | None) -> None:
        self._price = price
        self._per_token: float | None = None
        self._seen = 0
        self._lock = threading.Lock()

    @classmethod
    def of(cls, wallet: object) -> WalletPricing | None:
        """From the middleware's ``wallet`` argument: ``None``/``False``, ``True``, a number or a price."""
        if wallet is None or wallet is False:
            return None
        if wallet is True:
            return cls(None)
        if isinstance(wallet, CreditPrice):
            return cls(wallet)
        if isinstance(wallet, int | float) and not isinstance(wallet, bool):
            return cls(CreditPrice(input=float(wallet), output=float(wallet)))
        raise ConfigurationError(
            f"wallet must be True, a number of credits per token or a CreditPrice, got {wallet!r}"
        )

    def reservation(self, demand: Demand) -> float:
        """Credits to reserve for ``demand`` (0 while the learned price is unknown)."""
        if self._price is not None:
            return self._price.reservation(demand)
        with self._lock:
            per_token = self._per_token
        if per_token is None:
            return 0.0
        tokens = (
            demand.input_tokens
            + demand.cache_creation_input_tokens
            + demand.cache_read_input_tokens
            + demand.max_tokens
        )
        return per_token * tokens

    def learn(self, usage: Usage, credits_used: float) -> None:
        """Note what a finished request cost (only a learned price changes)."""
        if self._price is not None:
            return
        tokens = usage.total_input_tokens + usage.output_tokens
        if tokens <= 0 or not credits_used >= 0:
            return
        with self._lock:
            self._seen += 1
            sample = credits_used / tokens
            if self._per_token is None:
                self._per_token = sample
            else:
                self._per_token += (sample - self._per_token) / min(self._seen, 20)
