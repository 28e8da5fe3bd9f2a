"""A Redis password never reaches a log line, an exception's message or ``repr(backend)``."""

from __future__ import annotations

import logging
import socket

import pytest

from ratekeeper import BackendUnavailable, Limiter, RedisBackend
from ratekeeper.redis._config import redact

SECRET = "hunter2"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@h:6379/0", "redis://***@h:6379/0"),
        ("redis://app:hunter2@h:6379/0", "redis://app:***@h:6379/0"),
        ("redis://h:6379/0?password=hunter2", "redis://h:6379/0?password=***"),
        (
            "redis://h/0?socket_timeout=1&Password=hunter2&db=2",
            "redis://h/0?socket_timeout=1&Password=***&db=2",
        ),
        ("rediss://u:hunter2@h/0?password=hunter2", "rediss://u:***@h/0?password=***"),
        ("unix://:hunter2@/tmp/redis.sock?db=0", "unix://***@/tmp/redis.sock?db=0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_every_credential_form_is_masked(url: str, shown: str) -> None:
    assert redact(url) == shown


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.anyio
@pytest.mark.parametrize(
    "url",
    ["redis://app:{s}@127.0.0.1:{p}/0", "redis://127.0.0.1:{p}/0?password={s}"],
)
async def test_an_unreachable_redis_is_named_without_its_password(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = RedisBackend(url.format(s=SECRET, p=_closed_port()), timeout=0.2, retry_interval=5.0)
    try:
        limiter = Limiter("tier-1", opening=60.0, backend=backend)
        with caplog.at_level(logging.DEBUG), pytest.raises(BackendUnavailable) as raised:
            async with limiter.acquire("claude-sonnet-4-5", input_tokens=1, max_tokens=1):
                pytest.fail("admitted")
        assert "127.0.0.1" in str(raised.value)
        assert SECRET not in str(raised.value)
        assert SECRET not in caplog.text
        assert SECRET not in repr(backend)
    finally:
        backend.close()
