"""``RedisBackend``'s configuration: the options' checks, the client's options, names for messages."""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import unquote

from ratekeeper.errors import ConfigurationError

__all__ = ["check_options", "client_options", "describe", "redact"]

POLICIES: Final = ("fail", "local")


def check_options(
    *,
    prefix: str,
    org: str,
    on_unavailable: str,
    fallback_fraction: float,
    flush_delay: float,
    prefetch: int,
    **seconds: float,
) -> None:
    """Raise ``ConfigurationError`` for the first option out of range (``seconds``: each > 0)."""
    if on_unavailable not in POLICIES:
        raise ConfigurationError(f"on_unavailable must be 'fail' or 'local', got {on_unavailable!r}")
    if not 0 < fallback_fraction <= 1:
        raise ConfigurationError(f"fallback_fraction must be in (0, 1], got {fallback_fraction!r}")
    for name, value in seconds.items():
        if not value > 0:
            raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
    if not flush_delay >= 0:
        raise ConfigurationError(f"flush_delay must be >= 0, got {flush_delay!r}")
    if type(prefetch) is not int or not 0 <= prefetch <= 1_000:
        raise ConfigurationError(f"prefetch must be an int from 0 to 1,000 (requests), got {prefetch!r}")
    for name, text in (("prefix", prefix), ("org", org)):
        if not text or any(c in text for c in "{}"):
            raise ConfigurationError(f"{name} must be a non-empty string without braces, got {text!r}")


def client_options(timeout: float) -> dict[str, Any]:
    """The options of a client made from a URL: ``timeout`` for every call, no retry of redis-py's own."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),  # our own policy decides what a failure means
        "decode_responses": True,
    }


def describe(client: Any) -> str:
    """``redis://host:port/db`` of a client, ``redis://host:port (cluster)`` of a cluster's, for messages."""
    try:
        kwargs = client.connection_pool.connection_kwargs
        return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
    except AttributeError:
        pass
    try:
        # a cluster client has no pool of its own: name the node it asks when no key decides
        node = client.get_default_node()
        return f"redis://{node.host}:{node.port} (cluster)"
    except AttributeError:
        return repr(client)


def redact(url: str) -> str:
    """The URL without its credentials, for messages, logs and ``repr``.

    redis-py takes a password in the userinfo (``redis://user:pw@host``) and in
    the query (``?password=pw``); both are masked, the user name is kept.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, q, query = rest.partition("?")
    userinfo, at, host = rest.rpartition("@")
    if at:
        user = userinfo.split(":", 1)[0]
        rest = f"{user + ':***' if user else '***'}@{host}"
    if q:
        fields = []
        for field in query.split("&"):
            key, eq, _ = field.partition("=")
            fields.append(f"{key}=***" if eq and unquote(key).lower() == "password" else field)
        rest = f"{rest}?{'&'.join(fields)}"
    return f"{scheme}://{rest}"
