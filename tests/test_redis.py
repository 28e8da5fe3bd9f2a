"""The Redis backend against a real ``redis-server``: atomicity, leases, fairness, pauses, outages.

Every test starts its own server (the ``redis_server`` fixture). Redis keeps
time with its own ``TIME``, which trio's ``MockClock`` does not move, so these
tests run on real clocks with waits of a fraction of a second.
"""

from __future__ import annotations

import contextlib
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import anyio
import pytest
import redis
from redis.crc import key_slot
from redis_server import RedisServer

import ratekeeper
from ratekeeper import (
    AcquireTimeout,
    BackendUnavailable,
    CapacityExceeded,
    ConfigurationError,
    Demand,
    Limiter,
    MissingDependency,
    RedisBackend,
    WouldBlock,
)
from ratekeeper.core._reading import MAX_PAUSE
from ratekeeper.gate._own_traffic import own_traffic
from ratekeeper.redis._ops import ScriptCall

SONNET = "claude-sonnet-4-5"
POOL = "sonnet-4.x"
LIMITS = {POOL: {"requests": 60.0, "input_tokens": 100_000.0, "output_tokens": 20_000.0}}
BIG = {POOL: {"requests": 600.0, "input_tokens": 1_000_000.0, "output_tokens": 200_000.0}}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """Real clocks on both libraries: Redis TIME does not follow a mock clock."""
    return request.param


def make(
    server: RedisServer,
    made: list[RedisBackend],
    *,
    burst: float = 1.0,
    limits: dict[str, dict[str, float]] = LIMITS,
    **options: Any,
) -> tuple[Limiter, RedisBackend]:
    """A limiter with its own backend: to Redis, a separate process."""
    options.setdefault("org", "acme")
    backend = RedisBackend(server.url, **options)
    made.append(backend)
    return Limiter("tier-1", opening=60.0, limits=limits, burst=burst, backend=backend), backend


def client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True)


#: The pool record's header, as ``_common.lua`` packs it (then five numbers per dimension).
HEADER = ("t", "burst", "paused", "clean", "shrink", "lx", "renew", "ver")
BUCKET = ("limit", "capacity", "rate", "debt", "level", "uncounted", "lowered")


def stored_pool(server: RedisServer, org: str = "acme") -> dict[str, float]:
    """The stored pool's numbers: the header's names, and ``dim.limit``, ``dim.level``, ..."""
    raw = redis.Redis.from_url(server.url).hmget(f"{{ratekeeper:{org}}}:pool:{POOL}", ["v2", "dims"])
    packed, dims = raw[0], raw[1]
    assert isinstance(packed, bytes)
    assert isinstance(dims, bytes)
    names = list(HEADER) + [f"{d}.{f}" for d in dims.decode().split(",") for f in BUCKET]
    return dict(zip(names, struct.unpack("<" + "d" * len(names), packed), strict=True))


def level(server: RedisServer, dim: str, org: str = "acme") -> float:
    """A bucket's stored level (as of the last change; refill since then not included)."""
    return stored_pool(server, org)[f"{dim}.level"]


def rpm_headers(remaining: int, limit: int = 60) -> dict[str, str]:
    return {
        "anthropic-ratelimit-requests-limit": str(limit),
        "anthropic-ratelimit-requests-remaining": str(remaining),
    }


# ---------------------------------------------------------------- packaging


def test_import_ratekeeper_does_not_import_redis() -> None:
    code = "import sys, ratekeeper; assert 'redis' not in sys.modules; ratekeeper.RedisBackend"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_redis_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis now raises ImportError
    message = r"^redis is not installed; install it with: pip install 'ratekeeper\[redis\]'$"
    with pytest.raises(MissingDependency, match=message):
        ratekeeper.RedisBackend("redis://127.0.0.1:1/0")


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"^on_unavailable must be 'fail' or 'local', got 'x'$"):
        RedisBackend("redis://127.0.0.1:1/0", on_unavailable="x")
    with pytest.raises(ConfigurationError, match=r"^fallback_fraction must be in \(0, 1\], got 0$"):
        RedisBackend("redis://127.0.0.1:1/0", fallback_fraction=0)
    message = r"^prefetch must be an int from 0 to 1,000 \(requests\), got -1$"
    with pytest.raises(ConfigurationError, match=message):
        RedisBackend("redis://127.0.0.1:1/0", prefetch=-1)
    message = r"^prefetch_ttl must be a positive number of seconds, got 0$"
    with pytest.raises(ConfigurationError, match=message):
        RedisBackend("redis://127.0.0.1:1/0", prefetch_ttl=0)
    with pytest.raises(ConfigurationError, match=r"^backend must be a ratekeeper backend"):
        Limiter(backend=object())


# ---------------------------------------------------------------- the shared state


@pytest.mark.anyio
async def test_every_key_carries_the_organization_hash_tag(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(redis_server, backends, prefix="rk", org="acme")
    assert all(k.startswith("{rk:acme}:") for k in backend.pool_keys(POOL).every)
    async with limiter.acquire(SONNET, input_tokens=100, max_tokens=100) as permit:
        permit.observe(rpm_headers(59), status=200)
        permit.settle({"input_tokens": 100, "output_tokens": 10})
    held = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=19_000)  # in flight
    with pytest.raises(AcquireTimeout):  # and a place in line, held while it waits
        await limiter.acquire(SONNET, input_tokens=100, max_tokens=19_000, timeout=0.05)
    assert backend.flush()
    keys = [str(k) for k in client(redis_server).keys("*")]
    assert {k.split(":", 2)[2].split(":")[0] for k in keys} >= {"org", "pool", "res", "lease"}
    assert all(k.startswith("{rk:acme}:") for k in keys), keys
    assert len({key_slot(k.encode()) for k in keys}) == 1  # one node of a cluster holds them all
    held.release()


def test_a_pool_stored_in_the_earlier_layout_starts_again_full(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    key = f"{{ratekeeper:acme}}:pool:{POOL}"
    # 'v' held 7 + 5 per dimension numbers (no uncounted, lowered, ver): not readable now
    old = struct.pack("<" + "d" * 12, 0, 1, 0, 0, -1, 0, 0, 60, 60, 1, 60, 3)
    client(redis_server).hset(key, mapping={"v": old, "dims": "requests"})
    limiter, _ = make(redis_server, backends)
    limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1).release()
    assert not client(redis_server).hexists(key, "v")
    assert stored_pool(redis_server)["requests.capacity"] == 60


def test_reserve_is_all_or_nothing(redis_server: RedisServer, backends: list[RedisBackend]) -> None:
    limiter, backend = make(redis_server, backends)
    first = limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=15_000)
    assert backend.flush()
    before = {d: level(redis_server, d) for d in ("requests", "input_tokens", "output_tokens")}
    # requests and input fit, output does not: nothing at all may be taken
    with pytest.raises(WouldBlock):
        limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=10_000)
    after = {d: level(redis_server, d) for d in ("requests", "input_tokens", "output_tokens")}
    assert after == before
    assert before["requests"] == pytest.approx(59.0, abs=0.1)
    first.release()


def test_a_skewed_caller_clock_mints_nothing(redis_server: RedisServer, backends: list[RedisBackend]) -> None:
    """Time is Redis TIME: a caller whose clock jumps an hour ahead gets no refill from it."""
    now = [1_000.0]
    backend = RedisBackend(redis_server.url, org="acme")
    backends.append(backend)
    limiter = Limiter("tier-1", opening=60.0, limits=LIMITS, backend=backend, clock=lambda: now[0])
    limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=20_000)
    with pytest.raises(WouldBlock) as info:
        limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=20_000)
    now[0] += 3_600.0
    with pytest.raises(WouldBlock):
        limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=20_000)
    assert info.value.retry_after == pytest.approx(60.0, abs=0.5)


def test_an_impossible_cost_fails_at_once(redis_server: RedisServer, backends: list[RedisBackend]) -> None:
    limiter, _ = make(redis_server, backends)
    with pytest.raises(CapacityExceeded):
        limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=30_000)


@pytest.mark.anyio
async def test_settle_refunds_what_was_over_reserved(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(redis_server, backends)
    async with limiter.acquire(SONNET, input_tokens=1_000, max_tokens=10_000) as permit:
        assert backend.flush()
        assert level(redis_server, "output_tokens") == pytest.approx(10_000, abs=5)
        permit.settle({"input_tokens": 1_000, "output_tokens": 500})
    assert backend.flush()
    assert level(redis_server, "output_tokens") == pytest.approx(19_500, abs=5)
    assert client(redis_server).hlen(f"{{ratekeeper:acme}}:res:{POOL}") == 0


@pytest.mark.anyio
async def test_release_rules_match_the_local_limiter(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(redis_server, backends)
    async with limiter.acquire(SONNET, input_tokens=1_000, max_tokens=1_000):
        pass  # never sent: everything comes back
    async with limiter.acquire(SONNET, input_tokens=1_000, max_tokens=1_000) as permit:
        permit.observe({}, status=500)  # refused by the server: only the request is kept
    assert backend.flush()
    assert level(redis_server, "requests") == pytest.approx(59.0, abs=0.05)
    assert level(redis_server, "output_tokens") == pytest.approx(20_000, abs=5)


# ---------------------------------------------------------------- prefetch

#: Small token buckets refill slowly (10 tokens/s), so stored levels can be checked closely;
#: 5% of each bucket is room for three requests of 1 request, 10 input and 10 output tokens.
SMALL = {POOL: {"requests": 60.0, "input_tokens": 600.0, "output_tokens": 600.0}}
RES = f"{{ratekeeper:acme}}:res:{POOL}"


def draws_of(text: str) -> dict[str, float]:
    return {d: float(a) for d, _, a in (part.partition("=") for part in text.split(","))}


def test_a_backend_is_a_context_manager_that_closes_it(redis_server: RedisServer) -> None:
    with RedisBackend(redis_server.url, org="acme") as backend:
        limiter = Limiter("tier-1", opening=60.0, limits=SMALL, backend=backend)
        with limiter.acquire_sync(SONNET, input_tokens=10, max_tokens=10) as permit:
            permit.settle({"output_tokens": 5})
        assert backend.flush()
        assert client(redis_server).hlen(RES) == 1  # the prefetch it took with that round trip
    assert client(redis_server).hlen(RES) == 0  # given back at the block's end
    assert backend._outbox._flusher is None or not backend._outbox._flusher.is_alive()


@pytest.mark.anyio
async def test_a_backend_is_an_async_context_manager_that_closes_it(redis_server: RedisServer) -> None:
    async with RedisBackend(redis_server.url, org="acme") as backend:
        limiter = Limiter("tier-1", opening=60.0, limits=SMALL, backend=backend)
        async with limiter.acquire(SONNET, input_tokens=10, max_tokens=10) as permit:
            permit.settle({"output_tokens": 5})
        assert await backend.aflush()
        assert client(redis_server).hlen(RES) == 1  # the prefetch it took with that round trip
    assert client(redis_server).hlen(RES) == 0
    assert backend._outbox._flusher is None or not backend._outbox._flusher.is_alive()
    assert not backend._transport._async_clients  # the asyncio client it made for the loop is closed


@pytest.mark.anyio
async def test_a_prefetch_admits_without_a_round_trip_and_every_token_is_accounted_for(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(redis_server, backends, limits=SMALL, prefetch_ttl=30.0)
    async with limiter.acquire(SONNET, input_tokens=10, max_tokens=10) as first:
        first.settle({"input_tokens": 10, "output_tokens": 5})
    assert first.seq > 0  # a Redis reservation
    assert backend.flush()
    # the round trip also reserved three more like it, under one record
    (record,) = client(redis_server).hvals(RES)
    assert draws_of(str(record)) == {"requests": 3.0, "input_tokens": 30.0, "output_tokens": 30.0}
    assert level(redis_server, "requests") == pytest.approx(56, abs=0.2)
    async with limiter.acquire(SONNET, input_tokens=10, max_tokens=10) as one:
        one.settle({"input_tokens": 10, "output_tokens": 5})  # 5 back to the prefetch
    async with limiter.acquire(SONNET, input_tokens=10, max_tokens=10) as two:
        assert one.seq < 0
        assert two.seq < 0
        assert backend.flush()
        assert level(redis_server, "requests") == pytest.approx(56, abs=0.2)  # Redis untouched
        # a stream runs 30 past its reservation: the prefetch owes more than it holds, so it
        # closes: the unused request and input go back, the output it owes is charged
        two.record_output(40)
        assert backend.flush()
        assert level(redis_server, "requests") == pytest.approx(57, abs=0.2)
        assert client(redis_server).hlen(RES) == 1  # still out: its part stays reserved
        two.settle({"input_tokens": 10, "output_tokens": 40})
    async with limiter.acquire(SONNET, input_tokens=10, max_tokens=10) as third:
        assert third.seq > 0  # the prefetch is closed: through Redis again
        third.release()  # never sent: everything back
    assert backend.flush()
    assert client(redis_server).hlen(RES) == 1  # only the new prefetch, nothing of the old
    backend.close()  # returns the new prefetch
    assert client(redis_server).hlen(RES) == 0
    # three requests were sent, 30 input and 5 + 5 + 40 output tokens used: nothing lost or minted
    assert level(redis_server, "requests") == pytest.approx(57, abs=0.3)
    assert level(redis_server, "input_tokens") == pytest.approx(570, abs=3)
    assert level(redis_server, "output_tokens") == pytest.approx(550, abs=3)
    assert limiter.statistics()[POOL].in_flight == 0
    # given back without the server ever counting it (resync allows for it): the first
    # prefetch's unused request, the released one, the second prefetch's three
    assert stored_pool(redis_server)["requests.uncounted"] == 5
    assert stored_pool(redis_server)["input_tokens.uncounted"] == 50


@pytest.mark.anyio
async def test_an_unused_prefetch_goes_back_when_it_expires(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(redis_server, backends, limits=SMALL, prefetch_ttl=0.2)
    async with limiter.acquire(SONNET, input_tokens=10, max_tokens=10) as permit:
        permit.settle({"input_tokens": 10, "output_tokens": 10})
    assert backend.flush()
    assert client(redis_server).hlen(RES) == 1
    await anyio.sleep(0.3)  # the flusher thread closes it, with nothing asked of this process
    assert backend.flush()
    assert client(redis_server).hlen(RES) == 0
    assert level(redis_server, "requests") == pytest.approx(59, abs=0.5)


def test_a_prefetched_requests_report_is_read_against_its_prefetch(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(redis_server, backends, limits=SMALL, prefetch_ttl=30.0)
    demand = Demand(input_tokens=10, max_tokens=10)
    with limiter.acquire_sync(SONNET, demand) as first, limiter.acquire_sync(SONNET, demand) as prefetched:
        assert first.seq > 0  # through Redis: 59 left, then 56 with a prefetch of three
        assert prefetched.seq < 0
        first.mark_sent()
        prefetched.mark_sent()
        # the server saw these two and 10 requests of someone else's: 48 left. The pool was
        # noted at 56 with the prefetch's three charged, two of them not sent yet: 10 ahead,
        # so 46 as of the admission. The moment is not known yet: as of the answer too, where
        # the two unsent and the two sends just now (they may not have reached the server
        # before the answer left) come off the 48: the lower of the two, 44
        prefetched.observe(rpm_headers(48), status=200)
        assert backend.flush()
        assert level(redis_server, "requests") == pytest.approx(44, abs=0.1)


def test_no_prefetch_while_others_wait_or_the_pool_is_under_half(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(redis_server, backends)
    held = limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=5_000)  # creates the pool
    keys = backend.pool_keys(POOL).reserve  # reserve.lua takes an op id key as KEYS[8]

    def reserve(who: str, arrival: str, draws: str, prefetch: int) -> list[str]:
        args: list[str | int] = [who, "600", "10", 60_000, "all,sonnet", "1", 1, arrival, draws]
        reply = backend.run_sync([ScriptCall("reserve", keys, [*args, prefetch, "0.05", "0.5"])])[0]
        assert isinstance(reply, list), reply
        return reply

    small = "requests=1,input_tokens=10,output_tokens=10"
    alone = reserve("a", "", small, 16)
    assert alone[0] == "OK"
    assert len(alone[5:]) == 1
    seq, _, prefetched = alone[4].partition(";")
    assert int(seq) == int(alone[5]) + 1  # one record for three requests (5% of 60)
    assert draws_of(prefetched) == {"requests": 3.0, "input_tokens": 30.0, "output_tokens": 30.0}
    # another process waits for more output than is left: it holds a place in line
    ghost = reserve("ghost", "", "requests=1,output_tokens=19000", 0)
    assert ghost[0] == "OK"
    assert ghost[5:] == []
    # a request that arrived before it is granted, but nothing is taken ahead of the ghost
    older = reserve("a", repr(float(ghost[1]) - 1.0), small, 16)
    assert len(older[5:]) == 1
    assert older[4] == ""
    client(redis_server).delete(keys[4], keys[5])  # the ghost's place in line is gone
    assert reserve("a", "", small, 16)[4] != ""
    # under half of the output bucket left (about 8,900 of 20,000): nothing is taken ahead
    limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=6_000)
    assert level(redis_server, "output_tokens") < 10_000
    below = reserve("a", "", small, 16)
    assert len(below[5:]) == 1
    assert below[4] == ""
    held.release()


@pytest.mark.anyio
async def test_a_dead_holders_lease_expires_and_its_charge_stands(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    dead, _ = make(redis_server, backends, lease=0.3)
    alive, alive_backend = make(redis_server, backends)
    dead.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=5_000)  # never settled: its process "died"
    res = f"{{ratekeeper:acme}}:res:{POOL}"
    assert client(redis_server).hlen(res) == 1
    await anyio.sleep(0.4)
    # the next script purges it: it no longer counts as in flight for resyncs ...
    async with alive.acquire(SONNET, input_tokens=1_000, max_tokens=1_000) as permit:
        permit.observe(rpm_headers(50), status=200)
        permit.settle({"input_tokens": 1_000, "output_tokens": 1_000})
    assert alive_backend.flush()
    assert client(redis_server).hlen(res) == 0
    # ... and its reservation stands: nothing was refunded
    assert level(redis_server, "output_tokens") < 20_000 - 5_000 + 200


# ---------------------------------------------------------------- resync across processes


def test_resync_counts_every_process_in_flight_requests(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    a, a_backend = make(redis_server, backends)
    b, b_backend = make(redis_server, backends)
    first = a.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)  # the observed request
    b.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)  # admitted after it, elsewhere
    a.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)  # and here
    assert level(redis_server, "requests") == pytest.approx(57, abs=0.05)
    # the server saw only the first: 50 left. The two admitted after it are still to come.
    first.observe(rpm_headers(50), status=200)
    assert a_backend.flush()
    assert level(redis_server, "requests") == pytest.approx(48, abs=0.05)
    # a report that is not lower changes nothing
    b.observe(rpm_headers(55), model=SONNET)
    assert b_backend.flush()
    assert level(redis_server, "requests") == pytest.approx(48, abs=0.05)


@pytest.mark.anyio
async def test_resync_lowers_by_how_far_the_shared_model_was_ahead_at_the_grant(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    """The local limiter's relative rule, across processes: the refill since is kept."""
    a, a_backend = make(redis_server, backends)
    b, b_backend = make(redis_server, backends)
    held = [a.acquire_nowait(SONNET, input_tokens=1, max_tokens=1) for _ in range(30)]
    for permit in held:
        permit.mark_sent()  # the server counted these
    first = a.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)  # 29 left after it
    second = b.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)  # 28, in another process
    first.mark_sent()
    second.mark_sent()
    await anyio.sleep(0.5)  # half a request of refill: 28.5
    # the server saw the first and 10 requests of someone else's: 19 left. The shared model
    # was 10 ahead at the grant: it comes down 10, and keeps the refill since (lowering to
    # the report less what was admitted since would give 18). The moment is not known yet,
    # and as of the answer it is 18 if the second's send lies within a way to the server
    # of the answer (so it may have been counted), else 19 less nothing: the lower of the two
    first.observe(rpm_headers(19), status=200)
    assert a_backend.flush()
    after_first = level(redis_server, "requests")
    assert 18.0 - 0.05 <= after_first <= 18.5 + 0.1
    # the second's report shows the same foreign traffic: already taken off, not again (as
    # of its answer it is 18 at most, the same for both)
    second.observe(rpm_headers(18), status=200)
    assert b_backend.flush()
    assert 18.0 - 0.05 <= level(redis_server, "requests") <= after_first + 0.1
    for permit in held:
        permit.release()


def test_resync_allows_for_what_the_server_never_counted(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(redis_server, backends)
    earlier = limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)  # 59 left
    observed = limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)  # 58
    later = limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)  # 57
    observed.mark_sent()
    # the server saw the observed request and 10 of someone else's, not the earlier one
    # (not sent yet): 49 left. When it is sent the server will have 48, 47 with the later
    # one: the model comes down to that now
    observed.observe(rpm_headers(49), status=200)
    assert backend.flush()
    assert level(redis_server, "requests") == pytest.approx(47, abs=0.1)
    # the earlier one never leaves: given back (the server never counted it), and a report
    # of the later one showing one more foreign request takes exactly that one off
    earlier.release()
    later.mark_sent()
    later.observe(rpm_headers(47), status=200)
    assert backend.flush()
    assert level(redis_server, "requests") == pytest.approx(47, abs=0.1)


def test_resync_does_not_count_refunds_of_requests_granted_after_the_observed_one(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(redis_server, backends)
    observed = limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)  # 59 left
    later = limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)  # 58
    later.release()  # never sent: 59 again, and the server never counted it
    observed.mark_sent()
    # the server saw the observed request and 10 of someone else's: 49. The note of the
    # observed request never had the later one charged: its refund changes nothing here
    observed.observe(rpm_headers(49), status=200)
    assert backend.flush()
    assert level(redis_server, "requests") == pytest.approx(49, abs=0.1)


@pytest.mark.parametrize(
    ("reported", "moment"),
    [
        # every report counts all ten, the first request's as the ninth's: of the answers
        ([(0, 50), (4, 50), (8, 50)], "response"),
        # each counts those admitted up to its own, and a later answer shows more left:
        # of the admissions (read at the answers, they would go up with the traffic)
        ([(8, 51), (4, 55), (0, 59)], "admission"),
    ],
)
def test_each_process_learns_the_moment_its_reports_describe(
    redis_server: RedisServer,
    backends: list[RedisBackend],
    reported: list[tuple[int, int]],
    moment: str,
) -> None:
    """The local limiter's evidence of the moment, read from this process's own traffic."""
    t = [1000.0]
    backend = RedisBackend(redis_server.url, org="acme", prefetch=0)
    backends.append(backend)
    limiter = Limiter("tier-1", opening=60.0, limits=LIMITS, backend=backend, clock=lambda: t[0])
    permits = []
    for _ in range(10):
        permit = limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)
        permit.mark_sent()
        permits.append(permit)
        t[0] += 0.5  # sent half a second apart: no two can pass each other on the way
    assert limiter.statistics()[POOL].report_moment == "unknown"
    for k, remaining in reported:
        t[0] += 1.0
        permits[k].observe(rpm_headers(remaining), status=200)
    assert limiter.statistics()[POOL].report_moment == moment


@pytest.mark.parametrize("prefetch", [0, 9])
def test_own_traffic_is_read_in_grant_order_across_redis_and_prefetched_seqs(
    redis_server: RedisServer, backends: list[RedisBackend], prefetch: int
) -> None:
    """A prefetched request's seq is local and negative (and decreasing): Redis's seq orders
    its prefetch among the reservations, then the local one within it, as they were granted."""
    backend = RedisBackend(redis_server.url, org="acme", prefetch=prefetch, prefetch_ttl=60.0)
    backends.append(backend)
    limiter = Limiter("tier-1", opening=60.0, limits=BIG, backend=backend)
    demand = Demand(input_tokens=1, max_tokens=1)
    with contextlib.ExitStack() as stack:
        permits = [stack.enter_context(limiter.acquire_sync(SONNET, demand)) for _ in range(10)]
        assert all(p.seq < 0 for p in permits[1:]) == bool(prefetch)
        for k in (0, 3, 4, 5, 6, 7, 8, 9):
            permits[k].mark_sent()
        # granted before the sixth and not sent: the second and the third, nothing else
        own = own_traffic(permits[5]._runtime, permits[5], limiter._now(), replay=False)
        assert own.early.get("requests") == 2
        own = own_traffic(permits[0]._runtime, permits[0], limiter._now(), replay=False)
        assert own.early.get("requests", 0.0) == 0


def _sent_permits(
    limiter: Limiter,
    stack: contextlib.ExitStack,
    n: int,
    sent: int | None = None,
    t: list[float] | None = None,
) -> list[Any]:
    """``n`` permits of one request each, the first ``sent`` of them (all by default) sent.

    ``t``: the limiter's clock, moved half a second after each grant and send, so that no
    two can pass each other on the way (they would blur what the reports show of their moment).
    """
    demand = Demand(input_tokens=1, max_tokens=1)
    permits = []
    for k in range(n):
        permit = stack.enter_context(limiter.acquire_sync(SONNET, demand))
        if k < (n if sent is None else sent):
            permit.mark_sent()
        permits.append(permit)
        if t is not None:
            t[0] += 0.5
    return permits


def _clocked(
    server: RedisServer, made: list[RedisBackend], **options: Any
) -> tuple[Limiter, RedisBackend, list[float]]:
    """``make``, with a limiter clock the test moves (Redis keeps its own time)."""
    t = [1000.0]
    backend = RedisBackend(server.url, org="acme", **options)
    made.append(backend)
    return Limiter("tier-1", opening=60.0, limits=LIMITS, backend=backend, clock=lambda: t[0]), backend, t


@pytest.mark.parametrize("prefetch", [0, 3])
def test_reports_shown_to_be_of_the_answer_give_back_what_the_admission_reading_took_twice(
    redis_server: RedisServer, backends: list[RedisBackend], prefetch: int
) -> None:
    """Read as of the grant, a report of the answer counts twice what was admitted meanwhile."""
    a, a_backend, t = _clocked(redis_server, backends, prefetch=prefetch, prefetch_ttl=60.0)
    b, b_backend = make(redis_server, backends, prefetch=0)
    with contextlib.ExitStack() as stack:
        # (with prefetch: through Redis with three more, those three, again: all handed out)
        mine = _sent_permits(a, stack, 8, t=t)
        if prefetch:
            assert [p.seq < 0 for p in mine] == [False, True, True, True] * 2
        _sent_permits(b, stack, 10)
        assert b_backend.flush()
        time.sleep(0.4)  # well before the answers: the server has all eighteen
        # each answer's report counts all eighteen: 42 left. The first is read as of its
        # grant (the moment is not known yet): the 17 admitted since are counted again
        mine[0].observe(rpm_headers(42), status=200)
        assert a_backend.flush()
        assert level(redis_server, "requests") < 30
        # the fourth and the eighth say the same: as of their admissions they would have
        # said more. Taken as the answers left, the level is the report's
        for k in (3, 7):
            t[0] += 1.0
            mine[k].observe(rpm_headers(42), status=200)
        assert a_backend.flush()
        assert a.statistics()[POOL].report_moment == "response"
        assert level(redis_server, "requests") == pytest.approx(42, abs=0.05)


def test_a_report_of_the_answer_lifts_nothing_the_server_may_not_have_counted(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    """Requests not sent, and sent too late to be in it, anywhere: taken off the report."""
    a, a_backend, t = _clocked(redis_server, backends, prefetch=0)
    b, b_backend = make(redis_server, backends, prefetch=0)
    with contextlib.ExitStack() as stack:
        mine = _sent_permits(a, stack, 10, t=t)
        theirs = _sent_permits(b, stack, 10, sent=5)
        assert b_backend.flush()
        time.sleep(0.4)
        # the server has fifteen: 45 left, in every report
        for k in (0, 3, 6):
            t[0] += 1.0
            mine[k].observe(rpm_headers(45), status=200)
        assert a_backend.flush()
        assert a.statistics()[POOL].report_moment == "response"
        for permit in theirs[5:7]:  # sent now: maybe after the next report's moment
            permit.mark_sent()
        assert b_backend.flush()
        t[0] += 1.0
        mine[8].observe(rpm_headers(45), status=200)
        assert a_backend.flush()
        # three never sent, two perhaps not there yet: 40, not 45
        assert level(redis_server, "requests") == pytest.approx(40, abs=0.05)


def test_reports_of_both_moments_lift_to_the_lower_of_the_two_readings(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    """Once the reports have shown both moments, each is read both ways and the lower wins."""
    a, a_backend, t = _clocked(redis_server, backends, prefetch=0)
    b, b_backend = make(redis_server, backends, prefetch=0)
    with contextlib.ExitStack() as stack:
        mine = _sent_permits(a, stack, 10, t=t)
        _sent_permits(b, stack, 10, sent=8)
        assert b_backend.flush()
        time.sleep(0.4)
        # the server has eighteen: 42 left, as the answers leave; then one shows more left
        # than it can have had at its answer (of its admission, then)
        for k, remaining in ((0, 42), (4, 42), (8, 42), (9, 45)):
            t[0] += 1.0
            mine[k].observe(rpm_headers(remaining), status=200)
        assert a_backend.flush()
        assert a.statistics()[POOL].report_moment == "mixed"
        assert level(redis_server, "requests") < 38
        time.sleep(0.4)
        # a request on its own: as of its admission or of its answer, the server has 42
        # less the two not sent. The admission rule alone would keep the level where it is
        alone = _sent_permits(a, stack, 1, t=t)[0]
        assert a_backend.flush()
        time.sleep(1.2)  # (no less than the limiter's clock moves: its ages are read in Redis time)
        t[0] += 0.5
        alone.observe(rpm_headers(42), status=200)
        assert a_backend.flush()
        assert level(redis_server, "requests") == pytest.approx(40, abs=0.05)


def test_reports_shown_to_be_of_the_admission_give_back_what_the_server_never_counted(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    """Read as of the admissions, the reports lift the level too: refill, and the model's excess."""
    a, a_backend = make(redis_server, backends, prefetch=0)
    b, b_backend = make(redis_server, backends, prefetch=0)
    for _ in range(5):  # sent, but lost on the way: the server never saw them, the model keeps them
        lost = b.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)
        lost.mark_sent()
        lost.release()
    assert b_backend.flush()
    mine = []
    for _ in range(10):  # apart: none can pass another on the way
        permit = a.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)
        permit.mark_sent()
        mine.append(permit)
        time.sleep(0.3)
    # each report is of its admission: the tenth saw ten gone, the sixth six, the second two
    # (later answers showing more left than earlier ones: not of the answers)
    for k in (9, 5, 1):
        mine[k].observe(rpm_headers(59 - k), status=200)
    assert a_backend.flush()
    assert a.statistics()[POOL].report_moment == "admission"
    # the first (the tenth's: 50 left) was read while the moment was not known, as of both
    # moments, and lifted the model's 45 to it; the older admissions after it only lower
    assert level(redis_server, "requests") <= 50.05
    # one more, reported as of its admission: eleven gone, and the refill since. The model
    # has five more gone (and the same refill): it comes up to the report
    mine.append(a.acquire_nowait(SONNET, input_tokens=1, max_tokens=1))
    mine[-1].mark_sent()
    time.sleep(0.3)
    mine[-1].observe(rpm_headers(49), status=200)
    assert a_backend.flush()
    assert 49 <= level(redis_server, "requests") <= 53.5  # (the server's: 49 and up to 4 refilled)
    for permit in mine:
        permit.release()


def test_a_send_is_counted_once_in_its_reservations_record(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(redis_server, backends, prefetch=0)
    permit = limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)
    permit.mark_sent()
    permit.mark_sent()  # (twice: a second would make an unsent request of a prefetch look sent)
    assert backend.flush()
    (record,) = client(redis_server).hvals(RES)
    assert draws_of(str(record))["~sent"] == 1
    assert client(redis_server).zcard("{ratekeeper:acme}:sent:" + POOL) == 1
    permit.release()


def test_learned_limits_are_shared(redis_server: RedisServer, backends: list[RedisBackend]) -> None:
    a, a_backend = make(redis_server, backends)
    b, _ = make(redis_server, backends)
    with a.acquire_sync(SONNET, Demand(input_tokens=10, max_tokens=10)) as permit:
        permit.observe(rpm_headers(900, limit=1_000), status=200)
    assert a_backend.flush()
    assert stored_pool(redis_server)["requests.limit"] == 1_000
    b.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)  # b's view of the limit follows Redis


# ---------------------------------------------------------------- pauses


@pytest.mark.anyio
async def test_one_processes_429_pauses_the_pool_for_all(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    a, a_backend = make(redis_server, backends)
    b, _ = make(redis_server, backends)
    async with a.acquire(SONNET, input_tokens=100, max_tokens=100) as permit:
        permit.observe({"retry-after": "1"}, status=429)
    assert a_backend.flush()
    with pytest.raises(WouldBlock, match="429 rate_limit_error"):
        b.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
    start = time.monotonic()
    async with b.acquire(SONNET, input_tokens=100, max_tokens=100):
        waited = time.monotonic() - start
    assert 0.5 < waited < 1.5


@pytest.mark.parametrize("status", [429, 529])
def test_a_shared_pause_is_capped_at_seven_days(
    redis_server: RedisServer, backends: list[RedisBackend], status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A retry-after of 10**9 s holds every process for the cap, as the local limiter does."""
    a, a_backend = make(redis_server, backends)
    b, _ = make(redis_server, backends)
    permit = a.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
    permit.observe({"retry-after": str(10**9)}, status=status)
    permit.release()
    assert a_backend.flush()
    assert 0 < a.statistics()[POOL].paused_for <= MAX_PAUSE
    assert "7 days" in caplog.text
    with pytest.raises(WouldBlock) as info:
        b.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
    assert info.value.retry_after is not None
    assert 0 < info.value.retry_after <= MAX_PAUSE  # what Redis holds the others to


def test_statistics_show_the_remaining_the_last_report_gave(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, _ = make(redis_server, backends)
    permit = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
    permit.observe(rpm_headers(41))
    permit.release()
    assert dict(limiter.statistics()[POOL].reported) == {"requests": 41.0}


def test_the_spend_limit_is_shared(redis_server: RedisServer, backends: list[RedisBackend]) -> None:
    a, a_backend = make(redis_server, backends)
    b, _ = make(redis_server, backends)
    body = {
        "type": "error",
        "error": {"type": "rate_limit_error", "details": {"error_code": "enforced_spend_limit_reached"}},
    }
    a.observe({}, model=SONNET, status=429, body=body)
    assert a_backend.flush()
    with pytest.raises(ratekeeper.SpendLimitReached):
        b.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)


@pytest.mark.anyio
async def test_a_subscription_rejection_holds_every_process(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    a, a_backend = make(redis_server, backends)
    b, _ = make(redis_server, backends)
    reset = str(int(time.time()) + 3_600)
    a.observe(
        {"anthropic-ratelimit-unified-status": "rejected", "anthropic-ratelimit-unified-reset": reset},
        status=429,
    )
    assert a_backend.flush()
    with pytest.raises(WouldBlock, match="subscription limit"):
        b.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)


# ---------------------------------------------------------------- fairness


@pytest.mark.anyio
async def test_waiters_in_different_processes_go_in_arrival_order(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    # 600 RPM with a one-second burst: 10 requests, then one every 0.1 s
    limits = {POOL: {"requests": 600.0, "input_tokens": 1_000_000.0, "output_tokens": 1_000_000.0}}
    procs = []
    for _ in range(2):
        backend = RedisBackend(redis_server.url, org="acme", poll_interval=1.0)
        backends.append(backend)
        procs.append(Limiter("tier-1", opening=60.0, limits=limits, burst=1 / 60, backend=backend))
    a, b = procs
    for _ in range(10):
        a.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)
    granted: dict[str, float] = {}
    order: dict[str, int] = {}

    async def take(limiter: Limiter, name: str) -> None:
        async with limiter.acquire(SONNET, input_tokens=1, max_tokens=1) as permit:
            granted[name] = time.monotonic()
            order[name] = permit.seq  # Redis's reservation counter: the order it granted them in
            permit.observe({}, status=200)
            permit.settle({"input_tokens": 1, "output_tokens": 1})  # sent: nothing comes back

    names = ("a1", "b1", "a2", "b2", "a3", "b3")
    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(take, a if name[0] == "a" else b, name)
            await anyio.sleep(0.01)
    # one token every 0.1 s, and each goes to the oldest waiter of either process (read from
    # the grants' order in Redis: when each task resumes depends on the machine's load)
    assert all(seq >= 0 for seq in order.values()), order  # none from a prefetch
    assert [order[name] for name in names] == sorted(order.values()), order
    assert max(granted.values()) - min(granted.values()) > 0.4  # no burst beyond the limit


@pytest.mark.anyio
async def test_a_dead_processes_place_in_line_expires(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(redis_server, backends)
    # a process that queued a request the bucket can't hold yet, then died
    keys = backend.pool_keys(POOL).reserve  # reserve.lua takes an op id key as KEYS[8]
    limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=19_000)
    ghost: list[str | int] = [
        "ghost",
        "600",
        "0.3",
        60_000,
        "all,sonnet",
        "1",
        1,
        "",
        "requests=1,output_tokens=19000",
        0,  # no prefetch
        "0.05",
        "0.5",
    ]
    reply = backend.run_sync([ScriptCall("reserve", keys, ghost)])[0]
    assert isinstance(reply, list), reply
    assert reply[0] == "OK"
    assert reply[4:] == [""]  # no prefetch, nothing granted: it holds the head of the line
    start = time.monotonic()
    async with limiter.acquire(SONNET, input_tokens=1, max_tokens=10):
        waited = time.monotonic() - start
    assert 0.2 < waited < 1.5  # the ghost's ticket lasted 0.3 s


@pytest.mark.anyio
async def test_timeout_and_cancel_leave_the_line(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(redis_server, backends)
    limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=20_000)
    with pytest.raises(AcquireTimeout):
        async with limiter.acquire(SONNET, input_tokens=1, max_tokens=5_000, timeout=0.2):
            pytest.fail("admitted")
    assert backend.flush()
    assert client(redis_server).zcard(f"{{ratekeeper:acme}}:q:{POOL}") == 0


def test_threads_share_the_remote_line(redis_server: RedisServer, backends: list[RedisBackend]) -> None:
    limiter, _ = make(redis_server, backends)
    got: list[int] = []

    def work() -> None:
        for _ in range(5):
            with limiter.acquire_sync(SONNET, Demand(input_tokens=10, max_tokens=10)) as permit:
                permit.settle({"input_tokens": 10, "output_tokens": 1})
                got.append(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(got) == 20


# ---------------------------------------------------------------- Redis unavailable


@pytest.mark.anyio
async def test_unavailable_with_fail_policy_raises(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, _ = make(redis_server, backends, timeout=0.3, retry_interval=5.0)
    redis_server.stop()
    message = (
        rf"^Redis at {redis_server.url} is unavailable \(ConnectionError: .*\); "
        r"on_unavailable='fail' admits nothing without it \(next attempt in 5s\)$"
    )
    start = time.monotonic()
    with pytest.raises(BackendUnavailable, match=message):
        async with limiter.acquire(SONNET, input_tokens=1, max_tokens=1):
            pytest.fail("admitted")
    with pytest.raises(BackendUnavailable, match=message):  # at once, without a new attempt
        limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)
    assert time.monotonic() - start < 1.0


@pytest.mark.anyio
async def test_local_fallback_then_recovery_after_a_restart(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(
        redis_server,
        backends,
        on_unavailable="local",
        fallback_fraction=0.25,
        timeout=0.3,
        retry_interval=0.2,
        prefetch=0,  # every request asks Redis: the first one after the stop finds it gone
    )
    async with limiter.acquire(SONNET, input_tokens=1, max_tokens=1) as permit:
        assert permit._limiter is limiter  # through Redis
    redis_server.stop()
    granted = 0
    for _ in range(60):
        try:
            async with limiter.acquire(SONNET, input_tokens=1, max_tokens=1, timeout=0) as permit:
                assert permit._limiter is not limiter  # the local fallback
                permit.observe({}, status=200)
                granted += 1
        except AcquireTimeout:
            break
    assert granted == 15  # a quarter of 60 RPM
    redis_server.start()  # empty: no keys, no scripts
    await anyio.sleep(0.25)
    async with limiter.acquire(SONNET, input_tokens=1, max_tokens=1) as permit:
        assert permit._limiter is limiter
        permit.settle({"input_tokens": 1, "output_tokens": 1})
    assert backend.flush()
    assert client(redis_server).exists(f"{{ratekeeper:acme}}:pool:{POOL}")


@pytest.mark.anyio
async def test_a_restart_mid_run_loses_no_request(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    limits = {POOL: {"requests": 6_000.0, "input_tokens": 1_000_000.0, "output_tokens": 1_000_000.0}}
    backend = RedisBackend(
        redis_server.url, org="acme", on_unavailable="local", timeout=0.3, retry_interval=0.1
    )
    backends.append(backend)
    limiter = Limiter("tier-1", opening=60.0, limits=limits, backend=backend)
    remote = local = 0
    restarted = False
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        async with limiter.acquire(SONNET, input_tokens=1, max_tokens=1) as permit:
            permit.observe({}, status=200)
            permit.settle({"input_tokens": 1, "output_tokens": 1})
            if permit._limiter is limiter:
                remote += 1
            else:
                local += 1
        if not restarted and time.monotonic() > deadline - 1.0:
            await anyio.to_thread.run_sync(redis_server.restart)
            restarted = True
        await anyio.sleep(0.005)
    assert remote > 10
    assert backend.available()
    assert client(redis_server).exists(f"{{ratekeeper:acme}}:pool:{POOL}")  # recreated after the restart


# ---------------------------------------------------------------- rounding and burst, as the local limiter

DATE = "Mon, 05 Jan 2026 00:00:10 GMT"


def full_headers(
    requests: int, input_: int, output: int, *, reset: str = "2026-01-05T00:00:20Z"
) -> dict[str, str]:
    """The three dimensions' limits (LIMITS), the given remaining, one reset, and the date."""
    out = {"date": DATE}
    for name, limit, remaining in (
        ("requests", 60, requests),
        ("input-tokens", 100_000, input_),
        ("output-tokens", 20_000, output),
    ):
        out[f"anthropic-ratelimit-{name}-limit"] = str(limit)
        out[f"anthropic-ratelimit-{name}-remaining"] = str(remaining)
        out[f"anthropic-ratelimit-{name}-reset"] = reset
    return out


def stored_burst(server: RedisServer) -> float:
    return stored_pool(server)["burst"]


def capacity(server: RedisServer, dim: str) -> float:
    return stored_pool(server)[f"{dim}.capacity"]


def test_token_resync_goes_to_the_reports_lowest_reading(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    """As the local limiter (``Pool.resync``): no tolerance band, always the lowest reading."""
    limiter, backend = make(redis_server, backends)
    permit = limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=1_000)
    assert level(redis_server, "output_tokens") == pytest.approx(19_000, abs=5)
    # 19,000 +- 500: keeping 19,000 could admit up to 1,000 more than the server has left
    permit.observe(full_headers(59, 99_000, 19_000))
    assert backend.flush()
    assert level(redis_server, "output_tokens") == pytest.approx(18_500, abs=50)
    assert level(redis_server, "input_tokens") == pytest.approx(98_500, abs=100)
    # requests are exact (no rounding): 57 remaining lowers 59 to 57
    permit.observe(full_headers(57, 99_000, 18_000))
    assert backend.flush()
    assert level(redis_server, "output_tokens") == pytest.approx(17_500, abs=50)
    assert level(redis_server, "requests") == pytest.approx(57, abs=0.05)
    permit.release()


def test_a_one_second_bucket_is_read_from_the_headers_and_shared(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    a, a_backend = make(redis_server, backends)
    b, b_backend = make(redis_server, backends)
    permit = a.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=1_000)
    # nearly empty, yet full again one second after the date: the server's buckets hold
    # one second of the limit. The tightest bound is ITPM's, (0 remaining + 500 rounding +
    # 100,000/60 * 1 s) / 100,000 = 0.022: under two seconds, and no report showed more than
    # one, so the one second the documentation names
    bound = 1 / 60
    permit.observe(full_headers(0, 0, 0, reset="2026-01-05T00:00:11Z"))
    assert a.statistics()[POOL].burst == pytest.approx(bound)  # before any 429
    assert a_backend.flush()
    assert stored_burst(redis_server) == pytest.approx(bound)
    assert capacity(redis_server, "input_tokens") == pytest.approx(100_000 * bound)
    # clamped, not shifted: the resync left -500 (the report's lowest reading), the smaller
    # bucket keeps it (shifting would carry the 100,000-token deficit over: -98,833)
    assert level(redis_server, "input_tokens") == pytest.approx(-500, abs=100)
    assert a.statistics()[POOL].rate_limited == 0
    # another process's next settle brings the shared burst to its own view
    with b.acquire_sync(SONNET, Demand(input_tokens=1, max_tokens=1), timeout=5) as other:
        other.settle({"input_tokens": 1, "output_tokens": 1})
    assert b_backend.flush()
    assert b.statistics()[POOL].burst == pytest.approx(bound)
    permit.release()


def test_a_429_after_the_burst_was_fitted_does_not_halve_it_again(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(redis_server, backends)
    permit = limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=1_000)
    tight = full_headers(0, 0, 0, reset="2026-01-05T00:00:11Z")
    permit.observe({**tight, "retry-after": "1"}, status=429)
    assert backend.flush()
    bound = 1 / 60  # (500 + 100,000 / 60 * 1 s) / 100,000 = 0.022: one second's bucket
    stats = limiter.statistics()[POOL]
    assert stats.burst == pytest.approx(bound)
    assert stored_burst(redis_server) == pytest.approx(bound)
    assert (stats.rate_limited, stats.rate_limited_predicted) == (1, 0)
    permit.release()


def test_an_unexplained_429_halves_the_shared_burst_once_per_event(
    redis_server: RedisServer, backends: list[RedisBackend]
) -> None:
    a, a_backend = make(redis_server, backends)
    b, b_backend = make(redis_server, backends)
    early_a = a.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
    early_b = b.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
    # both refused with no header explaining why: the server's bucket is smaller than ours
    early_a.observe({"retry-after": "0"}, status=429)
    assert a_backend.flush()
    assert stored_burst(redis_server) == 0.5
    # the second 429 is of a request admitted (elsewhere) before that shrink: old news
    early_b.observe({"retry-after": "0"}, status=429)
    assert b_backend.flush()
    assert stored_burst(redis_server) == 0.5
    assert b.statistics()[POOL].burst == 0.5  # the reply brought b's view along
    assert (b.statistics()[POOL].rate_limited, b.statistics()[POOL].rate_limited_predicted) == (1, 0)
    # one admitted after the shrink and refused too: a new event
    late = b.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
    late.observe({"retry-after": "0"}, status=429)
    assert b_backend.flush()
    assert stored_burst(redis_server) == 0.25
    for p in (early_a, early_b, late):
        p.release()
