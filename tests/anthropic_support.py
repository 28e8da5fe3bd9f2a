"""Shared pieces of the ``ratekeeper.anthropic`` tests: the real SDK against the emulator."""

from __future__ import annotations

from typing import Any

import anthropic
import attrs
import httpx2
import pytest

from ratekeeper import Limiter, Permit, Usage
from ratekeeper.anthropic import RateLimitMiddleware, wrap
from ratekeeper.emulator import EmulatedServer, EmulatorConfig, EmulatorTransport, LatencyModel, VirtualClock

FAST = LatencyModel(ttft=0.01, tokens_per_second=20_000.0, error_delay=0.001, jitter=0.0)
MODEL = "claude-sonnet-4-6"
POOL = "sonnet-4.x"
HELLO: list[Any] = [{"role": "user", "content": "Hello there, how are you today?"}]


def emulator(**config: Any) -> EmulatedServer:
    """An emulated server with fast latency unless told otherwise."""
    config.setdefault("latency", FAST)
    return EmulatedServer(EmulatorConfig(**config))


def async_client(
    server: EmulatedServer, limiter: Limiter | None = None, *, max_retries: int = 2, **options: Any
) -> anthropic.AsyncAnthropic:
    """An ``AsyncAnthropic`` on the emulator's in-process transport, wrapped."""
    http = httpx2.AsyncClient(transport=EmulatorTransport(server))
    client = anthropic.AsyncAnthropic(
        api_key="test", http_client=http, base_url="http://emulator", max_retries=max_retries
    )
    return wrap(client, limiter, **options)


def sync_client(
    server: EmulatedServer, limiter: Limiter | None = None, *, max_retries: int = 2, **options: Any
) -> anthropic.Anthropic:
    """An ``Anthropic`` on the emulator's transport (virtual time on the server side), wrapped."""
    http = httpx2.Client(transport=EmulatorTransport(server, clock=VirtualClock()))
    client = anthropic.Anthropic(
        api_key="test", http_client=http, base_url="http://emulator", max_retries=max_retries
    )
    return wrap(client, limiter, **options)


def middleware_of(client: anthropic.Anthropic | anthropic.AsyncAnthropic) -> RateLimitMiddleware:
    """The ``RateLimitMiddleware`` that ``wrap`` added."""
    found = [m for m in client.middleware if isinstance(m, RateLimitMiddleware)]
    assert len(found) == 1
    return found[0]


def in_flight(limiter: Limiter) -> int:
    """Active permits over every pool: 0 once everything is settled or released."""
    return sum(pool.in_flight for pool in limiter.statistics().pools.values())


@attrs.define
class Settlement:
    """One ``Permit.settle`` call seen by the spy."""

    permit: Permit
    usage: Usage
    credits: float | None


@attrs.define
class Spy:
    """What the permits of a test went through."""

    settled: list[Settlement] = attrs.Factory(list)
    released: list[Permit] = attrs.Factory(list)
    outputs: list[int] = attrs.Factory(list)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    """Record every settle, release and progressive output charge (the real methods still run)."""
    seen = Spy()
    settle, release, record = Permit.settle, Permit.release, Permit.record_output

    def spy_settle(
        self: Permit, usage: object, *, credits: float | None = None, headers: object = None
    ) -> Any:
        if self.active:
            seen.settled.append(Settlement(self, Usage.from_any(usage), credits))
        return settle(self, usage, credits=credits, headers=headers)

    def spy_release(self: Permit) -> None:
        if self.active:
            seen.released.append(self)
        release(self)

    def spy_record(self: Permit, output_tokens: int) -> None:
        seen.outputs.append(output_tokens)
        record(self, output_tokens)

    monkeypatch.setattr(Permit, "settle", spy_settle)
    monkeypatch.setattr(Permit, "release", spy_release)
    monkeypatch.setattr(Permit, "record_output", spy_record)
    return seen
