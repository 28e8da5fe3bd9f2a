"""A shared pool opens small and widens when a report shows the server's bucket (issue 12).

Under a backend as without one, a new pool's buckets hold ``opening`` seconds of the
limit (default one, the shortest interval documented) until a response's headers show
more: a report's remaining is a floor on the server's bucket, and ``control.lua widen``
grows the shared burst to it for every process. The first wave is then paced at the
refill rate rather than sent at once, which is also what lets the reports' moment be
learned (a wave sent together blurs it).

Every test starts its own ``redis-server``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pytest
import redis
from redis_server import RedisServer
from test_redis import level, stored_pool

from ratekeeper import Demand, Limiter, RedisBackend, WouldBlock
from ratekeeper.core._pool import MIN_BURST
from ratekeeper.redis._wire import load_scripts

SONNET = "claude-sonnet-4-5"
POOL = "sonnet-4.x"
LIMITS = {POOL: {"requests": 600.0, "input_tokens": 600_000.0, "output_tokens": 60_000.0}}
DEMAND = Demand(input_tokens=100, max_tokens=100)


def _limiter(server: RedisServer, made: list[RedisBackend], **options: Any) -> tuple[Limiter, RedisBackend]:
    backend = RedisBackend(server.url, org="acme", prefetch=0)
    made.append(backend)
    return Limiter("tier-1", limits=LIMITS, backend=backend, **options), backend


def _report(
    requests: int, input_: int, output: int, limits: dict[str, float] = LIMITS[POOL]
) -> dict[str, str]:
    """Headers with each bucket's limit (``limits``) and what it has left."""
    out = {}
    for name, dim, remaining in (
        ("requests", "requests", requests),
        ("input-tokens", "input_tokens", input_),
        ("output-tokens", "output_tokens", output),
    ):
        out[f"anthropic-ratelimit-{name}-limit"] = str(int(limits[dim]))
        out[f"anthropic-ratelimit-{name}-remaining"] = str(remaining)
    return out


def _admitted_at_once(limiter: Limiter, stack: contextlib.ExitStack, most: int) -> int:
    """How many requests the shared pool admits now, without waiting (at most ``most``)."""
    n = 0
    for _ in range(most):
        try:
            permit = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
        except WouldBlock:
            break
        stack.callback(permit.release)
        n += 1
    return n


def test_a_shared_pool_opens_at_one_second_of_the_limit(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    a, a_backend = _limiter(redis_server, backends)
    with contextlib.ExitStack() as stack:
        # 600 RPM over one second: 10 at once (and the refill of the calls' own time)
        assert 10 <= _admitted_at_once(a, stack, 40) <= 12
        assert a_backend.flush()
    stored = stored_pool(redis_server)
    assert stored["burst"] == pytest.approx(MIN_BURST)
    assert stored["requests.capacity"] == pytest.approx(10.0)
    assert stored["output_tokens.capacity"] == pytest.approx(1_000.0)


def test_opening_sixty_starts_the_shared_pool_full(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    a, a_backend = _limiter(redis_server, backends, opening=60.0)
    with contextlib.ExitStack() as stack:
        assert _admitted_at_once(a, stack, 40) == 40
        assert a_backend.flush()
    assert stored_pool(redis_server)["burst"] == pytest.approx(1.0)


def test_a_report_showing_a_larger_bucket_widens_it_for_every_process(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    a, a_backend = _limiter(redis_server, backends)
    b, b_backend = _limiter(redis_server, backends)
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(a.acquire_sync(SONNET, DEMAND))
        first.mark_sent()
        assert a_backend.flush()
        # the server's bucket held at least half a minute of every limit after this request
        first.settle({"input_tokens": 100, "output_tokens": 100}, headers=_report(300, 300_000, 30_000))
        assert a_backend.flush()
    stored = stored_pool(redis_server)
    assert stored["burst"] == pytest.approx(0.5, rel=0.01)
    assert stored["requests.capacity"] == pytest.approx(300.0, rel=0.01)
    assert a.statistics().pools[POOL].burst == pytest.approx(0.5, rel=0.01)
    # the report's resync, after the widening, set the level to what the server holds
    assert stored["requests.level"] == pytest.approx(300.0, abs=0.5)
    with contextlib.ExitStack() as stack:
        # the other process reserves from the widened pool: more than one second's worth
        assert _admitted_at_once(b, stack, 40) == 40
        assert b_backend.flush()


def test_a_report_bounding_another_dimension_below_does_not_widen(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    a, a_backend = _limiter(redis_server, backends)
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(a.acquire_sync(SONNET, DEMAND))
        first.mark_sent()
        assert a_backend.flush()
        # requests show half a minute left, but output shows a bucket of one second, full
        # again within a second: one burst serves every dimension, so it stays
        report = _report(300, 300_000, 900)
        report["anthropic-ratelimit-output-tokens-reset"] = "2000-01-01T00:00:01Z"
        report["date"] = "Sat, 01 Jan 2000 00:00:00 GMT"
        first.settle({"input_tokens": 100, "output_tokens": 100}, headers=report)
        assert a_backend.flush()
    assert stored_pool(redis_server)["burst"] == pytest.approx(MIN_BURST)


def test_widen_grows_only_when_clearly_larger_and_never_past_a_minute(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    a, a_backend = _limiter(redis_server, backends)
    with a.acquire_sync(SONNET, DEMAND):
        pass
    assert a_backend.flush()
    text, _ = load_scripts()["control"]
    r = redis.Redis.from_url(redis_server.url)
    keys = [a_backend.org_key(), a_backend.pool_keys(POOL).pool]

    def widen(burst: float, ident: str) -> list[bytes]:
        reply = r.eval(text, 3, *keys, a_backend.op_key(ident), "widen", 60_000, repr(burst))
        assert isinstance(reply, list)
        return reply

    assert widen(MIN_BURST * 1.04, "a")[3] == b"0"  # within 5%: left as it is
    assert stored_pool(redis_server)["burst"] == pytest.approx(MIN_BURST)
    level_before = stored_pool(redis_server)["requests.level"]
    assert widen(0.25, "b")[3] == b"1"
    # levels do not jump with the capacity: they refill from where they were
    assert stored_pool(redis_server)["requests.level"] == pytest.approx(level_before, abs=0.5)
    assert widen(0.1, "c")[3] == b"0"  # never narrows: that is fit's job
    assert stored_pool(redis_server)["burst"] == pytest.approx(0.25)
    assert stored_pool(redis_server)["requests.capacity"] == pytest.approx(150.0)
    assert widen(3.0, "d")[3] == b"1"
    assert stored_pool(redis_server)["burst"] == pytest.approx(1.0)
    assert widen(0.5, "d")[0] == b"DUP"  # the same op again changes nothing


def test_while_the_moment_is_unknown_an_earlier_answer_bounds_a_later_report_of_an_admission(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    """Two requests at one instant, a server that mixes the moments (the local machine's case).

    Another client draws 5,000 output tokens half a second after both were admitted. The
    first request's report is of its answer (it saw that draw: 13,333 left), the second's,
    read later, of its admission (before the draw: 18,000). Read as of both moments but
    each report by itself, the second is the newer under both readings and lifts output
    about 3,500 tokens past what the server has. The first report's answer is no earlier
    than the second's admission, so it may be the latest moment of the two: it bounds it.
    """
    limits = {POOL: {"requests": 600.0, "input_tokens": 1_000_000.0, "output_tokens": 20_000.0}}
    backend = RedisBackend(redis_server.url, org="acme", prefetch=0)
    backends.append(backend)
    limiter = Limiter("tier-1", limits=limits, backend=backend, opening=60.0)
    demand = Demand(input_tokens=100, max_tokens=1_000)

    def report(output: int) -> dict[str, str]:
        return _report(598, 999_800, output, limits[POOL])

    with limiter.acquire_sync(SONNET, demand) as first, limiter.acquire_sync(SONNET, demand) as second:
        first.mark_sent()
        second.mark_sent()
        assert backend.flush()
        time.sleep(1.0)
        first.observe(report(13_333), status=200)  # of its answer, after the other's draw
        assert backend.flush()
        assert limiter.statistics()[POOL].report_moment == "unknown"
        time.sleep(0.3)
        second.observe(report(18_000), status=200)  # of its admission, before the draw
        assert backend.flush()
        # the server: 13,000 and its refill since the sends (333 a second, under 2 s of it)
        assert level(redis_server, "output_tokens") <= 13_000 + 2 * 20_000 / 60
        first.release()
        second.release()
