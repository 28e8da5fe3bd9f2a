"""count_tokens and Message Batches through the middleware; exact counting."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import pytest
from anthropic_support import HELLO, MODEL, async_client, emulator, in_flight, middleware_of, sync_client

from ratekeeper import ConfigurationError, Demand, Limiter, meta
from ratekeeper.anthropic import RateLimitMiddleware

pytestmark = pytest.mark.anyio

PARAMS: Any = {"model": MODEL, "max_tokens": 10, "messages": HELLO}


def _spy_demands(limiter: Limiter, monkeypatch: pytest.MonkeyPatch) -> list[Demand]:
    demands: list[Demand] = []
    acquire = limiter.acquire_demand

    def spy(model: str, demand: Demand, **kwargs: Any) -> Any:
        demands.append(demand)
        return acquire(model, demand, **kwargs)

    monkeypatch.setattr(limiter, "acquire_demand", spy)
    return demands


async def test_count_tokens_draws_on_its_own_rpm() -> None:
    server = emulator(count_tokens_rpm=100)
    limiter = Limiter("tier-1")
    client = async_client(server, limiter)
    counted = await client.messages.count_tokens(model=MODEL, messages=HELLO)
    assert counted.input_tokens == server.log[0].input_tokens or counted.input_tokens > 0
    pools = limiter.statistics().pools
    assert pools["count_tokens"].granted == 1
    assert "sonnet-4.x" not in pools  # no Messages capacity was drawn
    assert meta(counted).request_id == server.log[0].request_id
    assert in_flight(limiter) == 0


async def test_count_tokens_option_reserves_the_exact_count(monkeypatch: pytest.MonkeyPatch) -> None:
    server = emulator()
    limiter = Limiter("tier-1")
    demands = _spy_demands(limiter, monkeypatch)
    client = async_client(server, limiter, count_tokens=True)
    long: Any = [{"role": "user", "content": "a quick brown fox jumps over the lazy dog " * 40}]
    exact = (await client.messages.count_tokens(model=MODEL, messages=long)).input_tokens
    await client.messages.create(model=MODEL, max_tokens=10, messages=long)
    assert demands[-1].input_tokens == exact
    assert server.log[-1].input_tokens == exact
    assert limiter.statistics().pools["count_tokens"].granted == 2
    assert in_flight(limiter) == 0


async def test_a_user_counter_sync_or_async(monkeypatch: pytest.MonkeyPatch) -> None:
    server = emulator()
    limiter = Limiter("tier-1")
    demands = _spy_demands(limiter, monkeypatch)

    async def count(body: Mapping[str, Any]) -> int:
        await anyio.sleep(0)
        return 1234

    client = async_client(server, limiter, counter=count, max_retries=0)
    await client.messages.create(model=MODEL, max_tokens=10, messages=HELLO)
    assert demands[-1].input_tokens == 1234
    client = async_client(server, limiter, counter=lambda body: 777)
    await client.messages.create(model=MODEL, max_tokens=10, messages=HELLO)
    assert demands[-1].input_tokens == 777


def test_count_tokens_needs_a_bound_client() -> None:
    import anthropic

    middleware = RateLimitMiddleware(Limiter("tier-1"), count_tokens=True)
    client = anthropic.Anthropic(api_key="test", base_url="http://emulator", middleware=[middleware])
    message = (
        r"^count_tokens=True needs the client: use ratekeeper.anthropic.wrap\(client, count_tokens=True\) "
        r"or middleware.bind\(client\)$"
    )
    with pytest.raises(ConfigurationError, match=message):
        client.messages.create(model=MODEL, max_tokens=10, messages=HELLO)


def test_counter_and_count_tokens_exclude_each_other() -> None:
    with pytest.raises(ConfigurationError, match=r"^give either counter or count_tokens=True, not both$"):
        RateLimitMiddleware(counter=lambda body: 1, count_tokens=True)


async def test_a_batch_holds_its_queue_slots_until_it_is_seen_ended() -> None:
    server = emulator(batch_processing_time=0.3)
    limiter = Limiter("tier-1")
    client = async_client(server, limiter)
    middleware = middleware_of(client)
    requests: Any = [{"custom_id": f"r{i}", "params": PARAMS} for i in range(3)]
    batch = await client.messages.batches.create(requests=requests)
    assert middleware.open_batches == {batch.id: 3}
    queued = limiter.statistics().pools["batches"].levels["queued_requests"]
    assert queued == 100_000 - 3  # Tier 1: 100,000 queued requests
    while batch.processing_status != "ended":
        await anyio.sleep(0.1)
        batch = await client.messages.batches.retrieve(batch.id)
    assert middleware.open_batches == {}
    stats = limiter.statistics().pools["batches"]
    assert stats.levels["queued_requests"] == 100_000
    assert stats.granted >= 2  # create and every retrieve drew on the batch RPM
    results = [r async for r in await client.messages.batches.results(batch.id)]
    assert len(results) == 3
    # seen ended once: a second sighting releases nothing more
    await client.messages.batches.retrieve(batch.id)
    assert limiter.statistics().pools["batches"].levels["queued_requests"] == 100_000
    assert in_flight(limiter) == 0


def test_batches_from_a_sync_client_and_list() -> None:
    server = emulator(batch_processing_time=0.0)
    limiter = Limiter("tier-1")
    client = sync_client(server, limiter)
    middleware = middleware_of(client)
    batch = client.messages.batches.create(requests=[{"custom_id": "a", "params": PARAMS}])
    assert middleware.open_batches == {batch.id: 1}
    listed = list(client.messages.batches.list())
    assert any(b.id == batch.id for b in listed)
    assert middleware.open_batches == {}  # the list showed it ended
    assert limiter.statistics().pools["batches"].levels["queued_requests"] == 100_000
