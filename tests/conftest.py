"""Shared fixtures."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

# a real redis-server on a free port, for the Redis backend's tests
from redis_server import redis_server  # noqa: F401
from trio.testing import MockClock

if TYPE_CHECKING:
    from ratekeeper import RedisBackend

# The gate's clock (ratekeeper.gate._clock.GateClock) runs shifted by this much in every test,
# as trio's SystemClock does: the shift changes nothing the gate does, so a stray
# time.monotonic() mixed with its times is what fails. Set it to reproduce a run.
os.environ.setdefault("RATEKEEPER_CLOCK_OFFSET", f"{random.choice((-1, 1)) * random.uniform(1e4, 1e7):.3f}")


# Hypothesis times each example (200 ms by default) and checks how fast data is drawn: both
# are wall-clock assertions, and a loaded CI machine fails them at random. Speed is measured in
# benchmarks/, so the suite asks neither.
settings.register_profile("ratekeeper", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ratekeeper")


def pytest_report_header() -> str:
    return f"RATEKEEPER_CLOCK_OFFSET={os.environ['RATEKEEPER_CLOCK_OFFSET']}"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """Run ``@pytest.mark.anyio`` tests on asyncio and on trio with an autojumping ``MockClock``."""
    if request.param == "trio":
        return ("trio", {"clock": MockClock(autojump_threshold=0)})
    return "asyncio"


@pytest.fixture
def backends() -> Iterator[list[RedisBackend]]:
    """Redis backends made by a test, closed after it (their flusher threads stop)."""
    made: list[RedisBackend] = []
    yield made
    for b in made:
        b.close()
