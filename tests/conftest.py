"""Shared fixtures."""

from __future__ import annotations

import pytest

# a real redis-server on a free port, for the Redis backend's tests
from redis_server import redis_server  # noqa: F401
from trio.testing import MockClock


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """Run ``@pytest.mark.anyio`` tests on asyncio and on trio with an autojumping ``MockClock``."""
    if request.param == "trio":
        return ("trio", {"clock": MockClock(autojump_threshold=0)})
    return "asyncio"
