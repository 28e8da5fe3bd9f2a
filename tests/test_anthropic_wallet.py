"""The credit-wallet proxy (seed 002) through the middleware: reserve, settle, refuse, 402."""

from __future__ import annotations

from typing import Any

import pytest
from anthropic_support import HELLO, Spy, async_client, emulator, in_flight, middleware_of, spy

from ratekeeper import ConfigurationError, Demand, InsufficientCredits, Limiter, meta
from ratekeeper.anthropic import CreditPrice, RateLimitMiddleware
from ratekeeper.anthropic._wallet import WalletPricing
from ratekeeper.emulator import WalletConfig

pytestmark = pytest.mark.anyio
__all__ = ["spy"]

WALLET_MODEL = "anthropic/claude-sonnet-4.6"
#: The emulator's Sonnet list price (3 / 15 USD per million tokens) at 1,000,000 credits per USD.
SONNET = CreditPrice(input=3.0, output=15.0)


def _wallet_server(balance: int) -> Any:
    return emulator(mode="wallet", wallet=WalletConfig(balance=balance))


async def test_credits_settle_from_the_body_and_the_final_event(spy: Spy) -> None:
    server = _wallet_server(10_000_000)
    limiter = Limiter()
    client = async_client(server, limiter, wallet=SONNET)
    message = await client.messages.create(model=WALLET_MODEL, max_tokens=400, messages=HELLO)
    quota = message.model_extra["quota"] if message.model_extra else None
    assert quota is not None
    assert spy.settled[-1].credits == quota["credits_used"]
    assert limiter.statistics().wallet_balance == server.wallet_balance == quota["balance_after"]
    assert meta(message).quota is not None
    assert meta(message).quota.balance == quota["balance_after"]  # type: ignore[union-attr]

    stream = await client.messages.create(model=WALLET_MODEL, max_tokens=400, messages=HELLO, stream=True)
    async for _ in stream:
        pass
    assert spy.settled[-1].credits is not None
    assert spy.settled[-1].credits > 0
    assert limiter.statistics().wallet_balance == server.wallet_balance
    assert in_flight(limiter) == 0


async def test_a_request_the_balance_cannot_cover_is_refused_before_sending() -> None:
    server = _wallet_server(100_000)
    limiter = Limiter()
    client = async_client(server, limiter, wallet=SONNET)
    await client.messages.create(model=WALLET_MODEL, max_tokens=100, messages=HELLO)  # learns the balance
    sent = len(server.log)
    message = r"^the wallet holds [\d,.]+ credits but the request reserves [\d,.]+$"
    with pytest.raises(InsufficientCredits, match=message):
        await client.messages.create(model=WALLET_MODEL, max_tokens=8000, messages=HELLO)
    assert len(server.log) == sent
    assert in_flight(limiter) == 0


async def test_a_402_is_raised_as_insufficient_credits() -> None:
    server = _wallet_server(10_000)
    limiter = Limiter()
    client = async_client(server, limiter)  # no wallet pricing: only the proxy knows
    with pytest.raises(InsufficientCredits, match=r"^the wallet cannot cover the request \(Reservation of "):
        await client.messages.create(model=WALLET_MODEL, max_tokens=8000, messages=HELLO)
    assert [r.status for r in server.log] == [402]
    assert in_flight(limiter) == 0


async def test_a_learned_price_reserves_after_the_first_response() -> None:
    server = _wallet_server(10_000_000)
    client = async_client(server, Limiter(), wallet=True)
    pricing = middleware_of(client)._wallet
    assert pricing is not None
    demand = Demand(input_tokens=100, max_tokens=100)
    assert pricing.reservation(demand) == 0
    await client.messages.create(model=WALLET_MODEL, max_tokens=100, messages=HELLO)
    assert 3 * 200 <= pricing.reservation(demand) <= 15 * 200


def test_wallet_argument_forms() -> None:
    assert WalletPricing.of(None) is None
    assert WalletPricing.of(False) is None
    flat = WalletPricing.of(2.0)
    assert flat is not None
    assert flat.reservation(Demand(input_tokens=10, max_tokens=5)) == 30
    assert (
        CreditPrice(1.0, 2.0, cache_write=3.0, cache_read=0.5).reservation(
            Demand(input_tokens=1, cache_creation_input_tokens=1, cache_read_input_tokens=2, max_tokens=1)
        )
        == 1 + 3 + 1 + 2
    )
    with pytest.raises(ConfigurationError, match=r"^wallet must be True, a number of credits per token"):
        RateLimitMiddleware(wallet="lots")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"^input must be a non-negative finite number, got -1$"):
        CreditPrice(input=-1, output=1)
