"""The Redis backend against a real three-node Redis Cluster, through a ``redis.RedisCluster`` client.

One cluster serves the whole module (forming one takes about 2 s); every test
starts from no keys. State is read back from the nodes themselves with plain
clients, so a key stored anywhere but on the node that owns the organization's
hash slot fails the test. Most organizations used here live on a node other
than the one the cluster clients start from: a backend that sent everything
to its client's first node would not pass by luck.
"""

# ruff: noqa: F811 (test parameters named after the fixtures imported below)

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.crc import key_slot
from redis_server import RedisClusterServer, redis_cluster  # noqa: F401

# the same fixture and readers as test_redis.py (pytest finds fixtures by name, hence the noqa)
from test_redis import LIMITS, POOL, SONNET, anyio_backend, level, rpm_headers  # noqa: F401

from ratekeeper import AcquireTimeout, BackendUnavailable, Demand, Limiter, RedisBackend, WouldBlock

#: Its slot is on node 1, not node 0 where every cluster client starts.
ORG = "initech"
#: One organization per node (slots 239, 7,372 and 14,453 of 0-5,460, 5,461-10,921, 10,922-16,383).
ORGS = ("acme", "initech", "hooli")
#: 5 requests a minute: a handful of acquires empties the bucket.
FIVE = {POOL: {"requests": 5.0, "input_tokens": 100_000.0, "output_tokens": 20_000.0}}


@pytest.fixture
def backends(redis_cluster: RedisClusterServer) -> Iterator[list[RedisBackend]]:
    """Backends made by a test on a cluster emptied for it; closed after it with their clients."""
    redis_cluster.flush()
    made: list[RedisBackend] = []
    yield made
    for b in made:
        b.close()
        b._transport._sync.close()  # the caller's client: the backend leaves it open


def make(
    cluster: RedisClusterServer,
    made: list[RedisBackend],
    *,
    limits: dict[str, dict[str, float]] = LIMITS,
    **options: Any,
) -> tuple[Limiter, RedisBackend]:
    """A limiter with its own backend and ``redis.RedisCluster`` client: to Redis, a separate process."""
    options.setdefault("org", ORG)
    backend = RedisBackend(cluster.client(), **options)
    made.append(backend)
    return Limiter("tier-1", opening=60.0, limits=limits, backend=backend), backend


def stored(cluster: RedisClusterServer, backend: RedisBackend, dim: str) -> float:
    """A bucket's level as stored on the node that owns the backend's slot (by the slots given at start)."""
    return level(cluster.nodes[cluster.owner(backend.tag)], dim, backend.org)


def refilled(expected: float, per_minute: float) -> Any:
    """``expected`` or up to half a second's refill more: a stored level includes it until its last change."""
    half = per_minute / 120
    return pytest.approx(expected + half / 2, abs=half / 2)


def commands(cluster: RedisClusterServer, i: int) -> dict[str, int]:
    """Calls of each command node ``i`` has run since its last ``CONFIG RESETSTAT``."""
    with cluster.node_client(i) as node:
        stats = node.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()}


def reset_stats(cluster: RedisClusterServer) -> None:
    for i in range(len(cluster.nodes)):
        with cluster.node_client(i) as node:
            node.config_resetstat()


@pytest.mark.anyio
@pytest.mark.parametrize("org", ORGS)
async def test_every_key_lands_on_the_node_that_owns_the_organizations_slot(
    redis_cluster: RedisClusterServer, backends: list[RedisBackend], org: str
) -> None:
    limiter, backend = make(redis_cluster, backends, org=org, prefetch=0)
    owner = redis_cluster.owner(backend.tag)
    async with limiter.acquire(SONNET, input_tokens=100, max_tokens=10_000) as permit:
        permit.observe(rpm_headers(59), status=200)
        permit.settle({"input_tokens": 100, "output_tokens": 500})  # 9,500 back
    async with limiter.acquire(SONNET, input_tokens=100, max_tokens=1_000):
        pass  # never sent: released, everything back
    held = limiter.acquire_nowait(SONNET, input_tokens=100, max_tokens=19_000)  # in flight
    with pytest.raises(AcquireTimeout):  # and a place in line, held while it waits
        await limiter.acquire(SONNET, input_tokens=100, max_tokens=19_000, timeout=0.05)
    assert backend.flush()
    found: list[list[str]] = []
    for i in range(len(redis_cluster.nodes)):
        with redis_cluster.node_client(i) as node:
            found.append(sorted(node.keys("*")))
    keys = found[owner]
    assert all(not other for i, other in enumerate(found) if i != owner), found
    assert {k.split(":", 2)[2].split(":")[0] for k in keys} >= {"org", "pool", "res", "lease"}
    assert all(k.startswith(f"{{ratekeeper:{org}}}:") for k in keys), keys
    # one slot, and that node counts every one of them in it
    (slot,) = {key_slot(k.encode()) for k in keys}
    with redis_cluster.node_client(owner) as node:
        assert node.cluster("COUNTKEYSINSLOT", slot) == len(keys)
    # what the scripts stored: three requests, the second given back; 500 + 19,000 output tokens
    assert stored(redis_cluster, backend, "requests") == refilled(58, 60)
    assert stored(redis_cluster, backend, "output_tokens") == refilled(20_000 - 500 - 19_000, 20_000)
    held.release()


def test_a_round_trip_goes_to_the_owner_alone_and_asks_nothing_else(
    redis_cluster: RedisClusterServer, backends: list[RedisBackend]
) -> None:
    """Calls alone or piped (queued settles ahead of a reserve) are EVALSHAs to the owner, and only that."""
    limiter, backend = make(redis_cluster, backends, prefetch=0, flush_delay=0.5)
    limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10).release()  # pool and scripts in place
    assert backend.flush()
    reset_stats(redis_cluster)
    first = limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)
    second = limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)
    first.settle({"input_tokens": 10, "output_tokens": 1})  # queued: the flusher waits 0.5 s
    second.settle({"input_tokens": 10, "output_tokens": 1})
    third = limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)
    assert not backend._outbox  # the reserve carried both settles, in one pipeline
    assert backend.flush()
    owner = redis_cluster.owner(backend.tag)
    calls = [commands(redis_cluster, i) for i in range(len(redis_cluster.nodes))]
    assert calls[owner].get("evalsha") == 5, calls
    # no COMMAND GETKEYS (redis-py's way to find a pipelined EVALSHA's node), nothing elsewhere
    assert not any("command|getkeys" in c for c in calls), calls
    assert not any("evalsha" in c for i, c in enumerate(calls) if i != owner), calls
    assert stored(redis_cluster, backend, "requests") == refilled(57, 60)
    third.release()


def test_reserve_is_all_or_nothing(redis_cluster: RedisClusterServer, backends: list[RedisBackend]) -> None:
    limiter, backend = make(redis_cluster, backends, prefetch=0)
    first = limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=15_000)
    assert backend.flush()
    dims = ("requests", "input_tokens", "output_tokens")
    before = {d: stored(redis_cluster, backend, d) for d in dims}
    # requests and input fit, output does not: nothing at all may be taken
    with pytest.raises(WouldBlock):
        limiter.acquire_nowait(SONNET, input_tokens=1_000, max_tokens=10_000)
    assert {d: stored(redis_cluster, backend, d) for d in dims} == before
    assert before["requests"] == refilled(59, 60)
    assert before["output_tokens"] == refilled(5_000, 20_000)
    first.release()


@pytest.mark.anyio
async def test_two_processes_share_one_limit(
    redis_cluster: RedisClusterServer, backends: list[RedisBackend]
) -> None:
    a, _ = make(redis_cluster, backends, limits=FIVE, prefetch=0)
    b, b_backend = make(redis_cluster, backends, limits=FIVE, prefetch=0)
    for _ in range(3):
        async with a.acquire(SONNET, input_tokens=10, max_tokens=10) as permit:
            permit.observe({}, status=200)
            permit.settle({"input_tokens": 10, "output_tokens": 1})
    # b has sent nothing yet and sees a's three: two requests are left, for either
    for _ in range(2):
        b.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)
    with pytest.raises(WouldBlock):
        b.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)
    with pytest.raises(WouldBlock):
        a.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)
    assert b_backend.flush()
    assert stored(redis_cluster, b_backend, "requests") == refilled(0, 5)


def test_a_resync_from_headers_counts_every_process(
    redis_cluster: RedisClusterServer, backends: list[RedisBackend]
) -> None:
    a, a_backend = make(redis_cluster, backends, prefetch=0)
    b, b_backend = make(redis_cluster, backends, prefetch=0)
    first = a.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)  # the observed request
    b.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)  # admitted after it, elsewhere
    a.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)  # and here
    assert stored(redis_cluster, a_backend, "requests") == refilled(57, 60)
    # the server saw only the first: 50 left. The two admitted after it are still to come.
    first.observe(rpm_headers(50), status=200)
    assert a_backend.flush()
    assert stored(redis_cluster, a_backend, "requests") == refilled(48, 60)
    # b's next reserve starts from the resynced level
    b.acquire_nowait(SONNET, input_tokens=100, max_tokens=100)
    assert b_backend.flush()
    assert stored(redis_cluster, a_backend, "requests") == refilled(47, 60)


@pytest.mark.anyio
async def test_scripts_flushed_on_the_owner_are_loaded_again(
    redis_cluster: RedisClusterServer, backends: list[RedisBackend]
) -> None:
    limiter, backend = make(redis_cluster, backends, prefetch=0, flush_delay=0.5)
    owner = redis_cluster.owner(backend.tag)
    sha = backend._transport._scripts["reserve"][1]
    held = limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)
    with redis_cluster.node_client(owner) as node:
        node.script_flush()
        assert node.script_exists(sha) == [False]
    # one op alone: EVALSHA, NOSCRIPT, the scripts loaded, EVALSHA again
    async with limiter.acquire(SONNET, input_tokens=10, max_tokens=10) as permit:
        permit.settle({"input_tokens": 10, "output_tokens": 1})
    assert backend.flush()
    with redis_cluster.node_client(owner) as node:
        assert node.script_exists(sha) == [True]
        node.script_flush()
        node.config_resetstat()
    # several ops in one pipeline (a queued release, then a reserve): every one fails, every one is redone
    held.release()
    limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)
    assert backend.flush()
    stats = commands(redis_cluster, owner)
    assert stats["evalsha"] == 4, stats  # two refused, two redone
    assert stats["script|load"] >= 1
    # what each did is there: three requests taken, the first given back (not sent)
    assert stored(redis_cluster, backend, "requests") == refilled(58, 60)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_asyncio_cluster_client_is_used_from_asyncio(
    redis_cluster: RedisClusterServer, backends: list[RedisBackend]
) -> None:
    port = redis_cluster.nodes[0].port
    async_client = redis.asyncio.RedisCluster(host="127.0.0.1", port=port, decode_responses=True)
    try:
        # settles wait (the flusher sleeps 0.5 s): each acquire carries the last one, piped
        limiter, backend = make(
            redis_cluster, backends, prefetch=0, async_client=async_client, flush_delay=0.5
        )
        owner = redis_cluster.owner(backend.tag)
        reset_stats(redis_cluster)
        for _ in range(3):
            async with limiter.acquire(SONNET, input_tokens=10, max_tokens=1_000) as permit:
                permit.settle({"input_tokens": 10, "output_tokens": 100})
        assert await backend.aflush()
        assert len(backend._transport._wires) == 0  # no connection of its own: the cluster client routes
        calls = [commands(redis_cluster, i) for i in range(len(redis_cluster.nodes))]
        assert calls[owner].get("evalsha", 0) >= 6, calls  # three reserves, three settles
        assert not any("evalsha" in c for i, c in enumerate(calls) if i != owner), calls
        assert stored(redis_cluster, backend, "requests") == refilled(57, 60)
        assert stored(redis_cluster, backend, "output_tokens") == refilled(19_700, 20_000)
        # scripts lost on the owner: loaded again through the asyncio client, there
        with redis_cluster.node_client(owner) as node:
            node.script_flush()
        async with limiter.acquire(SONNET, input_tokens=10, max_tokens=1_000) as permit:
            permit.settle({"input_tokens": 10, "output_tokens": 100})
        assert await backend.aflush()
        assert stored(redis_cluster, backend, "requests") == refilled(56, 60)
        calls = [commands(redis_cluster, i) for i in range(len(redis_cluster.nodes))]
        assert calls[owner]["script|load"] >= 1
        assert not any("script|load" in c for i, c in enumerate(calls) if i != owner), calls
    finally:
        await async_client.aclose()


def move_slot(cluster: RedisClusterServer, slot: int, source: int, target: int) -> None:
    """Reshard ``slot`` with its keys from node ``source`` to node ``target``, as ``redis-cli`` does."""
    with cluster.node_client(source) as src, cluster.node_client(target) as dst:
        src_id, dst_id = src.cluster("MYID"), dst.cluster("MYID")
        dst.cluster("SETSLOT", slot, "IMPORTING", src_id)
        src.cluster("SETSLOT", slot, "MIGRATING", dst_id)
        keys = src.cluster("GETKEYSINSLOT", slot, 1_000)
        if keys:
            src.migrate("127.0.0.1", cluster.nodes[target].port, keys, 0, 5_000)
        for node in (dst, src):  # the new owner first: it bumps its epoch, so its claim wins
            node.cluster("SETSLOT", slot, "NODE", dst_id)


def test_a_moved_slot_is_followed(redis_cluster: RedisClusterServer, backends: list[RedisBackend]) -> None:
    """A pipeline sent by the client's stale slot table to the old owner is told MOVED, and follows."""
    limiter, backend = make(redis_cluster, backends, prefetch=0, flush_delay=0.5)
    held = limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)
    slot, source = key_slot(backend.tag.encode()), redis_cluster.owner(backend.tag)
    target = (source + 1) % len(redis_cluster.nodes)
    move_slot(redis_cluster, slot, source, target)
    reset_stats(redis_cluster)
    try:
        held.release()  # queued: the flusher waits 0.5 s
        limiter.acquire_nowait(SONNET, input_tokens=10, max_tokens=10)  # the release and a reserve, piped
        assert backend.flush()
        with redis_cluster.node_client(source) as old, redis_cluster.node_client(target) as new:
            assert old.info("errorstats")["errorstat_MOVED"]["count"] >= 2  # both went there first
            assert old.keys("*") == []
            assert new.cluster("COUNTKEYSINSLOT", slot) > 0
        # both applied where the state now is: two requests taken, one given back
        assert level(redis_cluster.nodes[target], "requests", ORG) == refilled(59, 60)
    finally:
        redis_cluster.flush()
        move_slot(redis_cluster, slot, target, source)
        redis_cluster.wait_ready()  # every node agrees again, for the tests after this one


def test_nodes_down_one_by_one_then_back(
    redis_cluster: RedisClusterServer, backends: list[RedisBackend]
) -> None:
    local, local_backend = make(
        redis_cluster, backends, prefetch=0, on_unavailable="local", retry_interval=0.05
    )
    failing, failing_backend = make(redis_cluster, backends, prefetch=0, retry_interval=0.05)
    for limiter in (local, failing):
        limiter.acquire_nowait(SONNET, input_tokens=1, max_tokens=1).release()  # through Redis
    # nothing left to send: no flusher thread loads the scripts again before the stop below
    assert local_backend.flush()
    assert failing_backend.flush()
    owner = redis_cluster.owner(local_backend.tag)
    other = (owner + 1) % len(redis_cluster.nodes)
    with redis_cluster.node_client(owner) as node:
        node.script_flush()
    redis_cluster.nodes[other].stop()
    try:
        # another organization's node is gone: this one's works, its scripts loaded where it lives
        with local.acquire_sync(SONNET, Demand(input_tokens=1, max_tokens=1)) as permit:
            assert permit._limiter is local
            permit.settle({"input_tokens": 1, "output_tokens": 1})
        assert local_backend.flush()
        assert stored(redis_cluster, local_backend, "requests") == refilled(59, 60)
        # its own node is gone, another answers: the caller's policy applies
        redis_cluster.nodes[owner].stop()
        message = (
            r"^Redis at redis://127\.0\.0\.1:\d+ \(cluster\) is unavailable "
            rf"\(ConnectionError: .*127\.0\.0\.1:{redis_cluster.nodes[owner].port}\b"
        )
        with pytest.raises(BackendUnavailable, match=message):
            failing.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)
        # no node at all: redis-py gives up on the cluster (RedisClusterException), an outage too
        for node in redis_cluster.nodes:
            node.stop()
        for _ in range(3):
            time.sleep(0.06)  # past retry_interval: Redis is tried again each time
            fallback = local.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)
            assert fallback._limiter is not local  # the local fallback
            fallback.release()
            with pytest.raises(BackendUnavailable, match=r"^Redis at .* \(cluster\) is unavailable"):
                failing.acquire_nowait(SONNET, input_tokens=1, max_tokens=1)
    finally:
        redis_cluster.rejoin()
    time.sleep(0.06)
    # back empty, without keys or scripts: the pool is made again, on the same node
    with local.acquire_sync(SONNET, Demand(input_tokens=1, max_tokens=1)) as permit:
        assert permit._limiter is local
        permit.settle({"input_tokens": 1, "output_tokens": 1})
    assert local_backend.flush()
    assert stored(redis_cluster, local_backend, "requests") == refilled(59, 60)
