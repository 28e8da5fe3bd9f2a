"""Subscription (OAuth) traffic, end to end: the unified headers warn, then hold the pool until reset."""

from __future__ import annotations

import logging
from typing import Any

import anthropic
import anyio
import httpx2
import pytest
from anthropic_support import HELLO, MODEL, emulator, in_flight

from ratekeeper import Limiter, LimiterEvent, meta
from ratekeeper.anthropic import wrap
from ratekeeper.emulator import EmulatorTransport, UnifiedConfig

pytestmark = pytest.mark.anyio
OUTPUT = {"x-emulator-output-tokens": "1000"}  # 1.5 cents of Sonnet output per request


def _oauth_client(server: Any, limiter: Limiter) -> anthropic.AsyncAnthropic:
    client = anthropic.AsyncAnthropic(
        auth_token="sk-ant-oat01-test",  # a bearer (OAuth) client, as Claude subscriptions use
        http_client=httpx2.AsyncClient(transport=EmulatorTransport(server)),
        base_url="http://emulator",
        max_retries=0,
    )
    return wrap(client, limiter)


@pytest.mark.parametrize("anyio_backend", ["trio"], indirect=True)
async def test_warning_then_rejection_holds_the_pool_until_the_window_resets(
    anyio_backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[LimiterEvent] = []
    server = emulator(mode="unified", unified=UnifiedConfig(five_hour_budget_usd=0.1, warning_threshold=0.5))
    limiter = Limiter("tier-4", on_event=events.append)
    client = _oauth_client(server, limiter)
    caplog.set_level(logging.WARNING, logger="ratekeeper")
    statuses: list[str | None] = []
    rejected_at = None
    for _ in range(20):
        try:
            raw = await client.messages.with_raw_response.create(
                model=MODEL, max_tokens=1000, messages=HELLO, extra_headers=OUTPUT
            )
        except anthropic.RateLimitError as exc:
            snapshot = meta(exc)
            assert snapshot.unified is not None
            assert snapshot.retry_after is not None
            assert snapshot.retry_after > 3600  # hours, not seconds
            rejected_at = anyio.current_time()
            break
        unified = meta(raw).unified
        assert unified is not None
        statuses.append(unified.status)
        if unified.status == "rejected":
            rejected_at = anyio.current_time()
            break
    assert "allowed_warning" in statuses
    assert [e.kind for e in events].count("unified_warning") == 1
    assert "subscription usage warning" in caplog.text
    assert rejected_at is not None
    paused = limiter.statistics().pools["sonnet-4.x"].paused_for
    assert paused > 3600

    sent = len(server.log)
    message = await client.messages.create(model=MODEL, max_tokens=10, messages=HELLO)
    # the next request waited for the reset instead of meeting another 429
    assert anyio.current_time() - rejected_at >= paused - 1
    assert [r.status for r in server.log[sent:]] == [200]
    assert meta(message).unified is not None
    assert in_flight(limiter) == 0
