"""A real ``redis-server`` for tests: started on a free loopback port, stopped afterwards.

``tests/conftest.py`` exposes the ``redis_server`` fixture; benchmarks import
``RedisServer`` directly. ``redis_cluster`` forms a real Redis Cluster of three
such servers. Nothing is mocked: the Redis backend is tested against the
server it will meet in production.
"""

from __future__ import annotations

import itertools
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, TypeVar

import pytest
import redis
from redis.crc import key_slot

__all__ = ["RedisClusterServer", "RedisServer", "free_port", "redis_cluster", "redis_server"]

#: Redis Cluster's hash slots: 0 to 16,383.
SLOTS: Final = 16_384


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process without persistence, restartable on the same port."""

    def __init__(self, directory: Path, port: int | None = None, options: Sequence[str] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed: the Redis backend is tested against a real server. "
                "Install it with `apt-get install redis-server` (scripts/test does this)."
            )
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        #: more ``redis-server`` arguments, e.g. cluster mode's
        self.options = tuple(options)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING (at most 10 s)."""
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"redis-server exited at once with code {self.process.returncode}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        pytest.fail(f"redis-server did not answer PING on port {self.port} within 10 s")

    def ping(self) -> bool:
        """True if the server answers ``PING`` with ``+PONG``."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (its data is lost: nothing is saved)."""
        process = self.process
        if process is None:
            return
        self.process = None
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port: every key and script is gone."""
        self.stop()
        self.start()


class RedisClusterServer:
    """A Redis Cluster of ``size`` primaries without replicas, each a ``RedisServer`` on loopback.

    Node ``i`` owns the ``i``-th equal share of the slots (``ranges``), so a test can
    tell which node must hold a key without asking the cluster it is testing.
    """

    def __init__(self, directory: Path, size: int = 3) -> None:
        ports: list[int] = []
        while len(ports) < 2 * size:  # a client port and a cluster bus port per node, all distinct
            port = free_port()
            if port not in ports:
                ports.append(port)
        self.bus_ports = ports[size:]
        self.nodes = [
            RedisServer(
                directory,
                port,
                options=(
                    "--cluster-enabled",
                    "yes",
                    # the bus port is given: the default (port + 10,000) may be taken or out of range
                    "--cluster-port",
                    str(bus),
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                ),
            )
            for port, bus in zip(ports[:size], self.bus_ports, strict=True)
        ]
        bounds = [SLOTS * i // size for i in range(size + 1)]
        self.ranges = [(first, last - 1) for first, last in itertools.pairwise(bounds)]

    def start(self) -> None:
        """Start the servers, give each its slots, introduce them; wait until every node says ok (10 s)."""
        try:
            for node in self.nodes:
                node.start()
            admins = [self.node_client(i) for i in range(len(self.nodes))]
            for epoch, (admin, (first, last)) in enumerate(zip(admins, self.ranges, strict=True), start=1):
                # distinct epochs up front: no collision for the nodes to resolve first
                admin.cluster("SET-CONFIG-EPOCH", epoch)
                admin.cluster("ADDSLOTSRANGE", first, last)
            # every pair meets: gossip alone takes up to 2 s more to introduce the others
            for i, j in itertools.combinations(range(len(self.nodes)), 2):
                admins[i].cluster("MEET", "127.0.0.1", self.nodes[j].port, self.bus_ports[j])
            for admin in admins:
                admin.close()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self) -> None:
        """Wait until every node says ``cluster_state:ok`` and maps every slot as given (at most 10 s).

        A primary holds back "ok" for about 2 s after its first state check (Redis'
        CLUSTER_WRITABLE_DELAY): that, not the gossip, sets how long forming takes.
        """
        admins = [self.node_client(i) for i in range(len(self.nodes))]
        try:
            deadline = time.monotonic() + 10.0
            while not all(self._ready(admin) for admin in admins):
                if time.monotonic() > deadline:
                    states = [self._info(admin) for admin in admins]
                    pytest.fail(f"the Redis Cluster was not ready within 10 s: {states}")
                time.sleep(0.02)
        finally:
            for admin in admins:
                admin.close()

    def rejoin(self) -> None:
        """Start again every node stopped with ``nodes[i].stop()``; wait until the cluster is ready.

        Each comes back empty (no persistence) with its old slots: its cluster
        config file, kept in the directory, says what they were.
        """
        for node in self.nodes:
            if node.process is None:
                node.start()
        self.wait_ready()

    def _info(self, admin: redis.Redis) -> dict[str, str]:
        return dict(admin.cluster("INFO"))

    def _ready(self, admin: redis.Redis) -> bool:
        if self._info(admin).get("cluster_state") != "ok":
            return False
        # every slot where it was given: a slot moved by a test and moved back counts once all agree
        slots = sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in admin.cluster("SLOTS"))
        given = zip(self.ranges, self.nodes, strict=True)
        return slots == [(first, last, node.port) for (first, last), node in given]

    def stop(self) -> None:
        """Stop every node: their data is lost, their cluster config files stay (see ``rejoin``)."""
        for node in self.nodes:
            node.stop()

    def client(self) -> redis.RedisCluster:
        """A new ``redis.RedisCluster`` client that finds every node from the first."""
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, decode_responses=True)

    def node_client(self, i: int) -> redis.Redis:
        """A plain client of node ``i`` alone: what is stored there, whatever the cluster says."""
        return redis.Redis(host="127.0.0.1", port=self.nodes[i].port, decode_responses=True)

    def owner(self, key: str) -> int:
        """The index of the node that owns ``key``'s slot (by the slots given at start)."""
        slot = key_slot(key.encode())
        return next(i for i, (first, last) in enumerate(self.ranges) if first <= slot <= last)

    def flush(self) -> None:
        """Delete every key on every node (loaded scripts stay)."""
        for i in range(len(self.nodes)):
            with self.node_client(i) as admin:
                admin.flushall()


_Server = TypeVar("_Server", RedisServer, RedisClusterServer)


def _running(factory: Callable[[Path], _Server], prefix: str) -> Iterator[_Server]:
    """``factory(a new temporary directory)``, started; stopped and its directory removed after."""
    with tempfile.TemporaryDirectory(prefix=prefix) as directory:
        server = factory(Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh ``redis-server`` for one test; ``.url``, ``.stop()``, ``.start()``, ``.restart()``."""
    yield from _running(RedisServer, "ratekeeper-redis-")


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterServer]:
    """A three-node Redis Cluster shared by one test module (forming one takes about 2 s).

    Tests call ``.flush()`` to start from no keys; ``.client()`` is a ``redis.RedisCluster``.
    """
    yield from _running(RedisClusterServer, "ratekeeper-redis-cluster-")
