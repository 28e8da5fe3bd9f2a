"""The strategies a simulation compares: how a program gates its calls to the SDK.

Each strategy gets a fresh ``httpx2.AsyncClient`` (talking to a fresh
emulator) and returns a ``Sender``: an async function that sends one planned
request through the official SDK, however the strategy decides to gate it,
and returns when the SDK has returned (or raises what the SDK raised).

- ``sdk``: the official SDK alone, with its built-in retries (2 by default).
- ``ratekeeper``: the same client wrapped with ``ratekeeper.anthropic.wrap``
  around a ``Limiter`` for the preset.
- ``rpm-only``: a leaky bucket at the RPM limit (what aiolimiter does), tokens ignored.
- ``fixed-window``: counters of requests, input and output tokens per calendar
  minute, reset at the minute boundary; input estimated from characters
  (3.5 per token, the docs' rule of thumb) and output reserved at
  ``max_tokens``, both corrected to the response's usage.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, final

import anthropic
import anyio
import attrs
import httpx2

from ratekeeper.core._accounting import OutputRule
from ratekeeper.core._presets import ModelLimits
from ratekeeper.gate._limiter import Limiter
from ratekeeper.simulate._workload import RequestPlan

__all__ = ["STRATEGIES", "Sender", "StrategyContext", "make_sender"]

#: Sends one planned request; returns when the SDK returned, raises what it raised.
Sender = Callable[[RequestPlan], Awaitable[None]]

_CHARS_PER_TOKEN: Final = 3.5
_API_KEY: Final = "sk-ant-simulated"


@final
@attrs.frozen(kw_only=True)
class StrategyContext:
    """What a strategy is built from: the limits it is told, the OTPM rule, the HTTP client."""

    preset: str
    model: str
    limits: ModelLimits
    output_rule: OutputRule
    http_client: httpx2.AsyncClient
    max_retries: int = 2
    #: ratekeeper's ``Limiter(opening=...)`` (``None``: its default)
    opening: float | None = None
    #: the preset ratekeeper's limiter is told, if not ``preset`` (it learns the rest)
    limiter_preset: str | None = None


def _client(ctx: StrategyContext) -> anthropic.AsyncAnthropic:
    client = anthropic.AsyncAnthropic(
        api_key=_API_KEY,
        base_url="https://api.anthropic.com",
        http_client=ctx.http_client,
        max_retries=ctx.max_retries,
    )
    return _on_loop(client)


def _on_loop(client: anthropic.AsyncAnthropic) -> anthropic.AsyncAnthropic:
    """Resolve the SDK's platform now, so that no request goes through a worker thread.

    The SDK looks its platform up in a worker thread on a client's first requests; a
    thread lets the virtual clock jump and makes the order of the first requests depend
    on thread timing. Every client (a ``with_middleware`` copy too) needs it done.
    """
    if getattr(client, "_platform", False) is None:
        from anthropic._base_client import get_platform

        client._platform = get_platform()
    return client


async def _call(client: anthropic.AsyncAnthropic, plan: RequestPlan) -> Any:
    """One SDK call for ``plan`` (streamed or not); returns the final message."""
    body: dict[str, Any] = dict(plan.body)
    if plan.stream:
        async with client.messages.stream(**body, extra_headers=plan.headers()) as stream:
            return await stream.get_final_message()
    return await client.messages.create(**body, extra_headers=plan.headers())


# ---------------------------------------------------------------------- sdk


def _sdk(ctx: StrategyContext) -> Sender:
    client = _client(ctx)

    async def send(plan: RequestPlan) -> None:
        await _call(client, plan)

    return send


# ---------------------------------------------------------------------- ratekeeper


def _ratekeeper(ctx: StrategyContext) -> Sender:
    from ratekeeper.anthropic import wrap

    preset = ctx.preset if ctx.limiter_preset is None else ctx.limiter_preset
    limiter = Limiter(preset, output_rule=ctx.output_rule, opening=ctx.opening)
    client = _on_loop(wrap(_client(ctx), limiter))

    async def send(plan: RequestPlan) -> None:
        await _call(client, plan)

    return send


# ---------------------------------------------------------------------- rpm-only


@final
class LeakyBucket:
    """aiolimiter's algorithm on anyio's clock: at most ``max_rate`` per ``time_period``.

    The bucket fills by one per acquisition and leaks continuously at
    ``max_rate / time_period``; an acquisition waits while it is full. Like
    aiolimiter, a burst of ``max_rate`` goes at once from an empty bucket.
    """

    __slots__ = ("_last", "_level", "_rate", "max_rate")

    def __init__(self, max_rate: float, time_period: float = 60.0) -> None:
        self.max_rate = float(max_rate)
        self._rate = max_rate / time_period
        self._level = 0.0
        self._last = -math.inf

    def _leak(self, now: float) -> None:
        if self._last > -math.inf:
            self._level = max(0.0, self._level - (now - self._last) * self._rate)
        self._last = now

    async def acquire(self) -> None:
        """Wait until one more fits, then take it."""
        while True:
            now = anyio.current_time()
            self._leak(now)
            if self._level + 1.0 <= self.max_rate + 1e-9:
                self._level += 1.0
                return
            await anyio.sleep((self._level + 1.0 - self.max_rate) / self._rate)


def _rpm_only(ctx: StrategyContext) -> Sender:
    client = _client(ctx)
    bucket = LeakyBucket(ctx.limits.rpm, 60.0)

    async def send(plan: RequestPlan) -> None:
        await bucket.acquire()
        await _call(client, plan)

    return send


# ---------------------------------------------------------------------- fixed-window


def _text_chars(value: object) -> int:
    """Characters of every string in a JSON value (what a chars-per-token estimate counts)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_text_chars(v) for k, v in value.items() if k not in ("type", "cache_control"))
    if isinstance(value, list | tuple):
        return sum(_text_chars(v) for v in value)
    return 0


@final
class FixedWindow:
    """Per-calendar-minute counters of requests, input and output tokens.

    ``admit`` waits for the next minute boundary while the current window
    can't take the request (a request alone in its window always goes, so an
    oversized one can't wait forever); ``correct`` replaces the estimate with
    the actual usage if the window it was counted in is still current.
    """

    __slots__ = ("_used", "_window", "limits")

    def __init__(self, rpm: float, itpm: float, otpm: float) -> None:
        self.limits = (float(rpm), float(itpm), float(otpm))
        self._window = -1
        self._used = [0.0, 0.0, 0.0]

    def _roll(self, now: float) -> int:
        window = math.floor(now / 60.0)
        if window != self._window:
            self._window = window
            self._used = [0.0, 0.0, 0.0]
        return window

    async def admit(self, input_tokens: float, output_tokens: float) -> int:
        """Count one request in the current window (waiting for a later one if full); returns the window."""
        need = (1.0, input_tokens, output_tokens)
        while True:
            now = anyio.current_time()
            window = self._roll(now)
            used = self._used
            empty = used[0] == 0.0
            if empty or all(u + n <= lim for u, n, lim in zip(used, need, self.limits, strict=True)):
                for i, n in enumerate(need):
                    used[i] += n
                return window
            await anyio.sleep((window + 1) * 60.0 - now)

    def correct(self, window: int, input_delta: float, output_delta: float) -> None:
        """Adjust the counts of ``window`` (if still current) by the estimate's error."""
        if window == self._window:
            self._used[1] = max(0.0, self._used[1] + input_delta)
            self._used[2] = max(0.0, self._used[2] + output_delta)


def _fixed_window(ctx: StrategyContext) -> Sender:
    client = _client(ctx)
    lim = ctx.limits
    window = FixedWindow(lim.rpm, lim.itpm, lim.otpm)

    async def send(plan: RequestPlan) -> None:
        est_in = math.ceil(_text_chars(plan.body.get("system")) / _CHARS_PER_TOKEN) + math.ceil(
            _text_chars(plan.body["messages"]) / _CHARS_PER_TOKEN
        )
        max_tokens = float(plan.body["max_tokens"])
        counted = await window.admit(est_in, max_tokens)
        try:
            message = await _call(client, plan)
        except anthropic.APIStatusError:
            window.correct(counted, -est_in, -max_tokens)  # refused: it used no tokens
            raise
        usage = message.usage
        actual_in = usage.input_tokens + (usage.cache_creation_input_tokens or 0)
        window.correct(counted, actual_in - est_in, usage.output_tokens - max_tokens)

    return send


#: Strategy name -> factory, in the order they are shown.
STRATEGIES: Final[Mapping[str, Callable[[StrategyContext], Sender]]] = {
    "sdk": _sdk,
    "ratekeeper": _ratekeeper,
    "rpm-only": _rpm_only,
    "fixed-window": _fixed_window,
}


def make_sender(name: str, ctx: StrategyContext) -> Sender:
    """Build strategy ``name``'s sender; raises ``KeyError`` for an unknown name."""
    return STRATEGIES[name](ctx)
