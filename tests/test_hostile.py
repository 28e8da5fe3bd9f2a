"""Hostile input to the local limiter: malformed reports and arguments fail clearly or are survived."""

from __future__ import annotations

import json
import math
from typing import Any

import anthropic
import anyio
import httpx2
import pytest
from anthropic_support import in_flight
from limiter_support import drain_requests

from ratekeeper import ConfigurationError, Limiter, Usage
from ratekeeper.anthropic import wrap
from ratekeeper.core._reading import MAX_PAUSE

MODEL = "claude-sonnet-4-5"
HELLO: Any = [{"role": "user", "content": "hello"}]
BAD_COUNTS: list[Any] = ["12", -5, 10**400]


def _message(usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }


def _sse(usage: dict[str, Any]) -> bytes:
    start = _message({"input_tokens": 5, "output_tokens": 1})
    start["content"] = []
    events = [
        ("message_start", {"type": "message_start", "message": start}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode() for kind, data in events)


def _client(limiter: Limiter, handler: Any) -> anthropic.Anthropic:
    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    client = anthropic.Anthropic(api_key="test", http_client=http, base_url="http://test", max_retries=0)
    return wrap(client, limiter)


@pytest.mark.parametrize("bad", BAD_COUNTS)
def test_a_stream_with_malformed_usage_still_lets_its_permit_go(bad: Any) -> None:
    limiter = Limiter("tier-1")
    body = _sse({"output_tokens": bad})

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=iter([body]))

    client = _client(limiter, handler)
    stream = client.messages.create(model=MODEL, max_tokens=100, messages=HELLO, stream=True)
    for _ in stream:
        pass
    assert in_flight(limiter) == 0


@pytest.mark.parametrize("bad", BAD_COUNTS)
def test_a_response_with_malformed_usage_is_returned_and_keeps_its_reservation(bad: Any) -> None:
    limiter = Limiter("tier-1", clock=lambda: 0.0)
    payload = json.dumps(_message({"input_tokens": bad, "output_tokens": 3})).encode()

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "application/json"}, content=payload)

    client = _client(limiter, handler)
    message = client.messages.create(model=MODEL, max_tokens=100, messages=HELLO)
    assert message.id == "msg_1"
    assert in_flight(limiter) == 0
    pool = next(iter(limiter.statistics().pools.values()))
    # kept as charged: the 100 reserved output tokens were not given back
    assert pool.levels["output_tokens"] == pool.capacity["output_tokens"] - 100


class _Message:
    """Something with a ``usage`` but no counts of its own: passed instead of ``message.usage``."""

    usage = Usage(input_tokens=5, output_tokens=5)


_MESSAGE_DICT = {"id": "msg_1", "type": "message", "usage": {"input_tokens": 5, "output_tokens": 5}}


@pytest.mark.parametrize(
    ("wrong", "named"),
    [(_Message(), "_Message"), ("usage", "str"), (7, "int"), ({}, "keys: none"), (_MESSAGE_DICT, "keys: id")],
)
def test_settle_rejects_what_is_not_a_usage_and_keeps_the_reservation(wrong: object, named: str) -> None:
    limiter = Limiter("tier-1", clock=lambda: 0.0)
    permit = limiter.acquire_nowait(MODEL, input_tokens=1000, max_tokens=500)
    with pytest.raises(TypeError, match=named):
        permit.settle(wrong)
    assert permit.active
    assert permit.settle({"input_tokens": 1000, "output_tokens": 500}).output_tokens == 500


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1, -0.5])
def test_record_output_rejects_non_finite_or_negative_counts(bad: float) -> None:
    limiter = Limiter("tier-1", clock=lambda: 0.0)
    permit = limiter.acquire_nowait(MODEL, input_tokens=10, max_tokens=100)
    with pytest.raises(ValueError, match="output_tokens"):
        permit.record_output(bad)  # type: ignore[arg-type]
    level = limiter.statistics().pools[permit.pool].levels["output_tokens"]
    assert level == limiter.statistics().pools[permit.pool].capacity["output_tokens"] - 100


@pytest.mark.parametrize(
    ("field", "bad", "error"),
    [("input_tokens", "100", TypeError), ("output_tokens", 10**400, ValueError)],
)
def test_a_malformed_count_names_its_field(field: str, bad: Any, error: type[Exception]) -> None:
    limiter = Limiter("tier-1", clock=lambda: 0.0)
    permit = limiter.acquire_nowait(MODEL, input_tokens=10, max_tokens=100)
    with pytest.raises(error, match=field):
        permit.settle({"input_tokens": 1, "output_tokens": 1, field: bad})
    arg = field.replace("output_tokens", "max_tokens")
    with pytest.raises(error, match=arg):
        limiter.acquire_nowait(MODEL, **{arg: bad})


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("option", "bad", "error"),
    [
        ("priority", None, TypeError),
        ("priority", "high", TypeError),
        ("timeout", math.nan, ValueError),
        ("timeout", 10**400, ValueError),
        ("timeout", "1", TypeError),
    ],
)
async def test_a_bad_acquire_argument_fails_before_it_is_enqueued(
    option: str, bad: Any, error: type[Exception]
) -> None:
    limiter = Limiter("tier-1", clock=lambda: 0.0)
    pool = limiter.pool_of(MODEL)
    limiter.set_limits(pool, requests=1)
    first = limiter.acquire_nowait(MODEL)
    with anyio.move_on_after(0.01):  # another request waits behind the first
        async with anyio.create_task_group() as tg:
            tg.start_soon(_acquire_and_settle, limiter)
            for _ in range(100):  # until it is in the queue (trio runs it later than asyncio)
                if limiter.statistics().pools[pool].queue_depth:
                    break
                await anyio.sleep(0)
            with pytest.raises(error, match=option):
                await limiter.acquire(MODEL, **{option: bad})
            assert limiter.statistics().pools[pool].queue_depth == 1
            tg.cancel_scope.cancel()
    first.release()
    assert limiter.statistics().pools[pool].queue_depth == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    "timeout", [None, math.inf, 1e308, 30.0, 10**300], ids=["none", "inf", "1e308", "30", "10**300"]
)
async def test_a_wait_with_any_timeout_sleeps_instead_of_spinning(timeout: Any) -> None:
    """A 0.1 s wait reads the clock a handful of times, whatever deadline it was given.

    (A NaN timeout is refused above: no deadline ever passes, and the wait loop woke 26,188
    times in one second.)
    """
    reads = 0

    def clock() -> float:
        nonlocal reads
        reads += 1
        return anyio.current_time()

    limiter = Limiter("tier-1", clock=clock)
    pool = limiter.pool_of(MODEL)
    limiter.set_limits(pool, requests=600)  # ten a second: the next one waits 0.1 s
    drain_requests(limiter, MODEL)
    reads = 0
    permit = await limiter.acquire(MODEL, input_tokens=1, max_tokens=1, timeout=timeout)
    assert reads < 20
    permit.release()


async def _acquire_and_settle(limiter: Limiter) -> None:
    async with limiter.acquire(MODEL):
        pass


@pytest.mark.parametrize("model", [None, 5])
def test_the_model_must_be_a_str(model: Any) -> None:
    limiter = Limiter("tier-1")
    with pytest.raises(TypeError, match="model must be a str"):
        limiter.acquire_nowait(model)
    with pytest.raises(TypeError, match="model must be a str"):
        limiter.acquire(model)


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": str(10**9)},
        {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"},
        {"retry-after-ms": "1e308"},
    ],
)
@pytest.mark.parametrize("status", [429, 529])
def test_a_pause_is_capped_at_seven_days(
    headers: dict[str, str], status: int, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = Limiter("tier-1", clock=lambda: 0.0)
    permit = limiter.acquire_nowait(MODEL, input_tokens=10, max_tokens=10)
    permit.observe(headers, status=status)
    paused = limiter.statistics().pools[permit.pool].paused_for
    assert 0 < paused <= MAX_PAUSE == 7 * 24 * 3600
    assert "7 days" in caplog.text


def test_a_subscription_hold_is_capped_at_seven_days() -> None:
    limiter = Limiter("tier-1", clock=lambda: 0.0)
    permit = limiter.acquire_nowait(MODEL, input_tokens=10, max_tokens=10)
    headers = {
        "anthropic-ratelimit-unified-status": "rejected",
        "anthropic-ratelimit-unified-reset": "253402300799",  # 9999-12-31
        "anthropic-ratelimit-unified-representative-claim": "five_hour",
    }
    permit.observe(headers, status=429)
    assert 0 < limiter.statistics().pools[permit.pool].paused_for <= MAX_PAUSE


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, "50", 10**400])
def test_a_bad_limit_is_rejected_by_the_constructor_naming_its_key(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"limits\['sonnet-4'\]\['requests'\]"):
        Limiter("tier-1", limits={"sonnet-4": {"requests": bad}})


def test_limits_without_the_pool_level_are_rejected_naming_the_form() -> None:
    with pytest.raises(ConfigurationError, match=r"limits\['requests'\] must map dimensions"):
        Limiter("tier-1", limits={"requests": 0})  # type: ignore[dict-item]


@pytest.mark.parametrize("bad", [0, math.nan, 10**400, "50"])
def test_set_limits_rejects_a_bad_limit_and_changes_nothing(bad: Any) -> None:
    limiter = Limiter("tier-1", clock=lambda: 0.0)
    pool = limiter.pool_of(MODEL)
    before = limiter.statistics().pools[pool].limits
    with pytest.raises(ConfigurationError, match=r"set_limits\(requests=...\)"):
        limiter.set_limits(pool, requests=bad)
    assert limiter.statistics().pools[pool].limits == before


def test_observe_names_a_status_that_is_not_an_int() -> None:
    limiter = Limiter("tier-1", clock=lambda: 0.0)
    permit = limiter.acquire_nowait(MODEL)
    with pytest.raises(TypeError, match="status must be an int"):
        permit.observe({}, status="429")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="status must be an int"):
        limiter.observe({}, status="429")  # type: ignore[arg-type]
    assert permit.active
    assert not permit.sent


def _system(ttl: str) -> Any:
    """A system block whose cache TTL the estimator cannot read."""
    return [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": ttl}}]


def test_an_unreadable_body_is_logged_without_its_text(caplog: pytest.LogCaptureFixture) -> None:
    limiter = Limiter("tier-1", clock=lambda: 0.0)
    secret = "my secret prompt text " * 5
    payload = json.dumps(_message({"input_tokens": 3, "output_tokens": 3})).encode()

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "application/json"}, content=payload)

    client = _client(limiter, handler)
    client.messages.create(model=MODEL, max_tokens=100, messages=HELLO, system=_system(secret))
    assert "cannot estimate this request (system[0].cache_control.ttl holds str)" in caplog.text
    assert "secret" not in caplog.text


def test_maps_keyed_by_input_are_bounded() -> None:
    from ratekeeper.gate._account import MAX_REMEMBERED

    limiter = Limiter("tier-1", clock=lambda: 0.0)
    for i in range(MAX_REMEMBERED * 2):
        limiter.pool_of(f"claude-sonnet-4-5-{20250000 + i}")
        limiter.observe(
            {
                "anthropic-ratelimit-unified-status": "allowed_warning",
                "anthropic-ratelimit-unified-reset": str(1_800_000_000 + i),
                "anthropic-ratelimit-unified-representative-claim": f"claim-{i}",
            }
        )
    assert len(limiter._model_runtime) <= MAX_REMEMBERED
    assert len(limiter._model_pool) <= MAX_REMEMBERED
    assert len(limiter._account.unified_warned) <= MAX_REMEMBERED
    for i in range(MAX_REMEMBERED * 2):  # rejections: a hold per server-sent claim
        limiter.observe(
            {
                "anthropic-ratelimit-unified-status": "rejected",
                "anthropic-ratelimit-unified-reset": str(1_800_000_000 + i),
                "anthropic-ratelimit-unified-representative-claim": f"claim-{i}",
            }
        )
    assert len(limiter._account.unified_holds) <= MAX_REMEMBERED
