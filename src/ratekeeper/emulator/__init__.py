"""An emulator of the Anthropic API's rate limiting, to test clients against.

The core, :class:`EmulatedServer`, is a pure model that takes time as an
argument. :class:`EmulatorTransport` plugs it into the official SDK's HTTP
client (async and sync), and :func:`serve` runs it as a real HTTP server on
loopback. See ``docs/emulator.md``.
"""

from __future__ import annotations

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
from ratekeeper.emulator._transport import Clock, EmulatorTransport, RealClock, VirtualClock
from ratekeeper.emulator._wire import EmulatorRequest, Reply, SseEvent

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
