"""The Redis backend under faults: error replies, replies that never come, ops sent twice.

Against a real ``redis-server``: a key of the wrong type makes a script fail with
WRONGTYPE; ``DEBUG SLEEP`` (enabled on these servers) holds Redis past the
client's timeout, after which Redis still runs what it had read, so a change may
have been applied though its sender saw a timeout. Whatever happens, no capacity
is minted (nothing applied twice) and no reservation is left without an owner.
"""

from __future__ import annotations

import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from limiter_support import drain_requests
from redis_server import RedisServer

from ratekeeper import BackendUnavailable, Limiter, RedisBackend
from ratekeeper.redis._engine import RemoteEngine
from ratekeeper.redis._ops import Result
from ratekeeper.redis._pools import _RemoteWaiter

SONNET = "claude-sonnet-4-5"
HAIKU = "claude-haiku-4-5"
POOL = "sonnet-4.x"
BAD_POOL = "haiku-4.5"
LIMITS = {
    POOL: {"requests": 60.0, "input_tokens": 100_000.0, "output_tokens": 20_000.0},
    BAD_POOL: {"requests": 60.0, "input_tokens": 100_000.0, "output_tokens": 20_000.0},
}
TAG = "{ratekeeper:acme}"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """Real clocks on both libraries: Redis TIME does not follow a mock clock."""
    return request.param


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A fresh ``redis-server`` that accepts ``DEBUG SLEEP``."""
    with tempfile.TemporaryDirectory(prefix="ratekeeper-redis-faults-") as directory:
        srv = RedisServer(Path(directory), options=("--enable-debug-command", "yes"))
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


def make(server: RedisServer, made: list[RedisBackend], **options: Any) -> tuple[Limiter, RedisBackend]:
    options.setdefault("org", "acme")
    options.setdefault("prefetch", 0)
    options.setdefault("timeout", 0.3)
    options.setdefault("retry_interval", 0.05)
    backend = RedisBackend(server.url, **options)
    made.append(backend)
    return Limiter("tier-1", opening=60.0, limits=LIMITS, burst=1.0, backend=backend), backend


def client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True)


def requests_level(server: RedisServer, pool: str = POOL) -> float:
    """The stored requests level (as of its last change)."""
    return stored(server, pool)[1]


def stored(server: RedisServer, pool: str = POOL) -> tuple[float, float]:
    """(Redis time of the stored levels, the requests level then)."""
    values = _pool_values(server, pool)
    return float(values[0]), float(values["requests.4"])


def level(server: RedisServer, dim: str, pool: str = POOL) -> float:
    """The stored level of ``dim`` (as of its last change)."""
    return float(_pool_values(server, pool)[f"{dim}.4"])


def _pool_values(server: RedisServer, pool: str) -> dict[int | str, float]:
    """The pool's packed doubles by name: its 8 header fields, then ``dim.i`` per dimension."""
    raw = redis.Redis.from_url(server.url).hmget(f"{TAG}:pool:{pool}", ["v2", "dims"])
    packed, dims = raw[0], raw[1]
    assert isinstance(packed, bytes)
    assert isinstance(dims, bytes)
    names: list[int | str] = list(range(8))
    names += [f"{d}.{i}" for d in dims.decode().split(",") for i in range(7)]
    return dict(zip(names, struct.unpack("<" + "d" * len(names), packed), strict=True))


def reservations(server: RedisServer, pool: str = POOL) -> int:
    return int(client(server).hlen(f"{TAG}:res:{pool}"))


def break_pool(server: RedisServer, pool: str = BAD_POOL) -> None:
    """Replace a pool's hash by a string: every script that reads it fails with WRONGTYPE."""
    c = client(server)
    c.delete(f"{TAG}:pool:{pool}")
    c.set(f"{TAG}:pool:{pool}", "not a hash")


def sleep_redis(server: RedisServer, seconds: float) -> threading.Thread:
    """``DEBUG SLEEP seconds`` from a thread; returns once Redis has started sleeping."""
    c = redis.Redis.from_url(server.url)
    c.ping()
    thread = threading.Thread(target=c.execute_command, args=("DEBUG", "SLEEP", repr(seconds)))
    thread.start()
    time.sleep(0.05)
    return thread


def statuses(results: list[Result]) -> list[str]:
    """Each reply's status, or the error Redis answered with."""
    return [r[0] if isinstance(r, list) else repr(r) for r in results]


def until_up(backend: RedisBackend) -> None:
    """Flush until Redis answers (the backend waits ``retry_interval`` after a failure)."""
    deadline = time.monotonic() + 5.0
    while not backend.flush():
        assert time.monotonic() < deadline, "Redis did not come back"
        time.sleep(0.02)


# ---------------------------------------------------------------- error replies


MESSAGE = r"^Redis at .* is unavailable \(ResponseError: WRONGTYPE .*\); on_unavailable='fail'"


@pytest.mark.anyio
async def test_an_error_reply_is_backend_unavailable(
    server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, _ = make(server, backends, retry_interval=5.0)
    break_pool(server, POOL)
    with pytest.raises(BackendUnavailable, match=MESSAGE):
        async with limiter.acquire(SONNET, input_tokens=1, max_tokens=1):
            pytest.fail("admitted")


def test_an_error_reply_to_a_thread_or_acquire_nowait_is_backend_unavailable(
    server: RedisServer, backends: list[RedisBackend]
) -> None:
    break_pool(server, POOL)
    limiter, _ = make(server, backends, retry_interval=5.0)
    with pytest.raises(BackendUnavailable, match=MESSAGE):
        limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)
    limiter, _ = make(server, backends, retry_interval=5.0)
    with pytest.raises(BackendUnavailable, match=MESSAGE):  # noqa: SIM117
        with limiter.acquire_sync(SONNET, input_tokens=1, max_tokens=1):
            pytest.fail("admitted")


def test_out_of_memory_is_backend_unavailable_or_the_local_fallback(
    server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, _ = make(server, backends, retry_interval=5.0)
    local, _ = make(server, backends, retry_interval=5.0, on_unavailable="local")
    client(server).config_set("maxmemory", "1")  # every write is refused with OOM
    with pytest.raises(BackendUnavailable, match=r"OutOfMemoryError: command not allowed"):
        limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)
    permit = local.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)
    assert permit._limiter is not local  # the local fallback
    permit.release()


@pytest.mark.anyio
async def test_an_error_reply_goes_to_the_local_fallback(
    server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, _ = make(server, backends, retry_interval=5.0, on_unavailable="local")
    break_pool(server, POOL)
    async with limiter.acquire(SONNET, input_tokens=1, max_tokens=1) as permit:
        assert permit._limiter is not limiter
        permit.settle({"input_tokens": 1, "output_tokens": 1})


@pytest.mark.anyio
async def test_a_failing_reserve_does_not_reapply_the_changes_that_rode_with_it(
    server: RedisServer, backends: list[RedisBackend]
) -> None:
    # flush_delay: the release waits in the outbox and rides with the next reserves
    limiter, backend = make(server, backends, flush_delay=1.0, retry_interval=0.01)
    permits = [await limiter.acquire(SONNET, input_tokens=1, max_tokens=1).__aenter__() for _ in range(10)]
    async with limiter.acquire(HAIKU, input_tokens=1, max_tokens=1) as permit:
        permit.settle({"input_tokens": 1, "output_tokens": 1})
    before = requests_level(server)
    break_pool(server)
    permits[0].release()  # never sent: one request comes back
    for _ in range(5):
        with pytest.raises(BackendUnavailable):
            async with limiter.acquire(HAIKU, input_tokens=1, max_tokens=1):
                pytest.fail("admitted")
        await anyio.sleep(0.02)
    assert backend.flush()
    # one refund, and the refill of well under a second (1 request a second)
    assert before + 1 <= requests_level(server) < before + 1.9
    for p in permits[1:]:
        p.release()
    assert backend.flush()


@pytest.mark.anyio
async def test_a_failing_change_does_not_orphan_the_reserve_it_rode_with(
    server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(server, backends, flush_delay=1.0)
    bad = await limiter.acquire(HAIKU, input_tokens=1, max_tokens=1).__aenter__()
    break_pool(server)
    bad.release()  # its release.lua fails with WRONGTYPE
    for _ in range(5):
        async with limiter.acquire(SONNET, input_tokens=1, max_tokens=1) as permit:
            assert permit._limiter is limiter  # through Redis, granted
            permit.settle({"input_tokens": 1, "output_tokens": 1})
    assert backend.flush()
    assert reservations(server) == 0
    assert backend.available()


@pytest.mark.anyio
async def test_a_reserve_that_fails_after_granting_is_cancelled(
    server: RedisServer, backends: list[RedisBackend]
) -> None:
    """The notes key has the wrong type: reserve.lua has written the reservation when it fails.

    That reservation has no owner; the caller cancels the reserve by its id, so it goes.
    """
    limiter, backend = make(server, backends)
    limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1).release()  # creates the pool
    assert backend.flush()
    c = client(server)
    c.set(f"{TAG}:notes:{POOL}", "not a hash")
    with pytest.raises(BackendUnavailable, match="WRONGTYPE"):
        limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)
    with pytest.raises(BackendUnavailable, match="WRONGTYPE"):
        async with limiter.acquire(SONNET, input_tokens=1, max_tokens=1):
            pytest.fail("admitted")
    backend.flush()  # the cancels (each fails at the notes again, after forgetting the record)
    assert reservations(server) == 0
    assert c.zcard(f"{TAG}:lease:{POOL}") == 0


def test_flush_drops_a_failing_change_and_applies_the_others(
    server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(server, backends, flush_delay=1.0)
    good = limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)
    bad = limiter.acquire_nowait(HAIKU, input_tokens=1, max_tokens=1)
    assert reservations(server) == 1
    break_pool(server)
    bad.release()
    good.release()
    assert backend.flush()  # the failing one is logged and dropped; the other is applied
    assert reservations(server) == 0


# ---------------------------------------------------------------- replies that never come


def test_a_release_whose_reply_timed_out_is_applied_once(
    server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(server, backends, flush_delay=1.0)
    permits = [limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1) for _ in range(10)]
    before = requests_level(server)
    permits[0].release()  # never sent: one request comes back
    sleeper = sleep_redis(server, 0.6)
    assert not backend.flush()  # timed out; Redis runs the release when it wakes
    sleeper.join()
    until_up(backend)  # sent again: a duplicate, a no-op
    assert before + 1 <= requests_level(server) < before + 1.9
    for p in permits[1:]:
        p.release()
    assert backend.flush()


def test_every_change_sent_twice_applies_once(server: RedisServer, backends: list[RedisBackend]) -> None:
    limiter, backend = make(server, backends, flush_delay=1.0)
    permits = [limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1) for _ in range(4)]
    before = requests_level(server)
    permits[0].release()  # unsent: 1 request back
    permits[1].settle({"input_tokens": 1, "output_tokens": 1})
    engine = limiter._engine
    assert isinstance(engine, RemoteEngine)
    engine.give_back(engine._pools[POOL].runtime, {"requests": 1.0})  # batch_finished's path
    ops = backend.take_outbox()
    assert [op.script for op in ops] == ["release", "settle", "control"]
    assert all(op.ident for op in ops)
    first = backend.run_sync(ops)
    second = backend.run_sync(ops)
    assert statuses(first) == ["OK", "OK", "OK"]
    assert statuses(second) == ["DUP", "DUP", "DUP"]
    assert before + 2 <= requests_level(server) < before + 2.9
    assert reservations(server) == 2
    for p in permits[2:]:
        p.release()
    assert backend.flush()


def test_every_correction_sent_twice_applies_once(server: RedisServer, backends: list[RedisBackend]) -> None:
    """Resyncs, pauses (with a burst halved), holds, the spend cap and limits set by hand.

    Sent again after a reply that never came, each must change nothing. Before they had
    ids, a second run re-applied each one later: a pause, a hold and the spend cap were
    extended by the time between the two runs.
    """
    limiter, backend = make(server, backends, flush_delay=5.0)
    permit = limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)
    assert backend.flush()
    headers = {
        "anthropic-ratelimit-requests-limit": "60",
        "anthropic-ratelimit-requests-remaining": "20",
        "retry-after": "30",
    }
    permit.observe(headers, status=429)  # resync.lua, then control.lua pause with a shrink
    limiter.set_limits(POOL, requests=50.0)
    reset = str(int(time.time()) + 3_600)
    limiter.observe(
        {"anthropic-ratelimit-unified-status": "rejected", "anthropic-ratelimit-unified-reset": reset}
    )
    body = {
        "type": "error",
        "error": {"type": "rate_limit_error", "details": {"error_code": "enforced_spend_limit_reached"}},
    }
    limiter.observe({}, model=SONNET, status=429, body=body)
    ops = backend.take_outbox()
    assert {op.script for op in ops} >= {"resync", "control"}
    assert sorted(str(op.args[0]) for op in ops if op.script == "control") == [
        "hold",
        "limits",
        "pause",
        "spend",
    ]
    assert all(op.ident for op in ops)
    c = redis.Redis.from_url(server.url)  # bytes: the pool's levels are packed doubles

    def state() -> tuple[Any, Any]:
        return c.hgetall(f"{TAG}:pool:{POOL}"), c.hgetall(f"{TAG}:org")

    first = backend.run_sync(ops)
    assert "DUP" not in statuses(first)
    after_one = state()
    second = backend.run_sync(ops)
    assert set(statuses(second)) == {"DUP"}
    assert state() == after_one


@pytest.mark.parametrize("prefetch", [0, 16])
def test_a_reserve_whose_reply_timed_out_is_given_back(
    server: RedisServer, backends: list[RedisBackend], prefetch: int
) -> None:
    limiter, backend = make(server, backends, prefetch=prefetch)
    limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1).release()  # creates the pool
    assert backend.flush()
    full = requests_level(server)
    sleeper = sleep_redis(server, 0.6)
    with pytest.raises(BackendUnavailable, match=r"no answer|Timeout"):  # noqa: SIM117
        with limiter.acquire_sync(SONNET, input_tokens=1, max_tokens=1):
            pytest.fail("admitted")
    sleeper.join()  # Redis ran the reserve when it woke: a reservation nobody holds
    until_up(backend)  # the cancel, by the reserve's id
    assert reservations(server) == 0
    assert requests_level(server) >= full - 1e-9


def test_a_cancel_that_arrives_first_makes_the_reserve_a_no_op(
    server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(server, backends)
    limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1).release()
    assert backend.flush()
    engine = limiter._engine
    assert isinstance(engine, RemoteEngine)
    remote = engine._pools[POOL]
    reserve = engine._reserve_call(remote, [_RemoteWaiter({"requests": 1.0}, 0, 0, 0.0)])
    engine._cancel(remote, reserve)
    cancel = backend.take_outbox()
    assert statuses(backend.run_sync(cancel)) == ["OK"]
    assert statuses(backend.run_sync([reserve])) == ["DUP"]
    assert reservations(server) == 0
    assert statuses(backend.run_sync(cancel)) == ["OK"]  # a second cancel: nothing to do


@pytest.mark.parametrize("end", ["release", "settle"])
def test_a_reservation_from_before_an_empty_restart_refunds_nothing_to_the_new_pool(
    server: RedisServer, backends: list[RedisBackend], end: str
) -> None:
    """Redis restarts empty while a permit is out; the pool is made again, full, and drained.

    The permit's end finds no record of it. Its caller's copy of the charge must not be
    refunded: the new pool never charged it (before, one request was minted per permit).
    """
    limiter, backend = make(server, backends)
    old = [limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=100) for _ in range(3)]
    assert backend.flush()
    server.restart()
    until_up(backend)
    dim = "requests" if end == "release" else "output_tokens"
    taken = drain_requests(
        limiter, SONNET, max_tokens=1 if end == "release" else 1_000
    )  # made full, then emptied
    assert backend.flush()
    empty = level(server, dim)
    for permit in old:
        if end == "release":
            permit.release()  # unsent: all of it would come back
        else:
            permit.settle({"input_tokens": 1, "output_tokens": 1})  # 99 output tokens back
    assert backend.flush()
    # only the refill (1 request, 333 output tokens a second) in the moment since
    assert level(server, dim) < empty + (0.5 if end == "release" else 90)
    for held in taken:
        held.release()
    assert backend.flush()


def test_a_change_whose_id_may_be_forgotten_is_not_sent_again(
    server: RedisServer, backends: list[RedisBackend]
) -> None:
    # lease 2 s: an op id lives 2 s; a change first sent over 2 - 2 * 0.3 - 1 = 0.4 s ago is dropped
    limiter, backend = make(server, backends, flush_delay=5.0, lease=2.0)
    permits = [limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1) for _ in range(10)]
    t0, before = stored(server)
    permits[0].release()  # never sent: one request comes back
    sleeper = sleep_redis(server, 0.6)
    assert not backend.flush()  # timed out; Redis runs the release when it wakes
    sleeper.join()
    time.sleep(2.1)  # its id has expired: sent again, it would give the request back twice
    assert backend.flush()
    t1, after = stored(server)
    assert after == pytest.approx(before + (t1 - t0) * 1.0 + 1, abs=1e-6)  # refill: 1 a second


@pytest.mark.anyio
async def test_an_async_reserve_whose_reply_timed_out_is_given_back(
    server: RedisServer, backends: list[RedisBackend]
) -> None:
    # asyncio: the backend's own connection and its deadline; trio: the client in a thread
    limiter, backend = make(server, backends, prefetch=16)
    async with limiter.acquire(SONNET, input_tokens=1, max_tokens=1) as permit:
        permit.release()  # creates the pool (and takes a prefetch)
    await anyio.sleep(0.3)  # the prefetch's unused part goes back (prefetch_ttl)
    assert await backend.aflush()
    assert reservations(server) == 0
    full = requests_level(server)
    sleeper = await anyio.to_thread.run_sync(sleep_redis, server, 0.6)
    with pytest.raises(BackendUnavailable):
        async with limiter.acquire(SONNET, input_tokens=1, max_tokens=1):
            pytest.fail("admitted")
    await anyio.to_thread.run_sync(sleeper.join)  # Redis ran the reserve (and its prefetch) when it woke
    await anyio.to_thread.run_sync(until_up, backend)
    assert reservations(server) == 0
    assert requests_level(server) >= full - 1e-9


@pytest.mark.anyio
async def test_a_pool_that_cannot_be_created_is_backend_unavailable(
    server: RedisServer, backends: list[RedisBackend]
) -> None:
    # a user who may not HDEL: init.lua fails (after HEXISTS), reserve.lua finds no pool
    client(server).acl_setuser("limited", enabled=True, nopass=True, keys=["~*"], commands=["+@all", "-hdel"])
    url = server.url.replace("redis://", "redis://limited@")
    message = r"can.t run this command"
    limiter = Limiter("tier-1", opening=60.0, limits=LIMITS, backend=limited(url, backends))
    with pytest.raises(BackendUnavailable, match=message):
        limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)
    limiter = Limiter("tier-1", opening=60.0, limits=LIMITS, backend=limited(url, backends))
    with anyio.fail_after(5), pytest.raises(BackendUnavailable, match=message):
        await limiter.acquire(SONNET, input_tokens=1, max_tokens=1).__aenter__()


def limited(url: str, made: list[RedisBackend]) -> RedisBackend:
    backend = RedisBackend(url, org="acme", prefetch=0, timeout=0.3, retry_interval=5.0)
    made.append(backend)
    return backend
