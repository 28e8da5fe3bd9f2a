"""The limiter speaks up: INFO lines with ``extra`` fields for 429s, pauses and what it learns,
a storm said once per pool and kind every LOG_EVERY seconds, and the hook run outside the lock."""

from __future__ import annotations

import logging
import threading

import pytest
from limiter_support import POOL, RATE_LIMIT_BODY, SONNET, Events, FakeClock, headers
from redis_server import RedisServer

from ratekeeper import Limiter, LimiterEvent, RedisBackend
from ratekeeper.gate._events import LOG_EVERY, SLOW_WAIT, EventLog


def info_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "ratekeeper" and r.levelno == logging.INFO]


def test_a_429_says_the_429_and_the_pause_at_info_with_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ratekeeper")
    limiter = Limiter("tier-1", opening=60, clock=FakeClock())
    permit = limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)
    permit.observe(headers(retry_after=12), status=429, body=RATE_LIMIT_BODY)
    by_kind = {r.event: r for r in info_lines(caplog)}  # type: ignore[attr-defined]
    assert by_kind["rate_limited"].getMessage() == (
        "sonnet-4.x: 429 rate limited (not predicted); retrying after 12 s"
    )
    assert by_kind["pause"].getMessage() == "sonnet-4.x: paused for 12 s (429)"
    pause = by_kind["pause"]
    assert (pause.pool, pause.seconds, pause.reason, pause.suppressed) == (POOL, 12.0, "429", 0)  # type: ignore[attr-defined]
    rate = by_kind["rate_limited"]
    assert (rate.predicted, rate.retry_after) == (False, 12.0)  # type: ignore[attr-defined]
    # an unexplained 429 halves the burst: said too, with what it means in seconds
    assert by_kind["burst_change"].getMessage() == (
        "sonnet-4.x: burst now: 0.5 of a minute's limit (30 s of refill)"
    )


def test_a_limit_learned_from_the_headers_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ratekeeper")
    clock = FakeClock()
    limiter = Limiter("tier-1", clock=clock)
    for _ in range(3):
        permit = limiter.acquire_nowait(SONNET, max_tokens=10)
        permit.observe(headers(requests=(60, 50)))
        permit.settle({"output_tokens": 1})
        clock.advance(LOG_EVERY * 2)
    lines = [r for r in info_lines(caplog) if r.event == "limit_change"]  # type: ignore[attr-defined]
    assert [r.getMessage() for r in lines] == ["sonnet-4.x: limit now requests=60 per minute"]
    assert (lines[0].limits, lines[0].dimension) == ({"requests": 60}, "requests")  # type: ignore[attr-defined]


def test_a_storm_of_429s_is_one_line_per_pool_and_kind_then_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ratekeeper")
    clock = FakeClock()
    limiter = Limiter("tier-1", opening=60, clock=clock)
    permits = [limiter.acquire_nowait(SONNET, max_tokens=10) for _ in range(20)]
    for permit in permits:
        permit.observe(headers(retry_after=1), status=429, body=RATE_LIMIT_BODY)
    assert len([r for r in info_lines(caplog) if r.event == "rate_limited"]) == 1  # type: ignore[attr-defined]
    clock.advance(LOG_EVERY)
    permit = limiter.acquire_nowait(SONNET, max_tokens=10)
    permit.observe(headers(retry_after=1), status=429, body=RATE_LIMIT_BODY)
    _, second = [r for r in info_lines(caplog) if r.event == "rate_limited"]  # type: ignore[attr-defined]
    assert second.suppressed == 19  # type: ignore[attr-defined]
    assert second.getMessage().endswith("(and 19 more like it in the last 10 s)")


def test_a_long_wait_is_said_at_info_a_short_one_only_at_debug() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test_events_log.waits")
    logger.addHandler(Keep())
    logger.setLevel(logging.DEBUG)
    log = EventLog(logger)
    log.record("grant", POOL, 0.0, {"waited": 0.2})
    log.record("grant", POOL, 1.0, {"waited": SLOW_WAIT + 1.5})
    log.record("resync", POOL, 2.0, {"dimension": "requests", "delta": -3.0})
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("DEBUG", "sonnet-4.x: a request waited 0.2 s in the queue"),
        ("INFO", "sonnet-4.x: a request waited 6.5 s in the queue"),
        ("DEBUG", "sonnet-4.x: resync {'dimension': 'requests', 'delta': -3.0}"),
    ]
    # a detail named like a LogRecord attribute does not make logging raise
    log.record("pause", POOL, 3.0, {"seconds": 1.0, "reason": "x", "name": "clash"})
    assert records[-1].detail_name == "clash"  # type: ignore[attr-defined]
    assert records[-1].name == "test_events_log.waits"


def test_nothing_is_said_of_header_values_or_keys(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ratekeeper")
    limiter = Limiter("tier-1", clock=FakeClock())
    permit = limiter.acquire_nowait(SONNET, max_tokens=10)
    sent = headers(requests=(60, 1), retry_after=3)
    sent.update({"x-api-key": "sk-ant-secret-1", "authorization": "Bearer sk-ant-secret-2"})
    permit.observe(sent, status=429, body=RATE_LIMIT_BODY)
    assert caplog.records
    assert "sk-ant" not in caplog.text


def test_grant_events_fire_on_the_fast_path_too() -> None:
    events = Events()
    limiter = Limiter("tier-1", opening=60, clock=FakeClock(), on_event=events)
    limiter.acquire_nowait(SONNET, max_tokens=10)  # the first: the general path (a new pool)
    limiter.acquire_nowait(SONNET, max_tokens=10)  # then _admit_plain
    grants = events.of("grant")
    assert [(e.pool, dict(e.detail)) for e in grants] == [(POOL, {"waited": 0.0})] * 2


def run_with_deadline(target: object, seconds: float = 10.0) -> bool:
    """Run ``target`` in a thread; False if it has not returned by then (a deadlock)."""
    thread = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def test_a_hook_may_call_back_into_the_limiter() -> None:
    seen: list[tuple[str, int]] = []
    limiter: Limiter

    def hook(event: LimiterEvent) -> None:
        seen.append((event.kind, limiter.statistics()[POOL].in_flight))  # takes the lock

    limiter = Limiter("tier-1", opening=60, clock=FakeClock(), on_event=hook)

    def run() -> None:
        permit = limiter.acquire_nowait(SONNET, max_tokens=10)
        permit.observe(headers(requests=(60, 50)))
        limiter.set_limits(SONNET, requests=30)

    assert run_with_deadline(run), "the hook deadlocked calling back into the limiter"
    assert seen == [("grant", 1), ("limit_change", 1), ("resync", 1), ("limit_change", 1)]


def test_a_slow_hook_holds_up_no_other_thread() -> None:
    entered, go = threading.Event(), threading.Event()

    def hook(event: LimiterEvent) -> None:
        if event.kind == "limit_change":
            entered.set()
            go.wait(10)

    limiter = Limiter("tier-1", opening=60, clock=FakeClock(), on_event=hook)
    limiter.acquire_nowait(SONNET, max_tokens=10)
    slow = threading.Thread(target=lambda: limiter.set_limits(SONNET, requests=30), daemon=True)
    slow.start()
    assert entered.wait(10)
    try:
        # the hook is still running in the other thread: the limiter is free meanwhile
        assert run_with_deadline(lambda: limiter.acquire_nowait(SONNET, max_tokens=10), 5.0)
    finally:
        go.set()
        slow.join(10)
    assert limiter.statistics()[POOL].in_flight == 2


def test_the_redis_engine_says_its_429s_through_the_same_log(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ratekeeper")
    seen: list[str] = []
    limiter: Limiter

    def hook(event: LimiterEvent) -> None:
        limiter.statistics()  # calls back in: the Redis engine's lock is the limiter's
        seen.append(event.kind)

    backend = RedisBackend(redis_server.url, org="acme")
    done = False
    try:
        limits = {POOL: {"requests": 60.0, "input_tokens": 100_000.0, "output_tokens": 20_000.0}}
        limiter = Limiter("tier-1", opening=60.0, limits=limits, backend=backend, on_event=hook)

        def run() -> None:
            permit = limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)
            permit.observe({"retry-after": "2"}, status=429, body=RATE_LIMIT_BODY)

        done = run_with_deadline(run)
        assert done, "the hook deadlocked calling back into the limiter"
    finally:
        if done:  # else the stuck thread holds the lock close() needs
            backend.close()
    lines = {r.event: r.getMessage() for r in info_lines(caplog)}  # type: ignore[attr-defined]
    assert lines["rate_limited"] == "sonnet-4.x: 429 rate limited (not predicted); retrying after 2 s"
    assert lines["pause"] == "sonnet-4.x: paused for 2 s (429)"
    assert {"pause", "rate_limited"} <= set(seen)


def test_a_resync_is_logged_at_debug_without_a_hook(caplog: pytest.LogCaptureFixture) -> None:
    # (its detail is built only for a hook or a DEBUG log: see PoolFeedback._resync)
    limiter = Limiter("tier-1", opening=60, clock=FakeClock())
    limiter.acquire_nowait(SONNET, max_tokens=10).observe(headers(requests=(60, 50)))
    assert not [r for r in caplog.records if getattr(r, "event", None) == "resync"]
    caplog.set_level(logging.DEBUG, logger="ratekeeper")
    limiter.acquire_nowait(SONNET, max_tokens=10).observe(headers(requests=(60, 40)))
    resyncs = [r for r in caplog.records if getattr(r, "event", None) == "resync"]
    assert [r.levelno for r in resyncs] == [logging.DEBUG]
    assert resyncs[0].dimension == "requests"  # type: ignore[attr-defined]
