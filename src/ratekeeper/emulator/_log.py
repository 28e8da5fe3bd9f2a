"""The request log and the charge ledger: what the server admitted, when, and what it cost."""

from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Final, Literal, final

import attrs

__all__ = ["DIMENSIONS", "Dimension", "Ledger", "RequestRecord"]

Dimension = Literal["requests", "input_tokens", "output_tokens"]
DIMENSIONS: Final[tuple[Dimension, ...]] = ("requests", "input_tokens", "output_tokens")


@final
@attrs.define(kw_only=True)
class RequestRecord:
    """One request as the server saw it (treat as read-only; the server fills it in as it settles).

    ``admitted`` holds the charges made at admission per dimension (empty if
    refused); ``usage`` the final usage fields; ``settled_at`` the server time
    at which the request's accounting became final (``None`` while running).
    """

    request_id: str
    arrival: float
    endpoint: str
    status: int
    pool: str | None = None
    model: str | None = None
    stream: bool = False
    error_type: str | None = None
    retry_after: int | None = None
    max_tokens: int = 0
    input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    output_tokens: int = 0
    planned_output_tokens: int = 0
    admitted: dict[str, float] = attrs.field(factory=dict)
    cost_usd: float = 0.0
    settled_at: float | None = None
    abandoned: bool = False

    @property
    def ok(self) -> bool:
        """True for a 200 answer."""
        return self.status == 200


@attrs.frozen
class _Charge:
    at: float
    amount: float
    request_id: str


class Ledger:
    """Every charge and refund the client's requests made on a pool bucket, in time order.

    Foreign traffic is continuous and not recorded here (buckets keep its total).
    """

    def __init__(self) -> None:
        self._times: dict[tuple[str, str], list[float]] = defaultdict(list)
        self._charges: dict[tuple[str, str], list[_Charge]] = defaultdict(list)

    def record(self, pool: str, dimension: str, at: float, amount: float, request_id: str) -> None:
        """Note a charge (positive) or a refund (negative)."""
        key = (pool, dimension)
        times = self._times[key]
        i = bisect.bisect_right(times, at)
        times.insert(i, at)
        self._charges[key].insert(i, _Charge(at, amount, request_id))

    def total(self, pool: str, dimension: str, t0: float, t1: float) -> float:
        """Net charges (charges minus refunds) in ``[t0, t1)``."""
        key = (pool, dimension)
        times = self._times.get(key, [])
        lo, hi = bisect.bisect_left(times, t0), bisect.bisect_left(times, t1)
        return sum(c.amount for c in self._charges[key][lo:hi]) if hi > lo else 0.0
