"""The Redis backend's transport: its own connection per event loop, lost scripts, timeouts.

Under asyncio the backend sends its commands packed by hand on a connection of
its own; these tests check what that path must keep: replies in step with
requests after a timeout, scripts reloaded after ``SCRIPT FLUSH``, clients
given by the caller. Real ``redis-server``, real clocks.
"""

from __future__ import annotations

import time

import anyio
import pytest
import redis
import redis.asyncio
from redis_server import RedisServer

# the same fixtures as test_redis.py (pytest finds them by name, hence the noqa)
from test_redis import anyio_backend, client, stored_pool  # noqa: F401

from ratekeeper import BackendUnavailable, Limiter, RedisBackend
from ratekeeper.redis._ops import ScriptCall

SONNET = "claude-sonnet-4-5"
POOL = "sonnet-4.x"
LIMITS = {POOL: {"requests": 600.0, "input_tokens": 100_000.0, "output_tokens": 20_000.0}}
RES = f"{{ratekeeper:acme}}:res:{POOL}"


async def cycle(limiter: Limiter) -> int:
    """One acquire+settle; the permit's reservation seq."""
    async with limiter.acquire(SONNET, input_tokens=10, max_tokens=10) as permit:
        permit.settle({"input_tokens": 10, "output_tokens": 5})
        return permit.seq


@pytest.mark.anyio
async def test_scripts_lost_mid_run_are_loaded_again_and_every_failed_call_repeated(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    backend = RedisBackend(redis_server.url, org="acme", prefetch=0)
    backends.append(backend)
    limiter = Limiter("tier-1", opening=60.0, limits=LIMITS, backend=backend)
    await cycle(limiter)
    leave = ScriptCall(
        "reserve", backend.pool_keys(POOL).reserve, [backend.participant, "600", "10", 86_400_000, "", "1", 0]
    )
    client(redis_server).script_flush()
    # two calls of one round trip both meet NOSCRIPT: both are answered after the reload
    replies = await backend.run_async([leave, leave])
    assert [r[0] if isinstance(r, list) else r for r in replies] == ["OK", "OK"]
    client(redis_server).script_flush()
    seqs = [await cycle(limiter) for _ in range(3)]
    assert seqs == sorted(set(seqs))
    assert backend.flush()
    assert client(redis_server).hlen(RES) == 0  # every settlement arrived


@pytest.mark.anyio
async def test_a_timed_out_round_trip_leaves_no_stale_reply_behind(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    backend = RedisBackend(redis_server.url, org="acme", timeout=0.1, retry_interval=0.05, prefetch=0)
    backends.append(backend)
    limiter = Limiter("tier-1", opening=60.0, limits=LIMITS, backend=backend)
    await cycle(limiter)
    client(redis_server).client_pause(300)  # the next reserve is answered only after the pause
    with pytest.raises(BackendUnavailable):
        await cycle(limiter)
    await anyio.sleep(0.35)
    # the late answer to the timed-out reserve must not be taken for this one's
    async with limiter.acquire(SONNET, input_tokens=10, max_tokens=10) as permit:
        assert backend.flush()
        held = sorted(int(s) for s in client(redis_server).hkeys(RES))
        # the timed-out reserve, if Redis ran it after the pause, is older than this one
        assert permit.seq == held[-1]
        permit.settle({"input_tokens": 10, "output_tokens": 5})
    assert backend.flush()
    assert str(permit.seq) not in client(redis_server).hkeys(RES)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_given_asyncio_client_without_decoding_works(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    given = redis.asyncio.Redis.from_url(redis_server.url)  # replies as bytes
    backend = RedisBackend(redis_server.url, org="acme", async_client=given, prefetch=0)
    backends.append(backend)
    limiter = Limiter("tier-1", opening=60.0, limits=LIMITS, backend=backend)
    seqs = [await cycle(limiter) for _ in range(3)]
    assert seqs == sorted(set(seqs))
    assert await given.ping()  # its own pool is untouched by the backend's connection
    assert backend.flush()
    assert client(redis_server).hlen(RES) == 0
    await given.aclose()


def test_the_flusher_thread_outlives_a_batch_redis_refuses(
    redis_server: RedisServer, backends: list[RedisBackend], caplog: pytest.LogCaptureFixture
) -> None:
    backend = RedisBackend(redis_server.url, org="acme", prefetch=0)
    backends.append(backend)
    limiter = Limiter("tier-1", opening=60.0, limits=LIMITS, backend=backend)
    limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)  # creates the pool: 599 left
    org, pool = backend.pool_keys(POOL).control
    bad = ScriptCall("control", [org, pool], ["no-such-operation", 60_000], ident=backend.new_ident())
    backend.send(bad)  # an error reply
    deadline = time.monotonic() + 2.0
    while "no-such-operation" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "refused a control change" in caplog.text  # logged and dropped, alone
    ident = backend.new_ident()
    giveback = ScriptCall("control", [org, pool], ["giveback", 60_000, "requests=1"], ident=ident)
    backend.send(giveback)  # sent by the flusher
    while level_of(redis_server, "requests") < 600 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert level_of(redis_server, "requests") == pytest.approx(600, abs=0.01)


def level_of(server: RedisServer, dim: str) -> float:
    return stored_pool(server)[f"{dim}.level"]
