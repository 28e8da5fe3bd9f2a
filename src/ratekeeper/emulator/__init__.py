"""An emulator of the Anthropic API's rate limiting, to test clients against.

The core, :class:`EmulatedServer`, is a pure model that takes time as an
argument. :class:`EmulatorTransport` plugs it into the official SDK's HTTP
client (async and sync), and :func:`serve` runs it as a real HTTP server on
loopback. See ``docs/emulator.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ratekeeper.emulator._clock import Clock, RealClock, VirtualClock
from ratekeeper.emulator._config import (
    DEFAULT_EPOCH,
    AccelerationLimit,
    EmulatorConfig,
    ForeignTraffic,
    LatencyModel,
    PoolLimits,
    UnifiedConfig,
    WalletConfig,
)
from ratekeeper.emulator._http import EmulatorHTTPServer, serve
from ratekeeper.emulator._log import RequestRecord
from ratekeeper.emulator._models import Price
from ratekeeper.emulator._server import EmulatedServer
from ratekeeper.emulator._tokens import count_text
from ratekeeper.emulator._wire import EmulatorRequest, Reply, SseEvent

if TYPE_CHECKING:
    from ratekeeper.emulator._transport import EmulatorTransport

__all__ = [
    "DEFAULT_EPOCH",
    "AccelerationLimit",
    "Clock",
    "EmulatedServer",
    "EmulatorConfig",
    "EmulatorHTTPServer",
    "EmulatorRequest",
    "EmulatorTransport",
    "ForeignTraffic",
    "LatencyModel",
    "PoolLimits",
    "Price",
    "RealClock",
    "Reply",
    "RequestRecord",
    "SseEvent",
    "UnifiedConfig",
    "VirtualClock",
    "WalletConfig",
    "count_text",
    "serve",
]


def __getattr__(name: str) -> object:
    # The transport needs httpx2 (the ``anthropic`` extra); the rest of the emulator does not.
    if name == "EmulatorTransport":
        try:
            from ratekeeper.emulator._transport import EmulatorTransport
        except ImportError as exc:
            from ratekeeper.errors import MissingDependency

            raise MissingDependency("httpx2", "anthropic") from exc
        return EmulatorTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
