"""Run a scenario: every strategy against a fresh emulator, on trio's virtual clock.

Each strategy runs in its own ``trio.run`` with ``MockClock(autojump_threshold=0)``:
whenever every task is waiting, the clock jumps to the next deadline, so
minutes of traffic take seconds of wall time and the run is deterministic
for a given seed. Requests go through the official SDK and an
``httpx2.AsyncClient`` whose transport is the in-process emulator, wrapped
to note when each attempt reached the server.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, cast, final

import anthropic
import anyio
import attrs
import httpx2
from anyio.abc import TaskGroup

from ratekeeper.core._accounting import OutputRule
from ratekeeper.core._presets import limits_for
from ratekeeper.emulator import (
    EmulatedServer,
    EmulatorConfig,
    EmulatorTransport,
    ForeignTraffic,
    LatencyModel,
)
from ratekeeper.emulator._config import REPORT_MOMENTS, ReportMoment
from ratekeeper.errors import ConfigurationError
from ratekeeper.simulate._metrics import DIMENSIONS, Attempt, Outcome, StrategyResult, bind, summarize
from ratekeeper.simulate._strategies import STRATEGIES, Sender, StrategyContext, make_sender
from ratekeeper.simulate._workload import SIM_ID_HEADER, Workload, WorkloadGenerator

__all__ = [
    "DEFAULT_STRATEGIES",
    "Progress",
    "Scenario",
    "SimulationResult",
    "concurrency_to_reach",
    "simulate",
]

#: Every strategy, in the order they are shown.
DEFAULT_STRATEGIES: Final = tuple(STRATEGIES)
#: Called as ``progress(strategy, simulated_seconds_done, simulated_seconds_total)``.
Progress = Callable[[str, float, float], None]


def concurrency_to_reach(preset: str, workload: Workload, *, overload: float = 2.0, minimum: int = 8) -> int:
    """Workers that ask for about ``overload`` times what ``preset`` allows ``workload``'s requests.

    Each worker sends back to back, one request per emulated latency (time to
    first token plus the mean output at the emulator's default speed); the
    preset allows, per minute, the fewest requests of its three limits. At
    least ``minimum`` (8 for Tier 1, whose limits 8 workers already exceed about
    twice over). A limit the workload never reaches shows every strategy alike.

    >>> concurrency_to_reach("tier-1", Workload()), concurrency_to_reach("tier-4", Workload())
    (8, 236)
    """
    lim = limits_for(preset, workload.model)
    latency = LatencyModel()
    output = workload.max_tokens * workload.output_ratio
    seconds = latency.ttft + output / latency.tokens_per_second
    uncached = workload.prompt_tokens - (0 if lim.cache_reads_count else workload.cached_prefix_tokens)
    per_minute = min(lim.rpm, lim.itpm / max(1.0, uncached), lim.otpm / max(1.0, output))
    return max(minimum, math.ceil(overload * per_minute * seconds / 60.0))


def _strategies(value: Sequence[str] | str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in value.split(",")) if isinstance(value, str) else tuple(value)
    return tuple(n for n in names if n)


@final
@attrs.frozen(kw_only=True)
class Scenario:
    """A simulation: the server's limits and rules, the workload, and the strategies to compare.

    ``preset`` and the workload's model give the limits (the emulator enforces
    them; every strategy is told the same preset). ``enforcement_interval`` is
    how many seconds of burst the server's buckets hold (60: a full minute; 1:
    "60 RPM enforced as 1 per second"). ``output_rule`` is how the server counts
    OTPM (``max_tokens`` reserved at the start, or ``actual`` tokens as
    produced); the ratekeeper strategy is told the same rule.
    ``foreign_traffic`` is the fraction of every limit other clients of the
    organization use, steadily. ``report_moment`` is the moment the server's
    non-streamed headers describe (``admission``, ``response`` or ``mixed``:
    see :class:`~ratekeeper.emulator.EmulatorConfig`). ``opening`` is given to
    ratekeeper's limiter (``Limiter(opening=...)``: seconds of the limit its
    buckets hold until a report shows the server's; ``None``: the limiter's default).
    ``limiter_preset``, if given, is the preset ratekeeper's limiter is told instead of
    ``preset`` (a user who does not know their tier): it learns the server's limits from
    the ``-limit`` headers. The other strategies are told ``preset``.
    ``uplink`` is the longest time a request takes to reach the server after it is sent
    (each draws its own, from 0 to ``uplink``: see :class:`~ratekeeper.emulator.LatencyModel`).
    After ``minutes`` no new request starts;
    requests under way get up to ``drain_seconds`` to finish.
    """

    preset: str = "tier-1"
    workload: Workload = attrs.field(factory=Workload)
    minutes: float = 10.0
    enforcement_interval: float = 60.0
    output_rule: str = "max_tokens"
    foreign_traffic: float = 0.0
    report_moment: str = "admission"
    opening: float | None = None
    limiter_preset: str | None = None
    uplink: float = 0.0
    strategies: tuple[str, ...] = attrs.field(default=DEFAULT_STRATEGIES, converter=_strategies)
    max_retries: int = 2
    drain_seconds: float = 120.0
    sample_step: float = 1.0

    def __attrs_post_init__(self) -> None:
        if not self.minutes > 0:
            raise ConfigurationError(f"minutes must be positive, got {self.minutes!r}")
        if not self.enforcement_interval > 0:
            raise ConfigurationError(
                f"enforcement_interval must be positive, got {self.enforcement_interval!r}"
            )
        if self.output_rule not in ("max_tokens", "actual"):
            raise ConfigurationError(
                f"output_rule must be 'max_tokens' or 'actual', got {self.output_rule!r}"
            )
        if self.opening is not None and not 0 < self.opening <= 60:
            raise ConfigurationError(f"opening must be in (0, 60] seconds, got {self.opening!r}")
        if self.report_moment not in REPORT_MOMENTS:
            raise ConfigurationError(
                f"report_moment must be one of {', '.join(REPORT_MOMENTS)}, got {self.report_moment!r}"
            )
        if not 0 <= self.uplink <= 60:
            raise ConfigurationError(f"uplink must be in [0, 60] seconds, got {self.uplink!r}")
        if not 0 <= self.foreign_traffic < 1:
            raise ConfigurationError(f"foreign_traffic must be in [0, 1), got {self.foreign_traffic!r}")
        if not self.strategies:
            raise ConfigurationError("give at least one strategy")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise ConfigurationError(f"unknown strategy {unknown[0]!r}; choose from: {', '.join(STRATEGIES)}")
        if self.max_retries < 0:
            raise ConfigurationError(f"max_retries must be >= 0, got {self.max_retries!r}")
        limits_for(self.preset, self.workload.model)  # an unknown preset or model fails here, clearly
        if self.limiter_preset is not None:
            limits_for(self.limiter_preset, self.workload.model)

    @property
    def duration(self) -> float:
        """Simulated seconds during which requests start."""
        return self.minutes * 60.0

    def emulator_config(self) -> EmulatorConfig:
        """The emulator's configuration for this scenario (each strategy gets a fresh server)."""
        lim = limits_for(self.preset, self.workload.model)
        f = self.foreign_traffic
        foreign = (
            (ForeignTraffic(pool=lim.pool, rpm=f * lim.rpm, itpm=f * lim.itpm, otpm=f * lim.otpm),)
            if f > 0
            else ()
        )
        return EmulatorConfig(
            preset=self.preset,
            enforcement_interval=self.enforcement_interval,
            otpm_rule="max_tokens" if self.output_rule == "max_tokens" else "actual",
            report_moment=cast(ReportMoment, self.report_moment),
            seed=self.workload.seed,
            latency=LatencyModel(uplink=self.uplink),
            foreign=foreign,
            monthly_spend_cap_usd=math.inf,  # the spend cap is not what a throughput run measures
        )


@final
@attrs.frozen
class SimulationResult:
    """The results of a scenario, one ``StrategyResult`` per strategy in the order asked."""

    scenario: Scenario
    results: tuple[StrategyResult, ...]
    limits: dict[str, float]
    capacity: dict[str, float]
    pool: str

    def __getitem__(self, strategy: str) -> StrategyResult:
        for r in self.results:
            if r.strategy == strategy:
                return r
        raise KeyError(strategy)

    @property
    def binding_dimension(self) -> str:
        """The dimension the workload fills first (the same for every strategy)."""
        return self.results[0].binding_dimension if self.results else ""


class _RecordingTransport(httpx2.AsyncBaseTransport):
    """Forwards to the emulator and notes every attempt: request number, time, status, request id."""

    def __init__(self, inner: EmulatorTransport, origin: float) -> None:
        self._inner = inner
        self._origin = origin
        self.attempts: list[Attempt] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        raw = request.headers.get(SIM_ID_HEADER)
        index = int(raw) if raw is not None and raw.isdigit() else -1
        sent_at = anyio.current_time() - self._origin
        response = await self._inner.handle_async_request(request)
        self.attempts.append(
            Attempt(index, sent_at, response.status_code, response.headers.get("request-id"))
        )
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Run:
    """One strategy's run inside trio: workers, arrivals, a sampler, and what they collected."""

    def __init__(
        self, scenario: Scenario, strategy: str, gen: WorkloadGenerator, progress: Progress | None
    ) -> None:
        self.scenario = scenario
        self.strategy = strategy
        self.gen = gen
        self.progress = progress
        self.server = EmulatedServer(scenario.emulator_config())
        self.lim = limits_for(scenario.preset, scenario.workload.model)
        self.outcomes: list[Outcome] = []
        self.level_times: list[float] = []
        self.levels: dict[str, list[float]] = {d: [] for d in DIMENSIONS}
        self.counter = itertools.count()
        self.started = 0
        self.origin = 0.0

    def now(self) -> float:
        return anyio.current_time() - self.origin

    async def main(self) -> tuple[_RecordingTransport, int]:
        self.origin = anyio.current_time()
        transport = _RecordingTransport(EmulatorTransport(self.server, origin=self.origin), self.origin)
        sc = self.scenario
        async with httpx2.AsyncClient(transport=transport) as http:
            ctx = StrategyContext(
                preset=sc.preset,
                model=sc.workload.model,
                limits=self.lim,
                output_rule=OutputRule(sc.output_rule),
                http_client=http,
                max_retries=sc.max_retries,
                opening=sc.opening,
                limiter_preset=sc.limiter_preset,
            )
            send = make_sender(self.strategy, ctx)
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._sample)
                with anyio.move_on_after(sc.duration + sc.drain_seconds):
                    async with anyio.create_task_group() as tg:
                        for _ in range(sc.workload.concurrency):
                            tg.start_soon(self._worker, send)
                        if sc.workload.arrival_rate > 0:
                            tg.start_soon(self._arrivals, tg, send)
                outer.cancel_scope.cancel()
        return transport, self.started - len(self.outcomes)

    async def _one(self, send: Sender, index: int) -> None:
        wanted = self.now()
        self.started += 1
        try:
            await send(self.gen.request(index))
        except anthropic.APIStatusError as exc:
            self.outcomes.append(Outcome(index, wanted, False, f"{exc.status_code} {type(exc).__name__}"))
        except anthropic.APIError as exc:
            self.outcomes.append(Outcome(index, wanted, False, type(exc).__name__))
        else:
            self.outcomes.append(Outcome(index, wanted, True))

    async def _worker(self, send: Sender) -> None:
        while self.now() < self.scenario.duration:
            await self._one(send, next(self.counter))

    async def _arrivals(self, tg: TaskGroup, send: Sender) -> None:
        w = self.scenario.workload
        rng = random.Random(f"arrivals-{w.seed}")
        rate = w.arrival_rate / 60.0
        while True:
            await anyio.sleep(rng.expovariate(rate))
            if self.now() >= self.scenario.duration:
                return
            tg.start_soon(self._one, send, next(self.counter))

    async def _sample(self) -> None:
        """Bucket levels every ``sample_step`` seconds until the run is over, and progress."""
        sc = self.scenario
        step = sc.sample_step
        total = sc.duration
        k = 0
        while True:
            t = k * step
            await anyio.sleep_until(self.origin + t)
            if t <= total:
                pools = self.server.pools()
                if self.lim.pool in pools:
                    self.level_times.append(t)
                    for d in DIMENSIONS:
                        cap = self.server.capacity(self.lim.pool, d)
                        self.levels[d].append(self.server.level(self.lim.pool, d, t) / cap)
                if self.progress is not None:
                    self.progress(self.strategy, min(t, total), total)
            k += 1


@contextlib.contextmanager
def _repeatable(seed: int) -> Iterator[None]:
    """Make a run repeatable: seed the SDK's retry jitter and trio's scheduling order.

    (The SDK's deprecation warning for older models, given on every call, is silenced too.)

    The SDK draws its jitter from the global ``random``; trio picks the order
    of tasks woken together at random (and, under Hypothesis, from a seeded
    generator in task-creation order, which is the switch used here). Both
    are put back afterwards. Without trio's switch (a future trio), runs
    still work but ties between tasks may resolve differently run to run.
    """
    import trio

    core: Any = getattr(getattr(trio, "_core", None), "_run", None)
    rng: Any = getattr(core, "_r", None)
    flag = getattr(core, "_ALLOW_DETERMINISTIC_SCHEDULING", None)
    switch = isinstance(rng, random.Random) and isinstance(flag, bool)
    saved = random.getstate()
    saved_trio = rng.getstate() if switch else None
    random.seed(f"sdk-jitter-{seed}")
    if switch:
        rng.seed(f"trio-{seed}")
        core._ALLOW_DETERMINISTIC_SCHEDULING = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"The model .* is deprecated", DeprecationWarning)
            yield
    finally:
        random.setstate(saved)
        if switch:
            rng.setstate(saved_trio)
            core._ALLOW_DETERMINISTIC_SCHEDULING = flag


def _run_strategy(
    scenario: Scenario, strategy: str, gen: WorkloadGenerator, progress: Progress | None
) -> StrategyResult:
    import trio
    from trio.testing import MockClock

    run = _Run(scenario, strategy, gen, progress)
    wall = time.perf_counter()
    with _repeatable(scenario.workload.seed):
        transport, unfinished = trio.run(run.main, clock=MockClock(autojump_threshold=0))
    server = run.server
    server.advance(server.now + 3600.0)  # settle everything still pending in the server's model
    pool = run.lim.pool
    limits = {d: float(v) for d, v in server.limits(pool).items()} if pool in server.pools() else {}
    duration = scenario.duration
    allowed = {d: server.allowed_in_window(pool, d, 0.0, duration) for d in limits}
    return summarize(
        strategy,
        records=server.log,
        attempts=transport.attempts,
        outcomes=run.outcomes,
        unfinished=unfinished,
        duration=duration,
        limits=limits,
        allowed=allowed,
        output_rule=scenario.output_rule,
        level_times=run.level_times,
        levels=run.levels,
        step=scenario.sample_step,
        wall_s=time.perf_counter() - wall,
    )


def simulate(scenario: Scenario | None = None, *, progress: Progress | None = None) -> SimulationResult:
    """Run every strategy of ``scenario`` (default: ``Scenario()``) and return their results.

    Needs the ``cli`` extra (trio, the SDK). Each strategy runs against a fresh
    emulator with the same seeded workload.
    """
    scenario = scenario if scenario is not None else Scenario()
    gen = WorkloadGenerator(scenario.workload)
    results = [_run_strategy(scenario, name, gen, progress) for name in scenario.strategies]
    lim = limits_for(scenario.preset, scenario.workload.model)
    limits = {"requests": float(lim.rpm), "input_tokens": float(lim.itpm), "output_tokens": float(lim.otpm)}
    capacity = {d: v * scenario.enforcement_interval / 60.0 for d, v in limits.items()}
    return SimulationResult(scenario, bind(results), limits, capacity, lim.pool)
