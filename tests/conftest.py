"""Shared fixtures."""

from __future__ import annotations

import pytest
from trio.testing import MockClock


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """Run ``@pytest.mark.anyio`` tests on asyncio and on trio with an autojumping ``MockClock``."""
    if request.param == "trio":
        return ("trio", {"clock": MockClock(autojump_threshold=0)})
    return "asyncio"
