"""The pure server model: step tables at explicit instants, headers parsed with plain code."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import math
import re
from typing import Any

import pytest

from ratekeeper.emulator import (
    DEFAULT_EPOCH,
    AccelerationLimit,
    EmulatedServer,
    EmulatorConfig,
    EmulatorRequest,
    ForeignTraffic,
    LatencyModel,
    PoolLimits,
    Reply,
    UnifiedConfig,
    WalletConfig,
    count_text,
)
from ratekeeper.errors import ConfigurationError

SONNET = "claude-sonnet-4-5"
POOL = "sonnet-4.x"
LAT = LatencyModel(ttft=0.5, tokens_per_second=100.0, jitter=0.0, error_delay=0.0)
ROUND = PoolLimits(rpm=60, itpm=60_000, otpm=6_000)  # one request a second, 1000 in, 100 out


def server(**kw: Any) -> EmulatedServer:
    kw.setdefault("latency", LAT)
    kw.setdefault("default_limits", ROUND)
    return EmulatedServer(EmulatorConfig(**kw))


def msg(
    text: str = "Hello",
    *,
    model: str = SONNET,
    max_tokens: int = 10,
    out: int | None = None,
    stream: bool = False,
    **extra: Any,
) -> EmulatorRequest:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    }
    if stream:
        body["stream"] = True
    body.update(extra)
    headers = {"x-emulator-output-tokens": str(out)} if out is not None else {}
    return EmulatorRequest.post("/v1/messages", body, headers)


def hdr(reply: Reply, name: str) -> str:
    value = reply.header(name)
    assert value is not None, name
    return value


def remaining(reply: Reply, dim: str) -> int:
    return int(hdr(reply, f"anthropic-ratelimit-{dim}-remaining"))


def body(reply: Reply) -> dict[str, Any]:
    assert reply.body is not None
    return dict(reply.body)


# ---------------------------------------------------------------- buckets and retry-after


def test_requests_bucket_step_table() -> None:
    s = server()
    for _ in range(60):
        assert s.handle(msg(), 0.0).status == 200
    # (t, status, retry-after): one request comes back per second, never earlier
    steps = [
        (0.0, 429, "1"),
        (0.5, 429, "1"),
        (1.0, 200, None),
        (1.0, 429, "1"),
        (2.9, 200, None),
        (2.9, 429, "1"),
    ]
    for t, status, retry in steps:
        r = s.handle(msg(), t)
        assert (t, r.status, r.header("retry-after")) == (t, status, retry)


def test_retry_after_is_exactly_when_it_fits() -> None:
    s = server(default_limits=PoolLimits(rpm=60, itpm=6_000, otpm=6_000))
    big = "word " * 2000  # about 2000 input tokens each
    cost = s.handle(msg(big), 0.0)
    assert cost.status == 200
    per = s.log[0].admitted["input_tokens"]
    while s.handle(msg(big), 0.0).status == 200:
        pass
    refused = s.log[-1]
    assert refused.status == 429
    assert refused.error_type == "rate_limit_error"
    level = s.level(POOL, "input_tokens", 0.0)
    exact = (per - level) / 100.0  # 6000 ITPM refill 100 a second
    assert refused.retry_after == math.ceil(exact)
    assert s.handle(msg(big), exact - 0.01).status == 429
    assert s.handle(msg(big), float(refused.retry_after)).status == 200


def test_429_body_and_headers_format() -> None:
    s = server()
    for _ in range(60):
        s.handle(msg(), 0.0)
    r = s.handle(msg(), 0.25)
    assert r.status == 429
    b = body(r)
    assert b["type"] == "error"
    assert b["error"]["type"] == "rate_limit_error"
    assert b["request_id"] == hdr(r, "request-id")
    assert re.fullmatch(r"req_[0-9A-Za-z]{24}", b["request_id"])
    assert "60 requests per minute" in b["error"]["message"]
    assert re.fullmatch(r"[0-9]+", hdr(r, "retry-after"))
    assert remaining(r, "requests") == 0


def test_reset_headers_are_rfc3339_when_full_and_date_is_http_date() -> None:
    s = server()
    r = s.handle(msg(out=5), 30.0)
    date = email.utils.parsedate_to_datetime(hdr(r, "date"))
    # a plain response is sent when generation ends: 0.5 s + 5 tokens at 100/s
    assert date == DEFAULT_EPOCH + dt.timedelta(seconds=30)
    reset = dt.datetime.fromisoformat(hdr(r, "anthropic-ratelimit-requests-reset").replace("Z", "+00:00"))
    assert reset == DEFAULT_EPOCH + dt.timedelta(seconds=31)  # one request back in one second
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", hdr(r, "anthropic-ratelimit-output-tokens-reset"))
    assert hdr(r, "anthropic-ratelimit-tokens-limit") == "66000"


def test_token_remaining_is_rounded_to_the_nearest_thousand_requests_exact() -> None:
    s = server(default_limits=PoolLimits(rpm=60, itpm=60_000, otpm=60_000))
    text = "word " * 1600
    r = s.handle(msg(text, max_tokens=1499), 0.0)
    charged = s.log[0].admitted["input_tokens"]
    assert charged == count_text(text) + 4 + 3  # message and request framing
    assert remaining(r, "input-tokens") == round((60_000 - charged) / 1000) * 1000
    assert remaining(r, "output-tokens") == 59_000  # 58,501 rounds up
    assert remaining(r, "requests") == 59


def test_time_going_backwards_mints_nothing() -> None:
    s = server()
    for _ in range(60):
        s.handle(msg(), 10.0)
    assert s.handle(msg(), 5.0).status == 429  # an earlier time counts as the latest one
    assert s.handle(msg(), 10.0).status == 429
    assert s.handle(msg(), 11.0).status == 200


def test_enforcement_interval_one_second() -> None:
    s = server(enforcement_interval=1.0)
    steps = [(0.0, 200), (0.0, 429), (0.5, 429), (1.0, 200), (1.5, 429), (2.0, 200)]
    for t, status in steps:
        assert (t, s.handle(msg(), t).status) == (t, status)
    assert s.capacity(POOL, "requests") == 1.0
    assert s.capacity(POOL, "input_tokens") == 1000.0
    # one a second: of 100 tries in [2.0, 11.9] after a take at 2.0, those at 3.0 .. 11.0 pass
    admitted = [round(2.0 + i / 10, 1) for i in range(100) if s.handle(msg(), 2.0 + i / 10).status == 200]
    assert admitted == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]


def test_request_larger_than_a_short_bucket_is_admitted_when_full_and_leaves_debt() -> None:
    s = server(enforcement_interval=1.0)  # input capacity 1000, limit 60,000 a minute
    big = "word " * 3000
    assert s.handle(msg(big), 0.0).status == 200
    assert s.level(POOL, "input_tokens", 0.0) < 0
    r = s.handle(msg(big), 1.0)
    assert r.status == 429
    charged = s.log[0].admitted["input_tokens"]
    # the level is 1000 - charged + 1000 (one second of refill); it must climb back to 1000
    assert int(hdr(r, "retry-after")) == math.ceil((charged - 1000) / 1000) == 3


def test_request_over_the_per_minute_limit_never_fits() -> None:
    s = server()
    r = s.handle(msg(max_tokens=6001), 0.0)
    assert r.status == 429
    assert "6,000 output tokens per minute" in body(r)["error"]["message"]
    assert hdr(r, "retry-after") == "60"


def test_presets_and_pools_are_shared_by_model_class() -> None:
    s = EmulatedServer(EmulatorConfig(preset="tier-1", latency=LAT))
    for model in ("claude-opus-4-1", "claude-opus-4-5", "claude-opus-4-20250514"):
        s.handle(msg(model=model), 0.0)
    s.handle(msg(model="claude-haiku-4-5"), 0.0)
    assert set(s.pools()) == {"opus-4.x", "haiku-4.5"}
    assert s.limits("opus-4.x") == {"requests": 50, "input_tokens": 30_000, "output_tokens": 8_000}
    assert s.level("opus-4.x", "requests", 0.0) == 47
    assert s.handle(msg(model="claude-nonesuch-9"), 0.0).status == 404


# ---------------------------------------------------------------- OTPM rules


def test_otpm_max_tokens_rule_reserves_then_settles() -> None:
    s = server()
    r = s.handle(msg(max_tokens=4000, out=100), 0.0)
    assert remaining(r, "output-tokens") == 2000
    assert s.handle(msg(max_tokens=4000), 0.0).status == 429
    end = 0.5 + 100 / 100.0
    s.advance(end)
    assert s.log[0].output_tokens == 100
    assert s.log[0].settled_at == pytest.approx(end)
    assert s.level(POOL, "output_tokens", end) == pytest.approx(min(6000, 6000 - 100 + 100 * end))
    assert s.admitted_in_window(POOL, "output_tokens", 0.0, end + 1) == 100


def test_otpm_actual_rule_charges_as_produced() -> None:
    s = server(otpm_rule="actual")
    r1 = s.handle(msg(max_tokens=4000, out=1000), 0.0)
    assert remaining(r1, "output-tokens") == 6000  # nothing reserved at the start
    assert s.handle(msg(max_tokens=4000, out=1000), 0.0).status == 200
    s.advance(0.5 + 5.0)  # halfway through both
    produced = s.admitted_in_window(POOL, "output_tokens", 0.0, 100.0)
    assert 900 <= produced <= 1100
    s.advance(100.0)
    assert s.admitted_in_window(POOL, "output_tokens", 0.0, 100.0) == 2000


def test_stop_reason_and_forced_output() -> None:
    s = server()
    capped = body(s.handle(msg(max_tokens=20, out=50), 0.0))
    assert capped["stop_reason"] == "max_tokens"
    assert capped["usage"]["output_tokens"] == 20
    free = body(s.handle(msg(max_tokens=20, out=7), 1.0))
    assert free["stop_reason"] == "end_turn"
    assert free["usage"]["output_tokens"] == 7


def test_default_output_is_a_seeded_fraction_of_max_tokens() -> None:
    a = [body(server(seed=3).handle(msg(max_tokens=500), 0.0))["usage"]["output_tokens"] for _ in range(2)]
    assert a[0] == a[1]
    assert 50 <= a[0] <= 500


# ---------------------------------------------------------------- prompt cache


def cached(
    system_words: int, ttl: str | None = None, model: str = SONNET, question: str = "Hi"
) -> EmulatorRequest:
    cc: dict[str, str] = {"type": "ephemeral"}
    if ttl:
        cc["ttl"] = ttl
    system = [{"type": "text", "text": "rule " * system_words, "cache_control": cc}]
    return msg(question, model=model, system=system)


def usage(reply: Reply) -> dict[str, Any]:
    u: dict[str, Any] = body(reply)["usage"]
    return u


def test_cache_write_then_read_after_the_writer_began() -> None:
    s = server()
    first = usage(s.handle(cached(1500), 0.0))
    assert first["cache_creation_input_tokens"] == 1500
    assert first["cache_read_input_tokens"] == 0
    assert first["cache_creation"] == {"ephemeral_5m_input_tokens": 1500, "ephemeral_1h_input_tokens": 0}
    same_instant = usage(s.handle(cached(1500), 0.1))  # the writer has not begun (ttft 0.5)
    assert same_instant["cache_read_input_tokens"] == 0
    hit = usage(s.handle(cached(1500, question="Another question"), 2.0))
    assert hit["cache_read_input_tokens"] == 1500
    assert hit["cache_creation_input_tokens"] == 0
    assert s.log[-1].admitted["input_tokens"] == hit["input_tokens"]  # reads do not count


def test_cache_ttl_refresh_and_expiry() -> None:
    s = server()
    s.handle(cached(1500), 0.0)
    assert usage(s.handle(cached(1500), 240.0))["cache_read_input_tokens"] == 1500  # refreshes to 540
    assert usage(s.handle(cached(1500), 500.0))["cache_read_input_tokens"] == 1500  # refreshes to 800
    assert usage(s.handle(cached(1500), 801.0))["cache_read_input_tokens"] == 0  # expired: written again
    t = 2000.0
    s.handle(cached(1500, ttl="1h"), t)
    assert usage(s.handle(cached(1500, ttl="1h"), t + 3000))["cache_read_input_tokens"] == 1500


def test_cache_minimum_length_per_model() -> None:
    s = server()
    short = usage(s.handle(cached(900), 0.0))
    assert short["cache_creation_input_tokens"] == 0  # under 1024 for Sonnet 4.5
    haiku45 = usage(s.handle(cached(3000, model="claude-haiku-4-5"), 1.0))
    assert haiku45["cache_creation_input_tokens"] == 0  # under 4096
    haiku3 = usage(s.handle(cached(3000, model="claude-3-haiku-20240307"), 2.0))
    assert haiku3["cache_creation_input_tokens"] == 3000  # over 2048


def test_dagger_models_count_cache_reads_toward_itpm() -> None:
    s = EmulatedServer(EmulatorConfig(preset="tier-1", latency=LAT))
    model = "claude-3-haiku-20240307"
    s.handle(cached(2500, model=model), 0.0)
    hit = usage(s.handle(cached(2500, model=model), 5.0))
    assert hit["cache_read_input_tokens"] == 2500
    assert s.log[-1].admitted["input_tokens"] == hit["input_tokens"] + 2500


def test_cache_lookback_finds_an_earlier_breakpoint() -> None:
    s = server()
    turn1 = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "fact " * 1200, "cache_control": {"type": "ephemeral"}}],
        }
    ]
    s.handle(EmulatorRequest.post("/v1/messages", {"model": SONNET, "max_tokens": 5, "messages": turn1}), 0.0)
    turn2 = [
        *turn1,
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "more", "cache_control": {"type": "ephemeral"}}],
        },
    ]
    r = s.handle(
        EmulatorRequest.post("/v1/messages", {"model": SONNET, "max_tokens": 5, "messages": turn2}), 5.0
    )
    u = usage(r)
    assert u["cache_read_input_tokens"] == 1204
    assert u["cache_creation_input_tokens"] > 0


def test_too_many_breakpoints_is_a_400() -> None:
    system = [{"type": "text", "text": f"part {i}", "cache_control": {"type": "ephemeral"}} for i in range(5)]
    r = server().handle(msg(system=system), 0.0)
    assert r.status == 400
    assert body(r)["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------- token counter


def test_token_counter_differs_from_a_fixed_ratio_and_by_family() -> None:
    prose = "The server uses a token bucket: capacity refills continuously up to the maximum."
    code = "def f(x):\n    return {'a': [1, 2, 3], 'b': x ** 2}\n"
    ratios = [len(t) / count_text(t) for t in (prose, code)]
    assert ratios[0] > 3.5
    assert ratios[1] < 3.0
    s = server()
    old = usage(s.handle(msg(prose * 10, model="claude-opus-4-5"), 0.0))["input_tokens"]
    new = usage(s.handle(msg(prose * 10, model="claude-opus-4-7"), 0.0))["input_tokens"]
    assert 1.25 < new / old < 1.35


def test_token_counter_covers_tools_images_and_documents() -> None:
    import base64
    import struct

    png = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + struct.pack(">II", 750, 100) + b"\x00" * 20
    content = [
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png).decode()},
        },
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "alpha beta"}},
        {"type": "text", "text": "Describe"},
    ]
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}]
    s = server()
    plain = usage(s.handle(msg("Describe"), 0.0))["input_tokens"]
    rich = s.handle(
        EmulatorRequest.post(
            "/v1/messages",
            {
                "model": SONNET,
                "max_tokens": 5,
                "tools": tools,
                "messages": [{"role": "user", "content": content}],
            },
        ),
        0.0,
    )
    assert usage(rich)["input_tokens"] > plain + 100 + 300  # 100 for the image, 300 for the tool prompt


# ---------------------------------------------------------------- spend, unified, wallet


def test_spend_cap_blocks_until_next_month_without_retry_after() -> None:
    s = server(monthly_spend_cap_usd=0.001)
    s.handle(msg(max_tokens=100, out=100), 0.0)  # $0.0015 of Sonnet output
    s.advance(10.0)
    assert s.spend_usd(10.0) > 0.001
    r = s.handle(msg(), 10.0)
    assert r.status == 429
    assert r.header("retry-after") is None
    assert body(r)["error"]["details"] == {"error_code": "enforced_spend_limit_reached"}
    assert "2026-02-01" in body(r)["error"]["message"]
    feb = (dt.datetime(2026, 2, 1, tzinfo=dt.UTC) - DEFAULT_EPOCH).total_seconds()
    assert s.handle(msg(), feb - 1).status == 429
    assert s.handle(msg(), feb).status == 200


def test_preset_spend_cap_is_the_default() -> None:
    s = EmulatedServer(EmulatorConfig(preset="tier-1", latency=LAT, initial_spend_usd=100.0))
    assert s.handle(msg(), 0.0).status == 429


def test_unified_mode_windows_and_rejection() -> None:
    cfg = UnifiedConfig(five_hour_budget_usd=0.01, seven_day_budget_usd=1.0, warning_threshold=0.5)
    s = server(mode="unified", unified=cfg)
    r = s.handle(msg(max_tokens=400, out=400), 0.0)  # Sonnet: 400 x $15/M = $0.006
    assert hdr(r, "anthropic-ratelimit-unified-status") == "allowed"
    assert hdr(r, "anthropic-ratelimit-unified-representative-claim") == "five_hour"
    assert hdr(r, "anthropic-ratelimit-unified-fallback-percentage") == "0.5"
    epoch = int(DEFAULT_EPOCH.timestamp())
    assert int(hdr(r, "anthropic-ratelimit-unified-reset")) == epoch + 5 * 3600
    assert r.header("anthropic-ratelimit-requests-limit") is None
    s.advance(60.0)
    r = s.handle(msg(max_tokens=400, out=400), 60.0)
    assert hdr(r, "anthropic-ratelimit-unified-status") == "allowed_warning"
    assert float(hdr(r, "anthropic-ratelimit-unified-5h-utilization")) == pytest.approx(0.6, abs=0.01)
    assert hdr(r, "anthropic-ratelimit-unified-5h-surpassed-threshold") == "0.5"
    s.advance(120.0)
    r = s.handle(msg(), 120.0)
    assert r.status == 429
    assert hdr(r, "anthropic-ratelimit-unified-status") == "rejected"
    assert int(hdr(r, "retry-after")) == 5 * 3600 - 120
    assert s.handle(msg(), 5 * 3600.0).status == 200


def test_wallet_mode_reserves_settles_and_refuses() -> None:
    s = server(mode="wallet", wallet=WalletConfig(balance=5_000, rpm=100))
    r = s.handle(msg(model="anthropic/claude-sonnet-4.6", max_tokens=100, out=40), 0.0)
    b = body(r)
    assert r.status == 200
    assert b["model"] == "claude-sonnet-4-6"
    q = b["quota"]
    assert q["balance_before"] == 5_000
    assert q["balance_after"] == 5_000 - q["credits_used"]
    assert hdr(r, "X-Quota-Credits-Used") == str(q["credits_used"])
    assert hdr(r, "X-Quota-Balance") == str(q["balance_after"])
    assert r.header("X-Quota-Markup") is None
    big = s.handle(msg(model="claude-sonnet-4-6", max_tokens=1000), 1.0)  # reserves $0.015 = 15,000 credits
    assert big.status == 402
    assert body(big)["error"]["type"] == "insufficient_credits"
    missing = s.handle(msg(model="openai/gpt-4o"), 1.0)
    assert missing.status == 404
    assert body(missing)["error"]["type"] == "model_not_found"


def test_wallet_rate_limit_and_stream_headers() -> None:
    s = server(mode="wallet", wallet=WalletConfig(rpm=100, markup=1.5))
    replies = [s.handle(msg(model="anthropic/claude-haiku-4.5", stream=True, out=3), 0.0) for _ in range(101)]
    assert [r.status for r in replies].count(200) == 100
    last = replies[-1]
    assert last.status == 429
    assert body(last)["error"]["type"] == "rate_limit_exceeded"
    assert last.header("retry-after") == "1"
    first = replies[0]
    reserved = int(hdr(first, "X-Quota-Credits-Reserved"))
    assert int(hdr(first, "X-Quota-Balance-Reserved")) == 10_000_000 - reserved
    final = first.events[-1]
    assert final.event == "quota_usage"
    assert final.data["quota"]["credits_used"] <= reserved
    assert set(final.data["quota"]) >= {
        "credits_used",
        "balance_before",
        "balance_after",
        "ledger_id",
        "billing_mode",
    }


# ---------------------------------------------------------------- overload, streams, abandonment


def test_overload_529_and_midstream_error() -> None:
    s = server(overload_probability=1.0)
    r = s.handle(msg(), 0.0)
    assert r.status == 529
    assert body(r)["error"]["type"] == "overloaded_error"
    assert s.level(POOL, "requests", 0.0) == 60  # not charged
    s2 = server(midstream_error_probability=1.0)
    stream = s2.handle(msg(stream=True, max_tokens=100, out=100), 0.0)
    assert stream.status == 200
    assert stream.events[-1].event == "error"
    assert stream.events[-1].data["error"]["type"] == "overloaded_error"
    assert "message_stop" not in [e.event for e in stream.events]


def test_stream_events_framing() -> None:
    r = server().handle(msg(stream=True, max_tokens=50, out=30), 0.0)
    names = [e.event for e in r.events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert r.events[0].data["message"]["usage"]["output_tokens"] == 1
    assert r.events[-2].data["usage"]["output_tokens"] == 30
    raw = r.body_bytes().decode()
    first = raw.split("\n\n")[0].split("\n")
    assert first[0] == "event: message_start"
    assert json.loads(first[1][len("data: ") :])["type"] == "message_start"
    assert [e.at for e in r.events] == sorted(e.at for e in r.events)
    assert r.delay == 0.5
    assert r.ends_at == pytest.approx(0.8)


def test_abandon_settles_what_was_produced() -> None:
    s = server()
    r = s.handle(msg(stream=True, max_tokens=1000, out=1000), 0.0)
    assert s.abandon(r.request_id, 3.0)  # 0.5 s + 250 tokens at 100/s
    rec = s.record(r.request_id)
    assert rec.abandoned
    assert rec.output_tokens == 250
    assert s.admitted_in_window(POOL, "output_tokens", 0.0, 100.0) == 250
    assert not s.abandon(r.request_id, 4.0)
    s.advance(100.0)
    assert rec.output_tokens == 250


# ------------------------------------------------ count_tokens, batches, foreign, acceleration


def test_count_tokens_has_its_own_rpm() -> None:
    s = server(count_tokens_rpm=2)
    req = EmulatorRequest.post(
        "/v1/messages/count_tokens", {"model": SONNET, "messages": [{"role": "user", "content": "Hi"}]}
    )
    a, b, c = (s.handle(req, 0.0) for _ in range(3))
    assert body(a) == {"input_tokens": 8}
    assert b.status == 200
    assert c.status == 429
    assert hdr(c, "retry-after") == "30"
    assert s.handle(msg(), 0.0).status == 200  # messages are not affected


def test_batches_queue_cap_and_lifecycle() -> None:
    s = server(batch_queue_cap=3, batch_processing_time=100.0)
    one = {"model": SONNET, "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]}

    def create(n: int, t: float) -> Reply:
        reqs = [{"custom_id": f"r{i}", "params": one} for i in range(n)]
        return s.handle(EmulatorRequest.post("/v1/messages/batches", {"requests": reqs}), t)

    first = create(2, 0.0)
    assert first.status == 200
    assert body(first)["processing_status"] == "in_progress"
    full = create(2, 10.0)
    assert full.status == 429
    assert hdr(full, "retry-after") == "90"
    assert s.batch_queue() == 2
    assert create(2, 100.0).status == 200
    bid = body(first)["id"]
    got = body(s.handle(EmulatorRequest("GET", f"/v1/messages/batches/{bid}"), 101.0))
    assert got["processing_status"] == "ended"
    assert got["request_counts"]["succeeded"] == 2
    results = s.handle(EmulatorRequest("GET", f"/v1/messages/batches/{bid}/results"), 101.0)
    lines = [json.loads(x) for x in (results.content or b"").splitlines()]
    assert [x["custom_id"] for x in lines] == ["r0", "r1"]
    assert lines[0]["result"]["type"] == "succeeded"
    second = body(create(1, 102.0))
    canceled = s.handle(EmulatorRequest("POST", f"/v1/messages/batches/{second['id']}/cancel"), 103.0)
    assert body(canceled)["processing_status"] == "canceling"
    s.advance(105.0)
    listed = body(s.handle(EmulatorRequest("GET", "/v1/messages/batches?limit=2"), 105.0))
    assert len(listed["data"]) == 2
    assert listed["has_more"] is True
    assert listed["data"][0]["request_counts"]["canceled"] == 1


def test_batch_rpm() -> None:
    s = server(batch_rpm=1)
    assert s.handle(EmulatorRequest("GET", "/v1/messages/batches"), 0.0).status == 200
    assert s.handle(EmulatorRequest("GET", "/v1/messages/batches"), 0.0).status == 429


def test_foreign_traffic_shows_only_in_headers() -> None:
    s = server(foreign=(ForeignTraffic(pool=POOL, rpm=30),))
    for _ in range(60):
        s.handle(msg(), 0.0)
    r = s.handle(msg(), 10.0)  # refill 1/s, foreign takes 0.5/s: 5 left, this one takes one
    assert remaining(r, "requests") == 4
    assert s.foreign_taken(POOL, "requests") == pytest.approx(5.0)


def test_acceleration_limit_refuses_a_sharp_increase() -> None:
    acc = AccelerationLimit(window=10.0, baseline=60.0, factor=2.0, floor_fraction=0.1)
    s = server(acceleration=acc, default_limits=PoolLimits(rpm=600, itpm=10**6, otpm=10**6))
    statuses = [s.handle(msg(), 0.0).status for _ in range(11)]
    assert statuses == [200] * 10 + [429]  # floor: 0.1 x 600 RPM = 1 a second over 10 s
    r = s.handle(msg(), 1.0)
    assert r.status == 429
    assert "increased too" in body(r)["error"]["message"]
    assert hdr(r, "retry-after") == "9"
    assert s.handle(msg(), 9.9).status == 429
    assert s.handle(msg(), 10.0).status == 200  # the burst now counts as baseline


def test_admitted_never_exceeds_allowed() -> None:
    s = server(enforcement_interval=10.0)
    t = 0.0
    while t < 120.0:
        s.handle(msg(out=5), t)
        t += 0.07
    s.advance(200.0)
    assert s.goodput(0.0, 200.0) == 5 * sum(r.status == 200 for r in s.log)
    assert s.goodput(0.0, 200.0, pool="nonesuch") == 0
    for t0 in (0.0, 13.0, 50.0):
        for dim in ("requests", "input_tokens", "output_tokens"):
            assert s.admitted_in_window(POOL, dim, t0, t0 + 30.0) <= s.allowed_in_window(
                POOL, dim, t0, t0 + 30.0
            )


def test_config_errors() -> None:
    with pytest.raises(ConfigurationError, match=r"^mode must be 'api', 'unified' or 'wallet', got 'x'$"):
        EmulatorConfig(mode="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"^enforcement_interval must be positive, got 0$"):
        EmulatorConfig(enforcement_interval=0)
    with pytest.raises(ConfigurationError, match=r"^give a preset, limits or default_limits$"):
        EmulatorConfig(preset=None)


def test_unknown_route_and_bad_json() -> None:
    s = server()
    assert s.handle(EmulatorRequest("GET", "/v1/nothing"), 0.0).status == 404
    bad = s.handle(EmulatorRequest("POST", "/v1/messages", b"{"), 0.0)
    assert bad.status == 400
    assert body(bad)["error"]["type"] == "invalid_request_error"
    huge = s.handle(EmulatorRequest("POST", "/v1/messages", b" " * (32 * 1024 * 1024 + 1)), 0.0)
    assert huge.status == 413
    assert huge.header("anthropic-ratelimit-requests-limit") is None


def test_public_api_is_listed_and_documented() -> None:
    import inspect

    import ratekeeper.emulator as emulator

    assert set(emulator.__all__) == {
        "DEFAULT_EPOCH", "AccelerationLimit", "Clock", "EmulatedServer", "EmulatorConfig",
        "EmulatorHTTPServer", "EmulatorRequest", "EmulatorTransport", "ForeignTraffic", "LatencyModel",
        "PoolLimits", "Price",
        "RealClock", "Reply", "RequestRecord", "SseEvent", "UnifiedConfig", "VirtualClock", "WalletConfig",
        "count_text", "serve",
    }  # fmt: skip
    for name in emulator.__all__:
        obj = getattr(emulator, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), name


def test_transport_without_httpx2_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import ratekeeper.emulator as emulator
    from ratekeeper.errors import MissingDependency

    monkeypatch.setitem(sys.modules, "httpx2", None)
    monkeypatch.delitem(sys.modules, "ratekeeper.emulator._transport", raising=False)
    with pytest.raises(
        MissingDependency,
        match=r"^httpx2 is not installed; install it with: pip install 'ratekeeper\[anthropic\]'$",
    ):
        emulator.__getattr__("EmulatorTransport")


# ---------------------------------------------------------------- the moment a report describes


def test_report_moment_admission_holds_the_report_taken_when_admitted() -> None:
    s = server(report_moment="admission")
    first = s.handle(msg(max_tokens=2000, out=100), 0.0)  # answered at 0.5 + 1.0
    s.handle(msg(max_tokens=2000, out=100), 0.2)  # admitted while the first is under way
    sent = s.deliver(first, first.delay)
    assert sent is first
    assert remaining(sent, "requests") == 59  # taken at 0.0, before the second
    assert remaining(sent, "output-tokens") == 4000


def test_report_moment_response_counts_its_settlement_and_what_came_meanwhile() -> None:
    s = server(report_moment="response")
    first = s.handle(msg(max_tokens=2000, out=100), 0.0)
    assert remaining(first, "output-tokens") == 4000  # as admitted, until delivered
    s.handle(msg(max_tokens=3000, out=100), 1.2)  # admitted meanwhile: 3000 reserved
    sent = s.deliver(first, first.delay)
    # at 1.5: 6000 - 2000 (first) + 1900 (its settlement) - 3000 (second) + refill 150 = 3050
    assert remaining(sent, "output-tokens") == 3000
    level = s.level(POOL, "output_tokens", 1.5)
    assert level == pytest.approx(6000 - 2000 + 1900 - 3000 + 100 * 1.5)
    assert hdr(sent, "date") == hdr(first, "date")  # the date was always the response's
    assert s.log[0].settled_at == pytest.approx(1.5)


def test_report_moment_response_leaves_streams_at_their_first_byte() -> None:
    s = server(report_moment="response")
    r = s.handle(msg(max_tokens=2000, out=100, stream=True), 0.0)
    assert r.late_headers is None
    assert s.deliver(r, 5.0) is r


def test_report_moment_mixed_takes_both_seeded_and_leaves_other_draws_alone() -> None:
    def outcomes(moment: str) -> tuple[list[bool], list[int]]:
        s = server(
            report_moment=moment, seed=7, default_limits=PoolLimits(rpm=6000, itpm=6_000_000, otpm=600_000)
        )
        replies = [s.handle(msg(max_tokens=100), t * 0.01) for t in range(200)]
        return [r.late_headers is not None for r in replies], [
            body(r)["usage"]["output_tokens"] for r in replies
        ]

    late, produced = outcomes("mixed")
    assert 60 < sum(late) < 140
    assert outcomes("mixed") == (late, produced)
    assert outcomes("admission")[1] == produced  # the output draws do not move
    assert not any(outcomes("admission")[0])
    assert all(outcomes("response")[0])


def test_report_moment_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="report_moment must be one of admission, response, mixed"):
        EmulatorConfig(report_moment="later")  # type: ignore[arg-type]
